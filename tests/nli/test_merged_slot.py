"""The merged slot (``nli.cuda_graphs.MergedSlot``): CUDA graphs over a floating-point base read
copies of the linear weights holding ``W + scaling * B @ A``, so the recorded forward has no LoRA
kernels.

As in tests/nli/test_cuda_graphs.py, the CPU runs the slot-and-bucket path eagerly
(``record=False``) and compares it with the classifier's ordinary path (PEFT's unmerged LoRA
layers). The last test records real graphs and needs a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from nli.classifier import NLIClassifier
from nli.cuda_graphs import (
    GraphSettings,
    LoraSlot,
    MergedSlot,
    SmallBatchGraphs,
    lora_layers,
    slot_modules,
)
from nli.loading import load_base_model
from tests.nli.adapters import PAIRS
from tests.nli.test_cuda_graphs import MORE_PAIRS, check_reattached_name, reference
from tests.nli.test_cuda_graphs import SETTINGS as LORA_SLOT_SETTINGS

# The LoRA-slot tests' buckets and slot rank (8: the rank16 adapter is above it), merging on.
SETTINGS = dataclasses.replace(LORA_SLOT_SETTINGS, merge=True)
# End to end: the merged bf16 weights round W + scaling * B @ A once more than PEFT's unmerged
# layers do, on top of the mask / prefix-cache differences that the LoRA slot's tests allow 2e-3.
ATOL = 5e-3


@pytest.fixture(params=["dequantized", "unquantized"])
def classifier(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Iterator[NLIClassifier]:
    """A classifier on a floating-point base, scoring small batches through the merged slot."""
    if request.param == "dequantized":
        base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=True)
    else:
        base = load_base_model(str(tiny_model_dir), quantization="none", device="cpu")
    classifier = NLIClassifier(base, max_batch_size=4)
    classifier.graphs = SmallBatchGraphs(classifier.device, SETTINGS, record=False)
    classifier.score_pairs(PAIRS)
    assert isinstance(classifier.graphs._slot, MergedSlot)
    yield classifier


def slot_of(classifier: NLIClassifier) -> MergedSlot:
    assert classifier.graphs is not None
    slot = classifier.graphs._slot
    assert isinstance(slot, MergedSlot)
    return slot


def test_merged_slot_scores_as_peft_across_swaps(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    for name in ("first", "second", "attention", "rank16", "rslora-bf16"):
        classifier.attach_adapter(graph_adapters[name], name=name)
    order = [None, "first", "rank16", "first", "attention", None, "rslora-bf16", "second"]
    recorded: list[tuple[int, int]] = []
    for round_ in range(2):
        for adapter in order:
            for pairs in (PAIRS[:1], MORE_PAIRS):
                got = classifier.score_pairs(pairs, adapter)
                want = reference(classifier, pairs, adapter)
                np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{adapter}")
                assert slot_of(classifier).holds == adapter  # it went through the slot
        if round_ == 0:
            recorded = graphs.recorded
    assert graphs.recorded == recorded  # swaps recorded nothing new
    assert not graphs._unfit  # rank 16 included: a merged slot has no rank limit
    # The adapters really differ, so the checks above could fail.
    assert not np.allclose(
        classifier.score_pairs(PAIRS, "first"), classifier.score_pairs(PAIRS, "rank16"), atol=0.02
    )


def test_merged_weights_are_the_lora_update_and_the_base_comes_back_exactly(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    classifier.attach_adapter(graph_adapters["attention"], name="attention")
    classifier.attach_adapter(graph_adapters["first"], name="first")
    slot = slot_of(classifier)
    layers = lora_layers(classifier.model.get_base_model().get_decoder())  # by slot name
    for adapter in ("first", "attention", None, "first"):
        classifier.score_pairs(PAIRS[:1], adapter)
        assert slot.holds == adapter
        for name, module in slot.modules.items():
            weight = module.weight
            layer = layers.get(name)
            if adapter is None or layer is None or adapter not in layer.lora_A:
                assert torch.equal(slot.weights[name], weight), (adapter, name)
                continue
            update = layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
            want = (weight.double() + layer.scaling[adapter] * update).to(weight.dtype)
            # float32 arithmetic then one rounding: within one unit in the weight's last place
            torch.testing.assert_close(slot.weights[name], want, rtol=2**-7, atol=1e-6)
            assert not torch.equal(slot.weights[name], weight)


def test_hooked_swaps_weights_only_inside_the_block(classifier: NLIClassifier) -> None:
    slot = slot_of(classifier)
    originals = {name: module.weight for name, module in slot.modules.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with slot.hooked():
            for name, module in slot.modules.items():
                assert module.weight.data_ptr() == slot.weights[name].data_ptr()
                assert not module.weight.requires_grad
            raise RuntimeError("failure inside the block")
    for name, module in slot.modules.items():
        assert module.weight is originals[name]


def test_dora_runs_eagerly_and_a_reattached_name_takes_its_new_weights(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    classifier.attach_adapter(graph_adapters["dora"], name="dora")
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS, "dora"), reference(classifier, PAIRS, "dora"), atol=1e-6
    )
    assert "not plain LoRA" in graphs._unfit["dora"]
    check_reattached_name(classifier, graph_adapters, ATOL)


def test_packed_nf4_and_a_merge_flag_off_keep_the_lora_slot(tiny_model_dir: Path) -> None:
    packed = load_base_model(str(tiny_model_dir), device="cpu")
    assert not MergedSlot.supports(slot_modules(packed.model.get_decoder()))
    with pytest.raises(ValueError, match="floating-point"):
        MergedSlot(slot_modules(packed.model.get_decoder()))
    dequantized = load_base_model(str(tiny_model_dir), device="cpu", dequantize=True)
    for settings, kind in ((SETTINGS, MergedSlot), (GraphSettings(merge=False), LoraSlot)):
        classifier = NLIClassifier(dequantized, max_batch_size=4)
        classifier.graphs = SmallBatchGraphs(classifier.device, settings, record=False)
        classifier.score_pairs(PAIRS[:1])
        assert isinstance(classifier.graphs._slot, kind)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records real CUDA graphs")
def test_recorded_merged_graphs_on_cuda(
    tiny_model_dir: Path, graph_adapters: dict[str, Path]
) -> None:
    base = load_base_model(str(tiny_model_dir), device="cuda", dequantize=True)
    classifier = NLIClassifier(base, max_batch_size=4, cuda_graphs=True, graph_settings=SETTINGS)
    graphs = classifier.graphs
    assert graphs is not None
    for rows, length in SETTINGS.buckets(SETTINGS.max_length):  # every bucket, as the service
        assert classifier.record_graph(rows, length)
    assert isinstance(graphs._slot, MergedSlot)
    for name in ("first", "rank16", "attention"):
        classifier.attach_adapter(graph_adapters[name], name=name)
    recorded = graphs.recorded
    for adapter in [None, "first", "rank16", "attention", "first", None]:
        for pairs in (PAIRS[:1], MORE_PAIRS):
            got = classifier.score_pairs(pairs, adapter)
            want = reference(classifier, pairs, adapter)
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{adapter}")
    assert graphs.broken is None and graphs.recorded == recorded
