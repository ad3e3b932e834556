"""The manifest of the random test adapters made in this folder's tests."""

from __future__ import annotations

from pathlib import Path

from nli.loading import LoadedBase
from nli.manifest import AdapterManifest, write_manifest
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
