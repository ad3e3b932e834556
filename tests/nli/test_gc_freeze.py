"""``nli.gc_freeze``: long-lived objects kept out of the collector's way (service, evaluation)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence

import numpy as np
import pytest

from nli.data import Example, NLIData
from nli.evaluation import evaluate_dataset
from nli.gc_freeze import freeze_startup_objects, objects_frozen, thaw


@pytest.fixture(autouse=True)
def nothing_frozen() -> None:
    """Start each test with no object frozen: some interpreters start with a few hundred."""
    gc.unfreeze()


class Node:
    """An object that points at itself: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_frozen_objects_are_skipped_until_thawed() -> None:
    assert gc.get_freeze_count() == 0
    node = Node()
    ref = weakref.ref(node)
    try:
        assert freeze_startup_objects() == gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # unreachable, but frozen: skipped
    finally:
        thaw()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_objects_alive_at_the_start_of_the_block_are_skipped_until_it_ends() -> None:
    assert gc.get_freeze_count() == 0
    node = Node()
    ref = weakref.ref(node)
    with objects_frozen() as froze:
        assert froze and gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None
        young = Node()  # made inside the block: collected as usual
        young_ref = weakref.ref(young)
        del young
        gc.collect()
        assert young_ref() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_objects_frozen_leaves_an_earlier_freeze_alone() -> None:
    frozen = freeze_startup_objects()
    try:
        with objects_frozen() as froze:
            assert not froze
        assert gc.get_freeze_count() == frozen  # the service's freeze is still in place
    finally:
        thaw()


def test_objects_frozen_freezes_even_when_other_code_froze_objects_first() -> None:
    # Some interpreters start with objects frozen (375 on the lent GPU machine's Python 3.12);
    # an earlier version took any frozen object for the service's freeze and skipped its own.
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        node = Node()
        ref = weakref.ref(node)
        with objects_frozen() as froze:
            assert froze and gc.get_freeze_count() > before
            del node
            gc.collect()
            assert ref() is not None
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_overlapping_blocks_share_one_freeze_until_the_last_ends() -> None:
    first, second = objects_frozen(), objects_frozen()
    assert first.__enter__() and second.__enter__()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    first.__exit__(None, None, None)
    assert gc.get_freeze_count() == frozen  # the second evaluation still runs
    second.__exit__(None, None, None)
    assert gc.get_freeze_count() == 0


def test_a_block_that_ends_after_the_service_froze_keeps_that_freeze() -> None:
    with objects_frozen() as froze:
        assert froze
        assert freeze_startup_objects() > 0
    try:
        assert gc.get_freeze_count() > 0  # still frozen (less what reference counting freed)
    finally:
        thaw()
    assert gc.get_freeze_count() == 0


def test_objects_frozen_ends_on_an_exception() -> None:
    with pytest.raises(RuntimeError), objects_frozen():
        raise RuntimeError("cancelled")
    assert gc.get_freeze_count() == 0


def test_an_evaluation_scores_with_the_objects_alive_before_it_frozen() -> None:
    examples = [Example(f"premise {i}", f"hypothesis {i}", i % 3) for i in range(9)]
    data = NLIData(examples, dropped=0, source="test")
    seen: list[int] = []

    def score(pairs: Sequence[tuple[str, str]], adapter: str | None) -> np.ndarray:
        seen.append(gc.get_freeze_count())
        return np.tile([0.5, 0.3, 0.2], (len(pairs), 1))

    report = evaluate_dataset(
        data, score, adapter="a", base_model="m", compare_base=True, chunk_size=4
    )
    assert report["n"] == 9 and len(seen) == 6  # 3 chunks, adapter and base
    assert all(count > 0 for count in seen)
    assert gc.get_freeze_count() == 0


class WatchedExamples(list[Example]):
    """The examples, noting whether objects were frozen whenever evaluation walked them."""

    def __init__(self, examples: list[Example]) -> None:
        super().__init__(examples)
        self.frozen_while_read: list[bool] = []

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.frozen_while_read.append(gc.get_freeze_count() > 0)
        return super().__iter__()


def test_an_evaluation_is_frozen_from_reading_its_examples_to_its_report() -> None:
    # Building the pairs and the report allocates as much as scoring does: a collection that
    # has come due would go off there just as well.
    examples = WatchedExamples([Example(f"p {i}", f"h {i}", i % 3) for i in range(9)])
    data = NLIData(examples, dropped=0, source="test")
    report = evaluate_dataset(
        data, lambda pairs, adapter: np.tile([0.5, 0.3, 0.2], (len(pairs), 1)),
        adapter="a", base_model="m", compare_base=True,
    )  # fmt: skip
    assert report["n"] == 9
    assert examples.frozen_while_read and all(examples.frozen_while_read)
    assert gc.get_freeze_count() == 0
