"""Where an evaluation pass spends its time: tokenising, the host's launches, the GPU's kernels.

    python -m bench.eval_profile [--model smollm2|qwen2-1.5b] [--config prefix+overlap+compile]
        [--batch-size 1024] [--repeats 3] [--out result.json]

The real path (``bench.eval_throughput``'s configurations, SNLI test, the bare base) is warmed
up with one ``evaluate_dataset`` pass (compiles, graph recordings), then timed piece by piece,
best of ``--repeats`` each:

- ``encode_s``: tokenising every pair (``NLIClassifier.encode``), on this thread alone;
- ``launch_s``: scoring the pre-tokenised pairs, until the host has queued every batch (before
  this was fixed, the results of 2026-11-27 timed it until the GPU was done, too);
- ``device_s``: the same, until the probabilities are back on the host;
- ``kernel_s``: the GPU's busy time in that scoring (CUDA kernels and copies, torch profiler);
- ``full_s``: the whole ``evaluate_dataset`` pass, as ``bench.eval_throughput`` times it.

``kernel_s`` well below ``device_s`` with ``launch_s`` close to it means the GPU waits for the
host (launch-bound); ``full_s`` well above ``max(encode_s, device_s)`` means tokenising and
scoring get in each other's way (the interpreter lock) instead of overlapping.

On CUDA, ``--sync-debug`` counts the calls that made the host wait for the GPU in one scoring of
the pre-tokenised pairs (``torch.cuda.set_sync_debug_mode``), by the Python line that made them;
``--trace FILE`` writes that scoring's host and device timeline (Chrome trace format, gzipped
when FILE ends in ``.gz``; open it in Perfetto).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import device_busy_s, git_commit, resolve_model
from bench.eval_throughput import (
    add_run_arguments,
    classifier_options,
    parse_config,
    read_data,
    sync,
)
from nli.classifier import NLIClassifier
from nli.cuda_graphs import GraphSettings
from nli.evaluation import evaluate_dataset
from nli.loading import load_base_model


def best_of(
    repeats: int, run: Callable[[], Any], device: torch.device, *, until_idle: bool = True
) -> float:
    """The shortest of ``repeats`` runs, each started with the device idle and timed until the
    device is idle again (``until_idle``) or until ``run`` returns."""
    times = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        run()
        if until_idle:
            sync(device)
        times.append(time.perf_counter() - began)
        sync(device)
    return min(times)


def kernel_seconds(run: Callable[[], Any]) -> float:
    """GPU busy time of ``run``: the summed durations of its device-side events (kernels,
    copies, memsets; they do not overlap on one stream), each counted once
    (``bench.common.device_busy_s``; before that, the results of 2026-11-27 also summed the
    CUDA runtime's launch rows, which carry their kernels' time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return device_busy_s(prof.key_averages())


def sync_calls(run: Callable[[], Any], *, frames: int = 4) -> list[dict[str, Any]]:
    """The calls in ``run`` that synchronised with the GPU, most frequent first: each with its
    count, the warning's text and the innermost ``frames`` Python frames that led to it."""
    found: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(message: Any, *_: Any, **__: Any) -> None:
        stack = traceback.extract_stack()[:-2][-frames:]
        where = " <- ".join(
            f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in stack[::-1]
        )
        found[(str(message).splitlines()[0][:120], where)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [
        {"count": count, "warning": message, "where": where}
        for (message, where), count in found.most_common()
    ]


def write_trace(run: Callable[[], Any], path: Path) -> None:
    """A Chrome trace of ``run``: host operators and device kernels on one timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(path, "wb") as target:
            target.write(source.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--config", default="prefix+overlap+compile")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    parser.add_argument(
        "--dequantize", action="store_true",
        help="hold the NF4 weights expanded (NLI_DEQUANTIZE=1 in the service)",
    )  # fmt: skip
    parser.add_argument(
        "--bnb-nf4", action="store_true",
        help="compiled layers keep bitsandbytes' NF4 forward (the A/B of nli.nf4_graph)",
    )  # fmt: skip
    parser.add_argument("--sync-debug", action="store_true", help="count host-GPU syncs (CUDA)")
    parser.add_argument("--trace", type=Path, default=None, help="write a Chrome trace (CUDA)")
    args = parser.parse_args()

    if args.bnb_nf4:
        import functools

        import nli.classifier
        from nli.layer_compile import LayerCompiledDecoder

        nli.classifier.LayerCompiledDecoder = functools.partial(  # type: ignore[misc]
            LayerCompiledDecoder, torch_nf4=False
        )
    name, options = classifier_options(parse_config(args.config), encode_chunk=None)
    base = load_base_model(
        resolve_model(args.model), device=args.device, dequantize=args.dequantize
    )
    device = base.device
    graphs = GraphSettings(max_batch=args.batch_size) if options["cuda_graphs"] else None
    classifier = NLIClassifier(
        base, max_batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens,
        graph_settings=graphs, **options,
    )  # fmt: skip
    data = read_data(args)
    pairs = [(e.premise, e.hypothesis) for e in data.examples]

    def full_pass() -> None:
        evaluate_dataset(
            data, classifier.score_pairs, adapter=None, base_model=base.ref.name,
            chunk_size=len(pairs),
        )  # fmt: skip

    began = time.perf_counter()
    full_pass()
    sync(device)
    warmup_s = time.perf_counter() - began

    encoded = classifier.encode(pairs)
    adapters = [None] * len(encoded)
    # NLIClassifier.score_encoded is _score_on_device (queue every batch) then _to_host (wait);
    # the profile times the first half alone to see when the host is done launching.
    launch_s = best_of(
        args.repeats,
        lambda: classifier._score_on_device(encoded, adapters, progress=None),
        device,
        until_idle=False,
    )
    result: dict[str, Any] = {
        "benchmark": "eval_profile",
        "model": args.model,
        "config": name
        + (" (dequantized)" if args.dequantize else "")
        + (" (bitsandbytes NF4 forward)" if args.bnb_nf4 else ""),
        "batch_size": args.batch_size,
        "pairs": len(pairs),
        "tokens": sum(map(len, encoded)),
        "warmup_s": round(warmup_s, 1),
        "encode_s": best_of(args.repeats, lambda: classifier.encode(pairs), device),
        "launch_s": launch_s,
        "device_s": best_of(
            args.repeats, lambda: classifier.score_encoded(encoded, adapters), device
        ),
        "full_s": best_of(args.repeats, full_pass, device),
    }
    if device.type == "cuda":
        result["kernel_s"] = kernel_seconds(lambda: classifier.score_encoded(encoded, adapters))
        if args.sync_debug:
            result["syncs"] = sync_calls(lambda: classifier.score_encoded(encoded, adapters))
        if args.trace:
            write_trace(lambda: classifier.score_encoded(encoded, adapters), args.trace)
    for key in ("encode_s", "launch_s", "device_s", "full_s", "kernel_s"):
        if key in result:
            result[key] = round(result[key], 4)
    result["pairs_per_s"] = round(len(pairs) / result["full_s"])
    result["card"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["commit"] = git_commit()
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
