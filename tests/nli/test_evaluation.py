"""evaluate_dataset with a fake score function, and the report files."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nli.data import Example, NLIData
from nli.evaluation import evaluate_dataset, render_markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GOLD = [0, 1, 2, 0, 1, 2]
# Row by row: corrected, broken, both wrong, both right, corrected, both wrong.
ADAPTER = [0, 2, 1, 0, 1, 0]
BASE = [1, 1, 0, 0, 0, 1]
REPORT_KEYS = {
    "metrics",
    "base",
    "cases",
    "n",
    "dropped",
    "pairs_per_s",
    "adapter",
    "base_model",
    "source",
    "seconds",
}


def make_data(premises: Sequence[str] | None = None) -> NLIData:
    premises = premises or [f"p{i}" for i in range(len(GOLD))]
    examples = [Example(p, f"h{i}", g) for i, (p, g) in enumerate(zip(premises, GOLD, strict=True))]
    return NLIData(examples=examples, dropped=4, source="hand.jsonl")


class FakeScorer:
    """Probability 0.7 (adapter) or 0.6 (base) on the hand-made prediction of each row."""

    def __init__(self, data: NLIData) -> None:
        self.row_of = {(e.premise, e.hypothesis): i for i, e in enumerate(data.examples)}
        self.calls: list[tuple[int, str | None]] = []

    def __call__(self, pairs: Sequence[tuple[str, str]], adapter: str | None) -> np.ndarray:
        self.calls.append((len(pairs), adapter))
        predictions, top = (BASE, 0.6) if adapter is None else (ADAPTER, 0.7)
        probs = np.full((len(pairs), 3), (1 - top) / 2)
        for i, pair in enumerate(pairs):
            probs[i, predictions[self.row_of[pair]]] = top
        return probs


def test_cases_counts_and_progress() -> None:
    data = make_data()
    scorer = FakeScorer(data)
    progress: list[tuple[int, int]] = []
    report = evaluate_dataset(
        data,
        scorer,
        adapter="snli-r16",
        base_model="tiny/base",
        compare_base=True,
        chunk_size=4,
        max_examples_per_case=1,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert set(report) == REPORT_KEYS
    assert scorer.calls == [(4, "snli-r16"), (2, "snli-r16"), (4, None), (2, None)]
    assert progress == [(4, 12), (6, 12), (10, 12), (12, 12)]
    cases = report["cases"]
    assert {name: case["count"] for name, case in cases.items()} == {
        "corrected": 2,
        "broken": 1,
        "both_wrong": 2,
    }
    assert [len(case["examples"]) for case in cases.values()] == [1, 1, 1]
    assert cases["corrected"]["examples"][0] == {
        "row": 0,
        "premise": "p0",
        "hypothesis": "h0",
        "label": "entailment",
        "prediction": "entailment",
        "base_prediction": "neutral",
        "score": pytest.approx(0.7),
        "base_score": pytest.approx(0.6),
    }
    assert cases["broken"]["examples"][0]["row"] == 1
    assert cases["both_wrong"]["examples"][0]["row"] == 2
    assert report["metrics"]["accuracy"] == pytest.approx(3 / 6)
    assert report["base"]["metrics"]["accuracy"] == pytest.approx(2 / 6)
    assert (report["n"], report["dropped"], report["source"]) == (6, 4, "hand.jsonl")
    assert (report["adapter"], report["base_model"]) == ("snli-r16", "tiny/base")
    assert report["pairs_per_s"] > 0


def test_all_examples_when_under_the_limit() -> None:
    data = make_data()
    report = evaluate_dataset(
        data, FakeScorer(data), adapter="a", base_model="b", compare_base=True
    )
    assert [ex["row"] for ex in report["cases"]["corrected"]["examples"]] == [0, 4]
    assert [ex["row"] for ex in report["cases"]["both_wrong"]["examples"]] == [2, 5]


@pytest.mark.parametrize("adapter", [None, "base"])
def test_bare_base_only(adapter: str | None) -> None:
    data = make_data()
    scorer = FakeScorer(data)
    report = evaluate_dataset(data, scorer, adapter=adapter, base_model="b", compare_base=True)
    assert scorer.calls == [(6, None)]
    assert report["adapter"] == "base"
    assert report["base"] is None and report["cases"] is None
    assert report["metrics"]["accuracy"] == pytest.approx(2 / 6)


def test_no_base_pass_without_compare() -> None:
    data = make_data()
    scorer = FakeScorer(data)
    report = evaluate_dataset(data, scorer, adapter="a", base_model="b")
    assert scorer.calls == [(6, "a")]
    assert report["base"] is None and report["cases"] is None


def test_cancel_by_raising_from_progress() -> None:
    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        raise Cancelled

    data = make_data()
    scorer = FakeScorer(data)
    with pytest.raises(Cancelled):
        evaluate_dataset(data, scorer, adapter="a", base_model="b", chunk_size=2, progress=cancel)
    assert scorer.calls == [(2, "a")]


def test_wrong_shape_from_score_function() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate_dataset(
            make_data(),
            lambda pairs, adapter: np.zeros((len(pairs), 2)),
            adapter="a",
            base_model="b",
        )


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return int(struct.unpack(">I", data[16:20])[0])


def test_write_report_files(tmp_path: Path) -> None:
    data = make_data()
    report = evaluate_dataset(
        data, FakeScorer(data), adapter="a", base_model="b", compare_base=True
    )
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "confusion_matrix.png"]
    assert json.loads(paths[0].read_text(encoding="utf-8")) == report
    assert paths[1].read_text(encoding="utf-8") == render_markdown(report)
    side_by_side = png_width(paths[2])
    alone = evaluate_dataset(data, FakeScorer(data), adapter="a", base_model="b")
    single = write_report(alone, tmp_path / "alone")
    assert png_width(single[2]) < side_by_side


def test_markdown_sections_and_numbers() -> None:
    data = make_data()
    report = evaluate_dataset(
        data, FakeScorer(data), adapter="a", base_model="b", compare_base=True
    )
    text = render_markdown(report)
    assert "**Accuracy 50.00%**" in text
    assert "| accuracy | 33.33% | 50.00% | ▲ 16.67 pp |" in text
    assert "## Corrected by the adapter (base wrong, adapter right): 2" in text
    assert "## Broken by the adapter (base right, adapter wrong): 1" in text
    assert "## Wrong in both: 2" in text
    assert "| **entailment** | 2 | 0 | 0 |" in text  # adapter confusion row: gold entailment


def test_markdown_escapes_pipes_newlines_and_formulas() -> None:
    nasty = ["=SUM(A1)|x\ny", "+1", "-2 <b>", "@cmd", " =1", "*plain*"]
    data = make_data(nasty)
    report = evaluate_dataset(
        data, FakeScorer(data), adapter="a", base_model="b", compare_base=True
    )
    text = render_markdown(report)
    assert r"'=SUM(A1)\|x<br>y" in text
    assert r"'-2 \<b\>" in text
    assert r"\*plain\*" in text
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-"}:
            continue
        # Split on unescaped pipes; no cell may start with a formula character.
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        assert len(cells) >= 2, line
        for cell in cells:
            assert not cell.strip().startswith(("=", "+", "-", "@")), line


def test_empty_data_is_rejected() -> None:
    from nli.errors import DataError

    def never(pairs: Any, adapter: Any) -> np.ndarray:
        raise AssertionError

    with pytest.raises(DataError, match="no examples"):
        evaluate_dataset(NLIData([], 0, "x"), never, adapter="a", base_model="b")
