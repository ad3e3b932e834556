"""CUDA-graph scoring through the LoRA slot (``nli.cuda_graphs``) scores as PEFT does.

On the CPU the slot-and-bucket path runs eagerly (``record=False``): the same forward that a
graph records, with the slot's hooks and without an attention mask. Every check compares with
the classifier's ordinary path (PEFT's LoRA layers, masked batches, prefix cache). The last test
records real graphs and needs a GPU (run it on the lent machine: ``pytest tests/nli -k graphs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nli.classifier import NLIClassifier
from nli.cuda_graphs import GraphSettings, SmallBatchGraphs, lora_layers
from nli.loading import LoadedBase, load_base_model
from tests.nli.test_fast_attach import PAIRS, make_adapter

# End to end, the slot path runs whole prompts without a mask while the ordinary path uses the
# prefix cache and a padding mask: the same tolerance as tests/nli/test_fast_scoring.py. The slot's
# arithmetic itself is checked layer by layer, far tighter.
ATOL = 2e-3
SETTINGS = GraphSettings(max_batch=4, max_length=128, length_step=16, lora_rank=8)
MORE_PAIRS = [*PAIRS, ("a woman reads a book on a bench outside", "nobody is reading")]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-adapters")
    specs: dict[str, dict[str, Any]] = {
        "first": dict(seed=11),
        "second": dict(seed=12, r=8),
        "attention": dict(seed=13, target_modules=["q_proj", "v_proj"]),
        "rslora-bf16": dict(seed=14, r=8, use_rslora=True, dtype=torch.bfloat16),
        "rank16": dict(seed=15, r=16),
        "dora": dict(seed=16, use_dora=True),
    }
    return {name: make_adapter(tiny_model_dir, root / name, **spec) for name, spec in specs.items()}


def eager_graphs(classifier: NLIClassifier) -> SmallBatchGraphs:
    classifier.graphs = SmallBatchGraphs(classifier.device, SETTINGS, record=False)
    return classifier.graphs


@pytest.fixture()
def classifier(base: LoadedBase) -> Iterator[NLIClassifier]:
    """A classifier scoring small batches through the slot path (eagerly, on the CPU)."""
    classifier = NLIClassifier(base, max_batch_size=4)
    eager_graphs(classifier)
    classifier.score_pairs(PAIRS)  # bitsandbytes' CPU repack happens at the first forward
    yield classifier
    for name in list(classifier.adapters):
        classifier.detach_adapter(name)


def reference(classifier: NLIClassifier, pairs: list[tuple[str, str]], adapter: str | None) -> Any:
    """The ordinary path's scores on the same classifier (graphs switched off for the call)."""
    graphs, classifier.graphs = classifier.graphs, None
    try:
        return classifier.score_pairs(pairs, adapter)
    finally:
        classifier.graphs = graphs


def test_buckets() -> None:
    settings = GraphSettings(max_batch=8, max_length=256, length_step=32)
    assert settings.bucket(1, 1) == (1, 32)
    assert settings.bucket(3, 33) == (4, 64)
    assert settings.bucket(8, 256) == (8, 256)
    assert settings.bucket(5, 200) == (8, 224)
    assert settings.bucket(9, 10) is None
    assert settings.bucket(1, 257) is None
    assert settings.bucket(0, 10) is None


def test_slot_scores_as_peft_across_swaps(
    classifier: NLIClassifier, adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    for name in ("first", "second", "attention", "rslora-bf16"):
        classifier.attach_adapter(adapters[name], name=name)
    calls = {"n": 0}
    original = graphs.score

    def counting(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls["n"] += result is not None
        return result

    graphs.score = counting  # type: ignore[method-assign]
    order = [None, "first", "second", "first", "attention", None, "rslora-bf16", "second"]
    buckets_after_first_round: list[tuple[int, int]] = []
    for round_ in range(2):
        for adapter in order:
            for pairs in (PAIRS[:1], PAIRS, MORE_PAIRS):
                got = classifier.score_pairs(pairs, adapter)
                want = reference(classifier, pairs, adapter)
                np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{adapter}, {len(pairs)}")
        if round_ == 0:
            buckets_after_first_round = graphs.recorded
    # Swapping adapters recorded nothing new: the second round reused every bucket.
    assert graphs.recorded == buckets_after_first_round
    assert calls["n"] == 2 * len(order) * 3
    # The adapters really differ, so the check above could fail.
    assert not np.allclose(
        classifier.score_pairs(PAIRS, "first"), classifier.score_pairs(PAIRS, "second"), atol=0.02
    )


@pytest.mark.parametrize("dequantize", [False, True], ids=["nf4", "dequantized"])
@pytest.mark.parametrize("name", ["second", "attention", "rslora-bf16"])
def test_slot_layer_output_equals_peft_lora_layer(
    tiny_model_dir: Path, adapters: dict[str, Path], name: str, dequantize: bool
) -> None:
    """Layer by layer, base layer + slot hook == PEFT's LoRA layer (bitsandbytes' LoRA layer on
    NF4, PEFT's plain Linear on the dequantized base): bit for bit when alpha / r = 2."""
    base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=dequantize)
    classifier = NLIClassifier(base, max_batch_size=4)
    eager_graphs(classifier)
    classifier.attach_adapter(adapters["first"], name="first")
    classifier.attach_adapter(adapters[name], name=name)
    classifier.score_pairs(PAIRS[:1], name)  # loads the slot with the adapter
    graphs = classifier.graphs
    assert graphs is not None and graphs._slot is not None and graphs._slot.holds == name
    slot = graphs._slot
    layers = lora_layers(classifier.model.get_base_model().get_decoder())
    exact = name != "rslora-bf16"  # rsLoRA's alpha / sqrt(r) is not a power of two
    checked = 0
    torch.manual_seed(0)
    with torch.inference_mode():
        for layer in layers.values():
            if name not in layer.lora_A:
                continue
            x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
            layer.set_adapter(name)
            layer.enable_adapters(True)
            want = layer(x)
            with slot.hooked():
                got = layer.get_base_layer()(x)
            if exact:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
            checked += 1
    per_block = 2 if name == "attention" else 7
    assert checked == per_block * base.model.config.num_hidden_layers


def test_adapters_the_slot_cannot_hold_run_eagerly(
    classifier: NLIClassifier, adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    for name in ("rank16", "dora", "first"):
        classifier.attach_adapter(adapters[name], name=name)
    for name in ("rank16", "dora", "first"):
        got = classifier.score_pairs(PAIRS, name)
        np.testing.assert_allclose(got, reference(classifier, PAIRS, name), atol=ATOL, err_msg=name)
    assert "above the slot's 8" in graphs._unfit["rank16"]
    assert "not plain LoRA" in graphs._unfit["dora"]
    assert "first" not in graphs._unfit


def test_reattached_name_scores_with_the_new_weights(
    classifier: NLIClassifier, adapters: dict[str, Path]
) -> None:
    classifier.attach_adapter(adapters["first"], name="x")
    first = classifier.score_pairs(PAIRS, "x")
    classifier.detach_adapter("x")
    classifier.attach_adapter(adapters["second"], name="x")
    second = classifier.score_pairs(PAIRS, "x")
    np.testing.assert_allclose(second, reference(classifier, PAIRS, "x"), atol=ATOL)
    assert not np.allclose(first, second, atol=1e-3)
    # The last detach unwraps the model; the graphs keep serving the bare base.
    classifier.detach_adapter("x")
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS), reference(classifier, PAIRS, None), atol=ATOL
    )


def test_mixed_and_large_batches_run_eagerly(
    classifier: NLIClassifier, adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    classifier.attach_adapter(adapters["first"], name="first")
    encoded = [classifier.encode([pair], "first")[0] for pair in MORE_PAIRS]
    rows: list[str | None] = ["first", None, "first", None]
    before = graphs.recorded
    got = classifier.score_encoded(encoded, rows)
    graphs_off, classifier.graphs = classifier.graphs, None
    want = classifier.score_encoded(encoded, rows)
    classifier.graphs = graphs_off
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert graphs.recorded == before  # the mixed batch did not go through the graphs
    assert not graphs.fits(SETTINGS.max_batch + 1, 10)


def test_a_failed_recording_falls_back_to_eager_scoring_for_good(
    classifier: NLIClassifier, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    graphs = SmallBatchGraphs(classifier.device, SETTINGS, record=True)
    classifier.graphs = graphs
    attempts: list[int] = []

    def failing_record(forward: Any) -> Any:
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record", failing_record)
    classifier.attach_adapter(adapters["first"], name="first")
    for _ in range(3):
        got = classifier.score_pairs(PAIRS, "first")
        np.testing.assert_allclose(got, reference(classifier, PAIRS, "first"), atol=1e-6)
    assert attempts == [1]  # tried once, then never again
    assert graphs.broken is not None and "stream is capturing" in graphs.broken
    assert not graphs.fits(1, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records real CUDA graphs")
def test_recorded_graphs_on_cuda(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    base = load_base_model(str(tiny_model_dir), device="cuda")
    classifier = NLIClassifier(base, max_batch_size=4, cuda_graphs=True, graph_settings=SETTINGS)
    graphs = classifier.graphs
    assert graphs is not None
    for name in ("first", "second", "attention"):
        classifier.attach_adapter(adapters[name], name=name)
    order = [None, "first", "second", "attention", "first", None]
    for round_ in range(2):
        for adapter in order:
            for pairs in (PAIRS[:1], MORE_PAIRS):
                got = classifier.score_pairs(pairs, adapter)
                want = reference(classifier, pairs, adapter)
                np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"{adapter}")
        if round_ == 0:
            recorded = graphs.recorded
    assert graphs.broken is None
    assert graphs.recorded == recorded and recorded
