"""Do CUDA-graphed scores keep the accuracy of the eager path? Same pairs, same classifier.

    python -m bench.graph_accuracy [--data FILE] [--rows 2000] [--adapter DIR] [--dequantize]
        [--out result.json]

Scores the first ``--rows`` pairs of ``--data`` (default: SNLI dev rows 0-1,999, the shipped
adapter's selection rows) in batches of 64 twice: through ``nli.cuda_graphs`` (recorded graphs
on CUDA; on a CPU the same slot-and-bucket forward runs eagerly) and through the ordinary path
(PEFT's LoRA layers, padding mask, prefix cache). Prints both accuracies and how far the
probabilities are apart (bf16 arithmetic in a different order: no mask, no prefix cache).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.common import add_accuracy_arguments
from nli.classifier import NLIClassifier
from nli.cuda_graphs import SmallBatchGraphs
from nli.data import read_nli_file
from nli.loading import load_base_model

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_accuracy_arguments(parser)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dequantize", action="store_true", help="as NLI_DEQUANTIZE=1")
    args = parser.parse_args()

    base = load_base_model(args.base_model, device=args.device, dequantize=args.dequantize)
    classifier = NLIClassifier(base, max_batch_size=BATCH, cuda_graphs=True)
    graphs = classifier.graphs or SmallBatchGraphs(classifier.device, record=False)
    classifier.attach_adapter(args.adapter, name="adapter")
    examples = read_nli_file(args.data).examples[: args.rows]
    pairs = [(e.premise, e.hypothesis) for e in examples]
    gold = np.array([e.label for e in examples])

    probs = {}
    for mode, use in (("graphs", graphs), ("eager", None)):
        classifier.graphs = use
        probs[mode] = np.concatenate(
            [
                classifier.score_pairs(pairs[i : i + BATCH], "adapter")
                for i in range(0, len(pairs), BATCH)
            ]
        )
    gap = np.abs(probs["graphs"] - probs["eager"]).max(axis=1)
    result = {
        "benchmark": "graph_accuracy",
        "device": str(base.device),
        "dequantized": base.dequantized,
        "recorded": base.device.type == "cuda",
        "slot": type(graphs._slot).__name__,
        "rows": len(pairs),
        "accuracy_graphs": round(float((probs["graphs"].argmax(1) == gold).mean()), 4),
        "accuracy_eager": round(float((probs["eager"].argmax(1) == gold).mean()), 4),
        "same_label": int((probs["graphs"].argmax(1) == probs["eager"].argmax(1)).sum()),
        "max_prob_gap": round(float(gap.max()), 4),
        "median_prob_gap": round(float(np.median(gap)), 5),
        "buckets": graphs.recorded,
    }
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
