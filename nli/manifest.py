"""The adapter artifact: PEFT's files plus ``nli_manifest.json``, which makes it self-describing."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nli.errors import AdapterInvalidError, BaseModelMismatchError
from nli.labels import LABELS
from nli.loading import BaseModelRef
from nli.prompt import PROMPT_FORMATS

logger = logging.getLogger(__name__)

MANIFEST_FILE = "nli_manifest.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
MANIFEST_SCHEMA = 1


@dataclass
class AdapterManifest:
    """What an adapter folder says about itself; written by training, checked by serving."""

    base_model: str
    base_model_fingerprint: str
    quantization: str
    prompt_format: int
    label_words: list[str]
    label_token_ids: list[list[int]]
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    package_version: str = ""
    license: str = ""
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest") -> AdapterManifest:
        """Validate and build; every problem is an ``AdapterInvalidError`` naming the field."""
        required = {
            "base_model": str,
            "base_model_fingerprint": str,
            "quantization": str,
            "prompt_format": int,
            "label_words": list,
            "label_token_ids": list,
        }
        for key, kind in required.items():
            if key not in data:
                raise AdapterInvalidError(f"{source}: missing field {key!r}")
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise AdapterInvalidError(f"{source}: field {key!r} must be {kind.__name__}")
        if list(data["label_words"]) != list(LABELS):
            raise AdapterInvalidError(
                f"{source}: label words {data['label_words']} differ from {list(LABELS)}"
            )
        if data["prompt_format"] not in PROMPT_FORMATS:
            versions = ", ".join(str(v) for v in PROMPT_FORMATS)
            raise AdapterInvalidError(
                f"{source}: prompt format {data['prompt_format']} is not one this version "
                f"knows ({versions})"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def write_manifest(folder: str | Path, manifest: AdapterManifest) -> Path:
    """Write ``nli_manifest.json`` into an adapter folder."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(manifest.to_json() + "\n")
    return path


def read_manifest(folder: str | Path) -> AdapterManifest:
    """Read and validate an adapter folder's manifest and check its weights are safetensors."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise AdapterInvalidError(f"{folder.name}: no {MANIFEST_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterInvalidError(
            f"{folder.name}: {MANIFEST_FILE} is not valid JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise AdapterInvalidError(f"{folder.name}: {MANIFEST_FILE} must hold a JSON object")
    manifest = AdapterManifest.from_dict(data, source=f"{folder.name}/{MANIFEST_FILE}")
    check_adapter_files(folder)
    return manifest


def check_adapter_files(folder: Path) -> None:
    """PEFT config present and weights in safetensors (pickled weights are never loaded)."""
    if not (folder / PEFT_CONFIG_FILE).is_file():
        raise AdapterInvalidError(f"{folder.name}: no {PEFT_CONFIG_FILE}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterInvalidError(
            f"{folder.name}: no {WEIGHTS_FILE} (only safetensors weights are loaded, never pickle)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise AdapterInvalidError(f"{folder.name}: {WEIGHTS_FILE} is unreadable: {exc}") from None


def check_base_model(manifest: AdapterManifest, ref: BaseModelRef, *, adapter: str) -> None:
    """Refuse an adapter trained on another base model."""
    if manifest.base_model_fingerprint == ref.fingerprint:
        return
    if manifest.base_model == ref.name:
        logger.warning(
            "adapter %s: base model %s matches by name but not by fingerprint (%s != %s)",
            adapter,
            ref.name,
            manifest.base_model_fingerprint,
            ref.fingerprint,
        )
        return
    raise BaseModelMismatchError(
        f"adapter {adapter!r} was trained on base model {manifest.base_model!r}, "
        f"but the loaded base model is {ref.name!r}",
        details={"adapter_base_model": manifest.base_model, "base_model": ref.name},
    )


def adapter_size_bytes(folder: str | Path) -> int:
    """Bytes on disk of every file in an adapter folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
