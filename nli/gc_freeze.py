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
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections.

    Returns how many objects are frozen. Objects created later (requests, adapters attached
    at run time) are collected as usual.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "froze %d start-up objects for the garbage collector in %.2f s",
        frozen,
        time.perf_counter() - started,
    )
    return frozen


def thaw() -> None:
    """Hand the frozen objects back to the collector (when the model they belong to goes)."""
    gc.unfreeze()


@contextmanager
def objects_frozen() -> Iterator[bool]:
    """Exempt every object alive now from collections until the block ends; yields whether it
    froze. Where objects are frozen already (a service's start-up objects) it changes nothing:
    unfreezing at the end would hand those back too. No collection first, unlike
    ``freeze_startup_objects``: garbage frozen here is collected after the block."""
    if gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()
