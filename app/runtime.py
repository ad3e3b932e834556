"""The model runtime: loads the base model once, in the background, and serves scoring.

The server answers at once; until the base model, the scoring worker and the default adapter
are ready, model routes answer 503 with ``Retry-After``. A failed load is logged and reported
to ``on_fatal`` (the CLI then stops the server with a non-zero exit code).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from app.engine import BatchEngine
from app.metrics import Metrics
from app.registry import AdapterRegistry, Target
from app.settings import BASE, BUILTIN_DEFAULT_ADAPTER, Settings
from nli.classifier import NLIClassifier
from nli.default_model import DEFAULT_BASE_MODEL
from nli.errors import AdapterInvalidError, NotReadyError
from nli.gc_freeze import freeze_startup_objects, thaw
from nli.labels import build_result
from nli.loading import free_device_memory, load_base_model

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "stopped"]
Pair = tuple[str, str]


@dataclass(frozen=True)
class Ready:
    """What model routes use once the runtime is ready."""

    classifier: NLIClassifier
    engine: BatchEngine
    registry: AdapterRegistry

    @property
    def base_model(self) -> str:
        return self.classifier.base_model


class ModelRuntime:
    """Base model + batching engine + adapter registry, with a loading state."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.state: State = "loading"
        self.error: str | None = None
        self._ready: Ready | None = None
        self._on_ready: list[Callable[[Ready], None]] = []
        self._lock = threading.Lock()
        self._frozen = False  # start-up objects exempt from garbage collection (nli.gc_freeze)
        self._thread = threading.Thread(target=self._load, name="nli-model-loader", daemon=True)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading in the background."""
        self._thread.start()

    def on_ready(self, callback: Callable[[Ready], None]) -> None:
        """Call ``callback`` once loaded (at once if already loaded)."""
        with self._lock:
            if self._ready is None:
                self._on_ready.append(callback)
                return
            ready = self._ready
        callback(ready)

    def wait(self, timeout: float | None = None) -> State:
        """Wait for the load to end (tests and the CLI)."""
        self._thread.join(timeout)
        return self.state

    def stop(self) -> None:
        """Stop the worker after the requests already queued; detach adapters; free memory."""
        with self._lock:
            ready, self._ready = self._ready, None
            self.state = "stopped"
        if ready is None:
            return
        ready.engine.stop()
        self.metrics.ready.set(0)
        if self._frozen:
            thaw()
            self._frozen = False
        free_device_memory(ready.classifier.device)
        logger.info("model runtime stopped")

    def _load(self) -> None:
        settings = self.settings
        started = time.perf_counter()
        engine: BatchEngine | None = None
        try:
            if settings.cache_dir is not None:
                # nli reads its cache location from the environment.
                os.environ["NLI_CACHE_DIR"] = str(settings.cache_dir)
            base = load_base_model(
                settings.base_model,
                quantization=settings.quantization,
                device=settings.device,
                dequantize=settings.dequantize,
            )
            classifier = NLIClassifier(
                base,
                max_batch_size=settings.max_batch_size,
                cuda_graphs=settings.cuda_graphs,
                cpu_merge=settings.cpu_merge,
            )
            engine = BatchEngine(
                classifier,
                max_batch_size=settings.max_batch_size,
                max_batch_wait_s=settings.max_batch_wait_ms / 1000,
                max_queue=settings.max_queue,
                metrics=self.metrics,
            )
            engine.start()
            registry = AdapterRegistry(
                engine,
                classifier,
                adapters_dir=settings.adapters_dir,
                builtin_dir=settings.builtin_adapters_dir,
                metrics=self.metrics,
            )
            self._load_default_adapter(registry)
        except Exception as exc:
            if engine is not None:
                engine.stop()
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self.error = f"the service could not start: {message}"
            self.state = "failed"
            logger.error("%s", self.error, exc_info=not hasattr(exc, "message"))
            if self.on_fatal is not None:
                self.on_fatal(self.error)
            return
        ready = Ready(classifier, engine, registry)
        with self._lock:
            if self.state == "stopped":  # shut down while loading
                stopping = True
            else:
                stopping = False
                self._ready = ready
                self.state = "ready"
                callbacks, self._on_ready = self._on_ready, []
        if stopping:
            engine.stop()
            return
        self.metrics.ready.set(1)
        logger.info(
            "ready: %s (%s) on %s in %.1f s; default adapter %s",
            settings.base_model,
            settings.quantization,
            classifier.device,
            time.perf_counter() - started,
            registry.default,
        )
        for callback in callbacks:
            callback(ready)
        self._record_graphs(ready)
        if settings.gc_freeze:
            with self._lock:  # not while stop() releases the model
                if self._ready is ready:
                    freeze_startup_objects()
                    self._frozen = True

    def _record_graphs(self, ready: Ready) -> None:
        """Record the CUDA graphs of the common batch shapes while requests are already served
        (each recording takes the forward lock once; a request waits for at most one)."""
        graphs = ready.classifier.graphs
        tokens = self.settings.cuda_graph_warmup_tokens
        if graphs is None or tokens < 1:
            return
        started, count = time.perf_counter(), 0
        try:
            for rows, length in graphs.settings.buckets(tokens):
                if self._ready is not ready:  # stopped meanwhile
                    return
                count += ready.classifier.record_graph(rows, length)
        except Exception as exc:  # noqa: BLE001 - a missing graph is recorded on first use
            logger.warning("recording CUDA graphs ahead of traffic stopped: %s", exc)
        logger.info(
            "%d CUDA graphs ready (prompts up to %d tokens) in %.1f s",
            count,
            tokens,
            time.perf_counter() - started,
        )

    def _load_default_adapter(self, registry: AdapterRegistry) -> None:
        wanted = self.settings.default_adapter
        if wanted is None:
            # The shipped adapter is the default only for the base model it was trained on.
            if self.settings.base_model != DEFAULT_BASE_MODEL:
                return
            if BUILTIN_DEFAULT_ADAPTER not in registry.available():
                return
            try:
                registry.load_blocking(BUILTIN_DEFAULT_ADAPTER)
            except AdapterInvalidError as exc:
                logger.warning("not using the shipped adapter: %s", exc.message)
                return
            registry.set_default(BUILTIN_DEFAULT_ADAPTER)
        elif wanted != BASE:
            registry.load_blocking(wanted)  # failing here is fatal: it was asked for
            registry.set_default(wanted)

    # -- serving ----------------------------------------------------------------------------

    def require_ready(self) -> Ready:
        """The loaded model, or ``NotReadyError`` (503 + Retry-After)."""
        ready = self._ready
        if ready is None:
            if self.state == "failed":
                raise NotReadyError(self.error or "the base model failed to load")
            if self.state == "stopped":
                raise NotReadyError("the service is shutting down")
            raise NotReadyError("the base model is still loading; retry shortly")
        return ready

    def describe(self) -> dict[str, Any]:
        """``GET /ready``'s answer."""
        ready = self.require_ready()
        base = ready.classifier.base
        graphs = ready.classifier.graphs
        return {
            "status": "ready",
            "base_model": base.ref.name,
            "quantization": base.quantization,
            "dequantized": base.dequantized,
            "device": str(base.device),
            "cuda_graphs": "off"
            if graphs is None
            else ("on" if graphs.broken is None else f"failed: {graphs.broken}"),
            "cuda_graphs_recorded": 0 if graphs is None else len(graphs.recorded),
            "default_adapter": ready.registry.default,
        }

    async def classify(
        self, pairs: Sequence[Pair], adapter: str | None, *, route: str
    ) -> list[dict[str, Any]]:
        """Score pairs through the batching worker; answers in input order."""
        ready = self.require_ready()
        target = ready.registry.acquire(adapter)
        release = None if target.entry is None else (lambda: ready.registry.release(target))
        try:
            future = ready.engine.submit(pairs, target.adapter, release=release)
        except BaseException:
            ready.registry.release(target)
            raise
        started = time.perf_counter()
        probs = await future
        self.metrics.classify_latency.labels(route, target.name).observe(
            time.perf_counter() - started
        )
        self.metrics.pairs.labels(route, target.name).inc(len(pairs))
        base_model = ready.base_model
        return [build_result(row, adapter=target.name, base_model=base_model) for row in probs]

    def score_function(
        self, target: Target, cancel: threading.Event | None
    ) -> Callable[[Sequence[Pair], str | None], np.ndarray]:
        """A ``score_fn`` for ``nli.evaluation``: ``target``'s adapter, or the base for None."""
        engine = self.require_ready().engine

        def score(pairs: Sequence[Pair], adapter: str | None) -> np.ndarray:
            return engine.score_blocking(
                pairs, None if adapter is None else target.adapter, cancel=cancel
            )

        return score
