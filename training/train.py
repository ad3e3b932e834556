"""One training run: data, model, ``Trainer``, then an atomic, self-describing adapter folder.

Layout of a run writing ``--output DIR``:

- ``DIR.work/``: checkpoints (``checkpoint-<step>/``), TensorBoard logs (``runs/``) and the
  run's ``config.json``. ``--resume`` continues from its last checkpoint.
- ``DIR/``: written under a hidden ``.DIR.*.partial`` name and renamed when complete: the PEFT
  adapter, ``nli_manifest.json``, ``report.json`` / ``report.md`` and ``eval/dev/`` (and
  ``eval/test/``) with the evaluation reports and confusion matrices.

Under ``torchrun`` every rank trains (DDP, the 4-bit base on ``cuda:<LOCAL_RANK>``); only rank 0
writes the adapter folder and the reports.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import EarlyStoppingCallback, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

import nli
from nli.errors import ConfigError
from nli.fsutil import atomic_directory
from nli.labels import LABELS
from nli.loading import BaseModelRef, free_device_memory
from nli.manifest import AdapterManifest, adapter_size_bytes, write_manifest
from nli.prompt import PairEncoder, get_prompt_format
from training.config import TrainingConfig
from training.data import LabelCollator, PreparedData, prepare_data, tokenizer_fingerprint
from training.evaluate import adapter_name, build_classifier, score_data
from training.model import (
    COMPILED_PADDING,
    LabelScoringModel,
    build_training_model,
    compile_decoder_layers,
    lora_summary,
    parameter_counts,
    skip_lora_input_casts,
)
from training.report import environment, now, peak_memory, write_training_report
from training.step_graphs import StepGraphs
from training.trainer import (
    CollapseCallback,
    NLITrainer,
    dev_metrics,
    training_arguments,
    use_bf16,
)

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
# Settings that may change between an interrupted run and its resumption: they do not change
# what is computed.
RESUMABLE_CHANGES = {
    "output.keep_checkpoints",
    "output.overwrite",
    "train.dataloader_workers",
    "train.logging_steps",
    "train.report_to",
    "eval.batch_size",
    "eval.test_file",
    "eval.test_split",
    "eval.compare_base",
    "eval.max_examples_per_case",
}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (1 process otherwise)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        """Read RANK, LOCAL_RANK and WORLD_SIZE as torchrun and accelerate set them."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs."""
        return self.rank == 0


def work_dir_for(output: Path) -> Path:
    """The working folder (checkpoints, logs) beside an adapter folder."""
    return output.with_name(output.name + ".work")


def training_device(cfg: TrainingConfig, dist: Distributed) -> str:
    """The device this process trains on: its own GPU under DDP, else the configured one.

    ``model.device=cpu`` under ``torchrun`` trains on CPU processes (gloo): slow, but it lets
    the distributed path be tested without GPUs.
    """
    if dist.world_size > 1 and cfg.model.device != "cpu":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= dist.local_rank:
            raise ConfigError(
                f"distributed training needs one CUDA GPU per process (local rank "
                f"{dist.local_rank}, {torch.cuda.device_count()} GPU(s) visible); "
                "set model.device=cpu to train on CPU processes"
            )
        return f"cuda:{dist.local_rank}"
    return cfg.model.device


@dataclass
class Session:
    """What the training phase leaves for saving and reporting."""

    trainer: NLITrainer | None
    model: LabelScoringModel | None
    ref: BaseModelRef
    label_token_ids: list[list[int]]
    data: PreparedData
    device: torch.device
    stats: dict[str, Any]
    parameters: dict[str, Any]
    lora: dict[str, Any]
    memory: dict[str, Any]

    def release(self) -> None:
        """Drop the training model so the final evaluation has the memory to itself."""
        if self.trainer is not None:
            self.trainer.accelerator.free_memory()
        self.trainer = self.model = None
        gc.collect()
        free_device_memory(self.device)


def run_training(
    cfg: TrainingConfig,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    progress: bool = True,
) -> Path | None:
    """Train, save and evaluate; return the adapter folder (``None`` on ranks other than 0)."""
    dist = Distributed.from_env()
    output = cfg.output_dir().absolute()
    work = work_dir_for(output)
    if output.exists() and not cfg.output.overwrite:
        raise ConfigError(
            f"{output} already exists: choose another --output or --set output.overwrite=true"
        )
    checkpoint = _checkpoint_to_resume(cfg, work, resume=resume)
    if dist.is_main:
        work.mkdir(parents=True, exist_ok=True)
        (work / RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    started = time.perf_counter()
    session = _fit(cfg, work, dist, checkpoint=checkpoint, callbacks=callbacks or [])
    if not dist.is_main:
        return None
    with atomic_directory(output, replace=cfg.output.overwrite) as tmp:
        manifest = _save_adapter(cfg, session, tmp)
        size = adapter_size_bytes(tmp)
        session.release()
        dev_report, test_report = _final_evaluation(cfg, session, tmp, progress=progress)
        manifest.metrics = _manifest_metrics(dev_report, test_report)
        write_manifest(tmp, manifest)
        report = {
            "recipe": cfg.name,
            "adapter": adapter_name(output),
            "output": str(output),
            "base_model": session.ref.name,
            "base_model_fingerprint": session.ref.fingerprint,
            "created_at": now(),
            "training": {**session.stats, "wall_seconds": round(time.perf_counter() - started, 2)},
            "parameters": session.parameters,
            "memory": session.memory,
            "adapter_size_bytes": size,
            "data": session.data.summary,
            "dev": dev_report,
            "test": test_report,
            "config": cfg.to_dict(),
            "environment": environment(session.device, world_size=dist.world_size),
        }
        write_training_report(report, tmp)
    if not cfg.output.keep_checkpoints:
        for folder in work.glob("checkpoint-*"):
            shutil.rmtree(folder, ignore_errors=True)
    logger.info("adapter written to %s", output)
    return output


def _checkpoint_to_resume(cfg: TrainingConfig, work: Path, *, resume: bool) -> str | None:
    last = get_last_checkpoint(str(work)) if work.is_dir() else None
    if not resume:
        if last is not None:
            raise ConfigError(
                f"{work} holds checkpoints of an earlier run: pass --resume to continue it, "
                "or delete that folder to start over"
            )
        return None
    if last is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", work)
        return None
    _check_same_run(cfg, work / RUN_CONFIG)
    logger.info("resuming from %s", last)
    return str(last)


def _check_same_run(cfg: TrainingConfig, saved_path: Path) -> None:
    # A resumed run ends where the interrupted one would only if it computes the same thing.
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        logger.warning("cannot read %s: not checking that the resumed config matches", saved_path)
        return
    current = cfg.to_dict()
    changed = [
        f"{section}.{key}"
        for section, values in current.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if f"{section}.{key}" not in RESUMABLE_CHANGES
        and saved.get(section, {}).get(key, value) != value
    ]
    if changed:
        raise ConfigError(
            f"--resume with a different config than the interrupted run ({', '.join(changed)}); "
            "use the same recipe and overrides, or start a new run in another --output"
        )


def switched_on(
    cfg: TrainingConfig,
    setting: Literal["torch_compile", "cuda_graphs"],
    device: torch.device,
    *,
    world_size: int,
) -> bool:
    """Whether ``train.<setting>`` is on for this run. ``true`` and ``false`` are taken as they
    are; ``auto`` is on for one process on a CUDA GPU (and, for ``cuda_graphs``, with
    ``grad_accum`` 1), the case the speed-ups were measured in (BENCHMARKS.md)."""
    value = getattr(cfg.train, setting)
    if value != "auto":
        return bool(value)
    one_gpu = device.type == "cuda" and world_size == 1
    return one_gpu and (setting != "cuda_graphs" or cfg.train.grad_accum == 1)


def pads_lengths(cfg: TrainingConfig, device: torch.device, *, world_size: int) -> bool:
    """Whether batches pad to a multiple of ``COMPILED_PADDING``: compiled code specialises on a
    length's alignment, and each padded length is one CUDA graph of the step."""
    return any(
        switched_on(cfg, setting, device, world_size=world_size)
        for setting in ("torch_compile", "cuda_graphs")
    )


def step_graphs_for(
    cfg: TrainingConfig, model: torch.nn.Module, device: torch.device, *, world_size: int
) -> StepGraphs | None:
    """``StepGraphs`` for ``train.cuda_graphs`` where they can run (one process on a GPU)."""
    if not switched_on(cfg, "cuda_graphs", device, world_size=world_size):
        return None
    if device.type != "cuda" or world_size > 1:
        where = "several processes" if world_size > 1 else f"device {device}"
        logger.warning("train.cuda_graphs needs one CUDA GPU (not %s): training eagerly", where)
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("recording the training step as CUDA graphs, one per batch shape")
    return StepGraphs(params)


def _fit(
    cfg: TrainingConfig,
    work: Path,
    dist: Distributed,
    *,
    checkpoint: str | None,
    callbacks: list[TrainerCallback],
) -> Session:
    # Seed before the LoRA weights are initialised: Trainer seeds only when it is built.
    set_seed(cfg.train.seed)
    base, model = build_training_model(cfg.model, cfg.lora, device=training_device(cfg, dist))
    if use_bf16(cfg, base.device):
        skip_lora_input_casts(model)
    compiled = switched_on(cfg, "torch_compile", base.device, world_size=dist.world_size)
    if compiled:
        compile_decoder_layers(model)
    step_graphs = step_graphs_for(cfg, model, base.device, world_size=dist.world_size)
    encoder = PairEncoder(
        base.tokenizer, get_prompt_format(cfg.model.prompt_format), max_length=cfg.model.max_length
    )
    data = prepare_data(
        cfg.data,
        cfg.eval,
        encoder,
        tokenizer_key=tokenizer_fingerprint(base.tokenizer, base.ref.fingerprint),
    )
    args = training_arguments(
        cfg,
        work,
        device=base.device,
        train_examples=len(data.train),
        world_size=dist.world_size,
    )
    extra: list[TrainerCallback] = []
    if cfg.eval.early_stopping_patience is not None:
        extra.append(
            EarlyStoppingCallback(early_stopping_patience=cfg.eval.early_stopping_patience)
        )
    if cfg.eval.collapse_accuracy is not None:
        extra.append(CollapseCallback(cfg.eval.collapse_accuracy))
    trainer = NLITrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.dev,
        data_collator=LabelCollator(
            pad_id=base.tokenizer.pad_token_id,
            pad_to_multiple_of=(
                COMPILED_PADDING
                if pads_lengths(cfg, base.device, world_size=dist.world_size)
                else 1
            ),
        ),
        compute_metrics=dev_metrics,
        callbacks=extra + callbacks,
        label_smoothing=cfg.train.label_smoothing,
        length_grouping=cfg.train.group_by_length,
        loraplus_lr_ratio=cfg.train.loraplus_lr_ratio,
        step_graphs=step_graphs,
    )
    logger.info(
        "training %s on %s: %d examples, batch %d x %d accumulation x %d process(es), "
        "bf16 %s, compiled layers %s, CUDA graphs %s",
        cfg.name,
        base.device,
        len(data.train),
        cfg.train.batch_size,
        cfg.train.grad_accum,
        dist.world_size,
        use_bf16(cfg, base.device),
        compiled,
        step_graphs is not None,
    )
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - started
    state = trainer.state
    train_seconds = max(wall - trainer.eval_seconds, 1e-9)
    examples = trainer.examples_seen * dist.world_size
    best = state.best_model_checkpoint
    stats = {
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(trainer.eval_seconds, 2),
        "examples_seen": examples,
        "examples_per_s": round(examples / train_seconds, 1),
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": float(state.epoch or 0.0),
        "train_loss": float(result.training_loss),
        "best_step": int(Path(best).name.rsplit("-", 1)[-1]) if best else None,
        "best_dev_accuracy": state.best_metric,
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from": checkpoint,
        "torch_compile": compiled,
        "cuda_graphs": step_graphs.summary() if step_graphs is not None else None,
        "trainer_metrics": result.metrics,
        "log_history": state.log_history,
    }
    return Session(
        trainer=trainer,
        model=model,
        ref=base.ref,
        label_token_ids=[list(seq) for seq in model.label_tokens.sequences],
        data=data,
        device=base.device,
        stats=stats,
        parameters=parameter_counts(model),
        lora=lora_summary(model, cfg.lora),
        memory=peak_memory(base.device),
    )


def _save_adapter(cfg: TrainingConfig, session: Session, folder: Path) -> AdapterManifest:
    assert session.model is not None
    session.model.save_pretrained(str(folder), safe_serialization=True)
    manifest = AdapterManifest(
        base_model=session.ref.name,
        base_model_fingerprint=session.ref.fingerprint,
        quantization=cfg.model.quantization,
        prompt_format=cfg.model.prompt_format,
        label_words=list(LABELS),
        label_token_ids=session.label_token_ids,
        training_data={"recipe": cfg.name, **session.data.summary},
        lora=session.lora,
        package_version=nli.__version__,
        license=cfg.output.license,
    )
    write_manifest(folder, manifest)
    return manifest


def _final_evaluation(
    cfg: TrainingConfig, session: Session, folder: Path, *, progress: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Score dev (and test) through the serving path: a fresh base plus the saved adapter."""
    classifier = build_classifier(
        cfg.model.base_model,
        quantization=cfg.model.quantization,
        device=str(session.device),
        batch_size=cfg.eval.batch_size,
        max_length=cfg.model.max_length,
    )
    name = adapter_name(cfg.output_dir())
    classifier.attach_adapter(folder, name=name)
    reports: list[dict[str, Any] | None] = []
    for split, data in (("dev", session.data.dev_data), ("test", session.data.test_data)):
        if data is None:
            reports.append(None)
            continue
        reports.append(
            score_data(
                classifier,
                data,
                adapter=name,
                compare_base=cfg.eval.compare_base,
                report_dir=folder / "eval" / split,
                max_examples_per_case=cfg.eval.max_examples_per_case,
                progress=progress,
            )
        )
    dev, test = reports
    assert dev is not None
    return dev, test


def _manifest_metrics(dev: dict[str, Any], test: dict[str, Any] | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for split, report in (("dev", dev), ("test", test)):
        if report is None:
            continue
        metrics[split] = {
            "accuracy": report["metrics"]["accuracy"],
            "macro_f1": report["metrics"]["macro_f1"],
            "n": report["n"],
            "source": report["source"],
        }
        if report.get("base"):
            metrics[f"{split}_base"] = {
                "accuracy": report["base"]["metrics"]["accuracy"],
                "macro_f1": report["base"]["metrics"]["macro_f1"],
            }
    return metrics
