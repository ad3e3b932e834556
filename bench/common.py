"""Helpers shared by the benchmark scripts: models, SNLI pairs, percentiles, machine and commit.

Only the standard library is imported at module level: the HTTP load clients of
``bench.classify_latency`` run in spawned processes that import their parent's module, and they
should not pay for torch.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "snli" / "test.jsonl"
MODEL_CHOICES = "smollm2 | qwen2-1.5b | a model folder"


def add_accuracy_arguments(parser: Any) -> None:
    """The options of the accuracy checks (``bench.graph_accuracy``, ``bench.merge_accuracy``):
    which pairs (default: SNLI dev rows 0-1,999, the shipped adapter's selection rows), which
    adapter on which base, and where to write the result."""
    from nli.default_model import DEFAULT_BASE_MODEL
    from training.config import snli_dir

    parser.add_argument("--data", type=Path, default=snli_dir() / "dev.jsonl")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--adapter", type=Path, default=REPO_ROOT / "adapters" / "snli-smollm2")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")


def random_qwen2_dir() -> Path:
    """Where the random Qwen2-1.5B-shaped model lives (built once per machine, for every bench)."""
    return Path(tempfile.gettempdir()) / "qwen2-1.5b-random"


def resolve_model(name: str) -> str:
    """``smollm2`` -> the offline default alias; ``qwen2-1.5b`` -> a random model's folder
    (built once, with the SmolLM2 tokenizer); anything else is passed through (a folder)."""
    from nli.default_model import DEFAULT_BASE_MODEL

    if name == "smollm2":
        return DEFAULT_BASE_MODEL
    if name == "qwen2-1.5b":
        from bench.shapes import build_random_qwen2_1_5b
        from nli.default_model import ensure_default_model

        return str(build_random_qwen2_1_5b(random_qwen2_dir(), str(ensure_default_model())))
    return name


def profiler_activities() -> list[Any]:
    """What ``torch.profiler`` should record here: the CPU, and CUDA when present."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def device_busy_s(table: Any) -> float:
    """Seconds the device spent in the kernels of a profiler's ``key_averages()``.

    Only device events count: a CPU op also carries the time of the kernels it launched as its
    own "self" device time, so summing every row counts each kernel twice.
    """
    from torch.autograd import DeviceType

    kernels = (
        e for e in table
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
    )  # fmt: skip
    return float(sum(e.self_device_time_total for e in kernels)) / 1e6


def read_pairs(path: Path, limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` (premise, hypothesis) pairs of an NLI .jsonl file (SNLI columns)."""
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            premise = row.get("premise", row.get("sentence1"))
            hypothesis = row.get("hypothesis", row.get("sentence2"))
            if premise and hypothesis:
                pairs.append((premise, hypothesis))
            if len(pairs) >= limit:
                break
    if not pairs:
        raise SystemExit(f"no pairs in {path}")
    return pairs


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_summary(seconds: list[float]) -> dict[str, float | int]:
    """p50 / p90 / p99 / max / mean in milliseconds."""
    values = sorted(seconds)
    ms = {f"p{q}_ms": round(1000 * percentile(values, q), 2) for q in (50, 90, 99)}
    ms["max_ms"] = round(1000 * values[-1], 2) if values else float("nan")
    ms["mean_ms"] = round(1000 * sum(values) / len(values), 2) if values else float("nan")
    return {"n": len(values), **ms}


def machine(device: str) -> str:
    """The GPU's name (nvidia-smi, so this process never initialises CUDA), else the CPU's."""
    if device != "cpu":
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
            if out:
                return out.splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
        if device == "cuda":
            return "cuda"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({name})"


def git_commit() -> str | None:
    """``$BENCH_COMMIT`` if set (copies without .git), else the checked-out commit (``+dirty``
    when tracked files differ), else None."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD", "--"],
            capture_output=True,
            timeout=10,
            check=False,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
