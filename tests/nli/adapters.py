"""Random test adapters on the tiny model, with their manifests, and pairs to score them on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from nli.loading import LoadedBase, load_base_model
from nli.manifest import WEIGHTS_FILE, AdapterManifest, write_manifest
from nli.prompt import CURRENT_PROMPT_FORMAT
from nli.scoring import label_tokens


def write_synthetic_manifest(folder: Path, base: LoadedBase) -> Path:
    """Write ``folder``'s manifest for an adapter made on ``base`` (NF4, current prompt)."""
    manifest = AdapterManifest(
        base_model=base.ref.name,
        base_model_fingerprint=base.ref.fingerprint,
        quantization="nf4",
        prompt_format=CURRENT_PROMPT_FORMAT,
        label_words=["entailment", "neutral", "contradiction"],
        label_token_ids=[list(seq) for seq in label_tokens(base.tokenizer).sequences],
        training_data={"source": "synthetic"},
        metrics={},
    )
    write_manifest(folder, manifest)
    return folder


PAIRS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("the child is sitting", "a child is sitting"),
]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    model_dir: Path,
    folder: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int | None = None,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Path:
    """A LoRA adapter with random weights (stored in ``dtype``) and its manifest; ``alpha``
    defaults to ``2 * r``."""
    base = load_base_model(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    config.setdefault("target_modules", ALL)
    lora = LoraConfig(
        r=r, lora_alpha=2 * r if alpha is None else alpha, init_lora_weights=False, **config
    )
    get_peft_model(base.model, lora).save_pretrained(folder)
    if dtype != torch.float32:
        weights = load_file(folder / WEIGHTS_FILE)
        save_file(
            {k: v.to(dtype) for k, v in weights.items()}, folder / WEIGHTS_FILE, {"format": "pt"}
        )
    return write_synthetic_manifest(folder, base)
