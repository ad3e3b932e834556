"""Offline evaluation of the base model or an adapter (``nli-train evaluate``, end of training).

Both go through ``nli.classifier.NLIClassifier`` and ``nli.evaluation`` (the code behind
``POST /evaluate``): base and adapter are scored in one process, the adapter disabled for the
base, so there is never a second load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nli.classifier import NLIClassifier
from nli.data import NLIData, load_nli_data, parse_columns
from nli.default_model import DEFAULT_BASE_MODEL
from nli.evaluation import evaluate_dataset, write_report
from nli.loading import load_base_model
from nli.manifest import read_manifest

logger = logging.getLogger(__name__)

# Pairs per forward pass when none is given. On a GPU a batch's cost is mostly the host queuing
# its kernels, whatever its rows: SNLI test ran at 18,370 pairs/s in batches of 1,024 with a
# compiled SmolLM2 on an H100 (BENCHMARKS.md); a batch that runs out of memory is retried as
# two halves. On a CPU, small batches keep the padding and the memory down.
DEFAULT_BATCH_SIZE = {"cuda": 1024, "cpu": 64}


def default_batch_size(device: torch.device) -> int:
    """The evaluation batch size for ``device`` (``DEFAULT_BATCH_SIZE``; CPU's for others)."""
    return DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"])


# Padded tokens per scoring batch per row of batch size: enough for SNLI-length prompts.
TOKENS_PER_ROW = 128


@contextmanager
def progress_bar(desc: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar driven by ``nli.evaluation``'s ``progress(done, total)`` callback."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="pair", dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        # The total counts both passes with --compare-base: known only once scoring starts.
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def adapter_name(folder: Path) -> str:
    """The name an adapter folder is scored and reported under."""
    # "base" always means "no adapter" in reports and in the service.
    return folder.name if folder.name and folder.name != "base" else "adapter"


def build_classifier(
    base_model: str,
    *,
    quantization: str = "nf4",
    device: str = "auto",
    batch_size: int | None = None,
    max_length: int = 512,
    compile: bool = False,
) -> NLIClassifier:
    """Load a base model for scoring (the serving configuration) into a classifier.

    ``batch_size``: pairs per forward pass (None: ``default_batch_size`` of the device).
    ``compile``: ``torch.compile`` one decoder layer for all layers (CUDA only; see
    ``NLIClassifier``).
    """
    base = load_base_model(base_model, quantization=quantization, device=device)  # type: ignore[arg-type]
    if batch_size is None:
        batch_size = default_batch_size(base.device)
    return NLIClassifier(
        base,
        max_length=max_length,
        max_batch_size=batch_size,
        max_tokens_per_batch=batch_size * TOKENS_PER_ROW,
        compile=compile,
    )


def score_data(
    classifier: NLIClassifier,
    data: NLIData,
    *,
    adapter: str | None,
    compare_base: bool,
    report_dir: Path | None,
    max_examples_per_case: int = 25,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``data`` with an attached adapter (or the base) and optionally write the files."""
    desc = f"evaluating {adapter or 'base'}"
    with progress_bar(desc, enabled=progress) as update:
        report = evaluate_dataset(
            data,
            classifier.score_pairs,
            adapter=adapter,
            base_model=classifier.base_model,
            compare_base=compare_base,
            max_examples_per_case=max_examples_per_case,
            progress=update,
        )
    if report_dir is not None:
        write_report(report, report_dir)
    return report


def run_evaluation(
    data: str,
    *,
    split: str | None = None,
    columns: str | None = None,
    adapter: str | Path | None = None,
    base_model: str | None = None,
    compare_base: bool = False,
    report_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    max_length: int = 512,
    compile: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``nli-train evaluate``: score a file or hub split with the base model or an adapter.

    With an adapter the base model defaults to the one its manifest names; without one the bare
    base is evaluated (``compare_base`` then has nothing to compare).
    """
    manifest = read_manifest(adapter) if adapter is not None else None
    name = base_model or (manifest.base_model if manifest else DEFAULT_BASE_MODEL)
    quantization = manifest.quantization if manifest else "nf4"
    # Read the data first: a bad file fails in a second, not after a model load.
    nli_data = load_nli_data(data, split=split, columns=parse_columns(columns))
    classifier = build_classifier(
        name,
        quantization=quantization,
        device=device,
        batch_size=batch_size,
        max_length=max_length,
        compile=compile,
    )
    scored: str | None = None
    if adapter is not None:
        scored = adapter_name(Path(adapter))
        classifier.attach_adapter(adapter, name=scored)
    elif compare_base:
        logger.warning("--compare-base without --adapter: evaluating the base model alone")
    return score_data(
        classifier,
        nli_data,
        adapter=scored,
        compare_base=compare_base and scored is not None,
        report_dir=Path(report_dir) if report_dir is not None else None,
        progress=progress,
    )
