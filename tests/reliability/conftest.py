"""Fixtures of the reliability tests: the service tests' adapters and reference scores, one
torch thread, and ``slow`` benchmarks skipped unless ``-m`` selects them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

# The service tests' session fixtures: test adapters (init_lora_weights=False) and sequential
# reference scores on the tiny model.
from tests.app.conftest import adapter_store, reference

__all__ = ["adapter_store", "reference"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """In-process services score on the test's own threads: with two shared cores, more intra-op
    threads only make every small forward wait for a time slice."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests here run only when the ``-m`` expression names ``slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow benchmark: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None and "reliability" in item.nodeid:
            item.add_marker(skip)
