"""Classification metrics for NLI, computed by scikit-learn and returned as plain JSON types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from nli.labels import LABELS

_LABEL_IDS = list(range(len(LABELS)))


def compute_metrics(
    gold: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the 3x3 confusion matrix.

    Confusion-matrix rows are gold labels, columns predicted labels, both in ``LABELS`` order;
    the matrix is always 3x3 and metrics of labels absent from the data are 0 (zero_division=0).
    Raises ``ValueError`` on empty or unequal inputs or ids outside 0..2.
    """
    y_true = np.asarray(gold, dtype=np.int64)
    y_pred = np.asarray(predicted, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(
            f"gold and predicted must be flat and of equal length, got {y_true.shape} and "
            f"{y_pred.shape}"
        )
    if y_true.size == 0:
        raise ValueError("no examples to compute metrics on")
    for name, values in (("gold", y_true), ("predicted", y_pred)):
        if values.min() < 0 or values.max() >= len(LABELS):
            raise ValueError(f"{name} label ids must be in 0..{len(LABELS) - 1}")

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=_LABEL_IDS, zero_division=0
    )
    per_label = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(LABELS)
    }
    counts = confusion_matrix(y_true, y_pred, labels=_LABEL_IDS)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=_LABEL_IDS, average="macro", zero_division=0)
        ),
        "per_label": per_label,
        "confusion_matrix": {
            "labels": list(LABELS),
            "counts": [[int(c) for c in row] for row in counts],
        },
    }
