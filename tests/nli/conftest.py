"""Fixtures shared by the tests of ``nli``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nli.loading import LoadedBase, load_base_model
from tests.nli.adapters import make_adapter


@pytest.fixture
def fresh_dynamo() -> None:
    """Dynamo's caches and counters emptied, so a test counts only its own graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedBase:
    """The tiny model in NF4 on the CPU, loaded once per test module."""
    return load_base_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def graph_adapters(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Random LoRA adapters for the CUDA-graph slots' tests (``rank16`` is above their LoRA
    slot's rank 8, which only the merged slot holds; ``dora`` is no plain LoRA)."""
    root = tmp_path_factory.mktemp("graph-adapters")
    specs: dict[str, dict[str, Any]] = {
        "first": dict(seed=11),
        "second": dict(seed=12, r=8),
        "attention": dict(seed=13, target_modules=["q_proj", "v_proj"]),
        "rslora-bf16": dict(seed=14, r=8, use_rslora=True, dtype=torch.bfloat16),
        "rank16": dict(seed=15, r=16),
        "dora": dict(seed=16, use_dora=True),
    }
    return {name: make_adapter(tiny_model_dir, root / name, **spec) for name, spec in specs.items()}
