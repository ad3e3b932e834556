"""The batching engine with a fake scorer: batching, priorities, isolation of failures,
out-of-memory, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from app.engine import BatchEngine, EvaluationCancelled
from app.errors import ResourceExhaustedError
from app.metrics import Metrics
from nli.errors import InputTooLongError, NotReadyError, QueueFullError

Pair = tuple[str, str]


class FakeScorer:
    """Encodes a pair as [its number]; scores row i as [number, adapter id, 0]."""

    def __init__(self, delay: float = 0.0, oom_over: int | None = None) -> None:
        self.delay = delay
        self.oom_over = oom_over
        self.calls: list[tuple[int, list[str | None]]] = []
        self.lock = threading.Lock()

    def encode(self, pairs: Sequence[Pair], adapter: str | None = None) -> list[list[int]]:
        for _, hypothesis in pairs:
            if hypothesis == "too long":
                raise InputTooLongError("too long")
        return [[int(premise)] for premise, _ in pairs]

    def score_encoded(
        self, encoded: Sequence[Sequence[int]], adapters: Sequence[str | None]
    ) -> np.ndarray:
        with self.lock:
            self.calls.append((len(encoded), list(adapters)))
        if self.oom_over is not None and any(seq[0] >= self.oom_over for seq in encoded):
            raise torch.OutOfMemoryError("simulated")
        time.sleep(self.delay)
        ids = {None: 0, "a": 1, "b": 2}
        return np.array([[seq[0], ids[a], 0] for seq, a in zip(encoded, adapters, strict=True)])


def pairs(*numbers: int) -> list[Pair]:
    return [(str(n), "h") for n in numbers]


Factory = Callable[..., BatchEngine]


@pytest.fixture()
def engine_factory() -> Iterator[Factory]:
    engines: list[BatchEngine] = []

    def make(scorer: FakeScorer, **kwargs: object) -> BatchEngine:
        engine = BatchEngine(scorer, **kwargs)  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def test_concurrent_requests_share_one_forward_with_per_row_adapters(
    engine_factory: Factory,
) -> None:
    scorer = FakeScorer()
    engine = engine_factory(scorer, max_batch_size=64)
    gate = threading.Event()
    blocker = engine.run_exclusive(lambda: gate.wait(10))

    async def main() -> list[list[list[float]]]:
        futures = [
            engine.submit(pairs(i), ["a", "b", None][i % 3]) for i in range(10)
        ]  # all queued while the worker is busy
        gate.set()
        return list(await asyncio.gather(*futures))

    results = asyncio.run(main())
    blocker.result(5)
    assert scorer.calls == [(10, [["a", "b", None][i % 3] for i in range(10)])]
    for i, result in enumerate(results):
        assert result == [[i, [1, 2, 0][i % 3], 0]]


def test_batches_respect_the_row_limit(engine_factory: Factory) -> None:
    scorer = FakeScorer()
    engine = engine_factory(scorer, max_batch_size=4)
    gate = threading.Event()
    engine.run_exclusive(lambda: gate.wait(10))

    async def main() -> None:
        futures = [engine.submit(pairs(i, i), None) for i in range(5)]
        gate.set()
        await asyncio.gather(*futures)

    asyncio.run(main())
    assert [rows for rows, _ in scorer.calls] == [4, 4, 2]


def test_interactive_requests_go_before_evaluation_work(engine_factory: Factory) -> None:
    scorer = FakeScorer(delay=0.02)
    engine = engine_factory(scorer, max_batch_size=2)
    finished: list[str] = []

    def evaluate() -> None:
        engine.score_blocking(pairs(*range(40)), "a")  # 20 slices of 2 rows
        finished.append("evaluation")

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(evaluate)
        while not scorer.calls:
            time.sleep(0.001)

        async def main() -> None:
            await engine.submit(pairs(7), "b")
            finished.append("interactive")

        asyncio.run(main())
        job.result(10)
    assert finished == ["interactive", "evaluation"]
    # The interactive pair was scored between two evaluation slices, not after all of them.
    position = next(i for i, (_, adapters) in enumerate(scorer.calls) if adapters == ["b"])
    assert position < len(scorer.calls) - 5


def test_evaluation_results_come_back_in_input_order(engine_factory: Factory) -> None:
    engine = engine_factory(FakeScorer(), max_batch_size=3)
    out = engine.score_blocking(pairs(5, 1, 4, 2, 3, 9, 0), "a")
    assert out[:, 0].tolist() == [5, 1, 4, 2, 3, 9, 0]


def test_a_bad_pair_fails_only_its_own_request(engine_factory: Factory) -> None:
    engine = engine_factory(FakeScorer())
    gate = threading.Event()
    engine.run_exclusive(lambda: gate.wait(10))

    async def main() -> list[object]:
        good = engine.submit(pairs(1), None)
        bad = engine.submit([("2", "too long")], None)
        other = engine.submit(pairs(3), None)
        gate.set()
        return list(await asyncio.gather(good, bad, other, return_exceptions=True))

    good, bad, other = asyncio.run(main())
    assert good == [[1, 0, 0]] and other == [[3, 0, 0]]
    assert isinstance(bad, InputTooLongError)


def test_out_of_memory_fails_only_the_request_that_cannot_fit(engine_factory: Factory) -> None:
    engine = engine_factory(FakeScorer(oom_over=100))
    gate = threading.Event()
    engine.run_exclusive(lambda: gate.wait(10))

    async def main() -> list[object]:
        futures = [engine.submit(pairs(n), None) for n in (1, 500, 2)]
        gate.set()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    first, huge, last = asyncio.run(main())
    assert first == [[1, 0, 0]] and last == [[2, 0, 0]]
    assert isinstance(huge, ResourceExhaustedError)


def test_a_full_queue_refuses_new_requests(engine_factory: Factory) -> None:
    engine = engine_factory(FakeScorer(), max_queue=2)
    gate = threading.Event()
    engine.run_exclusive(lambda: gate.wait(10))

    async def main() -> None:
        futures = [engine.submit(pairs(1), None), engine.submit(pairs(2), None)]
        with pytest.raises(QueueFullError):
            engine.submit(pairs(3), None)
        gate.set()
        await asyncio.gather(*futures)

    asyncio.run(main())


def test_cancelled_evaluation_stops_between_slices(engine_factory: Factory) -> None:
    scorer = FakeScorer(delay=0.01)
    engine = engine_factory(scorer, max_batch_size=2)
    cancel = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(engine.score_blocking, pairs(*range(200)), None, cancel=cancel)
        while len(scorer.calls) < 3:
            time.sleep(0.001)
        cancel.set()
        with pytest.raises(EvaluationCancelled):
            job.result(10)
    assert len(scorer.calls) < 100


def test_a_lone_client_never_waits_for_a_fuller_batch(engine_factory: Factory) -> None:
    engine = engine_factory(FakeScorer(), max_batch_wait_s=1.0)

    async def main() -> float:
        started = time.perf_counter()
        for i in range(5):
            await engine.submit(pairs(i), None)
        return time.perf_counter() - started

    assert asyncio.run(main()) < 1.0  # five waits would take 5 s


def test_stop_finishes_queued_requests_and_refuses_new_work(engine_factory: Factory) -> None:
    engine = engine_factory(FakeScorer(delay=0.01))
    gate = threading.Event()
    engine.run_exclusive(lambda: gate.wait(10))

    async def main() -> list[object]:
        futures = [engine.submit(pairs(i), None) for i in range(3)]
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        gate.set()
        results = await asyncio.gather(*futures)
        stopper.join(10)
        with pytest.raises(NotReadyError):
            engine.submit(pairs(9), None)
        return list(results)

    assert asyncio.run(main()) == [[[0, 0, 0]], [[1, 0, 0]], [[2, 0, 0]]]
    with pytest.raises(NotReadyError):
        engine.score_blocking(pairs(1), None)
    with pytest.raises(NotReadyError):
        engine.run_exclusive(lambda: None).result(1)


def test_the_worker_counts_its_time_by_phase(engine_factory: Factory) -> None:
    metrics = Metrics()
    engine = engine_factory(FakeScorer(delay=0.02), metrics=metrics, max_batch_wait_s=0.05)

    def spent(phase: str) -> float:
        value = metrics.registry.get_sample_value("nli_engine_seconds_total", {"phase": phase})
        assert value is not None
        return value

    async def lone() -> None:
        for i in range(3):
            await engine.submit(pairs(i), None)

    asyncio.run(lone())
    assert spent("forward") >= 3 * 0.02  # the fake scorer's 20 ms per step
    assert spent("encode") > 0 and spent("deliver") > 0
    assert spent("batch_wait") == 0  # a lone client never waits
    gate = threading.Event()
    engine.run_exclusive(lambda: gate.wait(10))

    async def under_load() -> None:
        first = [engine.submit(pairs(n), None) for n in (10, 11)]
        gate.set()
        await asyncio.gather(*first)  # a step of two requests: the next one may wait
        await engine.submit(pairs(12), None)

    asyncio.run(under_load())
    assert 0.04 <= spent("batch_wait") < 1.0
