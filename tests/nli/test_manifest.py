"""Adapter manifest round trip, validation, and the base-model mismatch error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from nli.classifier import NLIClassifier
from nli.errors import AdapterInvalidError, BaseModelMismatchError
from nli.labels import LABELS
from nli.loading import BaseModelRef, load_base_model
from nli.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterManifest,
    check_base_model,
    read_manifest,
    write_manifest,
)
from nli.prompt import CURRENT_PROMPT_FORMAT
from nli.scoring import label_tokens


def make_manifest(ref: BaseModelRef, token_ids: list[list[int]]) -> AdapterManifest:
    return AdapterManifest(
        base_model=ref.name,
        base_model_fingerprint=ref.fingerprint,
        quantization="nf4",
        prompt_format=CURRENT_PROMPT_FORMAT,
        label_words=list(LABELS),
        label_token_ids=token_ids,
        training_data={"source": "synthetic"},
        metrics={"dev": {"accuracy": 0.5}},
    )


@pytest.fixture()
def adapter_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    base = load_base_model(str(tiny_llama_dir), device="cpu")
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    ids = [list(seq) for seq in label_tokens(base.tokenizer).sequences]
    write_manifest(folder, make_manifest(base.ref, ids))
    return folder


def test_manifest_round_trip(adapter_dir: Path) -> None:
    manifest = read_manifest(adapter_dir)
    again = AdapterManifest.from_dict(json.loads(manifest.to_json()))
    assert again == manifest
    assert manifest.label_words == list(LABELS)
    assert manifest.metrics == {"dev": {"accuracy": 0.5}}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / MANIFEST_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / MANIFEST_FILE).unlink(), "no nli_manifest.json"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 10), "unreadable"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "only safetensors"),
        (
            lambda d: (d / MANIFEST_FILE).write_text(json.dumps({"base_model": "x"})),
            "missing field",
        ),
    ],
)
def test_corrupt_adapters_are_refused(adapter_dir: Path, corrupt, message: str) -> None:
    corrupt(adapter_dir)
    with pytest.raises(AdapterInvalidError, match=message):
        read_manifest(adapter_dir)


def test_truncated_weights_are_refused(adapter_dir: Path) -> None:
    weights = adapter_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterInvalidError, match="unreadable"):
        read_manifest(adapter_dir)


def test_adapter_for_another_base_model_is_refused(adapter_dir: Path, tiny_qwen2_dir: Path) -> None:
    manifest = read_manifest(adapter_dir)
    with pytest.raises(BaseModelMismatchError, match="trained on base model"):
        check_base_model(manifest, BaseModelRef("other/model", "x"), adapter="a")
    classifier = NLIClassifier(load_base_model(str(tiny_qwen2_dir), device="cpu"))
    with pytest.raises(BaseModelMismatchError):
        classifier.attach_adapter(adapter_dir, name="a")
    assert classifier.adapters == {}


def test_attach_detach_and_disabled_adapter_equals_base(
    adapter_dir: Path, tiny_llama_dir: Path
) -> None:
    classifier = NLIClassifier(load_base_model(str(tiny_llama_dir), device="cpu"))
    pairs = [("a man is playing", "a man plays"), ("two dogs", "a cat")]
    first = classifier.score_pairs(pairs)
    classifier.attach_adapter(adapter_dir, name="a")
    classifier.detach_adapter("a")
    before = classifier.score_pairs(pairs)
    # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights at the first forward and
    # unpacks them when PEFT reads the state dict; the very first forward differs by ~1e-4 from
    # every later one (which are then bit-identical).
    assert abs(first - before).max() < 1e-3

    classifier.attach_adapter(adapter_dir, name="a")
    with_adapter = classifier.score_pairs(pairs, "a")
    assert abs(with_adapter - before).max() > 1e-3  # init_lora_weights=False changes answers
    assert (classifier.score_pairs(pairs) == before).all()  # base rows == the bare base
    mixed = classifier.score_encoded(
        classifier.encode(pairs) + classifier.encode(pairs, "a"), [None, None, "a", "a"]
    )
    # Rows of a mixed batch match single-adapter batches up to bf16 padding noise.
    assert abs(mixed[:2] - before).max() < 2e-3
    assert abs(mixed[2:] - with_adapter).max() < 2e-3
    classifier.detach_adapter("a")
    assert (classifier.score_pairs(pairs) == before).all()  # swap back == before
    classifier.attach_adapter(adapter_dir, name="a")
    assert (classifier.score_pairs(pairs, "a") == with_adapter).all()  # reload == loaded
