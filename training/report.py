"""The training report (``report.json`` and ``report.md`` in the adapter folder)."""

from __future__ import annotations

import json
import platform
import re
import resource
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from nli.evaluation import render_markdown
from training.config import REPO_ROOT

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak GPU memory allocated by torch on a GPU; peak resident set size on CPU."""
    if device.type == "cuda":
        return {
            "kind": "gpu_max_memory_allocated",
            "bytes": int(torch.cuda.max_memory_allocated(device)),
            "device": torch.cuda.get_device_name(device),
        }
    # ru_maxrss is in kilobytes on Linux.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": "cpu_peak_rss", "bytes": int(rss), "device": platform.processor() or "cpu"}


def environment(device: torch.device, *, world_size: int) -> dict[str, Any]:
    """Versions, hardware and commit: what a benchmark entry needs to be reproducible."""
    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["torch"] = torch.__version__  # the runtime one (site overlays bypass metadata)
    return {
        "python": platform.python_version(),
        "packages": versions,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world_size,
        "commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def now() -> str:
    """The current UTC time, ISO 8601, in seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_training_report(report: dict[str, Any], folder: Path) -> None:
    """Write ``report.json`` and ``report.md``."""
    (folder / REPORT_JSON).write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / REPORT_MD).write_text(render_training_markdown(report), encoding="utf-8")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:,.1f} GiB"  # pragma: no cover


def _accuracy_row(name: str, report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return [name, "not evaluated", "", ""]
    adapter = report["metrics"]["accuracy"]
    base = (report.get("base") or {}).get("metrics", {}).get("accuracy")
    base_text = f"{base:.2%}" if base is not None else "not scored"
    change = f"{(adapter - base) * 100:+.2f} pp" if base is not None else ""
    return [name, base_text, f"{adapter:.2%}", change.replace("+", "▲ ").replace("-", "▼ ")]


def render_training_markdown(report: dict[str, Any]) -> str:
    """A readable summary of the run, followed by the dev (and test) evaluation reports."""
    training, params, memory = report["training"], report["parameters"], report["memory"]
    lines = [
        f"# Training report: {report['adapter']}",
        "",
        f"Recipe `{report['recipe']}` on base model `{report['base_model']}`, "
        f"finished {report['created_at']}.",
        "",
        "| accuracy | base | adapter | change |",
        "|---|---|---|---|",
        "| " + " | ".join(_accuracy_row("dev (selection)", report.get("dev"))) + " |",
    ]
    if report.get("test") is not None:
        lines.append("| " + " | ".join(_accuracy_row("test", report["test"])) + " |")
    rows = [
        ("wall time", f"{training['wall_seconds']:,.1f} s"),
        (
            "training throughput",
            f"{training['examples_per_s']:,.1f} examples/s "
            f"({training['examples_seen']:,} examples in {training['train_seconds']:,.1f} s, "
            "dev evaluation excluded)",
        ),
        ("optimizer steps", f"{training['steps']:,} ({training['epochs']:.2f} epochs)"),
        ("best checkpoint", f"step {training['best_step']} (dev accuracy {_pct(training)})"),
        ("stopped early", "yes" if training["stopped_early"] else "no"),
        ("resumed from", training["resumed_from"] or "no (one uninterrupted run)"),
        (
            "parameters",
            f"{params['trainable']:,} trainable of {params['total']:,} "
            f"({params['trainable_percent']:.3f}%)",
        ),
        (
            "peak memory",
            f"{_size(memory['bytes'])} ({memory['kind'].replace('_', ' ')}, {memory['device']})",
        ),
        ("adapter size on disk", _size(report["adapter_size_bytes"])),
        (
            "data",
            f"{report['data']['train_examples']:,} training examples "
            f"({report['data']['extra_train_from_dev']:,} from dev), "
            f"{report['data']['dev_examples']:,} dev examples",
        ),
        ("devices", f"{report['environment']['world_size']} x {report['environment']['device']}"),
        ("commit", str(report["environment"]["commit"])),
    ]
    lines += ["", "| run | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    for split in ("dev", "test"):
        evaluation = report.get(split)
        if evaluation is None:
            continue
        body = render_markdown(evaluation)
        # Nest the evaluation report's headings one level under this report's split heading.
        body = re.sub(r"^(#+) ", r"#\1 ", body, flags=re.MULTILINE)
        lines += ["", f"# {split.capitalize()} evaluation", "", body.rstrip()]
    return "\n".join(lines) + "\n"


def _pct(training: dict[str, Any]) -> str:
    best = training.get("best_dev_accuracy")
    return f"{best:.2%}" if best is not None else "n/a"
