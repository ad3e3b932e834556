"""``nli-train``: QLoRA fine-tuning and offline evaluation from the command line.

    nli-train train --recipe NAME_OR_PATH [--set section.key=value ...] [--output DIR] [--resume]
    nli-train evaluate --data FILE_OR_HUB_ID [--split NAME] [--columns MAP] [--adapter DIR]
                       [--base-model ID] [--compare-base] [--report-dir DIR]
    nli-train average ADAPTER ADAPTER [...] --output DIR [--rank R] [--overwrite]
    nli-train recipes

Errors the user can fix (bad data, bad config, missing model) are one line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from nli.errors import NLIError

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nli-train`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="nli-train", description="QLoRA fine-tuning and evaluation of NLI adapters."
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune an adapter from a recipe")
    train.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. --set train.learning_rate=3e-4",
    )
    train.add_argument("--output", help="adapter folder (default outputs/<recipe>)")
    train.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in <output>.work"
    )

    evaluate = commands.add_parser("evaluate", help="evaluate the base model or an adapter")
    evaluate.add_argument("--data", required=True, help="NLI file or hub dataset id")
    evaluate.add_argument("--split", help="hub dataset split (default test)")
    evaluate.add_argument(
        "--columns", help="column mapping, e.g. premise=sentence1,hypothesis=sentence2,label=y"
    )
    evaluate.add_argument("--adapter", help="adapter folder (omit to evaluate the bare base)")
    evaluate.add_argument(
        "--base-model", help="base model (default: the adapter's, else the offline default)"
    )
    evaluate.add_argument(
        "--compare-base",
        action="store_true",
        help="also score the base (adapter disabled) and list corrected/broken cases",
    )
    evaluate.add_argument(
        "--report-dir", help="write report.json, report.md and confusion_matrix.png here"
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pairs per forward pass (default: 1024 on a GPU, 64 on the CPU)",
    )
    evaluate.add_argument("--max-length", type=int, default=512, help="token budget per pair")
    evaluate.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder (CUDA only): ~15 s of compile first, then faster "
        "batches; pays only for files of hundreds of thousands of pairs (training/README.md)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the whole report as JSON")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    average = commands.add_parser(
        "average", help="average adapters of one base into one (a uniform soup of their updates)"
    )
    average.add_argument("adapters", nargs="+", help="adapter folders (two or more)")
    average.add_argument("--output", required=True, help="folder for the averaged adapter")
    average.add_argument(
        "--rank",
        type=int,
        help="compress each layer's mean update to this rank (default: exact, sum of the ranks)",
    )
    average.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    commands.add_parser("recipes", help="list the shipped recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nli-train`` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "average":
            return _average(args)
        return _recipes()
    except NLIError as exc:
        _say(f"nli-train: error: {exc.message}", err=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("nli-train: interrupted", err=True)
        return EXIT_INTERRUPTED


def _say(text: str, *, err: bool = False) -> None:
    """The command's own output (results on stdout, errors on stderr); everything else logs."""
    print(text, file=sys.stderr if err else sys.stdout)  # noqa: T201


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The libraries' own INFO chatter drowns the run's log; their warnings still show.
    for noisy in ("transformers", "datasets", "peft", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def _train(args: argparse.Namespace) -> int:
    from training.recipe import load_config
    from training.train import run_training

    config = load_config(args.recipe, args.overrides, output=args.output)
    output = run_training(config, resume=args.resume)
    if output is None:  # a DDP rank other than 0: rank 0 reports
        return 0
    report = json.loads((output / "report.json").read_text())
    training = report["training"]
    _say(f"adapter: {output}")
    for split in ("dev", "test"):
        if report.get(split):
            _say(_accuracy_line(split, report[split]))
    _say(
        f"training: {training['examples_per_s']:,.1f} examples/s, {training['steps']} steps, "
        f"{training['wall_seconds']:,.1f} s wall; trainable "
        f"{report['parameters']['trainable_percent']:.3f}% of parameters; report "
        f"{output / 'report.md'}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import run_evaluation

    report = run_evaluation(
        args.data,
        split=args.split,
        columns=args.columns,
        adapter=args.adapter,
        base_model=args.base_model,
        compare_base=args.compare_base,
        report_dir=args.report_dir,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        compile=args.compile,
        progress=not args.no_progress,
    )
    if args.json:
        _say(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    _say(
        f"{report['source']}: {report['n']:,} pairs ({report['dropped']:,} without a gold label "
        f"dropped), {report['pairs_per_s']:,.1f} pairs/s"
    )
    _say(_accuracy_line(report["adapter"], report))
    if report.get("cases"):
        cases = report["cases"]
        _say(
            f"cases: corrected {cases['corrected']['count']:,}, broken "
            f"{cases['broken']['count']:,}, both wrong {cases['both_wrong']['count']:,}"
        )
    if args.report_dir:
        _say(f"report: {Path(args.report_dir) / 'report.md'}")
    return 0


def _average(args: argparse.Namespace) -> int:
    from training.average import average_adapters

    summary = average_adapters(
        [Path(a) for a in args.adapters],
        Path(args.output),
        rank=args.rank,
        overwrite=args.overwrite,
    )
    how = "exact" if summary["exact"] else f"worst layer error {summary['max_relative_error']:.2%}"
    _say(
        f"adapter: {args.output} (mean of {len(args.adapters)} adapters, rank {summary['rank']}, "
        f"{how}); evaluate it before use: nli-train evaluate --adapter {args.output} ..."
    )
    return 0


def _accuracy_line(name: str, report: dict[str, Any]) -> str:
    metrics = report["metrics"]
    line = f"{name}: accuracy {metrics['accuracy']:.2%}, macro-F1 {metrics['macro_f1']:.4f}"
    if report.get("base"):
        base = report["base"]["metrics"]
        line += f" (base {base['accuracy']:.2%}, macro-F1 {base['macro_f1']:.4f})"
    return line


def _recipes() -> int:
    from training.recipe import load_config, recipe_names

    for name in recipe_names():
        _say(f"{name}: {load_config(name).description}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
