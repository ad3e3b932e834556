"""The transformers ``Trainer`` specialised for the three-label loss, its arguments and callbacks.

Evaluation, best-checkpoint selection, early stopping, checkpoints and resume, seeds, bf16,
the progress bar and TensorBoard all come from ``Trainer``; this module only supplies the loss
(cross-entropy on ``nli.scoring.label_logits``, via ``LabelScoringModel.forward``), the dev
predictions, and the mapping from the recipe to ``TrainingArguments``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from nli.errors import NLIError
from nli.metrics import compute_metrics
from training.config import TrainingConfig
from training.data import LengthGroupedSampler
from training.step_graphs import StepGraphs, causal_mask

logger = logging.getLogger(__name__)

METRIC = "accuracy"


class TrainingCollapsedError(NLIError):
    """Dev accuracy fell to chance: the adapter predicts (nearly) one label for everything."""


class NLITrainer(Trainer):
    """``Trainer`` whose loss is the label-smoothed cross-entropy over the three label logits."""

    # Our loss is a per-batch mean: Trainer must divide it by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        label_smoothing: float = 0.0,
        length_grouping: bool = True,
        loraplus_lr_ratio: float | None = None,
        step_graphs: StepGraphs | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing
        self.length_grouping = length_grouping
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.step_graphs = step_graphs
        # Trainer inspects the *base* model's forward (which takes **kwargs) and would then treat
        # our loss as already normalised over the accumulated batch and count label tokens for
        # it (an extra all-gather per step under DDP). Neither applies to a per-example loss.
        self.model_accepts_loss_kwargs = False
        self.examples_seen = 0
        self.eval_seconds = 0.0

    def create_optimizer(self, model: Any = None) -> Any:
        """Trainer's optimizer, or with ``loraplus_lr_ratio`` peft's LoRA+ parameter groups
        (B matrices at that multiple of the learning rate) for the same optimizer class."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        # LabelScoringModel around the PeftModel: the groups go by parameter names ("lora_B").
        opt_model: Any = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        # Trainer's own length grouping draws its order from the global RNG at each epoch start,
        # which a resumed run cannot replay mid-epoch; ours depends on (seed, epoch) only.
        if self.length_grouping and self.train_dataset is not None:
            return LengthGroupedSampler(
                list(self.train_dataset["length"]),
                batch_size=self.args.per_device_train_batch_size,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                world_size=self.args.world_size,
            )
        return super()._get_train_sampler(*args, **kwargs)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        """Trainer's step, or with ``step_graphs`` the same forward, loss and backward replayed
        from a CUDA graph (right-padded rows under a plain causal mask: ``training.step_graphs``).
        """
        self.examples_seen += int(inputs["labels"].shape[0])
        if self.step_graphs is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            mask = causal_mask(batch["input_ids"].shape[1], batch["input_ids"].device)
            with self.compute_loss_context_manager():
                loss: torch.Tensor = self.compute_loss(model, {**batch, "attention_mask": mask})
                return loss

        batch = {key: inputs[key] for key in ("input_ids", "last_index", "labels")}
        return self.step_graphs.run(loss_of, batch)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Cross-entropy (with label smoothing) on the ``[batch, 3]`` label logits."""
        logits = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            last_index=inputs["last_index"],
        )
        loss = F.cross_entropy(logits, inputs["labels"], label_smoothing=self.label_smoothing)
        return (loss, logits) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Dev loss (plain cross-entropy) and the ``[batch, 3]`` logits for accuracy."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                last_index=inputs["last_index"],
            )
            loss = F.cross_entropy(logits, inputs["labels"]).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, logits.detach(), inputs["labels"]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Trainer's evaluation, timed so that throughput can exclude it."""
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - started


def dev_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 of the dev predictions (``nli.metrics``, as in the reports)."""
    logits = np.asarray(prediction.predictions)
    gold = np.asarray(prediction.label_ids)
    metrics = compute_metrics(gold, logits.argmax(axis=-1))
    return {METRIC: metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


class CollapseCallback(TrainerCallback):
    """Abort when dev accuracy falls below a floor (the run predicts one label for everything)."""

    def __init__(self, floor: float) -> None:
        self.floor = floor

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Raise ``TrainingCollapsedError`` when dev accuracy is under the floor."""
        accuracy = (metrics or {}).get(f"eval_{METRIC}")
        if accuracy is not None and accuracy < self.floor:
            raise TrainingCollapsedError(
                f"training collapsed: dev accuracy {accuracy:.1%} at step {state.global_step} "
                f"is below eval.collapse_accuracy={self.floor} (chance is 33%). Lower "
                "train.learning_rate (especially at high lora.r) and try again, or set "
                "eval.collapse_accuracy=null if an early evaluation is expected to be this low."
            )


def steps_per_epoch(examples: int, cfg: TrainingConfig, *, world_size: int) -> int:
    """Optimizer steps in one epoch (Trainer's arithmetic: partial batches count)."""
    batches = math.ceil(examples / (cfg.train.batch_size * world_size))
    return max(1, math.ceil(batches / cfg.train.grad_accum))


def total_steps(examples: int, cfg: TrainingConfig, *, world_size: int) -> int:
    """Optimizer steps of the whole run."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return math.ceil(cfg.train.epochs * steps_per_epoch(examples, cfg, world_size=world_size))


def _report_to(choice: str) -> list[str]:
    if choice == "tensorboard":
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            return ["tensorboard"]
        logger.warning("train.report_to=tensorboard, but tensorboard is not installed: not logging")
    return []


def use_bf16(cfg: TrainingConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``auto`` on a bf16-capable GPU."""
    if cfg.train.precision == "bf16":
        return True
    return (
        cfg.train.precision == "auto"
        and device.type == "cuda"
        and bool(torch.cuda.is_bf16_supported())
    )


def training_arguments(
    cfg: TrainingConfig,
    work_dir: Path,
    *,
    device: torch.device,
    train_examples: int,
    world_size: int,
) -> TrainingArguments:
    """``TrainingArguments`` for a recipe; checkpoints and logs go to ``work_dir``."""
    loop, evaluation = cfg.train, cfg.eval
    steps = total_steps(train_examples, cfg, world_size=world_size)
    strategy: dict[str, Any] = {"eval_strategy": evaluation.strategy}
    strategy["save_strategy"] = evaluation.strategy
    if evaluation.strategy == "steps":
        strategy.update(eval_steps=evaluation.steps, save_steps=evaluation.steps)
    workers = loop.dataloader_workers
    kwargs: dict[str, Any] = dict(
        output_dir=str(work_dir),
        num_train_epochs=loop.epochs,
        max_steps=loop.max_steps if loop.max_steps is not None else -1,
        per_device_train_batch_size=loop.batch_size,
        per_device_eval_batch_size=evaluation.batch_size,
        gradient_accumulation_steps=loop.grad_accum,
        learning_rate=loop.learning_rate,
        lr_scheduler_type=loop.lr_scheduler,
        # An integer count: the meaning of a fractional warmup_steps has changed across
        # transformers releases, and warmup_ratio was removed in v5.
        warmup_steps=math.ceil(loop.warmup_ratio * steps),
        weight_decay=loop.weight_decay,
        max_grad_norm=loop.max_grad_norm,
        optim=loop.optimizer,
        bf16=use_bf16(cfg, device),
        use_cpu=device.type == "cpu",
        seed=loop.seed,
        data_seed=loop.seed,
        **strategy,
        save_total_limit=cfg.output.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=METRIC,
        greater_is_better=True,
        # Early-stopping patience counts survive a resume, so it ends as an unbroken run would.
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=loop.logging_steps,
        logging_first_step=True,
        # The NaN/inf filter reads the loss on the host after every step: a device sync per
        # step, which starves a launch-bound GPU. A NaN loss then shows in the log, unmasked.
        logging_nan_inf_filter=False,
        report_to=_report_to(loop.report_to),
        dataloader_num_workers=workers,
        dataloader_pin_memory=device.type == "cuda",
        # Pinned batches can be copied to the GPU without blocking the host.
        accelerator_config={"non_blocking": device.type == "cuda"},
        # Persistent workers would make the first evaluation after a resume draw a worker seed
        # from the global RNG that the unbroken run drew earlier, shifting every later dropout
        # mask: the resumed run would no longer end where the unbroken one does.
        dataloader_persistent_workers=False,
        # Our batches carry last_index, which the base model's forward signature lacks.
        remove_unused_columns=False,
        label_names=["labels"],
        # Every LoRA parameter takes part in every step; searching for unused ones costs a
        # graph traversal per step.
        ddp_find_unused_parameters=False,
        # A causal LM's buffers (the rotary tables) are constants, equal on every rank: DDP's
        # broadcast of them at every forward is a wait for rank 0, nothing more (in the profile
        # of BENCHMARKS.md, "Multi-GPU (DDP)").
        ddp_broadcast_buffers=False,
        disable_tqdm=False,
    )
    return one_gpu_per_process(TrainingArguments(**kwargs), world_size=world_size)


def one_gpu_per_process(args: TrainingArguments, *, world_size: int) -> TrainingArguments:
    """Keep a lone process on one GPU where several are visible.

    ``Trainer`` would otherwise wrap the model in ``nn.DataParallel`` over every visible GPU
    (a frozen base copied to each GPU on every step, the batch multiplied by the GPU count, and
    all of it gathered on the first). Several GPUs train under ``torchrun`` (DDP) instead.
    """
    if world_size == 1 and args.n_gpu > 1:
        logger.warning(
            "%d GPUs visible to one process: training on one; run under torchrun for DDP",
            args.n_gpu,
        )
        args._n_gpu = 1  # what TrainingArguments sets for a process with one device
    return args
