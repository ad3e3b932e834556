"""Training data: read and validate with ``nli.data``, tokenise once (cached), collate batches.

Pairs are encoded with ``nli.prompt.PairEncoder`` (the encoding serving uses) through
``datasets.Dataset.map``, whose output is cached as an Arrow file keyed by the examples, the
tokenizer, the prompt format and the token budget. The cache lives under ``$NLI_CACHE_DIR``
(never next to the data, which may be read-only), and a file lock lets concurrent DDP ranks
share one tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nli.data import Example, NLIData, load_nli_data, parse_columns
from nli.default_model import cache_dir
from nli.errors import DataError, InputTooLongError
from nli.fsutil import file_lock
from nli.prompt import PairEncoder
from nli.scoring import collate
from training.config import DataConfig, EvalConfig, expand_source, parse_slice

logger = logging.getLogger(__name__)

# Bump when the cached columns or their meaning change.
CACHE_VERSION = 1
COLUMNS = ("input_ids", "labels", "length")


@dataclass
class PreparedData:
    """Tokenised training and dev sets, plus the raw dev/test data for the final reports."""

    train: Any  # datasets.Dataset with COLUMNS
    dev: Any  # datasets.Dataset with COLUMNS
    dev_data: NLIData
    test_data: NLIData | None
    summary: dict[str, Any] = field(default_factory=dict)


def load_split(source: str, *, split: str, columns: str | None) -> NLIData:
    """Load one split of a file or hub dataset (``{snli_dir}`` expanded)."""
    return load_nli_data(expand_source(source), split=split, columns=parse_columns(columns))


def select_rows(data: NLIData, spec: str, *, name: str) -> NLIData:
    """The rows of ``data`` in the slice ``spec`` (``start:stop``), as a new ``NLIData``."""
    chosen = data.examples[parse_slice(spec, name=name)]
    if not chosen:
        raise DataError(
            f"{name} {spec!r} selects no rows (the data has {len(data.examples):,})",
            source=data.source,
        )
    return NLIData(examples=chosen, dropped=data.dropped, source=f"{data.source}[{spec}]")


def prepare_data(
    data_cfg: DataConfig, eval_cfg: EvalConfig, encoder: PairEncoder, *, tokenizer_key: str
) -> PreparedData:
    """Read every split the run needs and tokenise the training and dev sets."""
    train = load_split(data_cfg.train_file, split=data_cfg.train_split, columns=data_cfg.columns)
    dev_all = load_split(data_cfg.dev_file, split=data_cfg.dev_split, columns=data_cfg.columns)
    dev = select_rows(dev_all, data_cfg.dev_rows, name="data.dev_rows")
    train_examples = list(train.examples)
    extra = 0
    if data_cfg.extra_train_from_dev is not None:
        added = select_rows(
            dev_all, data_cfg.extra_train_from_dev, name="data.extra_train_from_dev"
        )
        extra = len(added.examples)
        train_examples += added.examples
    if data_cfg.max_train_examples is not None:
        train_examples = train_examples[: data_cfg.max_train_examples]
    test = None
    if eval_cfg.test_file is not None:
        test = load_split(eval_cfg.test_file, split=eval_cfg.test_split, columns=data_cfg.columns)
    cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else None
    cache = cache or cache_dir() / "tokenized"
    train_set = tokenize(
        train_examples, encoder, cache=cache, tokenizer_key=tokenizer_key, name="train"
    )
    dev_set = tokenize(dev.examples, encoder, cache=cache, tokenizer_key=tokenizer_key, name="dev")
    # Trainer evaluates in dataset order; sorted, each batch holds similar lengths. (The final
    # reports score the dev rows through NLIClassifier, in file order.)
    dev_set = dev_set.sort("length")
    summary = {
        "train_source": train.source,
        "train_examples": len(train_examples),
        "train_dropped": train.dropped,
        "extra_train_from_dev": extra,
        "dev_source": dev.source,
        "dev_examples": len(dev.examples),
        "dev_dropped": dev_all.dropped,
        "test_source": test.source if test else None,
        "test_examples": len(test.examples) if test else None,
        "mean_prompt_tokens": round(float(sum(train_set["length"]) / len(train_set)), 1),
    }
    logger.info(
        "data: %d training examples (%d from dev), %d dev examples%s",
        len(train_examples),
        extra,
        len(dev.examples),
        f", {len(test.examples)} test examples" if test else "",
    )
    return PreparedData(train_set, dev_set, dev, test, summary)


def cache_key(examples: list[Example], encoder: PairEncoder, *, tokenizer_key: str) -> str:
    """A digest of everything the tokenised output depends on."""
    digest = hashlib.sha256()
    header = {
        "cache_version": CACHE_VERSION,
        "tokenizer": tokenizer_key,
        "prompt_format": encoder.format.version,
        "max_length": encoder.max_length,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for example in examples:
        digest.update(f"{example.premise}\x1f{example.hypothesis}\x1f{example.label}\x1e".encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any, base_fingerprint: str) -> str:
    """Identify a tokenizer by its serialised vocabulary and rules (fast tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"{type(tokenizer).__name__}:{base_fingerprint}"
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:32]


def tokenize(
    examples: list[Example],
    encoder: PairEncoder,
    *,
    cache: Path,
    tokenizer_key: str,
    name: str,
) -> Any:
    """A ``datasets.Dataset`` of ``input_ids``, ``labels`` and ``length``, cached on disk."""
    import datasets

    if not examples:
        raise DataError(f"no {name} examples")
    key = cache_key(examples, encoder, tokenizer_key=tokenizer_key)
    cache.mkdir(parents=True, exist_ok=True)
    raw = datasets.Dataset.from_dict(
        {
            "premise": [e.premise for e in examples],
            "hypothesis": [e.hypothesis for e in examples],
            "labels": [e.label for e in examples],
        }
    )
    # One process tokenises, the others (DDP ranks, parallel runs) wait and read its file.
    with file_lock(cache / f"{key}.lock"):
        encoded = raw.map(
            _encode_batch,
            batched=True,
            batch_size=2048,
            remove_columns=["premise", "hypothesis"],
            with_indices=True,
            fn_kwargs={"encoder": encoder, "name": name},
            cache_file_name=str(cache / f"{key}.arrow"),
            new_fingerprint=key,
            load_from_cache_file=True,
            desc=f"tokenising {name}",
        )
    logger.info("%s: %d examples tokenised (cache %s)", name, len(encoded), key)
    return encoded


def _encode_batch(
    batch: dict[str, list[Any]], indices: list[int], encoder: PairEncoder, name: str
) -> dict[str, list[Any]]:
    pairs = list(zip(batch["premise"], batch["hypothesis"], strict=True))
    try:
        ids = encoder.encode(pairs)
    except InputTooLongError:
        # Find the offending pair so the message can point at it.
        for index, (premise, hypothesis) in zip(indices, pairs, strict=True):
            try:
                encoder.encode([(premise, hypothesis)])
            except InputTooLongError as exc:
                raise DataError(
                    f"{name} example {index + 1:,}: {exc.message}; the hypothesis starts "
                    f"{hypothesis[:60]!r} (raise model.max_length or drop the row)"
                ) from None
        raise
    return {"input_ids": ids, "length": [len(seq) for seq in ids]}


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Random batches of similar lengths, in an order set by ``(seed, epoch)`` alone.

    Indices are shuffled, cut into windows of ``window_batches`` batches, and sorted by length
    inside each window, so a batch holds similar lengths (little padding) while batch order
    stays random. The batch holding the longest example goes first, so running out of memory
    shows at step 1. Trainer calls ``set_epoch``; the order never touches the global RNG, which
    is what lets a resumed run replay the epoch it was interrupted in.

    Under DDP (``world_size`` > 1) every process draws the same order and takes every
    ``world_size``-th batch of it (accelerate's batch sharding), so one optimizer step runs
    ``world_size`` consecutive batches, one per process. Those batches are kept together, as
    neighbours in one sorted window, when the order is shuffled: the processes of a step then get
    batches of similar lengths and none waits long for the slowest in the gradient all-reduce.
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        batch_size: int,
        seed: int,
        window_batches: int = 64,
        world_size: int = 1,
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.window = batch_size * window_batches
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer (through accelerate) at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=self.lengths.__getitem__)
            batches += [
                window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)
            ]
        # A short batch must stay last: the DataLoader cuts the flat order into equal batches.
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        # One step's batches (one per process) move together; full batches that do not fill a
        # step stay at the end, before the short one.
        cut = len(full) - len(full) % self.world_size
        steps = [full[i : i + self.world_size] for i in range(0, cut, self.world_size)]
        rest = full[cut:]
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        if steps:
            longest = max(
                range(len(steps)), key=lambda i: max(self.lengths[j] for b in steps[i] for j in b)
            )
            steps[0], steps[longest] = steps[longest], steps[0]
        full = [batch for step in steps for batch in step] + rest
        return iter([index for batch in full + short for index in batch])


@dataclass
class LabelCollator:
    """Right-pads a batch with ``nli.scoring.collate`` (the padding serving uses).

    ``pad_to_multiple_of`` > 1 (with ``train.torch_compile`` or ``train.cuda_graphs``): padded
    lengths share their alignment, which compiled code would otherwise specialise on (one more
    graph), and fewer lengths mean fewer recorded CUDA graphs.
    """

    pad_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(
            [f["input_ids"] for f in features],
            pad_id=self.pad_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "last_index": batch.last_index,
            "labels": torch.as_tensor([f["labels"] for f in features], dtype=torch.long),
        }
