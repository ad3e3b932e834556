"""Does the CPU merge (``nli.cpu_merge``) keep the accuracy of PEFT's path? Same pairs, same
classifier.

    python -m bench.merge_accuracy [--data FILE] [--rows 2000] [--adapter DIR] [--out result.json]

Holds the default model's NF4 values expanded (``NLI_DEQUANTIZE=1``: a merge needs
floating-point weights), attaches ``--adapter`` (default: the shipped one), and scores the first
``--rows`` pairs of ``--data`` (default: SNLI dev rows 0-1,999, the shipped adapter's selection
rows) in batches of 64 twice: through PEFT's LoRA layers, then with the adapter merged into a
copy of the weights. Prints both accuracies, how many labels agree, how far the probabilities
are apart, and each pass's seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import add_accuracy_arguments
from nli.classifier import NLIClassifier
from nli.cpu_merge import SteadyMerge
from nli.data import read_nli_file
from nli.loading import load_base_model

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_accuracy_arguments(parser)
    args = parser.parse_args()

    base = load_base_model(args.base_model, device="cpu", dequantize=True)
    classifier = NLIClassifier(base, max_batch_size=BATCH)
    classifier.attach_adapter(args.adapter, name="adapter")
    examples = read_nli_file(args.data).examples[: args.rows]
    pairs = [(e.premise, e.hypothesis) for e in examples]
    gold = np.array([e.label for e in examples])

    probs, seconds = {}, {}
    for mode, merge in (("peft", None), ("merged", SteadyMerge(after=1))):
        classifier.cpu_merge = merge  # after=1: the first batch merges
        started = time.perf_counter()
        probs[mode] = np.concatenate(
            [
                classifier.score_pairs(pairs[i : i + BATCH], "adapter")
                for i in range(0, len(pairs), BATCH)
            ]
        )
        seconds[mode] = round(time.perf_counter() - started, 1)
        assert merge is None or merge.holds == "adapter", "the adapter was not merged"
    labels = {mode: p.argmax(1) for mode, p in probs.items()}
    gap = np.abs(probs["merged"] - probs["peft"]).max(axis=1)
    result = {
        "benchmark": "merge_accuracy",
        "rows": len(pairs),
        "accuracy_peft": round(float((labels["peft"] == gold).mean()), 4),
        "accuracy_merged": round(float((labels["merged"] == gold).mean()), 4),
        "same_label": int((labels["merged"] == labels["peft"]).sum()),
        "max_prob_gap": round(float(gap.max()), 4),
        "mean_prob_gap": round(float(gap.mean()), 5),
        "seconds": seconds,
    }
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
