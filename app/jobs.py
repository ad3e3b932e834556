"""Evaluation jobs: a SQLite store under ``NLI_DATA_DIR`` and the thread that runs them.

Jobs, their progress and results live in SQLite (WAL), so they survive restarts. A job that was
running when the process died (``kill -9``, power loss) is marked ``failed`` with the reason at
the next start; queued jobs run after the restart. Only one server may use a data dir at a time
(an advisory lock, which the OS releases when the process dies).
"""

from __future__ import annotations

import fcntl
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.engine import EvaluationCancelled
from app.errors import JobConflictError
from app.metrics import Metrics
from nli.errors import ConfigError, JobNotFoundError, NLIError

logger = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
INTERRUPTED = "the server stopped while this job was running (restart or crash); submit it again"
SHUTDOWN = "the server shut down while this job was running; submit it again"
PROGRESS_EVERY_S = 0.25

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    adapter TEXT NOT NULL,
    compare_base INTEGER NOT NULL,
    source TEXT NOT NULL,
    upload TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
"""


@dataclass(frozen=True)
class Job:
    """One evaluation job as stored."""

    id: str
    status: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    adapter: str
    compare_base: bool
    source: str
    upload: str
    done: int
    total: int
    result: dict[str, Any] | None
    error: dict[str, str] | None

    def public(self) -> dict[str, Any]:
        """``GET /evaluate/{job_id}``'s answer."""
        return {
            "job_id": self.id,
            "status": self.status,
            "progress": {"done": self.done, "total": self.total},
            "result": self.result,
            "error": self.error,
            "adapter": self.adapter,
            "compare_base": self.compare_base,
            "source": self.source,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class JobStore:
    """Jobs in ``<data_dir>/jobs.sqlite3``; uploads in ``<data_dir>/uploads``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.uploads = self.data_dir / "uploads"
        try:
            self.uploads.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.data_dir / ".server.lock", "a+")
        except OSError as exc:
            raise ConfigError(f"NLI_DATA_DIR {self.data_dir} is not writable: {exc}") from None
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ConfigError(
                f"another server is using NLI_DATA_DIR {self.data_dir}; give each its own"
            ) from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        self._lock_file.close()

    def _recover(self) -> None:
        """Fail jobs cut off by the last shutdown or crash; delete uploads nobody needs."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status='failed', error=?, finished_at=? WHERE status='running'",
                (json.dumps({"type": "interrupted", "message": INTERRUPTED}), time.time()),
            )
            if cursor.rowcount:
                logger.warning("%d interrupted evaluation job(s) marked failed", cursor.rowcount)
            keep = {
                row["upload"]
                for row in self._db.execute("SELECT upload FROM jobs WHERE status='queued'")
            }
        for path in self.uploads.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # -- reads ------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no evaluation job {job_id!r}", details={"job_id": job_id})
        return _job(row)

    def next_queued(self) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE status='queued' ORDER BY created_at LIMIT 1"
            ).fetchone()
        return None if row is None else _job(row)

    def count(self, status: JobState) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()
        return int(row[0])

    # -- writes -----------------------------------------------------------------------------

    def new_upload_path(self, suffix: str) -> Path:
        """A fresh file name in the uploads folder."""
        return self.uploads / f"{uuid.uuid4().hex}{suffix}"

    def create(
        self, *, adapter: str, compare_base: bool, source: str, upload: Path, total: int
    ) -> Job:
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, created_at, adapter, compare_base, source, upload,"
                " total) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, time.time(), adapter, int(compare_base), source, upload.name, total),
            )
        return self.get(job_id)

    def start(self, job_id: str) -> bool:
        """queued -> running; False when it is no longer queued (cancelled meanwhile)."""
        return self._transition(job_id, "queued", "running", started_at=time.time())

    def progress(self, job_id: str, done: int, total: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET done=?, total=? WHERE id=? AND status='running'",
                (done, total, job_id),
            )

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        return self._transition(
            job_id, "running", "succeeded", finished_at=time.time(), result=json.dumps(result)
        )

    def fail(self, job_id: str, error_type: str, message: str) -> bool:
        error = json.dumps({"type": error_type, "message": message})
        return self._transition(job_id, "running", "failed", finished_at=time.time(), error=error)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; a no-op for a cancelled one; 409 once finished."""
        job = self.get(job_id)
        if job.status in ("queued", "running"):
            self._transition(job_id, job.status, "cancelled", finished_at=time.time())
            job = self.get(job_id)
        if job.status in ("succeeded", "failed"):
            raise JobConflictError(
                f"job {job_id!r} already {job.status}", details={"status": job.status}
            )
        return job

    def _transition(self, job_id: str, old: str, new: str, **values: Any) -> bool:
        columns = "".join(f", {name}=?" for name in values)
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET status=?{columns} WHERE id=? AND status=?",
                (new, *values.values(), job_id, old),
            )
        return cursor.rowcount == 1


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=row["status"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        adapter=row["adapter"],
        compare_base=bool(row["compare_base"]),
        source=row["source"],
        upload=row["upload"],
        done=row["done"],
        total=row["total"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
    )


# (job, its upload file, cancel event, progress(done, total)) -> the report
RunJob = Callable[[Job, Path, threading.Event, Callable[[int, int], None]], dict[str, Any]]


class JobRunner:
    """Runs queued jobs one at a time on a thread, in submission order."""

    def __init__(self, store: JobStore, run: RunJob, *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.run = run
        self.metrics = metrics
        self._cond = threading.Condition()
        self._stopping = False
        self._current: tuple[str, threading.Event] | None = None
        self._thread = threading.Thread(target=self._loop, name="nli-job-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A job was queued."""
        with self._cond:
            self._cond.notify()

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: at once when queued, at the next scoring step when running."""
        job = self.store.cancel(job_id)
        with self._cond:
            running = self._current is not None and self._current[0] == job_id
            if running and self._current is not None:
                self._current[1].set()
        if not running:
            (self.store.uploads / job.upload).unlink(missing_ok=True)
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job (it is marked failed with the reason) and the thread."""
        with self._cond:
            self._stopping = True
            if self._current is not None:
                self._current[1].set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            job = self.store.next_queued()
            if job is None:
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(timeout=5.0)
                continue
            try:
                self._run_one(job)
            except Exception:
                logger.exception("job %s: unexpected failure of the job runner", job.id)

    def _run_one(self, job: Job) -> None:
        cancel = threading.Event()
        with self._cond:
            if self._stopping:
                return
            self._current = (job.id, cancel)
        upload = self.store.uploads / job.upload
        try:
            if not self.store.start(job.id):
                return
            logger.info("job %s: evaluating %s with %s", job.id, job.source, job.adapter)
            last = 0.0

            def progress(done: int, total: int) -> None:
                nonlocal last
                if cancel.is_set():
                    raise EvaluationCancelled("cancelled")
                now = time.monotonic()
                if done >= total or now - last >= PROGRESS_EVERY_S:
                    last = now
                    self.store.progress(job.id, done, total)

            try:
                report = self.run(job, upload, cancel, progress)
            except EvaluationCancelled:
                if self._stopping:
                    self.store.fail(job.id, "interrupted", SHUTDOWN)
                    self._count("failed")
                else:
                    self._count("cancelled")  # the store already says so
                logger.info(
                    "job %s: stopped (%s)", job.id, "shutdown" if self._stopping else "cancelled"
                )
                return
            except NLIError as exc:
                self.store.fail(job.id, type(exc).__name__, exc.message)
                self._count("failed")
                logger.info("job %s: failed: %s", job.id, exc.message)
                return
            except Exception as exc:
                logger.exception("job %s: failed", job.id)
                self.store.fail(job.id, "internal_error", f"internal error ({type(exc).__name__})")
                self._count("failed")
                return
            if self.store.succeed(job.id, report):
                self._count("succeeded")
                logger.info("job %s: succeeded", job.id)
        finally:
            with self._cond:
                self._current = None
            if self.store.get(job.id).status in TERMINAL:
                upload.unlink(missing_ok=True)

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs.labels(status).inc()
