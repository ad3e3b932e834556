"""Per-layer compile: one traced graph serves every decoder layer, and scores do not change."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from nli.classifier import NLIClassifier
from nli.layer_compile import LayerCompiledDecoder
from nli.loading import LoadedBase, load_base_model
from nli.prefix_cache import cache_argument, compute_prefix_states, prefixed_label_logits
from nli.scoring import collate, label_logits, split_peft
from tests.compile_backends import RecordingBackend
from tests.nli.adapters import make_adapter

PAIRS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("a woman", "a young woman is eating at a big red table in the street with a child"),
    ("the child is sitting", "a child is sitting"),
]


def decoder_of(base: LoadedBase) -> Any:
    return split_peft(base.model)[0].get_decoder()


def prefixed_scores(
    base: LoadedBase, pairs: list[tuple[str, str]], forward: Callable[..., Any] | None
) -> np.ndarray:
    classifier = NLIClassifier(base)
    encoder = classifier.base_encoder
    batch = collate(encoder.encode(pairs), pad_id=classifier.tokenizer.pad_token_id)
    with torch.inference_mode():
        prefix = compute_prefix_states(base.model, encoder.prefix, device=classifier.device)
        logits = prefixed_label_logits(
            base.model, batch, classifier.tokens, [prefix], decoder_forward=forward
        )
    return logits.float().numpy()


@pytest.mark.usefixtures("fresh_dynamo")
def test_every_layer_shares_one_graph_and_scores_match(base: LoadedBase) -> None:
    decoder = decoder_of(base)
    assert len(decoder.layers) > 1
    compiled = LayerCompiledDecoder(decoder, cache_argument(decoder), backend="eager")
    expected = prefixed_scores(base, PAIRS, None)
    got = prefixed_scores(base, PAIRS, compiled)
    np.testing.assert_array_equal(got, expected)  # the eager backend runs the same operations
    assert counters["stats"]["unique_graphs"] == 1  # not one per layer
    # another batch size and length reuses it (dynamic shapes)
    prefixed_scores(base, PAIRS[:3], compiled)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    assert all("forward" not in vars(layer) for layer in decoder.layers)  # restored


@pytest.mark.usefixtures("fresh_dynamo")
def test_without_a_cache_the_layers_share_one_graph_too(base: LoadedBase) -> None:
    decoder = decoder_of(base)
    compiled = LayerCompiledDecoder(decoder, "", backend="eager")
    classifier = NLIClassifier(base)
    batch = collate(classifier.base_encoder.encode(PAIRS), pad_id=classifier.tokenizer.pad_token_id)
    with torch.inference_mode():
        expected = label_logits(base.model, batch, classifier.tokens)
        got = label_logits(base.model, batch, classifier.tokens, decoder_forward=compiled)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_layers_are_restored_when_the_forward_fails(base: LoadedBase) -> None:
    decoder = decoder_of(base)
    compiled = LayerCompiledDecoder(decoder, cache_argument(decoder), backend="eager")
    with pytest.raises((RuntimeError, IndexError)), torch.inference_mode():
        compiled(input_ids=torch.full((1, 3), 10**6), attention_mask=None)  # ids out of range
    assert all("forward" not in vars(layer) for layer in decoder.layers)


def assert_inductor_agrees(base: LoadedBase) -> None:
    """The layers compiled by the real backend score as the eager model does, up to the fused
    kernels' bf16 rounding, through one graph."""
    decoder = decoder_of(base)
    compiled = LayerCompiledDecoder(decoder, cache_argument(decoder))
    expected = prefixed_scores(base, PAIRS, None)
    got = prefixed_scores(base, PAIRS, compiled)
    np.testing.assert_allclose(got, expected, atol=0.05)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_compiled_layers_agree_with_eager(base: LoadedBase) -> None:
    """The real backend (CPU Inductor here; CUDA in the benchmarks): equal up to bf16 rounding."""
    assert_inductor_agrees(base)


def test_compile_scope_is_checked(base: LoadedBase) -> None:
    with pytest.raises(ValueError, match="compile_scope"):
        NLIClassifier(base, compile_scope="model")  # type: ignore[arg-type]


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_classifier_scores_adapters_through_the_compiled_layers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``nli-train evaluate --compile --adapter``: LoRA layers inside the shared compiled layer,
    the adapter and then the bare base selected, each scored as the eager classifier does."""
    folder = make_adapter(tiny_model_dir, tmp_path / "lora", seed=3)
    classifiers = []
    for _ in range(2):
        classifier = NLIClassifier(load_base_model(str(tiny_model_dir), device="cpu"))
        classifier.attach_adapter(folder, name="a")
        classifiers.append(classifier)
    eager, compiled = classifiers
    decoder = decoder_of(compiled.base)
    # On the CPU the classifier ignores compile=True: hand it the compiled forward directly.
    compiled.compile = True
    compiled._compiled = (
        decoder,
        LayerCompiledDecoder(decoder, cache_argument(decoder), backend="eager"),
    )
    for adapter in ("a", None):
        got = compiled.score_pairs(PAIRS, adapter=adapter)
        np.testing.assert_array_equal(got, eager.score_pairs(PAIRS, adapter=adapter))
    # one graph per PEFT state (adapter active, adapter layers disabled), not one per layer
    assert counters["stats"]["unique_graphs"] == 2
    assert all("forward" not in vars(layer) for layer in decoder.layers)


@pytest.mark.usefixtures("fresh_dynamo")
def test_python_floats_are_constants_of_the_compiled_layer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """LoRA's alpha/r and the norms' epsilon reach the compiler as constants, not as float
    scalar inputs (float64 CPU tensors, for which Inductor builds C++ kernels: most of the
    first compiled step's time on a GPU)."""
    classifier = NLIClassifier(load_base_model(str(tiny_model_dir), device="cpu"))
    classifier.attach_adapter(make_adapter(tiny_model_dir, tmp_path / "lora", seed=3), name="a")
    decoder = decoder_of(classifier.base)
    backend = RecordingBackend()
    classifier.compile = True
    classifier._compiled = (
        decoder,
        LayerCompiledDecoder(decoder, cache_argument(decoder), backend=backend),
    )
    classifier.score_pairs(PAIRS, adapter="a")
    assert backend.inputs  # the layer was traced
    assert backend.float_scalars() == []
