"""The adapter registry: public adapter names, their folders, hot-swap and safe unloading.

Verbs mirror PEFT: load, unload, set default. Public names map to opaque internal PEFT adapter
names (``nli_1``, ``nli_2``, ...), so ``replace`` can attach the new files under a fresh name,
switch the public name over atomically, and detach the old version once nothing uses it.

Every scoring request holds a *lease* on the adapter version it was routed to, from the moment
it is queued until it is scored: an unloaded or replaced version is detached only when its last
lease is released. So no request fails and none is scored with the wrong adapter while adapters
are loaded, unloaded or switched. Attach and detach run on the engine's worker thread, between
forward passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from app.engine import BatchEngine
from app.metrics import Metrics
from app.settings import ADAPTER_NAME_RE, BASE
from nli.classifier import LoadedAdapter, NLIClassifier
from nli.errors import (
    AdapterConflictError,
    AdapterInvalidError,
    AdapterNotFoundError,
    NLIError,
    NotReadyError,
)
from nli.fsutil import is_partial_name
from nli.manifest import MANIFEST_FILE, WEIGHTS_FILE, adapter_size_bytes

logger = logging.getLogger(__name__)

Source = Literal["adapters_dir", "builtin"]
LoadStatus = Literal["loaded", "unchanged", "replaced"]
# How long DELETE waits for in-flight work on the adapter before answering "detached: false".
UNLOAD_WAIT_S = 10.0


@dataclass(eq=False)
class AdapterEntry:
    """One loaded version of an adapter."""

    name: str
    internal: str
    folder: Path
    source: Source
    fingerprint: str
    size_bytes: int
    loaded: LoadedAdapter
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    refs: int = 0
    retired: bool = False
    detached: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)

    def describe(self) -> dict[str, Any]:
        """The public description (``GET /adapters``)."""
        manifest = self.loaded.manifest
        return {
            "name": self.name,
            "base_model": manifest.base_model,
            "size_bytes": self.size_bytes,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "prompt_format": manifest.prompt_format,
            "created_at": manifest.created_at,
            "loaded_at": self.loaded_at,
            "metrics": manifest.metrics,
        }


@dataclass(frozen=True)
class Target:
    """Where a request is routed: a public name and the PEFT adapter (None for the base)."""

    name: str
    adapter: str | None
    entry: AdapterEntry | None


def check_adapter_name(name: str) -> None:
    """Refuse names that are not plain folder names, and the reserved ``base``."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise AdapterInvalidError(
            "adapter names are 1-64 characters of letters, digits, '.', '_' and '-', "
            "not starting with '.'"
        )
    if name.lower() == BASE:
        raise AdapterConflictError("'base' is reserved: it always means the bare base model")


def folder_fingerprint(folder: Path) -> str:
    """sha256 of every file's relative path and contents (what "unchanged files" means)."""
    return _fingerprint_keeping_weights(folder)[0]


def _fingerprint_keeping_weights(folder: Path) -> tuple[str, bytes | None]:
    """``folder_fingerprint`` and the weights file's bytes as hashed (None if it is absent).

    The fast attach loads those bytes (``NLIClassifier.read_adapter(weights=...)``): the
    weights are read once, and the fingerprint describes exactly the weights attached even if
    the file is replaced meanwhile. PEFT's path (the first adapter on a bare base, adapters
    other than plain LoRA) reads the folder itself.
    """
    digest = hashlib.sha256()
    weights: bytes | None = None
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        digest.update(str(relative).encode() + b"\0")
        if relative == Path(WEIGHTS_FILE):
            weights = path.read_bytes()
            digest.update(weights)
            continue
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest(), weights


class AdapterRegistry:
    """Loaded adapters by public name, the default adapter, and leases on adapter versions."""

    def __init__(
        self,
        engine: BatchEngine,
        classifier: NLIClassifier,
        *,
        adapters_dir: Path,
        builtin_dir: Path | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.classifier = classifier
        self.roots: list[tuple[Path, Source]] = [(Path(adapters_dir), "adapters_dir")]
        if builtin_dir is not None:
            self.roots.append((Path(builtin_dir), "builtin"))
        self.metrics = metrics
        self._lock = threading.Lock()  # guards _entries, _default and every refcount
        self._entries: dict[str, AdapterEntry] = {}
        self._default = BASE
        # Per-name admin locks, with a count of holders and waiters so that unused ones go away.
        self._name_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._internal_ids = itertools.count(1)

    # -- reading ----------------------------------------------------------------------------

    @property
    def default(self) -> str:
        return self._default

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def describe(self) -> dict[str, Any]:
        """``{default, loaded, available}`` as ``GET /adapters`` answers it."""
        with self._lock:
            loaded = [self._entries[name].describe() for name in sorted(self._entries)]
            default = self._default
        return {"default": default, "loaded": loaded, "available": self.available()}

    def available(self) -> list[str]:
        """Names of complete adapter folders in the adapters dir and the built-in dir."""
        names: set[str] = set()
        for root, _ in self.roots:
            if not root.is_dir():
                continue
            resolved_root = root.resolve()
            for child in root.iterdir():
                if is_partial_name(child.name) or not ADAPTER_NAME_RE.fullmatch(child.name):
                    continue
                if child.name.lower() == BASE:
                    continue
                try:
                    target = child.resolve()
                except OSError:
                    continue
                if target.is_relative_to(resolved_root) and (target / MANIFEST_FILE).is_file():
                    names.add(child.name)
        return sorted(names)

    # -- leases -----------------------------------------------------------------------------

    def acquire(self, name: str | None) -> Target:
        """Route a request: ``None`` is the default, ``base`` the bare base model.

        The caller must ``release`` the target once its pairs are scored.
        """
        with self._lock:
            public = self._default if name is None else name
            if public == BASE:
                return Target(BASE, None, None)
            entry = self._entries.get(public)
            if entry is None:
                raise AdapterNotFoundError(
                    f"adapter {public!r} is not loaded", details={"adapter": public}
                )
            entry.refs += 1
            return Target(public, entry.internal, entry)

    def release(self, target: Target) -> None:
        """End a lease; the last lease on a retired version detaches it."""
        entry = target.entry
        if entry is None:
            return
        with self._lock:
            entry.refs -= 1
            detach = entry.retired and entry.refs == 0
        if detach:
            self._detach(entry)

    # -- admin ------------------------------------------------------------------------------

    async def load(self, name: str, *, replace: bool = False) -> tuple[AdapterEntry, LoadStatus]:
        """Load ``name`` from the adapters dir (then the built-in dir); see ``load_blocking``."""
        check_adapter_name(name)
        async with self._locked(name):
            return await asyncio.to_thread(self.load_blocking, name, replace=replace)

    def load_blocking(self, name: str, *, replace: bool = False) -> tuple[AdapterEntry, LoadStatus]:
        """Load an adapter; a no-op for unchanged files, 409 for changed ones unless ``replace``.

        Never call from the event loop (it waits for the worker thread).
        """
        check_adapter_name(name)
        started = time.perf_counter()
        folder, source = self.locate(name)
        fingerprint, weights = _fingerprint_keeping_weights(folder)
        hashed = time.perf_counter()
        with self._lock:
            current = self._entries.get(name)
        if current is not None:
            if current.fingerprint == fingerprint:
                return current, "unchanged"
            if not replace:
                raise AdapterConflictError(
                    f"adapter {name!r} is loaded from different files; "
                    "send replace: true to swap the new files in",
                    details={"adapter": name},
                )
        internal = f"nli_{next(self._internal_ids)}"
        try:
            # Files are read and checked here, while requests are still scored; only attaching
            # the weights pauses the scoring worker.
            read = self.classifier.read_adapter(folder, name=name, weights=weights)
            loaded = self.engine.run_exclusive(
                lambda: self.classifier.attach_adapter(folder, name=internal, read=read)
            ).result()
        except NLIError:
            raise
        except Exception as exc:  # e.g. weights that pass the header check but do not load
            logger.warning("adapter %s cannot be loaded", name, exc_info=exc)
            raise AdapterInvalidError(
                f"adapter {name!r} cannot be loaded: {type(exc).__name__}"
            ) from None
        entry = AdapterEntry(
            name=name,
            internal=internal,
            folder=folder,
            source=source,
            fingerprint=fingerprint,
            size_bytes=adapter_size_bytes(folder),
            loaded=loaded,
        )
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = entry
            count = len(self._entries)
        if old is not None:
            self._retire(old)
        self._count("replace" if old is not None else "load", count)
        logger.info(
            "adapter %s %s from %s in %.1f ms (fingerprint %.1f ms)",
            name,
            "replaced" if old else "loaded",
            folder,
            1000 * (time.perf_counter() - started),
            1000 * (hashed - started),
        )
        return entry, "replaced" if old is not None else "loaded"

    async def unload(self, name: str) -> bool:
        """Unlist ``name`` at once; True when its weights were freed within ``UNLOAD_WAIT_S``.

        In-flight requests that already hold it are still scored with it; its weights are freed
        when the last of them is done.
        """
        if name.lower() == BASE:
            raise AdapterConflictError("'base' is the bare base model and cannot be unloaded")
        async with self._locked(name):
            with self._lock:
                entry = self._entries.get(name)
                if entry is None:
                    raise AdapterNotFoundError(
                        f"adapter {name!r} is not loaded", details={"adapter": name}
                    )
                if name == self._default:
                    raise AdapterConflictError(
                        f"adapter {name!r} is the default; set another default first",
                        details={"adapter": name},
                    )
                del self._entries[name]
                count = len(self._entries)
            self._retire(entry)
            self._count("unload", count)
            try:
                await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(entry.detached)), UNLOAD_WAIT_S
                )
            except TimeoutError:
                logger.info("adapter %s unlisted; freed when its in-flight work ends", name)
                return False
            return True

    def set_default(self, name: str) -> str:
        """Make a loaded adapter (or ``base``) the default; 404 when it is not loaded."""
        with self._lock:
            if name != BASE and name not in self._entries:
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded; load it before making it the default",
                    details={"adapter": name},
                )
            self._default = name
        self._count("set_default", None)
        logger.info("default adapter is now %s", name)
        return name

    # -- internals --------------------------------------------------------------------------

    def locate(self, name: str) -> tuple[Path, Source]:
        """The folder of ``name``; it must resolve inside its adapters dir, links included."""
        for root, source in self.roots:
            candidate = root / name
            if not candidate.exists() and not candidate.is_symlink():
                continue
            resolved_root = root.resolve()
            folder = candidate.resolve()
            if not folder.is_relative_to(resolved_root) or folder == resolved_root:
                raise AdapterInvalidError(
                    f"adapter {name!r} resolves outside the adapters dir; refusing to load it"
                )
            if not folder.is_dir():
                raise AdapterInvalidError(f"adapter {name!r} is not a folder")
            for path in folder.rglob("*"):
                if not path.resolve().is_relative_to(resolved_root):
                    raise AdapterInvalidError(
                        f"adapter {name!r} links to files outside the adapters dir; "
                        "refusing to load it"
                    )
            return folder, source
        raise AdapterNotFoundError(
            f"no adapter named {name!r} in the adapters dir", details={"adapter": name}
        )

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        # Only the event loop touches _name_locks, so the dict needs no lock of its own.
        lock, users = self._name_locks.get(name, (asyncio.Lock(), 0))
        self._name_locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._name_locks[name]
            if users == 1:
                del self._name_locks[name]
            else:
                self._name_locks[name] = (lock, users - 1)

    def _retire(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.retired = True
            detach = entry.refs == 0
        if detach:
            self._detach(entry)

    def _detach(self, entry: AdapterEntry) -> None:
        def detach() -> None:
            self.classifier.detach_adapter(entry.internal)

        future = self.engine.run_exclusive(detach)

        def done(f: concurrent.futures.Future[None]) -> None:
            error = f.exception()
            if error is not None and not isinstance(error, NotReadyError):  # not at shutdown
                logger.error(
                    "detaching adapter %s (%s) failed: %s", entry.name, entry.internal, error
                )
            if not entry.detached.done():
                entry.detached.set_result(None)

        future.add_done_callback(done)

    def _count(self, operation: str, loaded: int | None) -> None:
        if self.metrics is None:
            return
        self.metrics.adapter_loads.labels(operation).inc()
        if loaded is not None:
            self.metrics.adapters_loaded.set(loaded)
