"""Where one `/classify`-sized request's time goes: batch-1 scoring latency with and without an
adapter, a torch-profiler table of it, and a cProfile of an adapter load (the hot-swap path).

    python -m bench.classify_profile [--model smollm2|FOLDER] [--random-shape DIR]
        [--device auto|cpu|cuda] [--repeats N] [--out DIR]

``--random-shape DIR`` builds a model of DIR's ``config.json`` with random weights (and DIR's
tokenizer), so the GPU machine needs no real weights: speed does not depend on their values.
Writes ``DIR/profile.txt`` (the tables) and prints a short summary last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.classify_latency import make_adapters
from bench.common import (
    DEFAULT_DATA,
    device_busy_s,
    machine,
    profiler_activities,
    read_pairs,
    resolve_model,
)
from bench.shapes import save_random_model


def timed(fn: Any, repeats: int, sync: Any) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - started))
    return {"p50_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random-shape", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="nli-prof-")))
    args = parser.parse_args()

    import torch

    from nli.classifier import NLIClassifier
    from nli.loading import load_base_model

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nli-prof-work-"))
    if args.random_shape:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(args.random_shape)
        tokenizer = AutoTokenizer.from_pretrained(args.random_shape)
        base_model = str(save_random_model(work / "model", config, tokenizer))
    else:
        base_model = resolve_model(args.model)
    make_adapters(
        base_model,
        work / "adapters",
        {"a": 1, "b": 2},
        rank=16,
        alpha=32,
        dtype="bf16",
        quantization="nf4",
    )
    base = load_base_model(base_model, quantization="nf4", device=args.device)
    classifier = NLIClassifier(base, max_length=256)
    on_gpu = base.device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    classifier.attach_adapter(work / "adapters" / "a", name="a")
    pair = read_pairs(args.data, 1)
    for adapter in (None, "a"):
        for _ in range(10):
            classifier.score_pairs(pair, adapter)
    result: dict[str, Any] = {"machine": machine(args.device), "model": base_model}
    result["base_batch1"] = timed(lambda: classifier.score_pairs(pair, None), args.repeats, sync)
    result["adapter_batch1"] = timed(lambda: classifier.score_pairs(pair, "a"), args.repeats, sync)

    sections = []
    for adapter in (None, "a"):
        sync()
        started = time.perf_counter()
        with torch.profiler.profile(activities=profiler_activities()) as prof:
            for _ in range(10):
                classifier.score_pairs(pair, adapter)
            sync()
        wall = time.perf_counter() - started
        table = prof.key_averages()
        device_s = device_busy_s(table)
        result[f"profiled_{adapter or 'base'}"] = {
            "wall_s_10_calls": round(wall, 3),
            "device_busy_s": round(device_s, 3),
        }
        sections.append(
            f"## batch 1, adapter {adapter}: 10 calls in {wall:.3f} s, device busy {device_s:.3f} s"
        )
        sections.append(table.table(sort_by="self_cpu_time_total", row_limit=30))

    # The hot-swap path: load (attach) adapter b and first use, under cProfile.
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    classifier.attach_adapter(work / "adapters" / "b", name="b")
    loaded = time.perf_counter()
    classifier.score_pairs(pair, "b")
    sync()
    profiler.disable()
    result["hot_swap_ms"] = {
        "load": round(1000 * (loaded - started), 1),
        "first_use": round(1000 * (time.perf_counter() - loaded), 1),
    }
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(40)
    sections.append("## attach_adapter + first use, cProfile (cumulative)")
    sections.append(stream.getvalue())
    (args.out / "profile.txt").write_text("\n\n".join(sections))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
