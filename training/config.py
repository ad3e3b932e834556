"""Training configuration: one dataclass per concern, each field documented and validated.

``training.recipe`` builds a ``TrainingConfig`` from a YAML recipe plus ``--set`` overrides.

Data paths may use ``{snli_dir}``, which expands to ``$NLI_SNLI_DIR`` when set, else to
``../shared/data/snli`` beside the repository root (see ``snli_dir``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nli.default_model import DEFAULT_BASE_MODEL
from nli.errors import ConfigError
from nli.loading import QUANTIZATIONS, Quantization
from nli.prompt import CURRENT_PROMPT_FORMAT, PROMPT_FORMATS

REPO_ROOT = Path(__file__).resolve().parents[1]
SNLI_DIR_ENV = "NLI_SNLI_DIR"

Precision = Literal["auto", "bf16", "fp32"]
Scheduler = Literal["cosine", "linear", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit"]
EvalStrategy = Literal["epoch", "steps"]
ReportTo = Literal["tensorboard", "none"]
Switch = bool | Literal["auto"]
"""A speed setting: on, off, or ``auto`` (on where it is known to help: one process on a CUDA
GPU; ``training.train.switched_on`` resolves it)."""


def snli_dir() -> Path:
    """Where ``{snli_dir}`` points: ``$NLI_SNLI_DIR``, else ``<repo>/../shared/data/snli``."""
    env = os.environ.get(SNLI_DIR_ENV)
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data" / "snli"


def expand_source(value: str) -> str:
    """Expand ``{snli_dir}`` and ``~`` in a data source; hub ids pass through unchanged."""
    if "{snli_dir}" in value:
        value = value.replace("{snli_dir}", str(snli_dir()))
    return str(Path(value).expanduser()) if value.startswith("~") else value


def parse_slice(spec: str, *, name: str) -> slice:
    """Parse ``"start:stop"`` (either side optional, non-negative) into a ``slice``."""
    start, sep, stop = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        parts = [int(p) if p.strip() else None for p in (start, stop)]
    except ValueError:
        raise ConfigError(f"{name}: expected 'start:stop' such as ':2000', got {spec!r}") from None
    if any(p is not None and p < 0 for p in parts):
        raise ConfigError(f"{name}: slice bounds must be non-negative, got {spec!r}")
    return slice(parts[0], parts[1])


def _positive(section: str, **values: float | None) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {value}")


def _literal(section: str, key: str, value: object, options: tuple[object, ...]) -> None:
    if value not in options:
        raise ConfigError(
            f"{section}.{key} must be one of {', '.join(map(str, options))}, got {value!r}"
        )


@dataclass
class ModelConfig:
    """The base model and how it is loaded and prepared for training."""

    base_model: str = DEFAULT_BASE_MODEL
    """The offline default alias, a local Hugging Face folder, or a hub id."""
    quantization: Quantization = "nf4"
    """``nf4`` (QLoRA: 4-bit NF4 with double quantization) or ``none`` (compute dtype)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``. Under ``torchrun`` each rank
    uses ``cuda:<LOCAL_RANK>`` whatever this says."""
    max_length: int = 256
    """Token budget of one prompt; longer pairs lose the end of the premise first."""
    prompt_format: int = CURRENT_PROMPT_FORMAT
    """Version of the prompt format (``nli.prompt``); written into the adapter's manifest."""
    prepare_kbit: bool = True
    """Run peft's ``prepare_model_for_kbit_training``: it casts every parameter that is not 4-bit
    (embeddings, norms, head) to float32 for stable training. Costs memory (about 1 GB for
    Qwen2.5-1.5B's untied embeddings, ~0.1 GB for SmolLM2-135M) and a little speed."""
    dequantize_frozen: bool = False
    """Hold the frozen NF4 base weights dequantized (``compute dtype``) for the whole run instead
    of dequantizing every 4-bit layer in every forward and backward. The values are exactly the
    ones the 4-bit layers compute with, so the adapter learns against the same quantized base
    that serves it; what changes is memory (2 bytes per weight instead of ~0.5) and speed (no
    per-step dequantize kernels). Worth it for small bases; leave it off to save memory."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% slower. Off for small
    models, where memory is plentiful and speed is the limit."""

    def __post_init__(self) -> None:
        if not self.base_model.strip():
            raise ConfigError("model.base_model must not be empty")
        _literal("model", "quantization", self.quantization, QUANTIZATIONS)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"model.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        _positive("model", max_length=self.max_length)
        _literal("model", "prompt_format", self.prompt_format, tuple(PROMPT_FORMATS))


@dataclass
class LoraSettings:
    """The LoRA adapter (peft ``LoraConfig``)."""

    r: int = 16
    """Rank of the update matrices. Lower the learning rate as the rank grows."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input; 0 skips the dropout kernels (faster)."""
    target_modules: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer but the output head) or a list of module names."""

    def __post_init__(self) -> None:
        _positive("lora", r=self.r, alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules must not be an empty list")


@dataclass
class DataConfig:
    """Where the training and selection data come from (local files or hub dataset ids)."""

    train_file: str = "{snli_dir}/train.jsonl"
    """Training data: a .jsonl/.json/.csv/.tsv/.parquet file or a hub dataset id."""
    train_split: str = "train"
    """Split of ``train_file`` when it is a hub dataset (ignored for files)."""
    dev_file: str = "{snli_dir}/dev.jsonl"
    """Selection (dev) data: evaluated during training to pick the best checkpoint."""
    dev_split: str = "validation"
    """Split of ``dev_file`` when it is a hub dataset."""
    dev_rows: str = ":2000"
    """The fixed slice of the dev data used for selection (``start:stop``, after dropping rows
    without a gold label). Fixed, so runs are comparable."""
    extra_train_from_dev: str | None = None
    """Optional slice of the dev data added to training (e.g. ``2000:``). Must not overlap
    ``dev_rows``: selection data is never trained on."""
    columns: str | None = None
    """Column mapping for every data file, e.g. ``premise=s1,hypothesis=s2,label=y``; by default
    premise/hypothesis/label or sentence1/sentence2/gold_label are recognised."""
    max_train_examples: int | None = None
    """Use only the first N training examples (quick runs, tests); ``null`` for all."""
    cache_dir: str | None = None
    """Where tokenised data is cached; ``null`` = ``$NLI_CACHE_DIR/tokenized``. Never next to the
    data, which may be read-only."""

    def __post_init__(self) -> None:
        for key in ("train_file", "dev_file", "train_split", "dev_split"):
            if not getattr(self, key).strip():
                raise ConfigError(f"data.{key} must not be empty")
        parse_slice(self.dev_rows, name="data.dev_rows")
        if self.extra_train_from_dev is not None:
            parse_slice(self.extra_train_from_dev, name="data.extra_train_from_dev")
        _positive("data", max_train_examples=self.max_train_examples)


@dataclass
class LoopConfig:
    """The optimisation loop (transformers ``Trainer``)."""

    epochs: float = 3.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = 64
    """Examples per device per step; the effective batch is ``batch_size * grad_accum * GPUs``."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    learning_rate: float = 2e-4
    """Peak learning rate (AdamW)."""
    lr_scheduler: Scheduler = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.05
    """Fraction of all steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    label_smoothing: float = 0.1
    """Label smoothing of the three-way cross-entropy."""
    optimizer: Optimizer = "adamw_torch"
    """transformers optimizer name; ``adamw_torch_fused`` saves kernel launches on GPU."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the LoRA B matrices learn at this multiple of ``learning_rate`` (the A matrices at
    ``learning_rate``; peft's ``create_loraplus_optimizer``). None: one rate for all."""
    precision: Precision = "auto"
    """``auto``: bf16 autocast on GPUs that support it, else fp32."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    seed: int = 42
    """Seed of weights init, data order and dropout."""
    dataloader_workers: int = 2
    """Worker processes that collate batches."""
    logging_steps: int = 20
    """Log loss and learning rate every N steps."""
    report_to: ReportTo = "tensorboard"
    """Where metrics go besides the log; TensorBoard logs land in ``<output>.work/runs``."""
    torch_compile: Switch = False
    """``torch.compile`` each decoder layer (one graph shared by all layers, dynamic shapes;
    ``training.model.compile_decoder_layers``). The first step waits for the compile.
    ``auto``: only when training is one process on a CUDA GPU."""
    cuda_graphs: Switch = False
    """Record each batch shape's forward and backward as a CUDA graph and replay it
    (``training.step_graphs``): one launch instead of thousands per step. One CUDA GPU only
    (``true`` elsewhere trains eagerly, with a warning); ``true`` needs ``grad_accum: 1``.
    ``auto``: only when training is one process on a CUDA GPU with ``grad_accum: 1``."""

    def __post_init__(self) -> None:
        for key in ("torch_compile", "cuda_graphs"):
            _literal("train", key, getattr(self, key), (True, False, "auto"))
        if self.cuda_graphs is True and self.grad_accum != 1:
            raise ConfigError(
                "train.cuda_graphs needs train.grad_accum=1 (a replayed step overwrites the "
                f"gradients instead of adding to them), got grad_accum={self.grad_accum}"
            )
        _positive(
            "train",
            epochs=self.epochs,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            learning_rate=self.learning_rate,
            logging_steps=self.logging_steps,
            max_grad_norm=self.max_grad_norm,
        )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1:
            raise ConfigError(
                f"train.loraplus_lr_ratio must be >= 1 or null, got {self.loraplus_lr_ratio}"
            )
        if self.weight_decay < 0 or self.dataloader_workers < 0:
            raise ConfigError("train.weight_decay and train.dataloader_workers must be >= 0")
        for key, kind in (
            ("lr_scheduler", Scheduler),
            ("optimizer", Optimizer),
            ("precision", Precision),
            ("report_to", ReportTo),
        ):
            _literal("train", key, getattr(self, key), typing.get_args(kind))


@dataclass
class EvalConfig:
    """Dev evaluation during training, checkpoint selection and the final reports."""

    strategy: EvalStrategy = "epoch"
    """Evaluate (and checkpoint) at the end of every epoch, or every ``steps`` steps."""
    steps: int = 200
    """Evaluation interval when ``strategy`` is ``steps``."""
    batch_size: int = 256
    """Examples per device per evaluation batch."""
    early_stopping_patience: int | None = 2
    """Stop after this many evaluations without a better dev accuracy; ``null`` never stops."""
    collapse_accuracy: float | None = 0.4
    """Abort when dev accuracy at an evaluation is below this: the run has collapsed onto one
    label (chance is 1/3). ``null`` disables the check."""
    test_file: str | None = None
    """Test data for one final report (never used for choosing). Only evaluated when set."""
    test_split: str = "test"
    """Split of ``test_file`` when it is a hub dataset."""
    compare_base: bool = True
    """Also score the bare base model in the final reports (same process, adapter disabled)."""
    max_examples_per_case: int = 25
    """Examples listed per corrected / broken / both-wrong case in the reports."""

    def __post_init__(self) -> None:
        _literal("eval", "strategy", self.strategy, typing.get_args(EvalStrategy))
        _positive("eval", steps=self.steps, batch_size=self.batch_size)
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError("eval.early_stopping_patience must be >= 1 or null")
        if self.collapse_accuracy is not None and not 0 < self.collapse_accuracy < 1:
            raise ConfigError("eval.collapse_accuracy must be in (0, 1) or null")
        if self.max_examples_per_case < 0:
            raise ConfigError("eval.max_examples_per_case must be >= 0")


@dataclass
class OutputConfig:
    """Where the adapter goes and what it says about itself."""

    dir: str | None = None
    """The adapter folder; ``null`` = ``outputs/<recipe name>``. Checkpoints and TensorBoard logs
    go to a working folder beside it, ``<dir>.work``."""
    overwrite: bool = False
    """Replace an existing adapter folder (atomically, once the new one is complete)."""
    save_total_limit: int = 2
    """Checkpoints kept in the working folder (the best one is always kept)."""
    keep_checkpoints: bool = False
    """Keep the checkpoints after a successful run (they are only needed to resume)."""
    license: str = ""
    """License statement written into the manifest (data and base model licenses)."""

    def __post_init__(self) -> None:
        _positive("output", save_total_limit=self.save_total_limit)


@dataclass
class TrainingConfig:
    """A whole training run."""

    name: str = "custom"
    """Recipe name; names the default output folder."""
    description: str = ""
    """One line about the recipe."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.data.extra_train_from_dev is not None:
            dev = parse_slice(self.data.dev_rows, name="data.dev_rows")
            extra = parse_slice(self.data.extra_train_from_dev, name="data.extra_train_from_dev")
            if _overlap(dev, extra):
                raise ConfigError(
                    f"data.extra_train_from_dev ({self.data.extra_train_from_dev}) overlaps "
                    f"data.dev_rows ({self.data.dev_rows}): selection data must not be trained on"
                )

    def output_dir(self) -> Path:
        """The adapter folder this run writes."""
        return Path(self.output.dir or Path("outputs") / self.name).expanduser()

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types (reports, the resume check)."""
        return dataclasses.asdict(self)


def _overlap(a: slice, b: slice) -> bool:
    # Both slices have non-negative bounds; None means "from the start" / "to the end".
    a_start, b_start = a.start or 0, b.start or 0
    a_stop = a.stop if a.stop is not None else float("inf")
    b_stop = b.stop if b.stop is not None else float("inf")
    return max(a_start, b_start) < min(a_stop, b_stop)
