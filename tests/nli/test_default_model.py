"""The real offline default model: conversion (atomic, idempotent), NF4 loading, scoring, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nli.default_model as default_model
from nli.classifier import NLIClassifier
from nli.data import read_nli_file
from nli.loading import LoadedBase, is_4bit
from nli.scoring import label_tokens


def test_default_model_scores_real_snli_pairs(default_base: LoadedBase, shared_data: Path) -> None:
    assert is_4bit(default_base.model)
    assert default_base.ref.name == default_model.DEFAULT_BASE_MODEL
    assert default_base.ref.fingerprint.endswith(default_model.GGUF_SHA256)
    tokens = label_tokens(default_base.tokenizer)
    assert tokens.distinct  # SmolLM2's label words start with distinct tokens
    examples = read_nli_file(shared_data / "snli" / "dev.jsonl").examples[:8]
    probs = NLIClassifier(default_base).score_pairs([(e.premise, e.hypothesis) for e in examples])
    assert probs.shape == (8, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs > 0).all()


def test_conversion_is_idempotent(
    default_base: LoadedBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = default_model.converted_dir()
    assert default_model.is_converted(folder)

    def fail(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(default_model, "_convert", fail)
    assert default_model.ensure_default_model() == folder


def test_a_crash_during_conversion_leaves_nothing_loadable(
    nli_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedTokenizerBase

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated crash while saving")

    # The model weights are written by then; the tokenizer save is where it dies.
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model.ensure_default_model()
    target = default_model.converted_dir()
    assert not target.exists()
    assert not default_model.is_converted(target)
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".")] == []


def test_cli_classify_prints_one_json_line(default_base: LoadedBase) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "nli", "classify", "--json", "--device", "cpu",
            "--premise", "A man is renovating a room.",
            "--hypothesis", "A man is using a hammer in a room.",
        ],
        capture_output=True, text=True, check=True, env=dict(os.environ), timeout=300,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    answer = json.loads(lines[0])
    assert set(answer) == {"label", "score", "scores", "adapter", "base_model"}
    assert [s["label"] for s in answer["scores"]] == ["entailment", "neutral", "contradiction"]
    assert sum(s["score"] for s in answer["scores"]) == pytest.approx(1.0, abs=1e-5)
    assert answer["adapter"] == "base"
    assert answer["base_model"] == "smollm2-135m-instruct"
