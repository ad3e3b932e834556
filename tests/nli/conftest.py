"""Fixtures shared by the tests of ``nli``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nli.loading import LoadedBase, load_base_model


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedBase:
    """The tiny model in NF4 on the CPU, loaded once per test module."""
    return load_base_model(str(tiny_model_dir), device="cpu")
