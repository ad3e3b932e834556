"""Regression test for the bitsandbytes CPU AVX512-BF16 trap (see NOTES.md and nli.loading).

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights into an inference layout at
the first eval-mode forward without grad. Training afterwards crashes on layers with a bias
(Qwen2's q/k/v) or silently computes zero LoRA gradients on layers without one (Llama). Trainer
does exactly that sequence (dev evaluation, then more training steps), so the training model
must have the fast path off on every 4-bit layer and keep learning after an evaluation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Linear4bit

from nli.prompt import PairEncoder, get_prompt_format
from nli.scoring import collate
from training.config import LoraSettings, ModelConfig
from training.model import build_training_model

PAIRS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("the child is sitting at a table", "a child is sitting"),
]


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module that carries LoRA weights, by name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}


@pytest.mark.parametrize("prepare_kbit", [True, False])
def test_training_after_an_eval_forward_gives_gradients_on_every_lora_layer(
    tiny_model_dir: Path, prepare_kbit: bool
) -> None:
    model_cfg = ModelConfig(
        base_model=str(tiny_model_dir), device="cpu", max_length=64, prepare_kbit=prepare_kbit
    )
    base, model = build_training_model(model_cfg, LoraSettings(r=4, alpha=8), device="cpu")
    encoder = PairEncoder(base.tokenizer, get_prompt_format(), max_length=64)
    batch = collate(encoder.encode(PAIRS), pad_id=base.tokenizer.pad_token_id)
    labels = torch.tensor([0, 2, 0])

    # What Trainer's dev evaluation does: eval mode, no grad. This is the forward that would
    # repack the weights on an AVX512-BF16 CPU.
    model.eval()
    with torch.no_grad():
        model(batch.input_ids, batch.attention_mask, batch.last_index)

    linear4bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert linear4bit, "the training model must be 4-bit"
    assert all(m.support_avx512bf16_for_cpu is False for m in linear4bit)

    layers = lora_layers(model)
    assert len(layers) == len(linear4bit)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        optimizer.zero_grad()
        logits = model(batch.input_ids, batch.attention_mask, batch.last_index)
        F.cross_entropy(logits, labels).backward()
        for name, layer in layers.items():
            grad_b = layer.lora_B["default"].weight.grad
            assert grad_b is not None and grad_b.abs().sum() > 0, f"step {step}: {name} lora_B"
            if step == 1:
                # lora_B starts at zero, so lora_A's gradient is zero until B has moved once.
                grad_a = layer.lora_A["default"].weight.grad
                assert grad_a is not None and grad_a.abs().sum() > 0, f"{name} lora_A"
        optimizer.step()
