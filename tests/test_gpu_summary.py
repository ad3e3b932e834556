"""``bench.gpu_summary``: the table ``bench/run_gpu.sh`` ends with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_summary


def _train_result(**run: Any) -> dict[str, Any]:
    base = {
        "model": "smollm2",
        "kind": "real",
        "status": "ok",
        "examples_per_s": 2100.0,
        "batch_size": 128,
        "overrides": [],
    }
    return {"benchmark": "train_throughput", "machine": "NVIDIA H100", "runs": [base | run]}


@pytest.mark.parametrize(
    ("run", "label"),
    [
        # What the run's report resolved (the recipe's `auto` depends on the machine).
        (
            {"torch_compile": True, "cuda_graphs": {"recorded": 7}},
            "training real, smollm2, torch_compile, cuda_graphs",
        ),
        ({"torch_compile": False, "cuda_graphs": None}, "training real, smollm2"),
        # Results from before the report said: what was asked for.
        ({"overrides": ["train.cuda_graphs=true"]}, "training real, smollm2, cuda_graphs"),
    ],
)
def test_training_rows_name_the_speed_settings_used(run: dict[str, Any], label: str) -> None:
    (row,) = gpu_summary.train_rows(_train_result(**run))
    assert row[0] == label
    assert row[2] == "2100.0 ex/s (met)"


def _summary(
    result: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """What ``python -m bench.gpu_summary`` prints for ``result`` written to a file."""
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result) + "\n")
    monkeypatch.setattr("sys.argv", ["gpu_summary", str(path)])
    gpu_summary.main()
    return capsys.readouterr().out


def test_graph_accuracy_results_get_a_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = {
        "benchmark": "graph_accuracy",
        "dequantized": True,
        "recorded": True,
        "slot": "MergedSlot",
        "rows": 2000,
        "accuracy_graphs": 0.8515,
        "accuracy_eager": 0.853,
        "same_label": 1987,
        "max_prob_gap": 0.1167,
    }
    out = _summary(result, tmp_path, capsys, monkeypatch)
    assert "skipping" not in out
    assert "| graphed vs eager scores, MergedSlot, dequantized |" in out
    assert "85.15% graphed vs 85.30% eager" in out


@pytest.mark.parametrize(
    ("passes", "tail"),
    [
        ([10.5, 0.66, 0.64], "first pass 10.5 s, best of 2 passes (0.66, 0.64 s)"),
        ([10.5, 0.64], "first pass 10.5 s"),  # one timed pass: nothing to choose from
        (None, "first pass 10.5 s"),  # results from before passes were recorded
    ],
)
def test_eval_rows_show_the_passes_the_best_came_from(
    passes: list[float] | None, tail: str
) -> None:
    row = {"config": "plain", "batch_size": 1024, "pairs": 9824, "accuracy": 0.328}
    row |= {"pairs_per_s": 15350, "warmup_s": 10.5}
    if passes is not None:
        row["passes_s"] = passes
    result = {"benchmark": "eval_throughput", "model": "smollm2", "results": [row]}
    (got,) = gpu_summary.eval_rows(result)
    assert got[2] == "15350 pairs/s (met)"
    assert got[3].endswith(tail)


def test_eval_rows_give_the_median_pass_collections_and_cpu_time_when_recorded() -> None:
    row = {"config": "prefix", "batch_size": 1024, "pairs": 9824, "accuracy": 0.328}
    row |= {"pairs_per_s": 16000, "median_pairs_per_s": 13000, "warmup_s": 8.0}
    row |= {"passes_s": [8.0, 0.614, 1.1, 0.756], "gc_full": [2, 0, 1, 0]}
    row |= {"cpu_s": [20.5, 1.2, 1.9, 1.3]}
    result = {"benchmark": "eval_throughput", "model": "smollm2", "results": [row]}
    (got,) = gpu_summary.eval_rows(result)
    # The goal is judged on the best pass; the median stands beside it.
    assert got[2] == "16000 pairs/s best, 13000 median (met)"
    passes = "best of 3 passes (0.614, 1.1, 0.756 s), full GCs per pass 0, 1, 0"
    assert got[3].endswith(passes + ", CPU s per pass 1.2, 1.9, 1.3")


@pytest.mark.parametrize(
    ("freeze", "label"),
    [
        (True, "eval smollm2 [plain]"),
        (False, "eval smollm2 [plain, no gc freeze]"),  # the off side of the A/B
        (None, "eval smollm2 [plain]"),  # results from before nli.gc_freeze
    ],
)
def test_eval_rows_name_the_run_without_the_gc_freeze(freeze: bool | None, label: str) -> None:
    row = {"config": "plain", "batch_size": 1024, "pairs": 9824, "accuracy": 0.328}
    row |= {"pairs_per_s": 15350, "warmup_s": 10.5}
    result: dict[str, Any] = {"benchmark": "eval_throughput", "model": "smollm2"}
    result["results"] = [row]
    if freeze is not None:
        result["gc_freeze"] = freeze
    (got,) = gpu_summary.eval_rows(result)
    assert got[0] == label


def test_eval_profile_results_get_a_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = {
        "benchmark": "eval_profile", "model": "smollm2", "config": "prefix+overlap+compile",
        "batch_size": 1024, "pairs": 9824, "encode_s": 0.139, "launch_s": 0.424,
        "device_s": 0.335, "kernel_s": 0.305, "full_s": 0.613, "pairs_per_s": 16031,
        "card": "NVIDIA H100 80GB HBM3", "commit": "2329784",
    }  # fmt: skip
    out = _summary(result, tmp_path, capsys, monkeypatch)
    assert "skipping" not in out
    assert (
        "| eval profile smollm2 [prefix+overlap+compile] | >= 15000 pairs/s | 16031 pairs/s (met) |"
        in out
    )
    assert "queuing 0.424 s, scoring 0.335 s (GPU busy 0.305 s), whole pass 0.613 s |" in out


@pytest.mark.parametrize(
    ("stack", "warned"),
    [
        ({"http": "h11", "loop": "asyncio"}, True),
        ({"http": "httptools", "loop": "uvloop"}, False),
        (None, False),  # results from before the bench recorded it
    ],
)
def test_load_rows_warn_when_the_server_ran_without_httptools_and_uvloop(
    stack: dict[str, str] | None, warned: bool
) -> None:
    load = {"clients": 64, "requests_per_s": 1336.3, "latency_p50_ms": 43.8}
    load |= {"latency_p99_ms": 120.2, "errors": 0, "window_s": 6.0, "client_processes": 8}
    result: dict[str, Any] = {"model": "smollm2", "machine": "NVIDIA H100 80GB HBM3"}
    result["load"] = load
    if stack is not None:
        result["serving_stack"] = stack
    (row,) = gpu_summary.classify_rows(result)
    assert row[2].endswith("(MISSED)")
    assert ("SERVED WITH h11 + asyncio, not httptools + uvloop" in row[3]) is warned
