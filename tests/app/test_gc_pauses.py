"""Garbage-collector pauses: timed into /metrics, start-up objects frozen while the model lives."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from app.gc_pauses import GCPauseTimer
from app.metrics import Metrics
from tests.app.conftest import start_client
from tests.app.helpers import make_settings


def pauses(metrics: Metrics, generation: int) -> tuple[float, float]:
    """(count, seconds) of the collections of one generation so far."""
    labels = {"generation": str(generation)}
    count = metrics.registry.get_sample_value("nli_gc_pause_seconds_count", labels)
    total = metrics.registry.get_sample_value("nli_gc_pause_seconds_sum", labels)
    assert count is not None and total is not None
    return count, total


def test_the_timer_counts_each_collection_by_generation_while_installed() -> None:
    metrics = Metrics()
    timer = GCPauseTimer(metrics.gc_pauses)
    timer.install()
    try:
        gc.collect(2)
        gc.collect(2)
        gc.collect(0)
    finally:
        timer.remove()
    full, full_seconds = pauses(metrics, 2)
    assert full >= 2 and full_seconds > 0  # (allocations may set off more meanwhile)
    assert pauses(metrics, 0)[0] >= 1
    gc.collect(2)  # removed: no longer counted
    assert pauses(metrics, 2)[0] == full
    timer.remove()  # removing twice is harmless


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze", "no-freeze"])
def test_the_service_freezes_its_start_up_objects_while_it_runs(
    tiny_llama_dir: Path, tmp_path: Path, freeze: bool
) -> None:
    client = start_client(make_settings(tiny_llama_dir, tmp_path, gc_freeze=freeze))
    try:
        frozen = gc.get_freeze_count()
        metrics = client.app.state.metrics  # type: ignore[attr-defined]
        full = pauses(metrics, 2)[0]
        assert client.get("/metrics").text.count('nli_gc_pause_seconds_count{generation="2"}') == 1
    finally:
        client.__exit__(None, None, None)
    if freeze:
        assert frozen > 10_000  # torch, transformers, the web stack and the model
        assert full >= 1  # the collection before freezing was timed
    else:
        assert frozen == 0
    assert gc.get_freeze_count() == 0  # thawed when the model was released
