"""``train.cuda_graphs``: the training step recorded per batch shape (``training.step_graphs``).

On machines without a GPU, ``StepGraphs(record=False)`` runs the same bookkeeping (static inputs,
one set of gradient buffers per shape, gradients handed to the parameters) eagerly; the tests
marked ``cuda`` record real graphs and run where a GPU is present.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nli.errors import ConfigError
from nli.manifest import WEIGHTS_FILE
from nli.prompt import PairEncoder, get_prompt_format
from nli.scoring import EncodedBatch, collate
from training import train as train_module
from training.model import COMPILED_PADDING, LabelScoringModel, build_training_model
from training.recipe import load_config
from training.step_graphs import StepGraphs, causal_mask
from training.train import run_training

from .conftest import RecipeWriter

# The real one: a test that patches it twice must not wrap its own first patch.
REAL_STEP_GRAPHS_FOR = train_module.step_graphs_for

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")

PAIRS = [
    ("a man is in the park", "a dog runs"),
    ("the child sits at the old table", "a red car"),
    ("two women talk", "nobody speaks at all today in the street"),
]


def _models(tmp_path: Path, tiny_recipe: RecipeWriter, device: str) -> tuple[Any, list[Any]]:
    """Two identical training models (non-zero LoRA weights, float64) and the tokenizer.

    float64: with the padding mask and without it, attention sums in a different order; in
    float32 the gradients then differ by ~1e-4 relative to their largest element, in float64 not
    at all.
    """
    cfg = load_config(tiny_recipe(tmp_path, model={"dequantize_frozen": True, "device": device}))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        base, model = build_training_model(cfg.model, cfg.lora, device=device)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(std=0.05)  # B starts at zero: make the LoRA path matter
        models.append(model.double())
    return base.tokenizer, models


def _batches(tokenizer: Any, device: str) -> list[EncodedBatch]:
    """Batches of two shapes, the first shape twice: A, B, A."""
    encoder = PairEncoder(tokenizer, get_prompt_format(1), max_length=96)
    batches = [
        collate(
            encoder.encode(pairs),
            pad_id=tokenizer.pad_token_id,
            pad_to_multiple_of=8,
            device=device,
        )
        for pairs in (PAIRS[:2], PAIRS, PAIRS[1::-1])
    ]
    shapes = [tuple(b.input_ids.shape) for b in batches]
    assert shapes[0] == shapes[2] != shapes[1]
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # padding to hide
    return batches


def _compare_steps(
    eager: LabelScoringModel, graphed: LabelScoringModel, batches: list[Any], *, record: bool
) -> StepGraphs:
    """Train both models on the batches (eager with the padding mask, graphed with a plain
    causal one), with an SGD step after each batch, and check that loss and gradients agree at
    every step."""
    params = [p for p in graphed.parameters() if p.requires_grad]
    graphs = StepGraphs(params, record=record)
    optimizers = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        for m in (eager, graphed)
    ]
    first_grads: list[torch.Tensor | None] = []
    for step, batch in enumerate(batches):
        labels = torch.arange(len(batch), device=batch.input_ids.device) % 3
        eager_loss = F.cross_entropy(
            eager(batch.input_ids, batch.attention_mask, batch.last_index), labels
        )
        eager_loss.backward()

        def loss_fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            ids = inputs["input_ids"]
            logits = graphed(ids, causal_mask(ids.shape[1], ids.device), inputs["last_index"])
            return F.cross_entropy(logits, inputs["labels"])

        inputs = {"input_ids": batch.input_ids, "last_index": batch.last_index, "labels": labels}
        loss = graphs.run(loss_fn, inputs)
        torch.testing.assert_close(loss, eager_loss.detach(), msg=f"loss at step {step}")
        for (name, p_eager), (_, p_graphed) in zip(
            eager.named_parameters(), graphed.named_parameters(), strict=True
        ):
            if p_eager.requires_grad:
                torch.testing.assert_close(
                    p_graphed.grad,
                    p_eager.grad,
                    msg=lambda m, n=name, s=step: f"{n} at step {s}: {m}",
                )
        if step == 0:
            first_grads = [p.grad for p in params]
        if step == 2:  # the same shape again: the gradients land in that shape's buffers
            assert all(p.grad is g for p, g in zip(params, first_grads, strict=True))
        for optimizer in optimizers:
            optimizer.step()  # the next replay must read the updated weights
            optimizer.zero_grad(set_to_none=True)
    assert graphs.recorded == 2 and graphs.eager_steps == 0 and graphs.broken is None
    return graphs


def test_graphed_steps_with_a_causal_mask_match_eager_steps_with_padding_masks(
    tiny_recipe: RecipeWriter, tmp_path: Path
) -> None:
    """Right-padded rows under a plain causal mask give the padding-masked loss and gradients;
    shapes reuse their inputs and gradient buffers; updated weights are read at the next step."""
    tokenizer, (eager, graphed) = _models(tmp_path, tiny_recipe, "cpu")
    _compare_steps(eager, graphed, _batches(tokenizer, "cpu"), record=False)


@pytest.mark.usefixtures("restore_compile_settings")
def test_compiled_layers_do_not_recompile_when_a_recording_starts(
    tiny_recipe: RecipeWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers builds the attention mask differently while a CUDA graph records (a
    materialised one instead of none); compiled layers then recompiled in the middle of the
    recording, which cannot run kernels. With the causal mask passed explicitly, the warm-up and
    the recording give the layers the same inputs."""
    from torch._dynamo.utils import counters

    from training.model import compile_decoder_layers

    tokenizer, (model, _) = _models(tmp_path, tiny_recipe, "cpu")
    batch = _batches(tokenizer, "cpu")[0]
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(model, backend="eager")

    def step() -> None:
        length = batch.input_ids.shape[1]
        model(batch.input_ids, causal_mask(length, "cpu"), batch.last_index).sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # the warm-up
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    step()  # what the recording runs
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_run_refuses_gradients_left_from_an_earlier_step() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    graphs = StepGraphs([weight], record=False)
    batch = {"x": torch.ones(2, 3)}
    graphs.run(lambda b: (b["x"] * weight).sum(), batch)
    with pytest.raises(RuntimeError, match="gradients cleared"):
        graphs.run(lambda b: (b["x"] * weight).sum(), batch)


def test_shapes_past_the_cap_train_eagerly() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    graphs = StepGraphs([weight], record=False, max_graphs=1)
    grads = []
    for rows in (2, 4, 2):
        loss = graphs.run(lambda b: (b["x"] * weight).sum(), {"x": torch.ones(rows, 3)})
        assert float(loss) == 3 * rows
        assert weight.grad is not None
        grads.append(weight.grad.tolist())
        weight.grad = None
    assert grads == [[2.0] * 3, [4.0] * 3, [2.0] * 3]
    assert graphs.recorded == 1 and graphs.eager_steps == 1


def test_cuda_graphs_need_one_accumulation_step(tiny_recipe: RecipeWriter, tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, train={"cuda_graphs": True, "grad_accum": 2})
    with pytest.raises(ConfigError, match="grad_accum=1"):
        load_config(recipe)


def test_auto_graphs_stay_off_with_accumulation(tiny_recipe: RecipeWriter, tmp_path: Path) -> None:
    cfg = load_config(tiny_recipe(tmp_path, train={"cuda_graphs": "auto", "grad_accum": 2}))
    assert not train_module.switched_on(cfg, "cuda_graphs", torch.device("cuda"), world_size=1)


@pytest.mark.parametrize("value", ["maybe", 2])
def test_speed_switches_refuse_other_values(
    tiny_recipe: RecipeWriter, tmp_path: Path, value: object
) -> None:
    for setting in ("torch_compile", "cuda_graphs"):
        with pytest.raises(ConfigError, match=f"train.{setting} must be one of true, false, auto"):
            load_config(tiny_recipe(tmp_path, train={setting: value}))


@pytest.mark.parametrize(
    ("value", "device", "world_size", "on"),
    [
        ("auto", "cuda", 1, True),
        ("auto", "cuda:1", 1, True),
        ("auto", "cpu", 1, False),
        ("auto", "cuda", 2, False),  # DDP: neither was measured there
        (True, "cpu", 1, True),  # asked for: compiles on the CPU; graphs warn (below)
        (False, "cuda", 1, False),
    ],
)
def test_speed_switches_resolve_per_device(
    tiny_recipe: RecipeWriter,
    tmp_path: Path,
    value: object,
    device: str,
    world_size: int,
    on: bool,
) -> None:
    cfg = load_config(tiny_recipe(tmp_path, train={"torch_compile": value, "cuda_graphs": value}))
    where = torch.device(device)
    for setting in ("torch_compile", "cuda_graphs"):
        assert train_module.switched_on(cfg, setting, where, world_size=world_size) is on
    assert train_module.pads_lengths(cfg, where, world_size=world_size) is on


def test_without_a_gpu_the_setting_warns_and_trains_eagerly(
    tiny_recipe: RecipeWriter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2, "cuda_graphs": True})
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert run_training(load_config(recipe), progress=False) is not None
    assert "train.cuda_graphs needs one CUDA GPU" in caplog.text


def test_auto_settings_stay_off_quietly_on_the_cpu(
    tiny_recipe: RecipeWriter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the SmolLM2 recipes ask for, on a machine without a GPU: an eager run, no warning,
    and a report that says neither was used."""
    train = {"max_steps": 2, "cuda_graphs": "auto", "torch_compile": "auto"}
    with caplog.at_level(logging.WARNING, logger="training.train"):
        output = run_training(load_config(tiny_recipe(tmp_path, train=train)), progress=False)
    assert output is not None
    assert "needs one CUDA GPU" not in caplog.text
    training = json.loads((output / "report.json").read_text())["training"]
    assert training["torch_compile"] is False and training["cuda_graphs"] is None


def _train(
    tiny_recipe: RecipeWriter,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    graphs: bool,
    device: str,
    record: bool,
) -> tuple[dict[str, torch.Tensor], list[StepGraphs]]:
    made: list[StepGraphs] = []

    def step_graphs_for(cfg: Any, model: Any, device: Any, *, world_size: int) -> Any:
        if record:
            found = REAL_STEP_GRAPHS_FOR(cfg, model, device, world_size=world_size)
        elif cfg.train.cuda_graphs:
            found = StepGraphs([p for p in model.parameters() if p.requires_grad], record=False)
        else:
            found = None
        if found is not None:
            made.append(found)
        return found

    monkeypatch.setattr(train_module, "step_graphs_for", step_graphs_for)
    real_collator = train_module.LabelCollator

    def causal_collator(**kwargs: Any) -> Any:
        # The eager run takes the graphed step's causal mask too (that it changes nothing but
        # rounding is the float64 test above): the two runs do the same arithmetic.
        collate_batch = real_collator(**kwargs)

        def collate_causal(features: Any) -> Any:
            batch = collate_batch(features)
            return {**batch, "attention_mask": causal_mask(batch["input_ids"].shape[1], "cpu")}

        return collate_causal

    monkeypatch.setattr(train_module, "LabelCollator", causal_collator)
    recipe = tiny_recipe(
        folder,
        model={"device": device, "dequantize_frozen": True},
        # Padding to a multiple of 8 in both runs: the same batches, so the same arithmetic.
        train={"max_steps": 8, "cuda_graphs": graphs, "precision": "fp32", "torch_compile": False},
        eval={"strategy": "steps", "compare_base": False},
    )
    cfg = load_config(recipe)
    monkeypatch.setattr(train_module, "pads_lengths", lambda *_args, **_kwargs: True)
    output = run_training(cfg, progress=False)
    assert output is not None
    reported = json.loads((output / "report.json").read_text())["training"]["cuda_graphs"]
    assert reported == (made[0].summary() if made else None)
    return load_file(str(output / WEIGHTS_FILE)), made


def _trains_like_eager(
    tiny_recipe: RecipeWriter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    device: str,
    record: bool,
) -> None:
    eager, none = _train(
        tiny_recipe, tmp_path / "eager", monkeypatch, graphs=False, device=device, record=record
    )
    graphed, made = _train(
        tiny_recipe, tmp_path / "graphs", monkeypatch, graphs=True, device=device, record=record
    )
    assert not none and len(made) == 1
    assert made[0].recorded >= 2 and made[0].eager_steps == 0 and made[0].broken is None
    assert eager.keys() == graphed.keys()
    moved = 0.0
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, float(eager[name].abs().max()))
    assert moved > 0  # the runs trained (B starts at zero)


def test_trainer_with_step_graphs_ends_where_eager_training_ends(
    tiny_recipe: RecipeWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``NLITrainer.training_step`` through ``StepGraphs`` (emulated): the saved adapter equals
    an eager run's (clipping, the optimizer and the schedule still see every gradient)."""
    _trains_like_eager(tiny_recipe, tmp_path, monkeypatch, device="cpu", record=False)


@cuda
def test_recorded_graphs_match_eager_steps(tiny_recipe: RecipeWriter, tmp_path: Path) -> None:
    tokenizer, (eager, graphed) = _models(tmp_path, tiny_recipe, "cuda")
    _compare_steps(eager, graphed, _batches(tokenizer, "cuda"), record=True)


@cuda
def test_recorded_training_ends_where_eager_training_ends(
    tiny_recipe: RecipeWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _trains_like_eager(tiny_recipe, tmp_path, monkeypatch, device="cuda", record=True)


def test_padding_follows_the_settings(tiny_recipe: RecipeWriter, tmp_path: Path) -> None:
    gpu = torch.device("cuda")
    for train, pads in (
        ({}, False),
        ({"cuda_graphs": True}, True),
        ({"torch_compile": True}, True),
        ({"torch_compile": "auto"}, True),
    ):
        cfg = load_config(tiny_recipe(tmp_path, train=train))
        assert train_module.pads_lengths(cfg, gpu, world_size=1) is pads
    assert COMPILED_PADDING == 8


def test_a_resumed_graphed_run_ends_where_an_unbroken_one_ends(
    tiny_recipe: RecipeWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming loads the checkpoint into the parameters the step graphs hand gradients to (a
    load that replaced them would leave the optimizer without gradients)."""
    from .test_train import Interrupt, InterruptAfterSave

    def emulated(cfg: Any, model: Any, device: Any, *, world_size: int) -> StepGraphs:
        return StepGraphs([p for p in model.parameters() if p.requires_grad], record=False)

    monkeypatch.setattr(train_module, "step_graphs_for", emulated)
    settings: dict[str, Any] = {
        "train": {"epochs": 2, "learning_rate": 3e-3, "cuda_graphs": True},
        "eval": {"strategy": "steps", "steps": 10, "early_stopping_patience": None},
    }
    unbroken = run_training(load_config(tiny_recipe(tmp_path / "a", **settings)), progress=False)
    recipe = tiny_recipe(tmp_path / "b", **settings)
    with pytest.raises(Interrupt):
        run_training(load_config(recipe), callbacks=[InterruptAfterSave(20)], progress=False)
    resumed = run_training(load_config(recipe), resume=True, progress=False)
    assert unbroken is not None and resumed is not None
    weights_a = load_file(str(unbroken / WEIGHTS_FILE))
    weights_b = load_file(str(resumed / WEIGHTS_FILE))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], atol=0, rtol=0)
