"""Memory after many adapter load/unload cycles stays where it was after the first few."""

from __future__ import annotations

import gc
from pathlib import Path

import psutil
import pytest
import torch

from tests.app.conftest import PAIRS, fill_adapters_dir, start_client
from tests.app.helpers import make_settings

CYCLES = 100
BASELINE_CYCLE = 10


def device_memory() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("keep_another", [False, True], ids=["last-adapter", "with-another"])
def test_rss_after_100_load_unload_cycles(
    tiny_llama_dir: Path, tmp_path: Path, adapter_store: Path, keep_another: bool
) -> None:
    """Cycle 10 to cycle 100: RSS within 2% (and device memory equal on a GPU). With no other
    adapter loaded, each unload also unwraps the PEFT model, the harder case."""
    fill_adapters_dir(adapter_store, tmp_path / "adapters")
    client = start_client(make_settings(tiny_llama_dir, tmp_path))
    process = psutil.Process()
    pair = {"premise": PAIRS[0][0], "hypothesis": PAIRS[0][1]}
    try:
        if keep_another:
            assert client.post("/adapters", json={"name": "beta"}).status_code == 200
        samples: dict[int, tuple[int, int]] = {}
        for cycle in range(1, CYCLES + 1):
            assert client.post("/adapters", json={"name": "alpha"}).status_code == 200
            assert client.post("/classify", json={**pair, "adapter": "alpha"}).status_code == 200
            assert client.delete("/adapters/alpha").json()["detached"] is True
            if cycle in (BASELINE_CYCLE, CYCLES):
                gc.collect()
                samples[cycle] = (process.memory_info().rss, device_memory())
        rss_10, gpu_10 = samples[BASELINE_CYCLE]
        rss_100, gpu_100 = samples[CYCLES]
        print(f"RSS after cycle 10: {rss_10 / 2**20:.1f} MiB, after 100: {rss_100 / 2**20:.1f} MiB")
        assert rss_100 <= rss_10 * 1.02
        assert gpu_100 <= gpu_10
    finally:
        client.__exit__(None, None, None)
