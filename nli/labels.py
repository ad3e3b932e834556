"""The three NLI labels, in Hugging Face SNLI order (0, 1, 2)."""

from __future__ import annotations

from typing import Literal

Label = Literal["entailment", "neutral", "contradiction"]

LABELS: tuple[Label, Label, Label] = ("entailment", "neutral", "contradiction")
LABEL_TO_ID: dict[str, int] = {label: i for i, label in enumerate(LABELS)}

# Values that mean "no gold label" in SNLI-style data (HF: -1; original files: "-").
NO_GOLD_LABEL: frozenset[str] = frozenset({"-1", "-"})


class LabelValueError(ValueError):
    """A label value that is neither a label word nor an HF integer id."""


def parse_label(value: object) -> int | None:
    """Map a label word or HF integer id (also as text) to 0..2; ``None`` means "no gold label".

    Words are matched ignoring case and surrounding whitespace. Raises ``LabelValueError`` for
    anything else (including ``None``/empty, which are missing values, not "no gold label").
    """
    if isinstance(value, bool) or value is None:
        raise LabelValueError(f"invalid label {value!r}")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip().lower()
    else:
        raise LabelValueError(f"invalid label {value!r}")
    if text in LABEL_TO_ID:
        return LABEL_TO_ID[text]
    if text in NO_GOLD_LABEL:
        return None
    if text in {"0", "1", "2"}:
        return int(text)
    if not text:
        raise LabelValueError("empty label")
    raise LabelValueError(
        f"unknown label {value!r} (expected one of {', '.join(LABELS)}, or 0, 1, 2)"
    )


def build_result(probs: list[float], *, adapter: str, base_model: str) -> dict[str, object]:
    """The answer of ``POST /classify`` and of ``python -m nli classify --json``."""
    best = max(range(len(LABELS)), key=probs.__getitem__)
    return {
        "label": LABELS[best],
        "score": probs[best],
        "scores": [{"label": label, "score": p} for label, p in zip(LABELS, probs, strict=True)],
        "adapter": adapter,
        "base_model": base_model,
    }
