"""Average LoRA adapters of one base into one adapter: a uniform "soup" of their weight updates.

Adapter i adds ``dW_i = s_i * B_i @ A_i`` to each targeted linear layer (``s_i`` = alpha / r,
or alpha / sqrt(r) with rsLoRA). The mean ``(1/k) * sum(dW_i)`` is itself a LoRA update, of
rank ``sum(r_i)``: stack the ``A_i`` and put the ``s_i * B_i / k`` side by side, at scale 1. That
adapter is exact and loads and serves like any other; it costs k times the bytes of one member.

``rank`` compresses it: per layer, the best rank-``rank`` approximation of the mean update
(truncated SVD, computed through QR on the factors, so no ``out x in`` matrix is formed), with
the singular values split evenly between B and A. Nothing changes about how it is served.

Runs of one recipe that differ only in the seed start from different random A and end in
different subspaces; in the small-update regime of LoRA their mean behaves much like an
ensemble of the runs at the cost of one model. Whether it helps is measured, not assumed:
evaluate the result on the selection rows like any other candidate.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nli.errors import AdapterInvalidError, ConfigError
from nli.fsutil import atomic_directory
from nli.manifest import (
    PEFT_CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterManifest,
    read_manifest,
    write_manifest,
)
from training.report import now

logger = logging.getLogger(__name__)

_A, _B = ".lora_A.weight", ".lora_B.weight"
# Manifest fields that must agree for adapters to be averaged: they fix what the weights mean.
_SAME_MANIFEST = (
    "base_model_fingerprint",
    "quantization",
    "prompt_format",
    "label_words",
    "label_token_ids",
)
# PEFT config fields that change the update beyond B @ A times a scale.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "modules_to_save": "fully trained modules",
}


class Member:
    """One adapter to average: its manifest, PEFT config, scale and LoRA factors by layer."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = read_manifest(folder)
        self.config = _read_config(folder)
        rank, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        rs = bool(self.config.get("use_rslora"))
        self.scale = alpha / math.sqrt(rank) if rs else alpha / rank
        self.dtype, self.factors = _read_factors(folder)


def average_adapters(
    folders: list[Path], output: Path, *, rank: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the mean of ``folders``' updates to ``output``; returns a summary of what was done.

    ``rank`` None keeps the exact mean (rank = the sum of the members' ranks); an int compresses
    each layer's mean update to that rank.
    """
    if len(folders) < 2:
        raise ConfigError("averaging needs at least two adapters")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank}")
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists: choose another output or overwrite it")
    members = [Member(Path(f)) for f in folders]
    _check_compatible(members)
    total = sum(int(m.config["r"]) for m in members)
    out_rank = total if rank is None else min(rank, total)
    tensors: dict[str, torch.Tensor] = {}
    error = 0.0
    for layer in members[0].factors:
        a, b = _mean_update(members, layer)
        if rank is not None:
            a, b, lost = _truncate(a, b, out_rank)
            error = max(error, lost)
        # Stored in the members' dtype: PEFT upcasts to float32 on load, as for any adapter.
        tensors[layer + _A] = a.to(members[0].dtype).contiguous()
        tensors[layer + _B] = b.to(members[0].dtype).contiguous()
    config = dict(members[0].config)
    config.update(r=out_rank, lora_alpha=out_rank, use_rslora=False)
    summary = {
        "members": [str(m.folder) for m in members],
        "member_ranks": [int(m.config["r"]) for m in members],
        "rank": out_rank,
        "exact": rank is None or out_rank == total,
        "max_relative_error": round(error, 6),
        "layers": len(members[0].factors),
    }
    manifest = _manifest(members, summary)
    with atomic_directory(output, replace=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp, manifest)
    logger.info(
        "averaged %d adapters into %s: rank %d, %d layers%s",
        len(members),
        output,
        out_rank,
        summary["layers"],
        "" if summary["exact"] else f", worst layer keeps all but {error:.2%} (Frobenius)",
    )
    return summary


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterInvalidError(f"{folder.name}: cannot read {PEFT_CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterInvalidError(f"{folder.name}: not a LoRA adapter")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterInvalidError(f"{folder.name}: {what} cannot be averaged")
    if config.get("bias", "none") != "none":
        raise AdapterInvalidError(f"{folder.name}: trained biases cannot be averaged")
    return config


def _read_factors(folder: Path) -> tuple[torch.dtype, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    weights = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in weights:
        if key.endswith(_A):
            layer = key.removesuffix(_A)
            if layer + _B not in weights:
                raise AdapterInvalidError(f"{folder.name}: {layer} has lora_A but no lora_B")
            factors[layer] = (weights[key].float(), weights[layer + _B].float())
        elif not key.endswith(_B):
            raise AdapterInvalidError(f"{folder.name}: cannot average the tensor {key}")
    if not factors:
        raise AdapterInvalidError(f"{folder.name}: no LoRA weights")
    dtypes = {t.dtype for t in weights.values()}
    return (dtypes.pop() if len(dtypes) == 1 else torch.float32), factors


def _check_compatible(members: list[Member]) -> None:
    first = members[0]
    for other in members[1:]:
        for key in _SAME_MANIFEST:
            if getattr(other.manifest, key) != getattr(first.manifest, key):
                raise AdapterInvalidError(
                    f"{other.folder.name} differs from {first.folder.name} in {key}: adapters "
                    "can only be averaged on the same base, prompt and labels"
                )
        if other.factors.keys() != first.factors.keys():
            raise AdapterInvalidError(
                f"{other.folder.name} targets other layers than {first.folder.name}"
            )
        for layer, (a, b) in first.factors.items():
            oa, ob = other.factors[layer]
            if oa.shape[1] != a.shape[1] or ob.shape[0] != b.shape[0]:
                raise AdapterInvalidError(
                    f"{other.folder.name}: {layer} has another shape than in {first.folder.name}"
                )


def _mean_update(members: list[Member], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A [sum r, in], B [out, sum r]) with B @ A = the mean of the members' updates."""
    k = len(members)
    a = torch.cat([m.factors[layer][0] for m in members])
    b = torch.cat([m.factors[layer][1] * (m.scale / k) for m in members], dim=1)
    return a, b


def _truncate(
    a: torch.Tensor, b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors of ``b @ a`` and the relative Frobenius error left."""
    q_b, r_b = torch.linalg.qr(b.double())  # b = q_b r_b
    q_a, r_a = torch.linalg.qr(a.double().T)  # a = r_a^T q_a^T
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # b @ a = q_b (u s vh) q_a^T
    kept = s[:rank]
    total = float(s.square().sum())
    lost = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    root = kept.sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return new_a.float(), new_b.float(), lost


def _manifest(members: list[Member], summary: dict[str, Any]) -> AdapterManifest:
    first = members[0].manifest
    lora = dict(first.lora)
    lora.update(r=summary["rank"], alpha=summary["rank"], averaged=summary)
    data = dict(first.training_data)
    data["averaged_from"] = [m.manifest.training_data for m in members]
    # The members' metrics describe the members, not their mean: evaluate the result afresh.
    return replace(
        first,
        lora=lora,
        training_data=data,
        metrics={},
        created_at=now(),
    )
