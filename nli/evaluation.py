"""Evaluation of an adapter (optionally against the bare base) and its report files.

``nli-train evaluate`` and ``POST /evaluate`` both call ``evaluate_dataset`` and ``write_report``,
so the CLI and the service return the same report object.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nli.data import NLIData
from nli.errors import ConfigError, DataError
from nli.gc_freeze import objects_frozen
from nli.labels import LABELS
from nli.metrics import compute_metrics

logger = logging.getLogger(__name__)

# (pairs, adapter name or None for the bare base) -> probabilities [N, 3] in LABELS order.
ScoreFn = Callable[[Sequence[tuple[str, str]], str | None], np.ndarray]
# (done, total) after each chunk; raising from it cancels the evaluation.
ProgressFn = Callable[[int, int], None]

CASES = {
    "corrected": "Corrected by the adapter (base wrong, adapter right)",
    "broken": "Broken by the adapter (base right, adapter wrong)",
    "both_wrong": "Wrong in both",
}
REPORT_FILES = ("report.json", "report.md", "confusion_matrix.png")


def _score_all(
    pairs: list[tuple[str, str]],
    score: ScoreFn,
    adapter: str | None,
    *,
    chunk_size: int,
    done: int,
    total: int,
    progress: ProgressFn | None,
) -> tuple[np.ndarray, float]:
    """Probabilities for every pair, scored chunk by chunk, and the seconds spent scoring."""
    probs = np.empty((len(pairs), len(LABELS)), dtype=np.float64)
    seconds = 0.0
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        began = time.perf_counter()
        out = np.asarray(score(chunk, adapter), dtype=np.float64)
        seconds += time.perf_counter() - began
        if out.shape != (len(chunk), len(LABELS)):
            raise ValueError(
                f"score function returned shape {out.shape} for {len(chunk)} pairs, "
                f"expected ({len(chunk)}, {len(LABELS)})"
            )
        probs[start : start + len(chunk)] = out
        done += len(chunk)
        logger.debug("scored %d/%d pairs", done, total)
        if progress is not None:
            progress(done, total)
    return probs, seconds


def _case_example(
    data: NLIData, row: int, adapter_probs: np.ndarray, base_probs: np.ndarray
) -> dict[str, Any]:
    example = data.examples[row]
    prediction = int(adapter_probs[row].argmax())
    base_prediction = int(base_probs[row].argmax())
    return {
        "row": row,
        "premise": example.premise,
        "hypothesis": example.hypothesis,
        "label": LABELS[example.label],
        "prediction": LABELS[prediction],
        "base_prediction": LABELS[base_prediction],
        "score": float(adapter_probs[row, prediction]),
        "base_score": float(base_probs[row, base_prediction]),
    }


def evaluate_dataset(
    data: NLIData,
    score: ScoreFn,
    *,
    adapter: str | None,
    base_model: str,
    compare_base: bool = False,
    chunk_size: int = 4096,
    max_examples_per_case: int = 25,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score ``data`` with ``adapter`` (``None`` or ``"base"``: the bare base) and build the report.

    With ``compare_base`` (and an adapter) the base is scored too, and the report gets the base's
    metrics plus the corrected / broken / both-wrong cases, each with its full count and the first
    ``max_examples_per_case`` examples in data order. ``progress(done, total)`` is called after
    every chunk, ``total`` counting both passes; an exception raised by it propagates and cancels.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    if max_examples_per_case < 0:
        raise ConfigError(f"max_examples_per_case must be >= 0, got {max_examples_per_case}")
    if not data.examples:
        raise DataError("no examples to evaluate", source=data.source)
    if adapter == "base":  # the name "base" always means "no adapter"
        adapter = None
    # The model, tokenizer and data are alive throughout: a full collection set off by this
    # evaluation's allocations would walk them all with the interpreter lock held
    # (nli.gc_freeze). Frozen from the first allocation to the report: a collection that has
    # come due can go off outside the scoring too (0.53 s in one Qwen2-1.5B-shape pass on an
    # H100 machine while only the scoring was frozen).
    with objects_frozen():
        return _evaluate(data, score, adapter, base_model, compare_base, chunk_size,
                         max_examples_per_case, progress)  # fmt: skip


def _evaluate(
    data: NLIData,
    score: ScoreFn,
    adapter: str | None,
    base_model: str,
    compare_base: bool,
    chunk_size: int,
    max_examples_per_case: int,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    pairs = [(e.premise, e.hypothesis) for e in data.examples]
    gold = np.fromiter((e.label for e in data.examples), dtype=np.int64, count=len(pairs))
    with_base = compare_base and adapter is not None
    total = len(pairs) * (2 if with_base else 1)
    logger.info(
        "evaluating %s on %s (%d pairs%s)",
        adapter or "base",
        data.source,
        len(pairs),
        ", with base" if with_base else "",
    )
    kwargs: dict[str, Any] = {"chunk_size": chunk_size, "total": total, "progress": progress}
    probs, seconds = _score_all(pairs, score, adapter, done=0, **kwargs)
    base_probs: np.ndarray | None = None
    if with_base:
        base_probs, base_seconds = _score_all(pairs, score, None, done=len(pairs), **kwargs)
        seconds += base_seconds
    predicted = probs.argmax(axis=1)
    base: dict[str, Any] | None = None
    cases: dict[str, Any] | None = None
    if base_probs is not None:
        base_predicted = base_probs.argmax(axis=1)
        base = {"metrics": compute_metrics(gold, base_predicted)}
        adapter_right = predicted == gold
        base_right = base_predicted == gold
        masks = {
            "corrected": ~base_right & adapter_right,
            "broken": base_right & ~adapter_right,
            "both_wrong": ~base_right & ~adapter_right,
        }
        cases = {}
        for name, mask in masks.items():
            rows = np.flatnonzero(mask)
            cases[name] = {
                "count": int(rows.size),
                "examples": [
                    _case_example(data, int(row), probs, base_probs)
                    for row in rows[:max_examples_per_case]
                ],
            }
    report: dict[str, Any] = {
        "metrics": compute_metrics(gold, predicted),
        "base": base,
        "cases": cases,
        "n": len(pairs),
        "dropped": data.dropped,
        "pairs_per_s": round(total / seconds, 2) if seconds > 0 else 0.0,
        "adapter": adapter or "base",
        "base_model": base_model,
        "source": data.source,
        "seconds": round(time.perf_counter() - started, 3),
    }
    logger.info(
        "evaluated %s on %s: accuracy %.4f, macro-F1 %.4f",
        report["adapter"],
        data.source,
        report["metrics"]["accuracy"],
        report["metrics"]["macro_f1"],
    )
    return report


def write_report(report: dict[str, Any], report_dir: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``confusion_matrix.png`` into ``report_dir``.

    The PNG shows the adapter's confusion matrix, with the base's beside it when compared.
    Returns the three paths.
    """
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (folder / name for name in REPORT_FILES)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    _plot_confusion(report, png_path)
    logger.info("wrote report to %s", folder)
    return [json_path, md_path, png_path]


def _plot_confusion(report: dict[str, Any], path: Path) -> None:
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, so this is
    # safe from the service's worker threads and needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(f"adapter: {report['adapter']}", report["metrics"])]
    if report.get("base"):
        panels.insert(0, (f"base: {report['base_model']}", report["base"]["metrics"]))
    figure = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    # One colour scale for both panels, so equal shades mean equal counts.
    vmax = max(max(map(max, m["confusion_matrix"]["counts"])) for _, m in panels) or 1
    for ax, (title, metrics) in zip(axes, panels, strict=True):
        counts = np.asarray(metrics["confusion_matrix"]["counts"])
        ax.imshow(counts, cmap="Blues", vmin=0, vmax=vmax)
        threshold = vmax / 2
        for (i, j), value in np.ndenumerate(counts):
            color = "white" if value > threshold else "black"
            ax.text(j, i, f"{value:,}", ha="center", va="center", color=color)
        ticks = range(len(LABELS))
        ax.set_xticks(ticks, LABELS)
        ax.set_yticks(ticks, LABELS)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        short = title if len(title) <= 48 else title[:45] + "..."
        ax.set_title(f"{short}\naccuracy {metrics['accuracy']:.2%}", fontsize=10)
    figure.savefig(path, dpi=110)


# CommonMark lets any ASCII punctuation be backslash-escaped; these could change how a cell of
# data text renders (emphasis, links, raw HTML, entities, the table's own pipes).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!])")
# Spreadsheets evaluate cells starting with these (CSV/formula injection, OWASP).
_FORMULA_START = ("=", "+", "-", "@")


def _cell(value: object) -> str:
    """One table cell of text: escaped for Markdown, one line, never a spreadsheet formula."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    guard = text.lstrip().startswith(_FORMULA_START)
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("\n", "<br>")
    # A leading apostrophe is what spreadsheets themselves use to mark a cell as text.
    return "'" + text if guard else text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _delta(new: float, old: float, *, percent: bool) -> str:
    # Arrows rather than a leading sign, so no cell starts with "+" or "-" (see _cell).
    change = (new - old) * (100 if percent else 1)
    unit = " pp" if percent else ""
    if abs(change) < 5e-5:
        return f"0.00{unit}" if percent else "0.0000"
    arrow = "▲" if change > 0 else "▼"
    return f"{arrow} {abs(change):.2f}{unit}" if percent else f"{arrow} {abs(change):.4f}"


def _confusion_table(metrics: dict[str, Any]) -> list[str]:
    counts = metrics["confusion_matrix"]["counts"]
    rows = [
        [f"**{label}**", *(f"{c:,}" for c in row)]
        for label, row in zip(LABELS, counts, strict=True)
    ]
    return _table(["gold ↓ / predicted →", *LABELS], rows)


def render_markdown(report: dict[str, Any]) -> str:
    """A readable Markdown report: headline, base comparison, per-label, confusion, cases."""
    metrics = report["metrics"]
    base = report.get("base")
    adapter = _cell(report["adapter"])
    lines = [
        "# NLI evaluation report",
        "",
        f"**Accuracy {metrics['accuracy']:.2%}**, **macro-F1 {metrics['macro_f1']:.4f}** "
        f"(adapter {adapter})",
        "",
    ]
    info = [
        ["source", _cell(report["source"])],
        ["adapter", adapter],
        ["base model", _cell(report["base_model"])],
        ["rows scored", f"{report['n']:,}"],
        ["rows dropped (no gold label)", f"{report['dropped']:,}"],
        ["throughput", f"{report['pairs_per_s']:,.1f} pairs/s"],
        ["seconds", f"{report['seconds']:,.2f}"],
    ]
    lines += _table(["run", ""], info)
    if base:
        old = base["metrics"]
        rows = [
            [
                "accuracy",
                f"{old['accuracy']:.2%}",
                f"{metrics['accuracy']:.2%}",
                _delta(metrics["accuracy"], old["accuracy"], percent=True),
            ],
            [
                "macro-F1",
                f"{old['macro_f1']:.4f}",
                f"{metrics['macro_f1']:.4f}",
                _delta(metrics["macro_f1"], old["macro_f1"], percent=False),
            ],
        ]
        for label in LABELS:
            before, after = old["per_label"][label]["f1"], metrics["per_label"][label]["f1"]
            rows.append(
                [
                    f"F1 {label}",
                    f"{before:.4f}",
                    f"{after:.4f}",
                    _delta(after, before, percent=False),
                ]
            )
        lines += ["## Base vs adapter", ""]
        lines += _table(["metric", "base", f"adapter {adapter}", "change"], rows)
    lines += [f"## Per label ({adapter})", ""]
    per_label = [
        [
            label,
            f"{m['precision']:.4f}",
            f"{m['recall']:.4f}",
            f"{m['f1']:.4f}",
            f"{m['support']:,}",
        ]
        for label, m in metrics["per_label"].items()
    ]
    lines += _table(["label", "precision", "recall", "F1", "support"], per_label)
    lines += [f"## Confusion matrix ({adapter})", ""] + _confusion_table(metrics)
    if base:
        lines += ["## Confusion matrix (base)", ""] + _confusion_table(base["metrics"])
    for name, title in CASES.items():
        case = (report.get("cases") or {}).get(name)
        if case is None:
            continue
        lines += [f"## {title}: {case['count']:,}", ""]
        examples = case["examples"]
        if not examples:
            lines += ["None.", ""]
            continue
        if len(examples) < case["count"]:
            lines += [f"First {len(examples)} of {case['count']:,}, in data order.", ""]
        rows = [
            [
                str(ex["row"]),
                ex["label"],
                f"{ex['prediction']} ({ex['score']:.2f})",
                f"{ex['base_prediction']} ({ex['base_score']:.2f})",
                _cell(ex["premise"]),
                _cell(ex["hypothesis"]),
            ]
            for ex in examples
        ]
        lines += _table(["row", "gold", "adapter", "base", "premise", "hypothesis"], rows)
    return "\n".join(lines).rstrip() + "\n"
