"""Recipes, overrides, validation and the data-dir resolution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nli.errors import ConfigError
from training.config import REPO_ROOT, TrainingConfig, expand_source, parse_slice, snli_dir
from training.recipe import RECIPES_DIR, SECTIONS, load_config, recipe_names, resolve_recipe


def test_shipped_recipes_load() -> None:
    assert recipe_names() == ["qwen2.5-1.5b-snli", "smollm2-135m-snli", "smollm2-135m-snli-fast"]
    smollm = load_config("smollm2-135m-snli")
    assert smollm.model.base_model == "smollm2-135m-instruct"
    assert smollm.data.train_file == "{snli_dir}/train.jsonl"
    assert smollm.data.dev_rows == ":2000"
    assert smollm.lora.target_modules == "all-linear"
    qwen = load_config("qwen2.5-1.5b-snli")
    assert qwen.model.base_model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (qwen.data.train_file, qwen.data.dev_split) == ("stanfordnlp/snli", "validation")
    assert smollm.output_dir() == Path("outputs") / "smollm2-135m-snli"
    fast = load_config("smollm2-135m-snli-fast")
    assert (fast.data.dev_rows, fast.data.extra_train_from_dev) == (":2000", None)
    assert (fast.train.batch_size, fast.model.dequantize_frozen) == (512, True)


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_field_is_set_and_commented(name: str) -> None:
    path = RECIPES_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, cls in SECTIONS.items():
        assert set(raw[section]) == set(cls.__dataclass_fields__), section
    for line in path.read_text().splitlines():
        if re.match(r"^\s+\w+:", line):
            assert " # " in line, f"{name}: uncommented field: {line.strip()}"


def test_overrides_are_coerced_to_field_types() -> None:
    cfg = load_config(
        "smollm2-135m-snli",
        [
            "train.learning_rate=3e-4",
            "train.batch_size=32",
            "train.max_steps=100",
            "train.group_by_length=false",
            "lora.target_modules=q_proj,v_proj",
            "lora.dropout=0.1",
            "data.extra_train_from_dev=2000:",
            "eval.test_file={snli_dir}/test.jsonl",
            "eval.early_stopping_patience=null",
            "train.precision=bf16",
            "name=sweep-1",
        ],
        output="/tmp/out",
    )
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 32 and cfg.train.max_steps == 100
    assert cfg.train.group_by_length is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.extra_train_from_dev == "2000:"
    assert cfg.eval.test_file == "{snli_dir}/test.jsonl"
    assert cfg.eval.early_stopping_patience is None
    assert cfg.train.precision == "bf16"
    assert cfg.name == "sweep-1"
    assert cfg.output_dir() == Path("/tmp/out")


def test_a_single_target_module_stays_a_name() -> None:
    cfg = load_config("smollm2-135m-snli", ["lora.target_modules=q_proj"])
    assert cfg.lora.target_modules == "q_proj"
    from training.model import lora_config

    assert lora_config(cfg.lora).target_modules == {"q_proj"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.learnin_rate=1e-4",
            "unknown key train.learnin_rate (did you mean 'learning_rate'?)",
        ),
        ("trian.epochs=1", "unknown recipe section 'trian' (did you mean 'train'?)"),
        ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
        ("train.batch_size=0", "train.batch_size must be positive"),
        ("train.epochs=2.5.1", "train.epochs: expected a number"),
        ("train.group_by_length=maybe", "expected true or false"),
        ("train.precision=fp16", "train.precision must be one of auto, bf16, fp32"),
        ("lora.dropout=1.5", "lora.dropout must be in [0, 1)"),
        ("train.loraplus_lr_ratio=0.5", "train.loraplus_lr_ratio must be >= 1 or null"),
        ("model.quantization=int8", "model.quantization must be one of nf4, none"),
        ("model.device=gpu", "model.device must be auto, cpu, cuda or cuda:N"),
        ("data.dev_rows=2000", "data.dev_rows: expected 'start:stop'"),
        ("data.extra_train_from_dev=1500:", "overlaps data.dev_rows"),
        ("eval.strategy=never", "eval.strategy must be one of epoch, steps"),
        ("eval.collapse_accuracy=2", "eval.collapse_accuracy must be in (0, 1)"),
        ("learning_rate=1", "bad override key 'learning_rate'"),
        ("train.learning_rate", "bad override 'train.learning_rate'"),
        ("a.b.c=1", "bad override key 'a.b.c'"),
    ],
)
def test_bad_values_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("smollm2-135m-snli", [override])
    assert message in info.value.message


def test_recipe_files_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 1\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(str(path))
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(str(path))
    path.write_text("train: {epochs: 1\n")
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_config(str(path))
    path.write_text("lora: {r: 4}\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.lora.r == 4 and cfg.train.epochs == 3.0
    with pytest.raises(ConfigError, match="shipped recipes: qwen2.5-1.5b-snli, smollm2"):
        load_config("no-such-recipe")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_recipe(str(tmp_path / "missing.yaml"))


def test_defaults_are_a_valid_config() -> None:
    assert isinstance(TrainingConfig(), TrainingConfig)


def test_snli_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NLI_SNLI_DIR", raising=False)
    assert snli_dir() == REPO_ROOT.parent / "shared" / "data" / "snli"
    monkeypatch.setenv("NLI_SNLI_DIR", str(tmp_path))
    assert snli_dir() == tmp_path
    assert expand_source("{snli_dir}/dev.jsonl") == f"{tmp_path}/dev.jsonl"
    assert expand_source("stanfordnlp/snli") == "stanfordnlp/snli"


def test_parse_slice() -> None:
    assert parse_slice(":2000", name="x") == slice(None, 2000)
    assert parse_slice("2000:", name="x") == slice(2000, None)
    assert parse_slice("10:20", name="x") == slice(10, 20)
    with pytest.raises(ConfigError, match="non-negative"):
        parse_slice("-5:", name="x")
