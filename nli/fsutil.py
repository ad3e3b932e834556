"""Atomic folder writes: a folder is either complete under its final name or absent."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final``.

    The temporary name starts with a dot and ends with ``.partial`` so that nothing that lists
    adapters or models ever picks it up. On an exception the temporary folder is removed and
    ``final`` is untouched. With ``replace``, an existing ``final`` is swapped out (moved aside,
    then deleted) after the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_tree(root: Path) -> None:
    # Flush file contents before the rename, so a crash cannot leave a renamed folder with
    # empty files in it.
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def is_partial_name(name: str) -> bool:
    """True for names that ``atomic_directory`` uses for unfinished or retired folders."""
    return name.startswith(".")
