"""``nli.cpu_merge``: on a CPU, a steady adapter is scored from a merged copy of the weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nli.classifier import NLIClassifier
from nli.cpu_merge import MERGE_AFTER, SteadyMerge
from nli.loading import load_base_model
from tests.nli.adapters import PAIRS
from tests.nli.test_merged_slot import ATOL

ONE = PAIRS[:1]


@pytest.fixture(params=["dequantized", "unquantized"])
def classifier(
    tiny_model_dir: Path, graph_adapters: dict[str, Path], request: pytest.FixtureRequest
) -> Iterator[NLIClassifier]:
    """A classifier on a floating-point CPU base, merging steady adapters, with two attached."""
    if request.param == "dequantized":
        base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=True)
    else:
        base = load_base_model(str(tiny_model_dir), quantization="none", device="cpu")
    classifier = NLIClassifier(base, max_batch_size=4, cpu_merge=True)
    for name in ("first", "rank16"):
        classifier.attach_adapter(graph_adapters[name], name=name)
    yield classifier


def merger(classifier: NLIClassifier) -> SteadyMerge:
    assert classifier.cpu_merge is not None
    return classifier.cpu_merge


def unmerged(classifier: NLIClassifier, adapter: str | None) -> np.ndarray:
    """PEFT's path on the same classifier (the merge switched off for the call)."""
    kept, classifier.cpu_merge = classifier.cpu_merge, None
    try:
        return classifier.score_pairs(PAIRS, adapter)
    finally:
        classifier.cpu_merge = kept


def test_an_adapter_is_merged_after_a_streak_and_scores_as_peft(
    classifier: NLIClassifier,
) -> None:
    want = unmerged(classifier, "first")
    for _ in range(MERGE_AFTER - 1):
        classifier.score_pairs(ONE, "first")
    assert merger(classifier).holds is None  # still renting: PEFT's layers
    classifier.score_pairs(ONE, "first")
    assert merger(classifier).holds == "first"
    got = classifier.score_pairs(PAIRS, "first")
    np.testing.assert_allclose(got, want, atol=ATOL)
    # The merge carries the adapter: it is far nearer PEFT's scores than the bare base's.
    effect = np.abs(want - unmerged(classifier, None)).max()
    assert np.abs(got - want).max() < effect / 4
    # Another adapter, the bare base and mixed batches still take PEFT's path, unchanged.
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS, "rank16"), unmerged(classifier, "rank16"), atol=1e-6
    )
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS, None), unmerged(classifier, None), atol=1e-6
    )
    assert merger(classifier).holds == "first"  # kept until another streak replaces it
    np.testing.assert_allclose(classifier.score_pairs(PAIRS, "first"), want, atol=ATOL)


def test_a_new_streak_replaces_the_merge(classifier: NLIClassifier) -> None:
    for name in ("first", "rank16"):
        for _ in range(MERGE_AFTER):
            classifier.score_pairs(ONE, name)
        assert merger(classifier).holds == name
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS, "rank16"), unmerged(classifier, "rank16"), atol=ATOL
    )


def test_alternating_adapters_never_merge(classifier: NLIClassifier) -> None:
    for _ in range(2 * MERGE_AFTER):
        for adapter in ("first", None, "rank16"):
            classifier.score_pairs(ONE, adapter)
    assert merger(classifier).holds is None


def test_detaching_the_merged_adapter_drops_the_copy(classifier: NLIClassifier) -> None:
    for _ in range(MERGE_AFTER):
        classifier.score_pairs(ONE, "first")
    assert merger(classifier).holds == "first"
    classifier.detach_adapter("first")
    assert merger(classifier).holds is None and merger(classifier)._slot is None
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS, "rank16"), unmerged(classifier, "rank16"), atol=1e-6
    )


def test_an_adapter_a_merge_cannot_hold_keeps_peft_layers(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    classifier.attach_adapter(graph_adapters["dora"], name="dora")
    for _ in range(MERGE_AFTER + 1):
        got = classifier.score_pairs(PAIRS, "dora")
    assert merger(classifier).holds is None
    np.testing.assert_allclose(got, unmerged(classifier, "dora"), atol=1e-6)


def test_a_packed_nf4_base_never_merges(
    tiny_model_dir: Path, graph_adapters: dict[str, Path]
) -> None:
    classifier = NLIClassifier(load_base_model(str(tiny_model_dir), device="cpu"), cpu_merge=True)
    classifier.attach_adapter(graph_adapters["first"], name="first")
    for _ in range(MERGE_AFTER + 1):
        got = classifier.score_pairs(PAIRS, "first")
    assert merger(classifier).unsupported and merger(classifier).holds is None
    np.testing.assert_allclose(got, unmerged(classifier, "first"), atol=1e-6)


def test_off_by_default_and_on_a_cpu_only(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), quantization="none", device="cpu")
    assert NLIClassifier(base).cpu_merge is None
    with pytest.raises(ValueError, match="at least 1"):
        SteadyMerge(after=0)
