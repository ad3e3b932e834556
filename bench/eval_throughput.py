"""Evaluation throughput through the real path: tokenise + score + metrics, model already loaded.

    python bench/eval_throughput.py [--model smollm2|qwen2-1.5b] [--batch-sizes 256 1024]

Runs ``nli.evaluation.evaluate_dataset`` over the SNLI test split (9,824 pairs) with the bare
base model, after one warm-up pass, and prints pairs/s per batch size plus one JSON line.
With ``--generate-baseline N`` it also times a naive per-pair ``generate`` on N pairs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nli.classifier import NLIClassifier
from nli.data import read_nli_file
from nli.default_model import DEFAULT_BASE_MODEL, ensure_default_model
from nli.evaluation import evaluate_dataset
from nli.loading import load_base_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "snli" / "test.jsonl"


def resolve_model(name: str) -> str:
    if name == "smollm2":
        return DEFAULT_BASE_MODEL
    if name == "qwen2-1.5b":
        from bench.shapes import build_random_qwen2_1_5b

        out = Path(tempfile.gettempdir()) / "qwen2-1.5b-random"
        return str(build_random_qwen2_1_5b(out, str(ensure_default_model())))
    return name


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate_baseline(classifier: NLIClassifier, pairs: list[tuple[str, str]]) -> float:
    """Pairs/s of the naive approach: per-pair generate of a few tokens, then parse the text."""
    tokenizer, model = classifier.tokenizer, classifier.model
    encoded = classifier.encode(pairs)
    sync()
    start = time.perf_counter()
    for ids in encoded:
        inputs = torch.tensor([ids], device=classifier.device)
        out = model.generate(inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
        tokenizer.decode(out[0, len(ids) :])
    sync()
    return len(pairs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="score only the first N pairs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--max-tokens", type=int, default=1 << 17)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--generate-baseline", type=int, default=0)
    args = parser.parse_args()

    base = load_base_model(resolve_model(args.model), device=args.device)
    data = read_nli_file(args.data)
    if args.limit:
        data.examples = data.examples[: args.limit]
    rows = []
    for batch_size in args.batch_sizes:
        classifier = NLIClassifier(
            base, max_batch_size=batch_size, max_tokens_per_batch=args.max_tokens
        )
        best = 0.0
        for _ in range(args.repeats + 1):  # the first pass warms up kernels and the allocator
            sync()
            start = time.perf_counter()
            report = evaluate_dataset(
                data, classifier.score_pairs, adapter=None, base_model=base.ref.name,
                chunk_size=len(data.examples),
            )  # fmt: skip
            sync()
            best = max(best, len(data.examples) / (time.perf_counter() - start))
        rows.append(
            {
                "batch_size": batch_size,
                "pairs": len(data.examples),
                "pairs_per_s": round(best),
                "accuracy": round(report["metrics"]["accuracy"], 4),
            }
        )
    card = torch.cuda.get_device_name() if base.device.type == "cuda" else "cpu"
    result: dict[str, object] = {"model": args.model, "card": card, "results": rows}
    if args.generate_baseline:
        pairs = [(e.premise, e.hypothesis) for e in data.examples[: args.generate_baseline]]
        result["generate_pairs_per_s"] = round(generate_baseline(classifier, pairs), 2)
        result["speedup_vs_generate"] = round(
            rows[-1]["pairs_per_s"] / result["generate_pairs_per_s"]
        )
    print(f"{args.model} on {card}")
    for row in rows:
        print("batch {batch_size:>5}: {pairs_per_s:>7} pairs/s (accuracy {accuracy})".format(**row))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
