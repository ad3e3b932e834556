"""Keeping the garbage collector's full collections off long-lived objects (``gc.freeze``).

A full (generation 2) collection walks every object the collector tracks, with the interpreter
lock held. A process holding a model, its tokenizer and torch tracks ~0.5-0.6 million objects:
~0.2 s a full collection on a 2-core CPU, during which no other thread runs, including the one
that launches a GPU's kernels. Scoring allocates token-id lists for every pair, enough to set
one off every few passes over SNLI test (BENCHMARKS.md).

Freezing moves every object alive now into the collector's permanent generation, which later
collections skip; objects created afterwards are collected as usual. The service freezes its
start-up objects once, while its model lives (``freeze_startup_objects`` / ``thaw``);
``nli.evaluation`` freezes for the length of one evaluation (``objects_frozen``).

The collector has one permanent generation, so this module keeps count of its own freezes
instead of reading ``gc.get_freeze_count()``: objects may be frozen before any of ours (the
lent GPU machine's Python 3.12.3 starts with 375, even under ``python3 -I -S``, which made an
earlier version of ``objects_frozen`` take them for a freeze in place and skip its own).
Unfreezing hands every frozen object back, those others included; that costs nothing but a
few hundred more objects in later collections.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_startup_frozen = False  # freeze_startup_objects is in effect (until thaw)
_open_blocks = 0  # objects_frozen blocks running now; the first one froze, the last one thaws


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections.

    Returns how many objects are frozen. Objects created later (requests, adapters attached
    at run time) are collected as usual.
    """
    global _startup_frozen
    started = time.perf_counter()
    gc.collect()
    with _lock:
        gc.freeze()
        _startup_frozen = True
    frozen = gc.get_freeze_count()
    logger.info(
        "froze %d start-up objects for the garbage collector in %.2f s",
        frozen,
        time.perf_counter() - started,
    )
    return frozen


def thaw() -> None:
    """Hand the frozen objects back to the collector (when the model they belong to goes)."""
    global _startup_frozen
    with _lock:
        gc.unfreeze()
        _startup_frozen = False


@contextmanager
def objects_frozen() -> Iterator[bool]:
    """Exempt every object alive now from collections until the block ends; yields whether it
    froze. Where the service's start-up objects are frozen it changes nothing: unfreezing at
    the end would hand those back too. Blocks that overlap (evaluations on several threads)
    share the first one's freeze, and the last to end unfreezes. No collection first, unlike
    ``freeze_startup_objects``: garbage frozen here is collected after the block."""
    global _open_blocks
    with _lock:
        if _startup_frozen:
            froze = False
        else:
            froze = True
            if _open_blocks == 0:
                gc.freeze()
            _open_blocks += 1
    try:
        yield froze
    finally:
        if froze:
            with _lock:
                _open_blocks -= 1
                # The service may have frozen its start-up objects meanwhile: keep them frozen.
                if _open_blocks == 0 and not _startup_frozen:
                    gc.unfreeze()
