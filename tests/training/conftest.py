"""Training fixtures: a synthetic NLI task a tiny random model learns in a few dozen steps.

The label is carried by one keyword of the hypothesis (dog -> entailment, cat -> neutral,
car -> contradiction), so two attention layers with LoRA can pick it up from the answer
position quickly, while the random base model sits near chance.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nli.labels import LABELS

KEYWORDS = ("dog", "cat", "car")
FILLER = (
    "a man woman child is the on in at with playing running sitting outside street park "
    "room table ball red blue old young big"
).split()


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spinning threads slow training by up to 50x as soon as another process takes a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_rows(n: int, *, seed: int) -> list[dict[str, str]]:
    """Rows whose label is set by the keyword in the hypothesis."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(3)
        premise = " ".join(rng.choice(FILLER) for _ in range(rng.randint(4, 10)))
        before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4)))
        after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 3)))
        hypothesis = f"{before} {KEYWORDS[label]} {after}".strip()
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": LABELS[label]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.jsonl`` (320 rows), ``dev.jsonl`` (160) and ``test.jsonl`` (96)."""
    folder = tmp_path_factory.mktemp("synthetic")
    for name, n, seed in (("train", 320, 0), ("dev", 160, 1), ("test", 96, 2)):
        write_jsonl(folder / f"{name}.jsonl", synthetic_rows(n, seed=seed))
    return folder


RecipeWriter = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_recipe(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, synthetic_data: Path
) -> RecipeWriter:
    """Write a recipe YAML for the tiny model and the synthetic task; keyword args override."""
    cache = tmp_path_factory.mktemp("tokenized")

    def write(folder: Path, **sections: dict[str, Any]) -> Path:
        recipe: dict[str, Any] = {
            "name": "tiny",
            "model": {"base_model": str(tiny_llama_dir), "device": "cpu", "max_length": 96},
            "lora": {"r": 8, "alpha": 16},
            "data": {
                "train_file": str(synthetic_data / "train.jsonl"),
                "dev_file": str(synthetic_data / "dev.jsonl"),
                "dev_rows": ":96",
                "extra_train_from_dev": "96:",
                "cache_dir": str(cache),
            },
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "learning_rate": 1e-2,
                "warmup_ratio": 0.05,
                "dataloader_workers": 0,
                "logging_steps": 5,
                "optimizer": "adamw_torch",
                "report_to": "none",
            },
            "eval": {"batch_size": 64, "collapse_accuracy": None},
            "output": {"dir": str(folder / "adapter"), "license": "synthetic test data"},
        }
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture
def restore_compile_settings() -> Iterator[None]:
    """``compile_decoder_layers`` changes compile settings for the process: not for other tests."""
    from nli.layer_compile import _settings

    before = [(config, name, getattr(config, name)) for config, name, _ in _settings()]
    yield
    for config, name, value in before:
        setattr(config, name, value)
