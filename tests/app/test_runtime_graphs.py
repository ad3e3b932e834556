"""Once ready, the service records its CUDA graphs ahead of traffic (NLI_CUDA_GRAPH_WARMUP_TOKENS).

Real graphs need CUDA (``tests/nli/test_cuda_graphs.py`` covers the recording itself); here a
stand-in classifier shows what the runtime asks for, in which order, and when it stops.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.metrics import Metrics
from app.runtime import ModelRuntime, Ready
from app.settings import load_settings
from nli.cuda_graphs import GraphSettings

SETTINGS = GraphSettings(max_batch=4, max_length=96, length_step=32)


class Graphs:
    def __init__(self) -> None:
        self.settings = SETTINGS


class Classifier:
    """Records which buckets the runtime asks for; ``fail_at`` raises on that call."""

    def __init__(self, *, fail_at: int | None = None, on_call: Any = None) -> None:
        self.graphs: Graphs | None = Graphs()
        self.asked: list[tuple[int, int]] = []
        self.fail_at = fail_at
        self.on_call = on_call

    def record_graph(self, rows: int, length: int) -> bool:
        self.asked.append((rows, length))
        if self.on_call is not None:
            self.on_call()
        if len(self.asked) == self.fail_at:
            raise RuntimeError("CUDA error: out of memory")
        return True


def runtime_with(classifier: Classifier, tokens: int) -> tuple[ModelRuntime, Ready]:
    runtime = ModelRuntime(load_settings(cuda_graph_warmup_tokens=tokens), Metrics())
    ready = Ready(classifier, engine=None, registry=None)  # type: ignore[arg-type]
    runtime._ready = ready
    return runtime, ready


def test_every_batch_size_is_recorded_for_prompts_up_to_the_limit() -> None:
    classifier = Classifier()
    runtime, ready = runtime_with(classifier, 64)
    runtime._record_graphs(ready)
    assert classifier.asked == [(1, 32), (2, 32), (4, 32), (1, 64), (2, 64), (4, 64)]


def test_nothing_is_recorded_when_off_or_without_graphs() -> None:
    classifier = Classifier()
    runtime, ready = runtime_with(classifier, 0)
    runtime._record_graphs(ready)
    classifier.graphs = None
    runtime, ready = runtime_with(classifier, 128)
    runtime._record_graphs(ready)
    assert classifier.asked == []


def test_recording_stops_when_the_service_stops_or_a_recording_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopping: list[ModelRuntime] = []
    classifier = Classifier(on_call=lambda: stopping and setattr(stopping[0], "_ready", None))
    runtime, ready = runtime_with(classifier, 96)
    stopping.append(runtime)
    runtime._record_graphs(ready)
    assert classifier.asked == [(1, 32)]  # stopped after the first

    classifier = Classifier(fail_at=2)
    runtime, ready = runtime_with(classifier, 96)
    runtime._record_graphs(ready)  # logs, does not raise: missing graphs record on first use
    assert classifier.asked == [(1, 32), (2, 32)]
    assert "out of memory" in caplog.text
