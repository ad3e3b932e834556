"""Pairs/s of label scoring with a loaded model (no HTTP): the core's raw throughput.

    python bench/score_throughput.py [--device cpu] [--batch-sizes 1 32] [--pairs 256]

Reads SNLI test pairs from ../shared/data (or --data), scores them through NLIClassifier at each
batch size (model already loaded, one warm-up batch first) and prints a table plus one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nli.classifier import NLIClassifier
from nli.data import read_nli_file
from nli.default_model import DEFAULT_BASE_MODEL
from nli.loading import load_base_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "snli" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    base = load_base_model(args.base_model, quantization=args.quantization, device=args.device)
    examples = read_nli_file(args.data).examples[: args.pairs]
    pairs = [(e.premise, e.hypothesis) for e in examples]
    rows = []
    for batch_size in args.batch_sizes:
        classifier = NLIClassifier(base, max_batch_size=batch_size, max_tokens_per_batch=1 << 30)
        classifier.score_pairs(pairs[:batch_size])  # warm-up
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        classifier.score_pairs(pairs)
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(
            {
                "batch_size": batch_size,
                "pairs": len(pairs),
                "pairs_per_s": round(len(pairs) / seconds, 1),
                "ms_per_pair": round(1000 * seconds / len(pairs), 2),
            }
        )
    device = torch.cuda.get_device_name() if base.device.type == "cuda" else platform.processor()
    print(f"base model {args.base_model} ({args.quantization}) on {base.device} [{device}]")
    print(f"threads {torch.get_num_threads()}")
    print(f"{'batch':>6} {'pairs':>6} {'pairs/s':>9} {'ms/pair':>8}")
    for row in rows:
        cells = (row["batch_size"], row["pairs"], row["pairs_per_s"], row["ms_per_pair"])
        print("{:>6} {:>6} {:>9} {:>8}".format(*cells))
    print(json.dumps({"device": str(base.device), "name": device, "results": rows}))


if __name__ == "__main__":
    main()
