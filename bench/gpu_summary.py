"""One table, target by target, from the JSON results of the benchmark scripts.

    python -m bench.gpu_summary RESULT.json [...]

Reads what ``bench.classify_latency``, ``bench.train_throughput``, ``bench.eval_throughput``,
``bench.eval_profile`` and ``bench.graph_accuracy`` write with ``--out`` and prints a Markdown
table (target, goal, measured, where, commit): the short summary ``bench/run_gpu.sh`` ends with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.serving_stack import FAST

Row = tuple[str, str, str, str]

# (model, on a GPU) -> 1-client p50 goal in ms; hot-swap goal in ms.
P50_GOAL_MS = {("smollm2", True): 10, ("qwen2-1.5b", True): 15, ("smollm2", False): 80}
SWAP_GOAL_MS = {"smollm2": 300, "qwen2-1.5b": 1000}
EVAL_GOAL = {"smollm2": 15000, "qwen2-1.5b": 3000}
TRAIN_GOAL = {"smollm2": 2000, "qwen2-1.5b": 450}


def mark(value: float | None, goal: float | None, *, lower_is_better: bool = False) -> str:
    if goal is None:
        return "no goal here"
    if value is None:
        return "n/a"
    met = value <= goal if lower_is_better else value >= goal
    return "met" if met else "MISSED"


def _slow_stack(r: dict[str, Any]) -> str:
    """A warning where the server ran without httptools or uvloop (results from before the
    bench recorded it carry no "serving_stack": nothing is said)."""
    stack = r.get("serving_stack")
    if not stack or stack == FAST:
        return ""
    return f"; SERVED WITH {stack['http']} + {stack['loop']}, not httptools + uvloop"


def classify_rows(r: dict[str, Any]) -> list[Row]:
    model, gpu = r["model"], "CPU" not in r["machine"]
    rows: list[Row] = []
    if "one_client" in r:
        p50, p99 = r["one_client"]["p50_ms"], r["one_client"]["p99_ms"]
        goal = P50_GOAL_MS.get((model, gpu))
        verdict = f" ({mark(p50, goal, lower_is_better=True)})" if goal else ""
        rows.append(
            (
                f"/classify 1 client, {model}",
                f"p50 <= {goal} ms" if goal else "-",
                f"p50 {p50} ms, p99 {p99} ms{verdict}",
                f"n={r['one_client']['n']}"
                + (
                    f"; in-process score_pairs p50 {r['direct']['p50_ms']} ms"
                    if "direct" in r
                    else ""
                ),
            )
        )
    if "load" in r:
        load = r["load"]
        goal = 1500 if model == "smollm2" and gpu else None
        verdict = f" ({mark(load['requests_per_s'], goal)})" if goal else ""
        batching = load.get("batching") or {}
        worker = batching.get("worker_ms_per_pass") or {}
        per_pass = ", ".join(f"{phase} {ms} ms" for phase, ms in worker.items())
        full_gc = (batching.get("gc") or {}).get("gc2")
        if full_gc:
            per_pass += f"; full GCs {full_gc['collections']} ({full_gc['ms']} ms)"
        rows.append(
            (
                f"/classify {load['clients']} clients, {model}",
                f">= {goal} req/s" if goal else "-",
                f"{load['requests_per_s']} req/s, p50 {load['latency_p50_ms']} ms, "
                f"p99 {load['latency_p99_ms']} ms, errors {load['errors']}{verdict}",
                f"{load['window_s']} s window, {load['client_processes']} client procs, "
                f"{batching.get('mean_requests_per_pass', '?')} req/forward"
                + (f"; worker per pass: {per_pass}" if per_pass else "")
                + _slow_stack(r),
            )
        )
    if "hot_swap" in r:
        swap = r["hot_swap"]
        goal = SWAP_GOAL_MS.get(model) if gpu else None
        value = swap["median_load_plus_first_use_ms"]
        verdict = f" ({mark(swap['max_load_plus_first_use_ms'], goal, lower_is_better=True)})"
        rows.append(
            (
                f"hot swap load + first use, {model}",
                f"<= {goal} ms" if goal else "-",
                f"median {value} ms, max {swap['max_load_plus_first_use_ms']} ms"
                + (verdict if goal else ""),
                f"load {swap['median_load_ms']} ms + first /classify "
                f"{swap['median_first_classify_ms']} ms; {r['adapter']['bytes'] / 2**20:.0f} MiB "
                f"{r['adapter']['dtype']} r={r['adapter']['rank']}",
            )
        )
    if "swaps_under_load" in r:
        s = r["swaps_under_load"]
        check = s["check"]
        # A failure: an error status, or an answer naming another adapter than the request.
        # Scores nearer another adapter's sequential reference are reported beside it: the
        # references run graphed at batch 1, mixed-adapter batches eagerly, and random adapters
        # amplify that numeric difference (BENCHMARKS.md), so they are a hint, not a verdict.
        failed = s["errors"] + check.get("wrong_adapter_name", 0)
        rows.append(
            (
                f"swaps under load, {model}",
                "0 failed requests",
                f"{s['errors']} failed of {sum(s['statuses'].values())}, "
                f"{check.get('wrong_adapter_name', 0)} named another adapter "
                f"({'met' if failed == 0 else 'MISSED'}); "
                f"{check.get('nearer_other_adapter', 0)} scored nearer another adapter's "
                f"reference than their own (beyond {check['tolerance']})",
                f"{s['cycles']} load/default/unload cycles, {s['requests_per_s']} req/s, "
                f"p99 {s['latency_p99_ms']} ms, admin failures {s['admin_failures']}, max score "
                f"deviation {check['max_deviation']} vs adapter gap "
                f"{check['median_gap_between_adapters']}",
            )
        )
    return rows


def _switched_on(run: dict[str, Any], setting: str) -> bool:
    """Whether a training run had ``train.<setting>`` on: as its report resolved it (``auto``
    depends on the machine), else (results before the report said) as it was asked for."""
    if setting in run:
        return run[setting] not in (None, False)
    return f"train.{setting}=true" in run.get("overrides", [])


def train_rows(r: dict[str, Any]) -> list[Row]:
    gpu = "CPU" not in r["machine"]
    rows: list[Row] = []
    for run in r["runs"]:
        model, kind = run["model"], run["kind"]
        processes = run.get("processes", 1)
        label = f"training {kind}, {model}" + (f", DDP x{processes}" if processes > 1 else "")
        for setting in ("torch_compile", "cuda_graphs"):
            if _switched_on(run, setting):
                label += f", {setting}"
        if run["status"] != "ok":
            rows.append((label, "-", run["status"], " / ".join(run.get("log_tail", []))[-200:]))
            continue
        rate = run.get("examples_per_s")
        peak = run.get("peak_process_gib_est", run.get("peak_rss_gib"))
        detail = (
            f"batch {run['batch_size']}x{run.get('grad_accum', 1)}, peak allocated "
            f"{run.get('train_peak_allocated_gib', '?')} GiB in training steps, "
            f"{run.get('peak_allocated_gib', '?')} GiB over the whole run, process ~{peak} "
            f"GiB; report.json-style {run.get('report_examples_per_s')} ex/s; steps before the "
            f"window {run.get('first_steps_s', '?')} s"
        )
        if run.get("error_after_training"):
            detail += f"; after training: {run['error_after_training'][:120]}"
        if kind == "real" and processes == 1 and model in TRAIN_GOAL and gpu:
            goal = TRAIN_GOAL[model]
            rows.append((label, f">= {goal} ex/s", f"{rate} ex/s ({mark(rate, goal)})", detail))
        elif kind == "low-memory":
            rows.append(
                (
                    label,
                    "fits in 6 GB",
                    f"{rate} ex/s, ~{peak} GiB ({mark(peak, 6.0, lower_is_better=True)})",
                    detail,
                )
            )
        else:
            rows.append((label, "-", f"{rate} ex/s", detail))
    if r.get("ddp_speedup"):
        rows.append(
            (
                f"DDP speed-up, {r['model']}",
                ">= 1.8x",
                f"{r['ddp_speedup']}x ({mark(r['ddp_speedup'], 1.8)})",
                "examples/s of all processes over one process's, same call, same settings",
            )
        )
    if r.get("speedup_vs_naive"):
        rows.append(
            (
                f"training speed-up vs naive, {r['model']}",
                "ratio",
                f"{r['speedup_vs_naive']}x",
                "same call",
            )
        )
    return rows


def _timed_passes(row: dict[str, Any]) -> str:
    """ ", best of 2 passes (0.62, 0.65 s)" where the result lists its passes, plus the full
    garbage collections and the process's CPU seconds per timed pass where it recorded them."""
    timed = row.get("passes_s", [])[1:]
    if len(timed) < 2:
        return ""
    text = f", best of {len(timed)} passes ({', '.join(str(s) for s in timed)} s)"
    if "gc_full" in row:
        text += f", full GCs per pass {', '.join(str(n) for n in row['gc_full'][1:])}"
    if "cpu_s" in row:
        text += f", CPU s per pass {', '.join(str(s) for s in row['cpu_s'][1:])}"
    return text


def _eval_rate(row: dict[str, Any], goal: int | None) -> str:
    """The (best) pass's rate against the goal, and the median pass's where recorded."""
    rate = row["pairs_per_s"]
    text = f"{rate} pairs/s"
    if "median_pairs_per_s" in row:
        text += f" best, {row['median_pairs_per_s']} median"
    return text + (f" ({mark(rate, goal)})" if goal else "")


def eval_rows(r: dict[str, Any]) -> list[Row]:
    model = r["model"]
    goal = EVAL_GOAL.get(model)
    rows: list[Row] = []
    # Results from before nli.gc_freeze carry no "gc_freeze" key: label only the A/B's off side.
    unfrozen = ", no gc freeze" if r.get("gc_freeze") is False else ""
    for row in r["results"]:
        rows.append(
            (
                f"eval {model} [{row['config']}{unfrozen}]",
                f">= {goal} pairs/s" if goal else "-",
                _eval_rate(row, goal),
                f"batch {row['batch_size']}, {row['pairs']} pairs, accuracy {row['accuracy']}, "
                f"first pass {row['warmup_s']} s" + _timed_passes(row),
            )
        )
    if r.get("generate_pairs_per_s"):
        ratio = r.get("speedup_vs_generate")
        rows.append(
            (
                f"eval {model} vs per-pair generate",
                ">= 500x",
                f"{ratio}x ({mark(ratio, 500)})",
                f"generate {r['generate_pairs_per_s']} pairs/s",
            )
        )
    return rows


def eval_profile_rows(r: dict[str, Any]) -> list[Row]:
    """One pass split up (``bench.eval_profile``): where the time between the host and the GPU
    goes, and the whole pass's rate against the goal."""
    model = r["model"]
    goal = EVAL_GOAL.get(model)
    details = (
        f"batch {r['batch_size']}, {r['pairs']} pairs: tokenising {r['encode_s']} s, "
        f"queuing {r['launch_s']} s, scoring {r['device_s']} s"
    )
    if "kernel_s" in r:
        details += f" (GPU busy {r['kernel_s']} s)"
    details += f", whole pass {r['full_s']} s"
    return [
        (
            f"eval profile {model} [{r['config']}]",
            f">= {goal} pairs/s" if goal else "-",
            _eval_rate(r, goal),
            details,
        )
    ]


def graph_accuracy_rows(r: dict[str, Any]) -> list[Row]:
    slot = r.get("slot") or "no slot"
    label = f"graphed vs eager scores, {slot}" + (", dequantized" if r.get("dequantized") else "")
    graphs, eager = 100 * r["accuracy_graphs"], 100 * r["accuracy_eager"]
    return [
        (
            label,
            "same accuracy within noise",
            f"{graphs:.2f}% graphed vs {eager:.2f}% eager",
            f"{r['rows']} rows, {r['same_label']} with the same label, largest probability gap "
            f"{r['max_prob_gap']}, graphs recorded: {r['recorded']}",
        )
    ]


ROWS = {
    "classify_latency": classify_rows,
    "train_throughput": train_rows,
    "eval_throughput": eval_rows,
    "eval_profile": eval_profile_rows,
    "graph_accuracy": graph_accuracy_rows,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="*", type=Path)
    args = parser.parse_args()
    rows: list[tuple[Row, str, str]] = []
    for path in args.results:
        try:
            result = json.loads(path.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as exc:
            print(f"skipping {path}: {exc}")
            continue
        kind = result.get("benchmark")
        where = result.get("machine") or result.get("card", "?")
        commit = result.get("commit") or "?"
        make = ROWS.get(kind)
        if make is None:
            print(f"skipping {path}: unknown benchmark {kind!r}")
            continue
        try:
            rows += [(row, where, commit) for row in make(result)]
        except (KeyError, TypeError, ValueError) as exc:  # a partial result: say so, go on
            rows.append(((f"{kind} {path.name}", "-", f"unreadable: {exc!r}", "-"), where, commit))
    print("| target | goal | measured | details | where | commit |")
    print("|---|---|---|---|---|---|")
    for (target, goal, measured, details), where, commit in rows:
        print(f"| {target} | {goal} | {measured} | {details} | {where} | {commit} |")


if __name__ == "__main__":
    main()
