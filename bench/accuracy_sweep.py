"""Run several `nli-train train` configurations side by side on one GPU and tabulate dev accuracy.

    python -m bench.accuracy_sweep --out runs/sweep --parallel 4 \
        --run "r16=lora.r=16 lora.alpha=32" --run "r16-lr4=lora.r=16 train.learning_rate=4e-4"

Each ``--run NAME=OVERRIDES`` trains ``--recipe`` with those ``--set`` overrides into
``OUT/NAME``. A 135M model leaves most of a GPU idle, so runs share it. Prints one table row
per run (selection-dev accuracy, examples/s, wall time, peak memory) and writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_run(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name.strip(), overrides.split()


def summarise(folder: Path, name: str, seconds: float, returncode: int) -> dict[str, object]:
    report_path = folder / "report.json"
    if returncode != 0 or not report_path.is_file():
        return {"name": name, "status": f"failed ({returncode})", "wall_s": round(seconds)}
    report = json.loads(report_path.read_text())
    training = report["training"]
    return {
        "name": name,
        "status": "ok",
        "dev_accuracy": report["dev"]["metrics"]["accuracy"],
        "best_step": training["best_step"],
        "epochs": training["epochs"],
        "examples_per_s": training["examples_per_s"],
        "train_s": round(training["train_seconds"]),
        "wall_s": round(seconds),
        "peak_gib": round(report["memory"]["bytes"] / 2**30, 2),
        "adapter_mib": round(report["adapter_size_bytes"] / 2**20, 1),
        "test_accuracy": (report.get("test") or {}).get("metrics", {}).get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="smollm2-135m-snli")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=OVERRIDES")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    pending = [parse_run(text) for text in args.run]
    running: list[tuple[str, subprocess.Popen[bytes], float]] = []
    results = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, overrides = pending.pop(0)
            cmd = [sys.executable, "-m", "training.cli", "train", "--recipe", args.recipe]
            for item in overrides:
                cmd += ["--set", item]
            cmd += ["--output", str(args.out / name)]
            log = open(args.out / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
            running.append((name, proc, time.perf_counter()))
            print(f"started {name}: {' '.join(overrides)}", flush=True)
        time.sleep(2)
        for entry in list(running):
            name, proc, began = entry
            if proc.poll() is not None:
                running.remove(entry)
                row = summarise(args.out / name, name, time.perf_counter() - began, proc.returncode)
                results.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"{'run':<16} {'dev acc':>8} {'ex/s':>7} {'train s':>8} {'peak GiB':>9} {'MiB':>6}")
    for row in results:
        if row["status"] != "ok":
            print(f"{row['name']:<16} {row['status']}")
            continue
        print(
            f"{row['name']:<16} {row['dev_accuracy']:>8.4f} {row['examples_per_s']:>7.0f} "
            f"{row['train_s']:>8} {row['peak_gib']:>9} {row['adapter_mib']:>6}"
        )


if __name__ == "__main__":
    main()
