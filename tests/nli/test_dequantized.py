"""``load_base_model(dequantize=True)``: the NF4 values held expanded score like the 4-bit base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit

from nli.classifier import NLIClassifier
from nli.loading import dequantize_4bit_linears, load_base_model

from .test_fast_scoring import PAIRS, make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=3)


def test_expanded_weights_are_the_nf4_values(tiny_model_dir: Path) -> None:
    from bitsandbytes.functional import dequantize_4bit

    packed = load_base_model(str(tiny_model_dir), device="cpu")
    layer = packed.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit)
    expected = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    count = dequantize_4bit_linears(packed.model)
    assert count == 7 * len(packed.model.model.layers)
    assert not any(isinstance(m, Linear4bit) for m in packed.model.modules())
    expanded = packed.model.model.layers[0].self_attn.q_proj
    assert not expanded.weight.requires_grad
    torch.testing.assert_close(expanded.weight.data, expected, atol=0, rtol=0)


def test_dequantized_base_scores_like_the_packed_one(tiny_model_dir: Path, adapter: Path) -> None:
    pairs = PAIRS * 2
    scores = {}
    for dequantize in (False, True):
        base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=dequantize)
        assert base.dequantized is dequantize and base.quantization == "nf4"
        classifier = NLIClassifier(base, max_length=96)
        classifier.attach_adapter(adapter, name="a")
        scores[dequantize] = (classifier.score_pairs(pairs), classifier.score_pairs(pairs, "a"))
    for packed, expanded in zip(scores[False], scores[True], strict=True):
        # Same weights; only the matmul kernels (and their bf16 rounding) differ. (The random
        # tiny model sits near uniform, so the argmax may flip between near-ties.)
        np.testing.assert_allclose(expanded, packed, atol=2e-3, rtol=0)
    # The adapter still moves the scores: it was applied on the expanded base too.
    assert np.abs(scores[True][1] - scores[True][0]).max() > 0.02


def test_dequantize_is_ignored_without_quantization(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), quantization="none", device="cpu", dequantize=True)
    assert base.dequantized is False
