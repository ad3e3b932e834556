"""Evaluation throughput through the real path: tokenise + score + metrics, model already loaded.

    python bench/eval_throughput.py [--model smollm2|qwen2-1.5b] [--batch-sizes 256 1024]
        [--no-prefix-cache] [--compile] [--encode-chunk N]
        [--configs plain prefix prefix+overlap prefix+overlap+compile]

Runs ``nli.evaluation.evaluate_dataset`` over the SNLI test split (9,824 pairs) with the bare
base model, after one warm-up pass, and prints pairs/s per batch size (the best timed pass and
the median) plus one JSON line. The line also counts, per pass, the garbage collector's full
collections and, on CUDA, the caching allocator's device allocations and retries: what a slow
pass may have spent its time on.
With ``--generate-baseline N`` it also times a naive per-pair ``generate`` on N pairs.

Speed levers of ``NLIClassifier``, each switchable so one run measures them side by side:
``prefix`` (shared-prefix key/value cache), ``overlap`` (tokenise chunks on a thread while the
GPU scores; ``--encode-chunk``), ``compile`` (``torch.compile``, CUDA only, of one decoder layer
shared by all layers, ``nli.layer_compile``; the warm-up pass includes the compilation) or
``compile-decoder`` (of the decoder's whole forward, as before that module), ``graphs`` (CUDA
only: each batch replays a CUDA graph per rows x length bucket, recorded at its first use, up
to the batch size; ``nli.cuda_graphs``; graphed batches score whole prompts, without the
prefix cache or the compiled code). ``--configs`` runs several lever sets in one process
(``plain`` = none of them); without it, the flags pick one set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.gc_pauses import CollectionTimer
from bench.common import git_commit, resolve_model
from nli.classifier import NLIClassifier
from nli.cuda_graphs import GraphSettings
from nli.data import NLIData, read_nli_file
from nli.evaluation import evaluate_dataset
from nli.loading import load_base_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "snli" / "test.jsonl"


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's running counts of device allocations (``cudaMalloc``) and
    of retries after freeing its cache (each one synchronises); empty off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_alloc_retries")}


class PassCollections:
    """One pass's garbage collections, fed by ``app.gc_pauses.CollectionTimer``: how many were
    full (they walk every tracked object with the interpreter lock held, ``nli.gc_freeze``) and
    the seconds spent in collections of any generation."""

    def __init__(self) -> None:
        self.full = 0
        self.seconds = 0.0

    def __call__(self, generation: int, seconds: float) -> None:
        self.seconds += seconds
        self.full += generation == 2


def generate_baseline(classifier: NLIClassifier, pairs: list[tuple[str, str]]) -> float:
    """Pairs/s of the naive approach: per-pair generate of a few tokens, then parse the text."""
    tokenizer, model = classifier.tokenizer, classifier.model
    encoded = classifier.encode(pairs)
    sync(classifier.device)
    start = time.perf_counter()
    for ids in encoded:
        inputs = torch.tensor([ids], device=classifier.device)
        out = model.generate(inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
        tokenizer.decode(out[0, len(ids) :])
    sync(classifier.device)
    return len(pairs) / (time.perf_counter() - start)


LEVERS = ("prefix", "overlap", "compile", "compile-decoder", "graphs")


def parse_config(text: str) -> set[str]:
    """``prefix+compile`` -> {"prefix", "compile"}; ``plain`` -> no lever."""
    levers = {part for part in text.split("+") if part and part != "plain"}
    unknown = levers - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown lever(s) {sorted(unknown)} in {text!r} (known: {LEVERS})")
    if {"compile", "compile-decoder"} <= levers:
        raise SystemExit(f"{text!r}: pick one of compile and compile-decoder")
    return levers


def classifier_options(levers: set[str], *, encode_chunk: int | None) -> tuple[str, dict[str, Any]]:
    """(the configuration's name, its ``NLIClassifier`` options) for a set of levers."""
    name = "+".join(lever for lever in LEVERS if lever in levers) or "plain"
    chunk = (encode_chunk or 4096) if "overlap" in levers else 0
    options = {
        "prefix_cache": "prefix" in levers,
        "compile": bool({"compile", "compile-decoder"} & levers),
        "compile_scope": "decoder" if "compile-decoder" in levers else "layers",
        "cuda_graphs": "graphs" in levers,
        "encode_chunk_size": chunk,
    }
    return name, options


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device, data and batch-token options this script and ``bench.eval_profile``
    share."""
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="score only the first N pairs")
    parser.add_argument("--max-tokens", type=int, default=1 << 17)


def read_data(args: argparse.Namespace) -> NLIData:
    """``--data``, cut to its first ``--limit`` pairs when given."""
    data = read_nli_file(args.data)
    if args.limit:
        data.examples = data.examples[: args.limit]
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--generate-baseline", type=int, default=0)
    parser.add_argument(
        "--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
        help="cache the prompt template's prefix key/values (default on; without --configs)",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the decoder, layer by layer (CUDA; without --configs)",
    )  # fmt: skip
    parser.add_argument(
        "--encode-chunk", type=int, default=None,
        help="pairs tokenised per background chunk while the GPU scores (0: all first; "
        "default: the classifier's, 4096 on CUDA, 0 on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="+", default=None,
        help="lever sets to compare in one run, e.g. plain prefix prefix+overlap+compile",
    )  # fmt: skip
    parser.add_argument(
        "--no-gc-freeze", action="store_true",
        help="score without evaluate_dataset's freeze of the objects alive before it "
        "(nli.gc_freeze), for an A/B against the real path",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    if args.no_gc_freeze:
        import contextlib

        import nli.evaluation

        nli.evaluation.objects_frozen = contextlib.nullcontext  # type: ignore[assignment]
    # (name, NLIClassifier options) per configuration to measure.
    configs: list[tuple[str, dict[str, Any]]] = []
    if args.configs is None:
        chunk_name = "auto" if args.encode_chunk is None else args.encode_chunk
        name = f"prefix={args.prefix_cache},compile={args.compile},chunk={chunk_name}"
        options = {"prefix_cache": args.prefix_cache, "compile": args.compile}
        configs.append((name, {**options, "encode_chunk_size": args.encode_chunk}))
    for text in args.configs or []:
        configs.append(classifier_options(parse_config(text), encode_chunk=args.encode_chunk))

    base = load_base_model(resolve_model(args.model), device=args.device)
    data = read_data(args)
    rows = []
    for (name, options), batch_size in [(c, size) for c in configs for size in args.batch_sizes]:
        graphs = GraphSettings(max_batch=batch_size) if options.get("cuda_graphs") else None
        classifier = NLIClassifier(
            base, max_batch_size=batch_size, max_tokens_per_batch=args.max_tokens,
            graph_settings=graphs, **options,
        )  # fmt: skip
        seconds: list[float] = []
        collections: list[PassCollections] = []
        allocations: list[dict[str, int]] = []
        cpu_seconds: list[float] = []
        for _ in range(args.repeats + 1):  # the first pass warms up kernels (and compiles)
            sync(base.device)
            before = allocator_counts(base.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            watch = PassCollections()
            with CollectionTimer(watch):
                report = evaluate_dataset(
                    data, classifier.score_pairs, adapter=None, base_model=base.ref.name,
                    chunk_size=len(data.examples),
                )  # fmt: skip
                sync(base.device)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            collections.append(watch)
            after = allocator_counts(base.device)
            allocations.append({key: after[key] - before[key] for key in after})
        timed = seconds[1:] or seconds
        best = len(data.examples) / min(timed)
        warmup_s = seconds[0]
        # CUDA only: the allocator's new device allocations and retries, per pass.
        allocator = {key: [a[key] for a in allocations] for key in allocations[0]}
        rows.append(
            {
                "config": name,
                "batch_size": batch_size,
                "warmup_s": round(warmup_s, 1),
                "pairs": len(data.examples),
                "pairs_per_s": round(best),  # the best timed pass
                "median_pairs_per_s": round(len(data.examples) / statistics.median(timed)),
                "passes_s": [round(x, 3) for x in seconds],  # the warm-up pass first
                # Per pass, as passes_s: full collections, and seconds in any collection.
                "gc_full": [watch.full for watch in collections],
                "gc_s": [round(watch.seconds, 3) for watch in collections],
                # The process's CPU seconds (every thread) per pass: a slow pass that also
                # used more CPU did more host work; one that did not waited for something.
                "cpu_s": [round(x, 3) for x in cpu_seconds],
                **allocator,
                "accuracy": round(report["metrics"]["accuracy"], 4),
            }
        )
    card = torch.cuda.get_device_name() if base.device.type == "cuda" else "cpu"
    result: dict[str, object] = {
        "model": args.model,
        "card": card,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
        "gc_freeze": not args.no_gc_freeze,
    }
    if args.generate_baseline:
        pairs = [(e.premise, e.hypothesis) for e in data.examples[: args.generate_baseline]]
        result["generate_pairs_per_s"] = round(generate_baseline(classifier, pairs), 2)
        result["speedup_vs_generate"] = round(
            rows[-1]["pairs_per_s"] / result["generate_pairs_per_s"]
        )
    print(f"{args.model} on {card}")
    for row in rows:
        print(
            "{config:>40} batch {batch_size:>5}: {pairs_per_s:>7} pairs/s best, "
            "{median_pairs_per_s} median "
            "(accuracy {accuracy}, first pass {warmup_s} s)".format(**row)
        )
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "eval_throughput", **result}) + "\n")


if __name__ == "__main__":
    main()
