"""Garbage-collector pauses: timed into ``/metrics``, and kept short by freezing start-up objects.

A full (generation 2) collection walks every object the collector tracks, with the interpreter
lock held: no request moves meanwhile. With the offline default model, its tokenizer and the
web stack loaded, that is ~630k objects and ~200 ms on a 2-core CPU. Under load, objects of
the requests in flight survive the young collections and pile up in the old generation until
they set off a full collection (BENCHMARKS.md measures how often, and what it costs).

``freeze_startup_objects`` collects once and then moves every surviving object into the
collector's permanent generation (``gc.freeze``), which later collections skip: start-up
objects live as long as the model does. ``thaw`` undoes it when the model is released, so a
process that starts several services (the tests) can still free their cycles."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Summary

logger = logging.getLogger(__name__)


class GCPauseTimer:
    """Times every collection into ``pauses`` (labelled by generation) while installed."""

    def __init__(self, pauses: Summary) -> None:
        self.pauses = pauses
        self._children = {gen: pauses.labels(str(gen)) for gen in range(3)}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        # The collector runs with the interpreter lock held: one collection at a time.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._started)

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections.

    Returns how many objects are frozen. Objects created later (requests, adapters attached
    at run time) are collected as usual.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "froze %d start-up objects for the garbage collector in %.2f s",
        frozen,
        time.perf_counter() - started,
    )
    return frozen


def thaw() -> None:
    """Hand the frozen objects back to the collector (when the model they belong to goes)."""
    gc.unfreeze()
