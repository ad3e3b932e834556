"""``python -m nli``: classify one pair, or prepare the offline default model ahead of time."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from nli.errors import NLIError
from nli.labels import build_result


def _classify(args: argparse.Namespace) -> int:
    from nli.classifier import NLIClassifier
    from nli.loading import load_base_model

    base = load_base_model(args.base_model, quantization=args.quantization, device=args.device)
    classifier = NLIClassifier(base)
    adapter_name = None
    if args.adapter:
        adapter_name = "adapter"
        classifier.attach_adapter(args.adapter, name=adapter_name)
    probs = classifier.score_pairs([(args.premise, args.hypothesis)], adapter_name)[0]
    result = build_result(
        [float(p) for p in probs], adapter=args.adapter or "base", base_model=base.ref.name
    )
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(f"{result['label']}\n")
        for item in result["scores"]:  # type: ignore[attr-defined]
            sys.stdout.write(f"  {item['label']:<14} {item['score']:.4f}\n")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from nli.default_model import ensure_default_model

    sys.stdout.write(f"{ensure_default_model()}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m nli``."""
    from nli.default_model import DEFAULT_BASE_MODEL

    parser = argparse.ArgumentParser(prog="python -m nli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    classify = sub.add_parser("classify", help="classify one premise/hypothesis pair")
    classify.add_argument("--premise", required=True)
    classify.add_argument("--hypothesis", required=True)
    classify.add_argument("--adapter", help="adapter folder (default: the bare base model)")
    classify.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    classify.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    classify.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    classify.add_argument("--json", action="store_true", help="one line of JSON on stdout")
    classify.set_defaults(func=_classify)
    pull = sub.add_parser("pull-default-model", help="fetch and convert the offline default")
    pull.set_defaults(func=_pull)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except NLIError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
