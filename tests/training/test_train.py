"""Training end to end on a tiny model: learning, reports, round trip, resume, atomic output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from nli.classifier import NLIClassifier
from nli.data import read_nli_file
from nli.errors import ConfigError
from nli.loading import is_4bit, load_base_model
from nli.manifest import MANIFEST_FILE, WEIGHTS_FILE, adapter_size_bytes, read_manifest
from nli.prompt import PairEncoder, get_prompt_format
from nli.scoring import collate, label_logits, label_tokens
from tests.compile_backends import RecordingBackend
from training import train as train_module
from training.model import LabelScoringModel, prepare_base
from training.recipe import load_config
from training.train import run_training
from training.trainer import TrainingCollapsedError

from .conftest import RecipeWriter


class CaptureModel(TrainerCallback):
    """Keeps the trained (best) model as Trainer leaves it, to compare with the saved adapter."""

    model: Any = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model = kwargs["model"]


@dataclass
class Trained:
    output: Path
    report: dict[str, Any]
    model: LabelScoringModel
    recipe: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_recipe: RecipeWriter) -> Trained:
    folder = tmp_path_factory.mktemp("run")
    test_file = Path(load_config(tiny_recipe(folder)).data.train_file).with_name("test.jsonl")
    recipe = tiny_recipe(folder, eval={"test_file": str(test_file)})
    capture = CaptureModel()
    output = run_training(load_config(recipe), callbacks=[capture], progress=False)
    assert output is not None
    report = json.loads((output / "report.json").read_text())
    return Trained(output, report, capture.model, recipe)


def test_learns_the_synthetic_task(trained: Trained) -> None:
    dev = trained.report["dev"]
    assert dev["metrics"]["accuracy"] >= 0.9  # chance is 1/3
    assert dev["base"]["metrics"]["accuracy"] < 0.6
    assert trained.report["test"]["metrics"]["accuracy"] >= 0.9
    assert trained.report["training"]["best_dev_accuracy"] >= 0.9


def test_report_fields_are_present_and_plausible(trained: Trained) -> None:
    report, output = trained.report, trained.output
    training = report["training"]
    # 320 train rows + dev[96:] (64 rows), 2 epochs, batch 16.
    assert report["data"]["train_examples"] == 384
    assert report["data"]["extra_train_from_dev"] == 64
    assert report["data"]["dev_examples"] == 96
    assert training["steps"] == 48
    assert training["examples_seen"] == 768
    assert training["examples_per_s"] > 0
    assert 0 < training["train_seconds"] <= training["wall_seconds"]
    assert training["resumed_from"] is None
    trainable, total = trained.model.get_nb_trainable_parameters()
    params = report["parameters"]
    assert (params["trainable"], params["total"]) == (trainable, total)
    assert params["trainable_percent"] == pytest.approx(100 * trainable / total, abs=1e-12)
    assert 0 < params["trainable_percent"] < 100
    memory = report["memory"]
    assert memory["kind"] == "cpu_peak_rss" and memory["bytes"] > 50 * 2**20
    weights = (output / WEIGHTS_FILE).stat().st_size
    assert weights < report["adapter_size_bytes"] < adapter_size_bytes(output)
    assert report["config"]["lora"]["r"] == 8
    assert report["environment"]["world_size"] == 1
    for split in ("dev", "test"):
        for name in ("report.json", "report.md", "confusion_matrix.png"):
            assert (output / "eval" / split / name).is_file()
        cases = report[split]["cases"]
        assert sum(c["count"] for c in cases.values()) <= report[split]["n"]
    markdown = (output / "report.md").read_text()
    assert "trainable" in markdown and "examples/s" in markdown and "Dev evaluation" in markdown


def test_manifest_describes_the_adapter(trained: Trained) -> None:
    manifest = read_manifest(trained.output)
    assert manifest.base_model == load_config(trained.recipe).model.base_model
    assert manifest.quantization == "nf4"
    assert manifest.lora["r"] == 8 and "q_proj" in manifest.lora["target_modules"]
    assert manifest.metrics["dev"]["accuracy"] == trained.report["dev"]["metrics"]["accuracy"]
    assert manifest.metrics["test_base"]["accuracy"] < manifest.metrics["test"]["accuracy"]
    assert manifest.training_data["train_examples"] == 384
    assert manifest.license == "synthetic test data"
    assert (trained.output / MANIFEST_FILE).is_file()


def test_checkpoints_are_removed_after_success(trained: Trained) -> None:
    work = trained.output.with_name(trained.output.name + ".work")
    assert (work / "config.json").is_file()
    assert get_last_checkpoint(str(work)) is None


def test_reloaded_adapter_scores_like_the_trained_model(trained: Trained) -> None:
    cfg = load_config(trained.recipe)
    dev = read_nli_file(Path(cfg.data.dev_file))
    pairs = [(e.premise, e.hypothesis) for e in dev.examples[:48]]
    manifest = read_manifest(trained.output)
    # A fresh base prepared as for training (same kernels, same float32 norms) plus the folder
    # gives exactly the logits of the model Trainer left in memory.
    base = load_base_model(cfg.model.base_model, device="cpu", for_training=True)
    base.model = prepare_base(base.model, cfg.model)
    reloaded = PeftModel.from_pretrained(base.model, str(trained.output)).eval()
    encoder = PairEncoder(
        base.tokenizer, get_prompt_format(manifest.prompt_format), max_length=cfg.model.max_length
    )
    batch = collate(encoder.encode(pairs), pad_id=base.tokenizer.pad_token_id)
    tokens = label_tokens(base.tokenizer)
    assert [list(seq) for seq in tokens.sequences] == manifest.label_token_ids
    with torch.no_grad():
        got = label_logits(reloaded, batch, tokens)
        expected = trained.model.eval()(batch.input_ids, batch.attention_mask, batch.last_index)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The service's loader takes the same folder and predicts the same labels.
    serving = load_base_model(cfg.model.base_model, device="cpu", for_training=True)
    serving.model = prepare_base(serving.model, cfg.model)
    classifier = NLIClassifier(serving, max_length=cfg.model.max_length)
    classifier.attach_adapter(trained.output, name="adapter")
    probs = classifier.score_pairs(pairs, "adapter")
    np.testing.assert_allclose(probs, torch.softmax(expected, -1).numpy(), atol=1e-4, rtol=0)
    # With the adapter disabled it is the base that never saw one.
    plain = load_base_model(cfg.model.base_model, device="cpu", for_training=True)
    plain.model = prepare_base(plain.model, cfg.model)
    untouched = NLIClassifier(plain, max_length=cfg.model.max_length).score_pairs(pairs)
    np.testing.assert_array_equal(classifier.score_pairs(pairs, None), untouched)


def test_evaluate_cli_matches_the_training_report(trained: Trained, tmp_path: Path) -> None:
    from training.cli import main

    test_file = load_config(trained.recipe).eval.test_file
    assert test_file is not None
    code = main(
        [
            "evaluate",
            "--data",
            test_file,
            "--adapter",
            str(trained.output),
            "--compare-base",
            "--device",
            "cpu",
            "--max-length",
            "96",
            "--report-dir",
            str(tmp_path / "report"),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    expected = trained.report["test"]
    assert report["metrics"] == expected["metrics"]
    assert report["base"] == expected["base"]
    assert report["adapter"] == trained.output.name
    assert {name: case["count"] for name, case in report["cases"].items()} == {
        name: case["count"] for name, case in expected["cases"].items()
    }
    assert (tmp_path / "report" / "confusion_matrix.png").is_file()


class Interrupt(Exception):
    """Stands in for a crash or a pre-empted job."""


class InterruptAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise Interrupt(f"interrupted after the checkpoint of step {self.step}")


def test_resume_ends_where_an_unbroken_run_ends(tmp_path: Path, tiny_recipe: RecipeWriter) -> None:
    # Mid-epoch checkpoints, dropout, length grouping and workers: every source of randomness
    # a resume has to restore.
    settings: dict[str, Any] = {
        "lora": {"dropout": 0.1},
        "train": {"epochs": 2, "dataloader_workers": 1, "learning_rate": 3e-3},
        "eval": {"strategy": "steps", "steps": 10, "early_stopping_patience": None},
        "output": {"keep_checkpoints": True},
    }
    unbroken = run_training(load_config(tiny_recipe(tmp_path / "a", **settings)), progress=False)
    recipe = tiny_recipe(tmp_path / "b", **settings)
    with pytest.raises(Interrupt):
        run_training(load_config(recipe), callbacks=[InterruptAfterSave(30)], progress=False)
    output = load_config(recipe).output_dir()
    assert not output.exists()  # nothing half-done under the final name
    assert not list(output.parent.glob(".adapter.*"))
    resumed = run_training(load_config(recipe), resume=True, progress=False)
    assert unbroken is not None and resumed is not None
    report = json.loads((resumed / "report.json").read_text())
    assert report["training"]["resumed_from"].endswith("checkpoint-30")
    for folder_a, folder_b in (
        (unbroken, resumed),
        (get_last_checkpoint(f"{unbroken}.work"), get_last_checkpoint(f"{resumed}.work")),
    ):
        weights_a = load_file(Path(folder_a) / WEIGHTS_FILE)
        weights_b = load_file(Path(folder_b) / WEIGHTS_FILE)
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            torch.testing.assert_close(weights_a[key], weights_b[key], atol=0, rtol=0)
    losses = [
        [h["loss"] for h in json.loads((f / "report.json").read_text())["training"]["log_history"]
         if "loss" in h and h["step"] > 30]
        for f in (unbroken, resumed)
    ]  # fmt: skip
    assert losses[0] and losses[0] == losses[1]


def test_a_new_run_refuses_old_checkpoints_and_existing_output(
    tmp_path: Path, tiny_recipe: RecipeWriter
) -> None:
    recipe = tiny_recipe(tmp_path, train={"max_steps": 4}, eval={"strategy": "steps", "steps": 2})
    with pytest.raises(Interrupt):
        run_training(load_config(recipe), callbacks=[InterruptAfterSave(2)], progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_training(load_config(recipe), progress=False)
    changed = load_config(recipe, ["train.learning_rate=0.5"])
    with pytest.raises(ConfigError, match=r"different config .*train\.learning_rate"):
        run_training(changed, resume=True, progress=False)
    output = run_training(load_config(recipe, ["train.logging_steps=1"]), resume=True)
    assert output is not None and output.is_dir()
    with pytest.raises(ConfigError, match="already exists"):
        run_training(load_config(recipe), progress=False)


def test_a_crash_while_saving_leaves_no_adapter_folder(
    tmp_path: Path, tiny_recipe: RecipeWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_report(report: dict[str, Any], folder: Path) -> None:
        (folder / "report.json").write_text("{")  # half-written, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "write_training_report", broken_report)
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2}, eval={"strategy": "steps", "steps": 2})
    with pytest.raises(OSError, match="disk full"):
        run_training(load_config(recipe), progress=False)
    output = load_config(recipe).output_dir()
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []


def test_collapse_guard_aborts_the_run(tmp_path: Path, tiny_recipe: RecipeWriter) -> None:
    # After 4 steps the tiny model is far from perfect: a floor of 99% stands in for "at chance".
    recipe = tiny_recipe(
        tmp_path,
        train={"max_steps": 4},
        eval={"strategy": "steps", "steps": 4, "collapse_accuracy": 0.99},
    )
    with pytest.raises(TrainingCollapsedError, match="collapsed"):
        run_training(load_config(recipe), progress=False)
    assert not load_config(recipe).output_dir().exists()


def test_training_model_is_4bit_with_lora_on_every_linear(
    tiny_llama_dir: Path, tiny_recipe: RecipeWriter, tmp_path: Path
) -> None:
    from training.model import build_training_model

    cfg = load_config(tiny_recipe(tmp_path))
    _, model = build_training_model(cfg.model, cfg.lora, device="cpu")
    assert is_4bit(model)
    names = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in model.named_parameters()
        if ".lora_A" in n
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_dequantized_frozen_base_trains_exactly_like_the_4bit_one(
    tiny_recipe: RecipeWriter, tmp_path: Path
) -> None:
    """``model.dequantize_frozen`` holds the NF4 weights expanded: same logits, same LoRA
    gradients, same parameter names (so the adapter serves on the 4-bit base unchanged)."""
    from bitsandbytes.nn import Linear4bit

    from training.model import build_training_model

    cfg = load_config(tiny_recipe(tmp_path))
    fast_cfg = load_config(tiny_recipe(tmp_path, model={"dequantize_frozen": True}))
    torch.manual_seed(0)
    base, packed = build_training_model(cfg.model, cfg.lora, device="cpu")
    _, expanded = build_training_model(fast_cfg.model, fast_cfg.lora, device="cpu")
    assert not any(isinstance(m, Linear4bit) for m in expanded.modules())
    trainable = {n for n, p in packed.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in expanded.named_parameters() if p.requires_grad}
    # Non-zero LoRA weights (B starts at zero), the same in both models.
    generator = torch.Generator().manual_seed(1)
    lora = {
        n: torch.randn(p.shape, generator=generator) * 0.05
        for n, p in packed.named_parameters()
        if p.requires_grad
    }
    for model in (packed, expanded):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in lora:
                    param.copy_(lora[name])
    encoder = PairEncoder(base.tokenizer, get_prompt_format(1), max_length=cfg.model.max_length)
    pairs = [("a man is in the park", "a dog runs"), ("the child sits", "a red car is old")]
    batch = collate(encoder.encode(pairs), pad_id=base.tokenizer.pad_token_id)
    grads = []
    outputs = []
    for model in (packed, expanded):
        logits = model(batch.input_ids, batch.attention_mask, batch.last_index)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
        outputs.append(logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    assert outputs[0].abs().max() > 0
    for name in trainable:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-3)


class CaptureOptimizer(TrainerCallback):
    """The optimizer's parameter groups (names and learning rates) after the first step."""

    groups: list[tuple[set[str], float]] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.groups is None:
            names = {id(p): n for n, p in kwargs["model"].named_parameters()}
            self.groups = [
                ({names[id(p)] for p in group["params"]}, group["lr"])
                for group in kwargs["optimizer"].param_groups
                if group["params"]
            ]


@pytest.mark.parametrize("ratio", [None, 8.0])
def test_loraplus_gives_the_b_matrices_their_own_rate(
    tmp_path: Path, tiny_recipe: RecipeWriter, ratio: float | None
) -> None:
    recipe = tiny_recipe(
        tmp_path, train={"max_steps": 2, "loraplus_lr_ratio": ratio}, eval={"strategy": "steps"}
    )
    capture = CaptureOptimizer()
    run_training(load_config(recipe), callbacks=[capture], progress=False)
    assert capture.groups is not None
    by_kind = {
        kind: {lr for names, lr in capture.groups if any(f".{kind}." in n for n in names)}
        for kind in ("lora_A", "lora_B")
    }
    if ratio is not None:  # no group mixes A and B matrices
        assert not any(
            any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
            for names, _ in capture.groups
        )
    # Every trainable matrix is in exactly one group.
    assert sum(len(names) for names, _ in capture.groups) == len(
        {n for names, _ in capture.groups for n in names}
    )
    (lr_a,), (lr_b,) = by_kind["lora_A"], by_kind["lora_B"]
    assert lr_a > 0
    assert lr_b == pytest.approx(lr_a * (ratio or 1.0))


@pytest.mark.usefixtures("restore_compile_settings")
def test_compiled_layers_train_like_eager_ones_and_share_one_graph(
    tiny_recipe: RecipeWriter, tmp_path: Path
) -> None:
    """``train.torch_compile``: the layers share compiled code (not one graph per layer), batches
    of new lengths do not recompile, and loss and gradients are those of the eager model."""
    from torch._dynamo.utils import counters

    from training.model import COMPILED_PADDING, build_training_model, compile_decoder_layers

    cfg = load_config(tiny_recipe(tmp_path, model={"dequantize_frozen": True}))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        base, model = build_training_model(cfg.model, cfg.lora, device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(std=0.05)  # B starts at zero: make the LoRA path matter
        models.append(model)
    eager, compiled = models
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    counters.clear()
    backend = RecordingBackend()  # runs the traced graph as the eager backend does
    layers = compile_decoder_layers(compiled, backend=backend)
    assert layers > 1 and list(compiled.state_dict()) == keys
    from torch.fx.experimental import _config as fx_config

    assert not fx_config.use_duck_shape  # batch 128 and 128 tokens would share a symbol
    encoder = PairEncoder(base.tokenizer, get_prompt_format(1), max_length=cfg.model.max_length)
    pairs = [("a man is in the park", "a dog runs"), ("the child sits", "a red car is old")]
    for batch_pairs in (pairs, pairs + [("two women talk", "nobody speaks at all today")]):
        batch = collate(
            encoder.encode(batch_pairs),
            pad_id=base.tokenizer.pad_token_id,
            pad_to_multiple_of=COMPILED_PADDING,  # as LabelCollator pads under the setting
        )
        assert batch.input_ids.shape[1] % COMPILED_PADDING == 0
        labels = torch.arange(len(batch_pairs)) % 3
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(batch.input_ids, batch.attention_mask, batch.last_index)
            torch.nn.functional.cross_entropy(logits, labels).backward()
        for (name, p_eager), (_, p_compiled) in zip(
            eager.named_parameters(), compiled.named_parameters(), strict=True
        ):
            if p_eager.requires_grad:
                torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=name)
    # One graph whatever the layer count (the first layer's input requires grad too).
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    # LoRA's alpha/r and the norms' epsilon are constants, not float scalar inputs (for which
    # Inductor would build C++ kernels on the CPU: most of the first step's compile on a GPU).
    assert backend.inputs and backend.float_scalars() == []


@pytest.mark.usefixtures("restore_compile_settings")
def test_torch_compile_setting_compiles_the_layers(
    tmp_path: Path, tiny_recipe: RecipeWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.model import COMPILED_PADDING

    calls: list[int] = []
    real = train_module.compile_decoder_layers

    def eager_compile(model: Any) -> int:
        calls.append(real(model, backend="eager"))
        return calls[-1]

    collators: list[Any] = []
    real_collator = train_module.LabelCollator

    def spy_collator(**kwargs: Any) -> Any:
        collators.append(real_collator(**kwargs))
        return collators[-1]

    monkeypatch.setattr(train_module, "compile_decoder_layers", eager_compile)
    monkeypatch.setattr(train_module, "LabelCollator", spy_collator)
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2, "torch_compile": True})
    assert run_training(load_config(recipe), progress=False) is not None
    assert calls and calls[0] > 1
    assert [c.pad_to_multiple_of for c in collators] == [COMPILED_PADDING]
