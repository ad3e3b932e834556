"""Training throughput (examples/s) and peak GPU memory of the real training path, and of the
naive Hugging Face recipe for the speed-up ratio, in one command.

    python -m bench.train_throughput [--model smollm2|qwen2-1.5b|FOLDER] [--low-memory]
        [--naive-baseline] [--steps N] [--warmup-steps W] [--batch-size B] [--grad-accum A]
        [--device auto|cpu] [--data-dir DIR] [--set section.key=value ...] [--out result.json]

Runs, each in its own process (clean peak-memory counters, no state carried over):

- ``real``: ``nli-train train``'s training phase (``training.train._fit``: the recipe, data
  preparation, the 4-bit base + LoRA, ``NLITrainer``) for a fixed number of optimizer steps. The
  SmolLM2 run uses the shipped adapter's settings (``lora.r=16 lora.alpha=32
  train.learning_rate=4e-4 data.extra_train_from_dev=2000:``, batch 128); other models use the
  ``qwen2.5-1.5b-snli`` recipe (r=16, all linear layers) on the local SNLI files.
- ``low-memory`` (``--low-memory``): the same with the frozen base kept packed
  (``model.dequantize_frozen=false``), gradient checkpointing, batch 32 x 2 accumulation steps,
  and the allocator capped (``--memory-cap-gib``, default 5.5 GiB, so that with the CUDA context
  the process fits in 6 GB); a run that does not fit fails with OOM.
- ``real`` under DDP (``--nproc N``): the same training phase in N processes under ``torchrun``
  (``torch.distributed.run --standalone``), one GPU each, ``--batch-size`` rows per GPU; the
  single-process ``real`` run comes first in the same command, as the baseline of the ratio.
- ``naive`` (``--naive-baseline``): the naive recipe on the same 4-bit base: plain ``Trainer``
  on ``AutoModelForCausalLM`` + LoRA r=16 on all linear layers, full-vocabulary SFT loss on the
  prompt + answer text (labels = input ids), every example padded to ``--naive-max-length``,
  batch 4, gradient checkpointing.

examples/s is measured over the steps after ``--warmup-steps`` (one device sync at each end of
that window, none per step; under DDP by rank 0 over every rank's examples, the gradient
all-reduce of each step keeping the ranks in step); ``report_examples_per_s`` is what
report.json would say (the whole ``Trainer.train`` call minus evaluation, first steps
included). Evaluation is kept out of the way: ``eval.strategy=steps`` with an interval past
the last step (``nli-train`` has no "no" strategy), the collapse check and early stopping off
(random weights sit at chance), and the evaluation and checkpoint ``Trainer`` would make after
the last step called off by the step timer. Model loading and data preparation are never
timed. No adapter is saved and no final report is written (those happen after training in
``nli-train train``).

On CPU, for a functional check: ``--device cpu --steps 2 --batch-size 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    MODEL_CHOICES,
    REPO_ROOT,
    device_busy_s,
    git_commit,
    machine,
    profiler_activities,
    resolve_model,
)

SHIPPED_SETTINGS = [
    "lora.r=16",
    "lora.alpha=32",
    "train.learning_rate=4e-4",
    "data.extra_train_from_dev=2000:",
]
# Default optimizer steps (and warm-up steps left out of the window) per run kind and model.
DEFAULT_STEPS = {
    # The recipe compiles and records graphs on a GPU: its first ~40 steps compile and record.
    ("real", "smollm2"): (100, 40),
    # The 1.5B recipe compiles its layers on one GPU (2329784): with 6 warm-up steps the window
    # still held compiles (175 ex/s against 703 after 15, H100).
    ("real", "other"): (45, 15),
    ("low-memory", "other"): (10, 3),
    ("naive", "smollm2"): (15, 5),
    ("naive", "other"): (15, 3),
}


# -- measuring --------------------------------------------------------------------------------


def make_step_timer(warmup_steps: int, end_step: int | None = None) -> Any:
    """A ``TrainerCallback`` that timestamps the end of step ``warmup_steps`` and of the last
    step, synchronising the device only at those two points. After the run's final step it
    calls off the evaluation and checkpoint that ``Trainer`` would then make: a benchmark
    keeps neither, and the evaluation's compile alone took ~9 s of the SmolLM2 run."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}
            self.train_started = 0.0
            self.peaks: dict[str, float] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.train_started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            last = end_step or state.max_steps
            if state.global_step in (warmup_steps, last):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks[state.global_step] = time.perf_counter()
            if state.global_step == last and torch.cuda.is_available():
                # Peaks of the training steps alone (whatever runs after them is not counted).
                self.peaks = {
                    "train_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "train_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                }
            if state.global_step >= state.max_steps:  # runs after Trainer's DefaultFlowCallback
                control.should_evaluate = False
                control.should_save = False

    return StepTimer()


def make_step_profiler(start_step: int, steps: int, out: Path) -> Any:
    """A ``TrainerCallback`` that records ``steps`` optimizer steps after ``start_step`` with
    ``torch.profiler`` and writes the op tables (by self CPU and by self device time) to ``out``.

    It runs after the timed window, so the measured examples/s never includes profiler cost.
    """
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == start_step and self.prof is None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=profiler_activities())
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.prof is None or state.global_step != start_step + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages()
            busy = device_busy_s(table)
            lines = [
                f"{steps} steps in {wall:.3f} s wall; device busy {busy:.3f} s "
                f"({100 * busy / wall:.0f}%)",
                table.table(sort_by="self_cpu_time_total", row_limit=40),
            ]
            if torch.cuda.is_available():
                lines.append(table.table(sort_by="self_cuda_time_total", row_limit=40))
            out.write_text("\n\n".join(lines))
            self.prof = None

    return StepProfiler()


def window_stats(timer: Any, *, steps: int, warmup: int, examples_per_step: int) -> dict[str, Any]:
    start, end = timer.marks.get(warmup), timer.marks.get(steps)
    if start is None or end is None or end <= start:
        return {"examples_per_s": None, "window_steps": 0}
    examples = (steps - warmup) * examples_per_step
    return {
        "examples_per_s": round(examples / (end - start), 1),
        "window_steps": steps - warmup,
        "window_s": round(end - start, 2),
        "first_steps_s": round(start - timer.train_started, 2),
        **timer.peaks,
    }


def memory_stats(device: Any) -> dict[str, Any]:
    """Peak allocated/reserved by torch, and an estimate of the whole process's peak footprint
    (peak reserved + what the device uses beyond torch's pool: CUDA context, cuBLAS, ...)."""
    import torch

    if device.type != "cuda":
        import resource

        return {
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        }
    free, total = torch.cuda.mem_get_info(device)
    outside_pool = (total - free) - torch.cuda.memory_reserved(device)
    peak_reserved = torch.cuda.max_memory_reserved(device)
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "peak_reserved_gib": round(peak_reserved / 2**30, 2),
        "outside_pool_gib": round(outside_pool / 2**30, 2),
        "peak_process_gib_est": round((peak_reserved + outside_pool) / 2**30, 2),
        "card": torch.cuda.get_device_name(device),
    }


def cap_memory(cap_gib: float | None, device: str) -> None:
    import torch

    if not cap_gib or device == "cpu" or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)


# -- the runs (each in its own process) -------------------------------------------------------


def run_real(spec: dict[str, Any]) -> dict[str, Any]:
    """The training phase of ``nli-train train`` for ``spec['steps']`` optimizer steps."""
    from training.recipe import load_config
    from training.train import Distributed, _fit

    steps, warmup = spec["steps"], spec["warmup"]
    batch, accum = spec["batch_size"], spec["grad_accum"]
    dist = Distributed.from_env()  # torchrun's ranks under --nproc, else one process
    per_step = batch * accum * dist.world_size
    recipe = "smollm2-135m-snli" if spec["model"] == "smollm2" else "qwen2.5-1.5b-snli"
    overrides = [] if spec["model"] != "smollm2" else list(SHIPPED_SETTINGS)
    if spec["model"] != "smollm2":
        overrides += [
            "data.train_file={snli_dir}/train.jsonl",
            "data.dev_file={snli_dir}/dev.jsonl",
            "data.extra_train_from_dev=2000:",
        ]
    overrides += [
        f"model.base_model={spec['base_model']}",
        f"model.device={spec['device']}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"train.grad_accum={accum}",
        # Exactly enough full batches: no short batch, no epoch boundary inside the window.
        f"data.max_train_examples={(steps + 1) * per_step}",
        "data.dev_rows=:256",
        "eval.strategy=steps",
        f"eval.steps={steps + 1000}",
        "eval.collapse_accuracy=null",
        "eval.early_stopping_patience=null",
        "eval.compare_base=false",
        "train.report_to=none",
        "train.logging_steps=1000000",
    ]
    if spec["low_memory"]:
        # The evaluation batch must fit the same budget (the recipe's 256-512 rows do not).
        # The frozen base stays packed (4 bits a weight, not 16): training/README's 6 GB setting.
        overrides += [
            "model.dequantize_frozen=false",
            "model.gradient_checkpointing=true",
            "train.torch_compile=false",
            f"eval.batch_size={batch}",
        ]
    timer = make_step_timer(warmup, steps)
    callbacks = [timer]
    if spec.get("profile_steps"):
        # Profiled steps come after the timed window: the run grows to fit them.
        extra = spec["profile_steps"]
        out = Path(spec["profile_out"])
        if dist.world_size > 1:  # one table per rank: the ranks wait for each other
            out = out.with_name(f"{out.stem}-rank{dist.rank}{out.suffix}")
        callbacks.append(make_step_profiler(steps, extra, out))
        overrides += [
            f"train.max_steps={steps + extra + 1}",
            f"data.max_train_examples={(steps + extra + 2) * per_step}",
        ]
    overrides += spec["overrides"]
    work = Path(tempfile.mkdtemp(prefix="nli-bench-train-"))
    cfg = load_config(recipe, overrides, output=str(work / "adapter"))
    cap_memory(spec.get("memory_cap_gib"), spec["device"])
    window = {"examples_per_step": per_step, "steps": steps, "warmup": warmup}
    try:
        session = _fit(cfg, work / "adapter.work", dist, checkpoint=None, callbacks=callbacks)
    except Exception as exc:
        if timer.marks.get(steps) is None:
            raise
        # The training steps were measured; what failed came after them.
        import torch

        on_gpu = spec["device"] != "cpu" and torch.cuda.is_available()
        return {
            **window_stats(timer, **window),
            "error_after_training": f"{type(exc).__name__}: {str(exc)[:300]}",
            "batch_size": batch,
            "grad_accum": accum,
            "overrides": overrides,
            **memory_stats(torch.device("cuda" if on_gpu else "cpu")),
        }
    stats = session.stats
    return {
        **window_stats(timer, **window),
        "report_examples_per_s": stats["examples_per_s"],
        "torch_compile": stats.get("torch_compile"),
        "cuda_graphs": stats.get("cuda_graphs"),
        "steps": stats["steps"],
        "batch_size": batch,
        "grad_accum": accum,
        "processes": dist.world_size,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "mean_prompt_tokens": session.data.summary.get("mean_prompt_tokens"),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout},
        "optimizer": cfg.train.optimizer,
        "recipe": recipe,
        "overrides": overrides,
        **memory_stats(session.device),
    }


def run_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The naive recipe: full-vocabulary SFT loss on padded prompt + answer text, batch 4."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    from nli.data import read_nli_file
    from nli.labels import LABELS
    from nli.loading import load_base_model
    from nli.prompt import get_prompt_format, label_texts, render_prompt

    steps, warmup, batch = spec["steps"], spec["warmup"], spec["batch_size"]
    cap_memory(spec.get("memory_cap_gib"), spec["device"])
    base = load_base_model(spec["base_model"], device=spec["device"], for_training=True)
    tokenizer, fmt = base.tokenizer, get_prompt_format()
    answers = label_texts(tokenizer)
    examples = read_nli_file(Path(spec["data_dir"]) / "train.jsonl").examples
    examples = examples[: (steps + 1) * batch]
    texts = [
        render_prompt(tokenizer, e.premise, e.hypothesis, fmt)
        + answers[e.label]
        + tokenizer.eos_token
        for e in examples
    ]
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=spec["max_length"],
        return_tensors="pt",
    )
    labels = encoded["input_ids"].clone()
    labels[encoded["attention_mask"] == 0] = -100

    class TextDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {
                "input_ids": encoded["input_ids"][i],
                "attention_mask": encoded["attention_mask"][i],
                "labels": labels[i],
            }

    checkpointing = {"use_reentrant": False}
    model = prepare_model_for_kbit_training(
        base.model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    cuda = base.device.type == "cuda"
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="nli-bench-naive-"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=2e-4,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=checkpointing,
        save_strategy="no",
        logging_steps=1_000_000,
        report_to=[],
        disable_tqdm=True,
    )
    timer = make_step_timer(warmup)
    trainer = Trainer(model=model, args=args, train_dataset=TextDataset(), callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats(base.device)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        **window_stats(timer, steps=steps, warmup=warmup, examples_per_step=batch),
        "report_examples_per_s": round(steps * batch / seconds, 1),
        "steps": trainer.state.global_step,
        "batch_size": batch,
        "max_length": spec["max_length"],
        "label_words": list(LABELS),
        "gradient_checkpointing": True,
        **memory_stats(base.device),
    }


def worker(spec_json: str, result_path: Path) -> None:
    spec = json.loads(spec_json)
    if spec.get("data_dir"):
        os.environ["NLI_SNLI_DIR"] = spec["data_dir"]
    from training.train import Distributed

    result = run_naive(spec) if spec["kind"] == "naive" else run_real(spec)
    if Distributed.from_env().rank == 0:  # under torchrun, rank 0 speaks for the job
        result_path.write_text(json.dumps(result) + "\n")


# -- orchestration ----------------------------------------------------------------------------


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    kinds = ["real"]
    if args.low_memory:
        kinds.append("low-memory")
    if args.naive_baseline:
        kinds.append("naive")
    if args.only:
        kinds = args.only
    if args.nproc > 1 and "real" in kinds:
        kinds.insert(kinds.index("real") + 1, "ddp")
    runs = []
    family = "smollm2" if args.model == "smollm2" else "other"
    for kind in kinds:
        run = "real" if kind == "ddp" else kind
        steps, warmup = DEFAULT_STEPS.get((run, family), DEFAULT_STEPS[(run, "other")])
        steps = args.steps or steps
        warmup = min(args.warmup_steps if args.warmup_steps is not None else warmup, steps - 1)
        spec: dict[str, Any] = {
            "kind": run,
            "nproc": args.nproc if kind == "ddp" else 1,
            "model": args.model,
            "device": args.device,
            "steps": steps,
            "warmup": max(warmup, 0),
            "overrides": args.set,
            "data_dir": str(args.data_dir) if args.data_dir else None,
            "low_memory": kind == "low-memory",
            "profile_steps": args.profile if run == "real" else 0,
        }
        if kind in ("real", "ddp"):
            spec.update(batch_size=args.batch_size or (128 if family == "smollm2" else 64))
            spec.update(grad_accum=args.grad_accum)
        elif kind == "low-memory":
            spec.update(batch_size=args.low_memory_batch_size, grad_accum=args.low_memory_accum)
            spec.update(memory_cap_gib=args.memory_cap_gib)
        else:
            spec.update(batch_size=args.naive_batch_size, max_length=args.naive_max_length)
        runs.append(spec)
    return runs


def run_name(spec: dict[str, Any]) -> str:
    """``real-smollm2``, ``real-smollm2-ddp2``, ...: names the run's row, log and profile."""
    ddp = f"-ddp{spec['nproc']}" if spec["nproc"] > 1 else ""
    return f"{spec['kind']}-{Path(spec['model']).name}{ddp}"


def launch(spec: dict[str, Any], log_dir: Path, timeout: float) -> dict[str, Any]:
    name = run_name(spec)
    result_path = log_dir / f"train-{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.train_throughput", "--worker", json.dumps(spec)]
    if spec["nproc"] > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone"]
        cmd[1:1] = [*launcher, f"--nproc-per-node={spec['nproc']}"]
    cmd += ["--result", str(result_path)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    with open(log_dir / f"train-{name}.log", "wb") as log:
        try:
            code: int | str = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    row: dict[str, Any] = {"run": name, "kind": spec["kind"], "model": spec["model"]}
    row["processes"] = spec["nproc"]
    row["wall_s"] = round(time.perf_counter() - started, 1)
    if code == 0 and result_path.is_file():
        row.update(status="ok", **json.loads(result_path.read_text()))
    else:
        tail = (log_dir / f"train-{name}.log").read_text(errors="replace").splitlines()[-3:]
        row.update(status=f"failed ({code})", log_tail=tail)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help=MODEL_CHOICES)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--low-memory", action="store_true", help="add the low-memory run")
    parser.add_argument("--naive-baseline", action="store_true", help="add the naive recipe")
    parser.add_argument(
        "--only", nargs="+", choices=["real", "low-memory", "naive"], help="runs to do"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps before the window")
    parser.add_argument("--batch-size", type=int, default=None, help="real run (recipe's)")
    parser.add_argument("--grad-accum", type=int, default=1, help="real run")
    parser.add_argument(
        "--nproc", type=int, default=1, help="also run the real run under DDP on this many GPUs"
    )
    parser.add_argument("--low-memory-batch-size", type=int, default=32)
    parser.add_argument("--low-memory-accum", type=int, default=2)
    parser.add_argument("--memory-cap-gib", type=float, default=5.5, help="low-memory run")
    parser.add_argument("--naive-batch-size", type=int, default=4)
    parser.add_argument("--naive-max-length", type=int, default=256)
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="folder of train.jsonl and dev.jsonl (default: $NLI_SNLI_DIR or ../shared/data/snli)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="more recipe overrides for the real and low-memory runs",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="real (and DDP) runs: profile N steps after the timed window (tables in --log-dir)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return

    if args.data_dir is None:  # training.config imports torch: not for a given folder
        from training.config import snli_dir

        args.data_dir = snli_dir()
    args.data_dir = args.data_dir.resolve()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="nli-bench-train-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    base_model = resolve_model(args.model)
    rows = []
    for spec in plan_runs(args):
        spec["base_model"] = base_model
        spec["profile_out"] = str(log_dir / f"profile-{run_name(spec)}.txt")
        row = launch(spec, log_dir, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    speedup = None
    real = next(
        (r for r in rows if r["kind"] == "real" and r["processes"] == 1 and r["status"] == "ok"),
        None,
    )
    naive = next((r for r in rows if r["kind"] == "naive" and r["status"] == "ok"), None)
    if real and naive and real["examples_per_s"] and naive["examples_per_s"]:
        speedup = round(real["examples_per_s"] / naive["examples_per_s"], 1)
    ddp = next((r for r in rows if r["processes"] > 1 and r["status"] == "ok"), None)
    ddp_speedup = None
    if real and ddp and real["examples_per_s"] and ddp["examples_per_s"]:
        ddp_speedup = round(ddp["examples_per_s"] / real["examples_per_s"], 3)
    result = {
        "benchmark": "train_throughput",
        "model": args.model,
        "machine": machine(args.device),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
        "speedup_vs_naive": speedup,
        "ddp_speedup": ddp_speedup,
    }
    print(f"\ntraining throughput on {result['machine']}, model {args.model}")
    print(f"{'run':<28} {'ex/s':>8} {'report ex/s':>12} {'batch':>9} {'peak GiB':>9} {'status'}")
    for row in rows:
        batch = f"{row.get('batch_size', '')}x{row.get('grad_accum', 1)}"
        peak = row.get("peak_process_gib_est", row.get("peak_rss_gib", ""))
        print(
            f"{row['run']:<28} {row.get('examples_per_s') or '-':>8} "
            f"{row.get('report_examples_per_s') or '-':>12} {batch:>9} {peak:>9} {row['status']}"
        )
    if speedup:
        print(f"real / naive: {speedup}x")
    if ddp_speedup:
        print(f"DDP, {ddp['processes']} processes / one: {ddp_speedup}x")
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
