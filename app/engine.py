"""The batching engine: one worker thread owns the model, and everything that touches it goes
through that thread.

* Interactive requests (``/classify``) wait in a bounded FIFO; the worker takes every request
  that is waiting (up to ``max_batch_size`` rows) and scores them in one forward pass, with
  PEFT's per-row adapter names when they ask for different adapters. Under load (the previous
  step served more than one request) it waits up to ``max_batch_wait_ms`` for a fuller batch; a
  lone client never waits.
* Evaluation work (jobs and synchronous ``/evaluate``) is scored one slice at a time, and only
  while no interactive request is waiting: interactive traffic always goes first.
* Commands (attaching and detaching adapters) run on the same thread between two steps, so
  they never race a forward pass or PEFT's adapter state.
* Forward passes never run on the event loop: interactive callers await an ``asyncio`` future
  that the worker resolves with ``call_soon_threadsafe``, once per step and loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from app.errors import ResourceExhaustedError
from app.metrics import Metrics
from nli.errors import NLIError, NotReadyError, QueueFullError

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
T = TypeVar("T")


class Scorer(Protocol):
    """What the engine needs of ``nli.classifier.NLIClassifier``."""

    def encode(self, pairs: Sequence[Pair], adapter: str | None = None) -> list[list[int]]: ...

    def score_encoded(
        self, encoded: Sequence[Sequence[int]], adapters: Sequence[str | None]
    ) -> np.ndarray: ...


class EvaluationCancelled(Exception):
    """Raised into evaluation work whose cancel event was set."""


@dataclass(eq=False)
class _Request:
    pairs: Sequence[Pair]
    adapter: str | None  # PEFT adapter name, None = base
    future: asyncio.Future[list[list[float]]]
    loop: asyncio.AbstractEventLoop
    release: Callable[[], None] | None
    encoded: list[list[int]] = field(default_factory=list)


@dataclass(eq=False)
class _EvalWork:
    pairs: Sequence[Pair]
    adapter: str | None
    future: concurrent.futures.Future[np.ndarray]
    cancel: threading.Event | None
    encoded: list[list[int]] | None = None
    order: list[int] = field(default_factory=list)
    next_row: int = 0
    out: np.ndarray | None = None


class BatchEngine:
    """Owns the scorer; scores batches, evaluation slices and commands on one thread."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        max_batch_size: int = 64,
        max_batch_wait_s: float = 0.0,
        max_queue: int = 1024,
        eval_batch_size: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.max_queue = max_queue
        self.eval_batch_size = eval_batch_size or max_batch_size
        self.metrics = metrics
        self._cond = threading.Condition()
        self._interactive: deque[_Request] = deque()
        self._interactive_rows = 0
        self._evaluation: deque[_EvalWork] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._stopping = False
        self._last_step_requests = 0
        self._thread = threading.Thread(target=self._run, name="nli-batch-worker", daemon=True)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the interactive requests already queued, cancel evaluation work, and stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def queue_depth(self) -> int:
        return len(self._interactive)

    # -- submitting work --------------------------------------------------------------------

    def submit(
        self,
        pairs: Sequence[Pair],
        adapter: str | None,
        *,
        release: Callable[[], None] | None = None,
    ) -> asyncio.Future[list[list[float]]]:
        """Queue pairs for interactive scoring; the future gives ``[[p_e, p_n, p_c], ...]``.

        Call from the event loop. ``release`` runs on the worker once the pairs are scored (or
        failed); it is not called when this raises. Raises ``QueueFullError`` when full.
        """
        loop = asyncio.get_running_loop()
        request = _Request(pairs, adapter, loop.create_future(), loop, release)
        with self._cond:
            if self._stopping:
                raise NotReadyError("the service is shutting down")
            if len(self._interactive) >= self.max_queue:
                if self.metrics is not None:
                    self.metrics.queue_rejections.inc()
                raise QueueFullError(
                    f"the scoring queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._interactive.append(request)
            self._interactive_rows += len(pairs)
            self._cond.notify()
        return request.future

    def score_blocking(
        self,
        pairs: Sequence[Pair],
        adapter: str | None,
        *,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """Score pairs at evaluation priority and wait; for worker threads, never the loop.

        Raises ``EvaluationCancelled`` soon after ``cancel`` is set.
        """
        work = _EvalWork(pairs, adapter, concurrent.futures.Future(), cancel)
        with self._cond:
            if self._stopping:
                raise NotReadyError("the service is shutting down")
            self._evaluation.append(work)
            self._cond.notify()
        return work.future.result()

    def run_exclusive(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the worker between two scoring steps (no forward pass runs meanwhile)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if not self._thread.is_alive() or self._stopping:
                future.set_exception(NotReadyError("the scoring worker is not running"))
                return future
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._commands or self._interactive or self._evaluation or self._stopping
                ):
                    self._cond.wait()
                if self._stopping and not self._interactive:
                    break
                commands = list(self._commands)
                self._commands.clear()
            try:
                if commands:
                    self._run_commands(commands)
                    continue
                requests = self._take_requests()
                if requests:
                    self._score_requests(requests)
                else:
                    self._score_eval_slice()
            except Exception:  # a bug here must not kill the only worker
                logger.exception("scoring worker step failed")
        self._shut_down()

    def _shut_down(self) -> None:
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
            work = list(self._evaluation)
            self._evaluation.clear()
        for _, future in commands:
            future.set_exception(NotReadyError("the service is shutting down"))
        for item in work:
            item.future.set_exception(NotReadyError("the service is shutting down"))
        logger.info("scoring worker stopped")

    def _run_commands(self, commands: list[tuple[Callable[[], Any], Any]]) -> None:
        for fn, future in commands:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def _take_requests(self) -> list[_Request]:
        with self._cond:
            if not self._interactive:
                return []
            if self.max_batch_wait_s > 0 and self._last_step_requests > 1:
                waited_from = time.perf_counter()
                deadline = time.monotonic() + self.max_batch_wait_s
                while (
                    self._interactive_rows < self.max_batch_size
                    and not self._commands
                    and not self._stopping
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._spent("batch_wait", time.perf_counter() - waited_from)
            taken: list[_Request] = []
            rows = 0
            while self._interactive and (not taken or rows < self.max_batch_size):
                request = self._interactive[0]
                if taken and rows + len(request.pairs) > self.max_batch_size:
                    break
                self._interactive.popleft()
                self._interactive_rows -= len(request.pairs)
                taken.append(request)
                rows += len(request.pairs)
            depth = len(self._interactive)
        if self.metrics is not None:
            self.metrics.queue_depth.labels("interactive").set(depth)
        self._last_step_requests = len(taken)
        return taken

    def _score_requests(self, requests: list[_Request]) -> None:
        failures: dict[_Request, BaseException] = {}
        results: dict[_Request, list[list[float]]] = {}
        started = time.perf_counter()
        try:
            ready = self._encode_requests(requests, failures)
            encoded = time.perf_counter()
            self._spent("encode", encoded - started)
            if ready:
                self._forward_requests(ready, results, failures)
                self._spent("forward", time.perf_counter() - encoded)
        finally:
            delivering = time.perf_counter()
            self._deliver(requests, results, failures)
            self._spent("deliver", time.perf_counter() - delivering)

    def _spent(self, phase: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.engine_seconds.labels(phase).inc(seconds)

    def _encode_requests(
        self, requests: list[_Request], failures: dict[_Request, BaseException]
    ) -> list[_Request]:
        groups: dict[str | None, list[_Request]] = {}
        for request in requests:
            groups.setdefault(request.adapter, []).append(request)
        for adapter, members in groups.items():
            try:  # one tokenizer call per adapter; on a bad pair, find whose it was
                ids = self.scorer.encode([p for r in members for p in r.pairs], adapter)
                start = 0
                for request in members:
                    request.encoded = ids[start : start + len(request.pairs)]
                    start += len(request.pairs)
            except NLIError:
                for request in members:
                    try:
                        request.encoded = self.scorer.encode(request.pairs, adapter)
                    except NLIError as exc:
                        failures[request] = exc
        return [r for r in requests if r not in failures]

    def _forward_requests(
        self,
        requests: list[_Request],
        results: dict[_Request, list[list[float]]],
        failures: dict[_Request, BaseException],
    ) -> None:
        encoded = [ids for r in requests for ids in r.encoded]
        adapters = [r.adapter for r in requests for _ in r.encoded]
        try:
            probs = self.scorer.score_encoded(encoded, adapters)
        except Exception as exc:
            if len(requests) > 1:
                # Isolate the request that fails (e.g. out of memory even for one row).
                logger.warning(
                    "a batch of %d requests failed; scoring them one by one", len(requests)
                )
                for request in requests:
                    self._forward_requests([request], results, failures)
                return
            error = _public_error(exc)
            if isinstance(error, ResourceExhaustedError) and self.metrics is not None:
                self.metrics.oom_failures.inc()
            failures[requests[0]] = error
            return
        if self.metrics is not None:
            self.metrics.batch_rows.labels("interactive").observe(len(encoded))
            self.metrics.batch_requests.observe(len(requests))
        rows = probs.tolist()
        start = 0
        for request in requests:
            results[request] = rows[start : start + len(request.encoded)]
            start += len(request.encoded)

    def _deliver(
        self,
        requests: list[_Request],
        results: dict[_Request, list[list[float]]],
        failures: dict[_Request, BaseException],
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, bool]]] = {}
        for request in requests:
            if request.release is not None:
                try:
                    request.release()
                except Exception:
                    logger.exception("releasing an adapter lease failed")
            if request in results:
                outcome: tuple[asyncio.Future[Any], Any, bool] = (
                    request.future,
                    results[request],
                    True,
                )
            else:
                error = failures.get(request) or RuntimeError("request was not scored")
                outcome = (request.future, error, False)
            by_loop.setdefault(request.loop, []).append(outcome)
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _score_eval_slice(self) -> None:
        with self._cond:
            if not self._evaluation:
                return
            work = self._evaluation[0]
        try:
            if work.cancel is not None and work.cancel.is_set():
                raise EvaluationCancelled("cancelled")
            if work.encoded is None:
                work.encoded = self.scorer.encode(work.pairs, work.adapter)
                # Slices of similar lengths waste little on padding.
                work.order = sorted(range(len(work.encoded)), key=lambda i: len(work.encoded[i]))  # type: ignore[index]
                work.out = np.zeros((len(work.encoded), 3), dtype=np.float32)
            rows = work.order[work.next_row : work.next_row + self.eval_batch_size]
            if rows:
                probs = self.scorer.score_encoded(
                    [work.encoded[i] for i in rows], [work.adapter] * len(rows)
                )
                assert work.out is not None
                work.out[rows] = probs
                work.next_row += len(rows)
                if self.metrics is not None:
                    self.metrics.batch_rows.labels("evaluation").observe(len(rows))
            if work.next_row >= len(work.order):
                self._finish_eval(work)
                assert work.out is not None
                work.future.set_result(work.out)
        except BaseException as exc:
            self._finish_eval(work)
            work.future.set_exception(_public_error(exc))

    def _finish_eval(self, work: _EvalWork) -> None:
        with self._cond:
            if self._evaluation and self._evaluation[0] is work:
                self._evaluation.popleft()
            depth = len(self._evaluation)
        if self.metrics is not None:
            self.metrics.queue_depth.labels("evaluation").set(depth)


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, value, ok in outcomes:
        if future.done():  # the caller gave up (cancelled)
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _public_error(exc: BaseException) -> BaseException:
    """Out-of-memory becomes a 503 the client may retry; anything else stays as it is."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return ResourceExhaustedError(
                "not enough device memory to score this request, even alone; retry later"
            )
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return exc
