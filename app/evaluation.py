"""``POST /evaluate``: uploads to a file, validation, then a synchronous report or a job.

The report is ``nli.evaluation.evaluate_dataset``'s, the same object ``nli-train evaluate``
writes to ``report.json``. Files are read and validated in full before anything is stored, so a
bad file is a 400 naming the row and column and leaves no job behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from starlette.concurrency import run_in_threadpool

from app.jobs import Job, JobRunner, JobStore
from app.metrics import Metrics
from app.registry import Target
from app.runtime import ModelRuntime
from app.settings import Settings
from nli.data import SUPPORTED_SUFFIXES, NLIData, read_nli_file
from nli.errors import PayloadTooLargeError, QueueFullError, UnsupportedFileTypeError
from nli.evaluation import evaluate_dataset

logger = logging.getLogger(__name__)

# Pairs handed to the scorer per progress step (and per cancellation check) in a job.
JOB_CHUNK_PAIRS = 1024
MAX_QUEUED_JOBS = 100
_COPY_BLOCK = 1 << 20


def upload_source(filename: str | None) -> tuple[str, str]:
    """The display name and lower-case suffix of an uploaded file; 415 for other types."""
    name = Path((filename or "").replace("\\", "/")).name[-200:]
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFileTypeError(
            f"unsupported file type {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}",
            details={"suffix": suffix, "supported": list(SUPPORTED_SUFFIXES)},
        )
    return name, suffix


def save_upload(source: IO[bytes], target: Path, *, max_bytes: int) -> int:
    """Copy an upload to ``target``; 413 (and nothing left behind) past ``max_bytes``."""
    source.seek(0)
    written = 0
    try:
        with open(target, "wb") as out:
            while block := source.read(_COPY_BLOCK):
                written += len(block)
                if written > max_bytes:
                    raise PayloadTooLargeError(
                        f"the file is over the upload limit of {max_bytes:,} bytes",
                        details={"max_upload_bytes": max_bytes},
                    )
                out.write(block)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return written


class EvaluationService:
    """Runs evaluations synchronously or as jobs, with the same report either way."""

    def __init__(
        self, settings: Settings, runtime: ModelRuntime, store: JobStore, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.runner = JobRunner(store, self._run_job, metrics=metrics)

    async def submit(
        self,
        upload: IO[bytes],
        filename: str | None,
        *,
        adapter: str | None,
        compare_base: bool,
        run_async: bool,
    ) -> tuple[int, dict[str, Any]]:
        """``(200, report)`` for a small synchronous evaluation, else ``(202, {job_id, ...})``."""
        ready = self.runtime.require_ready()
        source, suffix = upload_source(filename)
        target = ready.registry.acquire(adapter)
        path = self.store.new_upload_path(suffix)
        keep = False
        try:
            await run_in_threadpool(
                save_upload, upload, path, max_bytes=self.settings.max_upload_bytes
            )
            data = await run_in_threadpool(self._read, path, source)
            if len(data.examples) <= self.settings.eval_sync_max_rows and not run_async:
                report = await run_in_threadpool(self._evaluate, data, target, compare_base)
                return 200, report
            if self.store.count("queued") >= MAX_QUEUED_JOBS:
                raise QueueFullError(f"{MAX_QUEUED_JOBS} evaluation jobs are already queued")
            passes = 2 if compare_base and target.adapter is not None else 1
            job = self.store.create(
                adapter=target.name,
                compare_base=compare_base,
                source=source,
                upload=path,
                total=len(data.examples) * passes,
            )
            keep = True
            self.runner.notify()
            logger.info("job %s queued: %d pairs of %s", job.id, len(data.examples), source)
            return 202, {"job_id": job.id, "status": job.status}
        finally:
            ready.registry.release(target)
            if not keep:
                path.unlink(missing_ok=True)

    def _read(self, path: Path, source: str) -> NLIData:
        return read_nli_file(path, max_text_chars=self.settings.max_text_chars, display_name=source)

    def _evaluate(
        self,
        data: NLIData,
        target: Target,
        compare_base: bool,
        *,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        ready = self.runtime.require_ready()
        return evaluate_dataset(
            data,
            self.runtime.score_function(target, cancel),
            adapter=target.name,
            base_model=ready.base_model,
            compare_base=compare_base,
            chunk_size=JOB_CHUNK_PAIRS,
            progress=progress,
        )

    def _run_job(
        self,
        job: Job,
        upload: Path,
        cancel: threading.Event,
        progress: Callable[[int, int], None],
    ) -> dict[str, Any]:
        data = self._read(upload, job.source)
        registry = self.runtime.require_ready().registry
        target = registry.acquire(job.adapter)
        try:
            return self._evaluate(data, target, job.compare_base, cancel=cancel, progress=progress)
        finally:
            registry.release(target)
