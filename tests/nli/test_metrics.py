"""compute_metrics against a hand-computed example."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nli.metrics import compute_metrics

# Rows 0-9; correct at 0, 1, 3, 5, 6, 8, 9 (7 of 10).
GOLD = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]
PREDICTED = [0, 0, 1, 1, 2, 2, 2, 0, 2, 1]


def test_hand_computed_example() -> None:
    metrics = compute_metrics(GOLD, PREDICTED)
    assert metrics["accuracy"] == pytest.approx(0.7)
    # entailment: TP 2 (rows 0, 1), FP 1 (row 7), FN 1 (row 2)
    # neutral: TP 2 (rows 3, 9), FP 1 (row 2), FN 1 (row 4)
    # contradiction: TP 3 (rows 5, 6, 8), FP 1 (row 4), FN 1 (row 7)
    expected = {
        "entailment": (2 / 3, 2 / 3, 2 / 3, 3),
        "neutral": (2 / 3, 2 / 3, 2 / 3, 3),
        "contradiction": (3 / 4, 3 / 4, 3 / 4, 4),
    }
    for label, (precision, recall, f1, support) in expected.items():
        got = metrics["per_label"][label]
        assert got["precision"] == pytest.approx(precision)
        assert got["recall"] == pytest.approx(recall)
        assert got["f1"] == pytest.approx(f1)
        assert got["support"] == support
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert metrics["confusion_matrix"] == {
        "labels": ["entailment", "neutral", "contradiction"],
        "counts": [[2, 1, 0], [0, 2, 1], [1, 0, 3]],
    }


def test_plain_json_types_and_numpy_input() -> None:
    metrics = compute_metrics(np.array(GOLD), np.array(PREDICTED))
    assert json.loads(json.dumps(metrics)) == metrics
    assert type(metrics["accuracy"]) is float
    assert type(metrics["per_label"]["neutral"]["support"]) is int


def test_always_three_by_three_with_zero_division_zero() -> None:
    metrics = compute_metrics([0, 0], [0, 0])
    assert metrics["confusion_matrix"]["counts"] == [[2, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert metrics["per_label"]["neutral"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    assert metrics["accuracy"] == 1.0
    assert metrics["macro_f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("gold", "predicted"), [([], []), ([0, 1], [0]), ([0, 3], [0, 1]), ([0, 1], [-1, 1])]
)
def test_bad_inputs(gold: list[int], predicted: list[int]) -> None:
    with pytest.raises(ValueError):
        compute_metrics(gold, predicted)
