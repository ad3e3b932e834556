"""Garbage-collector pauses, timed: into ``/metrics`` by the service (``GCPauseTimer``), per
evaluation pass by ``bench.eval_throughput`` (``CollectionTimer`` with its own tally).

A full (generation 2) collection walks every object the collector tracks, with the interpreter
lock held: no request moves meanwhile. With the offline default model, its tokenizer and the
web stack loaded, that is ~630k objects and ~200 ms on a 2-core CPU. Under load, objects of
the requests in flight survive the young collections and pile up in the old generation until
they set off a full collection (BENCHMARKS.md measures how often, and what it costs). The
runtime keeps those collections short by freezing its start-up objects while the model lives
(``nli.gc_freeze.freeze_startup_objects``, undone by ``thaw`` when the model is released, so a
process that starts several services, the tests, can still free their cycles)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Summary


class CollectionTimer:
    """Calls ``observe(generation, seconds)`` after every collection while installed
    (``install`` / ``remove``, or as a ``with`` block)."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self.observe = observe
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        # The collector runs with the interpreter lock held: one collection at a time.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.observe(info["generation"], time.perf_counter() - self._started)

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def __enter__(self) -> CollectionTimer:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class GCPauseTimer(CollectionTimer):
    """Times every collection into ``pauses`` (labelled by generation) while installed."""

    def __init__(self, pauses: Summary) -> None:
        children = {gen: pauses.labels(str(gen)) for gen in range(3)}
        super().__init__(lambda generation, seconds: children[generation].observe(seconds))
        self.pauses = pauses
