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
from nli.cuda_graphs import (
    GraphSettings,
    LoraSlot,
    SmallBatchGraphs,
    input_groups,
    lora_layers,
    slot_modules,
)
from nli.loading import LoadedBase, load_base_model
from tests.nli.adapters import PAIRS

# End to end, the slot path runs whole prompts without a mask while the ordinary path uses the
# prefix cache and a padding mask: the same tolerance as tests/nli/test_fast_scoring.py. The slot's
# arithmetic itself is checked layer by layer, far tighter.
ATOL = 2e-3
SETTINGS = GraphSettings(max_batch=4, max_length=128, length_step=16, lora_rank=8, merge=False)
MORE_PAIRS = [*PAIRS, ("a woman reads a book on a bench outside", "nobody is reading")]


def assert_bf16_equal(got: torch.Tensor, want: torch.Tensor, *, max_share: float = 0.02) -> None:
    """Equal, but for a few elements one bf16 rounding step of a term apart. Matmuls of
    different shapes (a group's fused product and a member's own, the slot's padded rank and
    PEFT's) may sum in different orders on CPUs with native bf16 dot products (AVX512-BF16,
    AMX): a term whose float32 sum lies near a rounding boundary then lands one step away, and
    the output (base + LoRA term) moves by that step, up to 2**-7 of the largest value. A wrong
    order of add and cast moves far more elements; another input's product, far more."""
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=2**-7 * float(want.abs().max()))
    share = (got != want).float().mean().item()
    assert share <= max_share, f"{share:.2%} of the elements differ"


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
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    for name in ("first", "second", "attention", "rslora-bf16"):
        classifier.attach_adapter(graph_adapters[name], name=name)
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
    tiny_model_dir: Path, graph_adapters: dict[str, Path], name: str, dequantize: bool
) -> None:
    """Layer by layer, base layer + slot hook == PEFT's LoRA layer (bitsandbytes' LoRA layer on
    NF4, PEFT's plain Linear on the dequantized base): bit for bit when alpha / r = 2, but for
    the CPU's bf16 rounding of different matmul shapes (``assert_bf16_equal``)."""
    base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=dequantize)
    classifier = NLIClassifier(base, max_batch_size=4)
    eager_graphs(classifier)
    classifier.attach_adapter(graph_adapters["first"], name="first")
    classifier.attach_adapter(graph_adapters[name], name=name)
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
                assert_bf16_equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
            checked += 1
    per_block = 2 if name == "attention" else 7
    assert checked == per_block * base.model.config.num_hidden_layers


def test_adapters_the_slot_cannot_hold_run_eagerly(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    for name in ("rank16", "dora", "first"):
        classifier.attach_adapter(graph_adapters[name], name=name)
    for name in ("rank16", "dora", "first"):
        got = classifier.score_pairs(PAIRS, name)
        np.testing.assert_allclose(got, reference(classifier, PAIRS, name), atol=ATOL, err_msg=name)
    assert "above the slot's 8" in graphs._unfit["rank16"]
    assert "not plain LoRA" in graphs._unfit["dora"]
    assert "first" not in graphs._unfit


def check_reattached_name(
    classifier: NLIClassifier, graph_adapters: dict[str, Path], atol: float
) -> None:
    """A name detached and attached again with other weights scores with the new ones."""
    classifier.attach_adapter(graph_adapters["first"], name="x")
    first = classifier.score_pairs(PAIRS, "x")
    classifier.detach_adapter("x")
    classifier.attach_adapter(graph_adapters["second"], name="x")
    second = classifier.score_pairs(PAIRS, "x")
    np.testing.assert_allclose(second, reference(classifier, PAIRS, "x"), atol=atol)
    assert not np.allclose(first, second, atol=1e-3)


def test_reattached_name_scores_with_the_new_weights(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    check_reattached_name(classifier, graph_adapters, ATOL)
    # The last detach unwraps the model; the graphs keep serving the bare base.
    classifier.detach_adapter("x")
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS), reference(classifier, PAIRS, None), atol=ATOL
    )


def test_mixed_and_large_batches_run_eagerly(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    classifier.attach_adapter(graph_adapters["first"], name="first")
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
    classifier: NLIClassifier, graph_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    graphs = SmallBatchGraphs(classifier.device, SETTINGS, record=True)
    classifier.graphs = graphs
    attempts: list[int] = []

    def failing_record(forward: Any) -> Any:
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record", failing_record)
    classifier.attach_adapter(graph_adapters["first"], name="first")
    for _ in range(3):
        got = classifier.score_pairs(PAIRS, "first")
        np.testing.assert_allclose(got, reference(classifier, PAIRS, "first"), atol=1e-6)
    assert attempts == [1]  # tried once, then never again
    assert graphs.broken is not None and "stream is capturing" in graphs.broken
    assert not graphs.fits(1, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records real CUDA graphs")
def test_recorded_graphs_on_cuda(tiny_model_dir: Path, graph_adapters: dict[str, Path]) -> None:
    base = load_base_model(str(tiny_model_dir), device="cuda")
    classifier = NLIClassifier(base, max_batch_size=4, cuda_graphs=True, graph_settings=SETTINGS)
    graphs = classifier.graphs
    assert graphs is not None
    for rows, length in SETTINGS.buckets(64):  # as the service does once ready
        assert classifier.record_graph(rows, length)
    for name in ("first", "second", "attention"):
        classifier.attach_adapter(graph_adapters[name], name=name)
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


def slot_with_adapter(
    tiny_model_dir: Path, graph_adapters: dict[str, Path], *, dequantize: bool = True
) -> tuple[NLIClassifier, Any, dict[str, Any]]:
    """A classifier holding the adapter ``second`` (alpha / r = 2: the slot is exact), its
    decoder and PEFT's LoRA layers in it."""
    base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=dequantize)
    classifier = NLIClassifier(base, max_batch_size=4)
    classifier.attach_adapter(graph_adapters["second"], name="second")
    decoder = classifier.model.get_base_model().get_decoder()
    layers = lora_layers(decoder)
    for layer in layers.values():
        layer.set_adapter("second")
        layer.enable_adapters(True)
    return classifier, decoder, layers


def loaded_slot(
    decoder: Any, layers: dict[str, Any], groups: list[list[str]] | None = None
) -> LoraSlot:
    slot = LoraSlot(slot_modules(decoder), SETTINGS.lora_rank, torch.device("cpu"), groups)
    assert slot.fit(layers, "second") is None
    slot.load(layers, "second")
    return slot


def test_q_k_v_and_gate_up_share_one_a_buffer(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), device="cpu")
    modules = slot_modules(base.model.get_decoder())
    groups = input_groups(modules)
    blocks = base.model.config.num_hidden_layers
    want: list[list[str]] = []
    for i in range(blocks):
        want.append([f"layers.{i}.self_attn.{p}_proj" for p in "qkv"])
        want.append([f"layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])
    assert groups == want
    slot = LoraSlot(modules, 8, torch.device("cpu"))
    for names in groups:
        first = slot.a[names[0]]
        for index, name in enumerate(names):
            # One buffer, rank rows per member, in order: load() writes where the matmul reads.
            assert slot.a[name].shape == (8, modules[name].in_features)
            assert slot.a[name]._base is first._base and first._base is not None
            assert slot.a[name].data_ptr() == first.data_ptr() + index * slot.a[name].nbytes
    assert LoraSlot(modules, 8, torch.device("cpu"), groups=[]).a[groups[0][1]]._base is None
    with pytest.raises(ValueError, match="cannot share"):
        LoraSlot(modules, 8, torch.device("cpu"), groups=[[groups[0][0], groups[0][0]]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("dequantize", [False, True], ids=["nf4", "dequantized"])
def test_fused_slot_layer_outputs_equal_unfused_and_peft(
    tiny_model_dir: Path, graph_adapters: dict[str, Path], dequantize: bool, dtype: torch.dtype
) -> None:
    """q/k/v (and gate/up) called on one input, as the decoder does, take their ``x @ A^T`` from
    the group's one matmul: the layer outputs are PEFT's. In bf16, bit for bit (as the unfused
    slot is) but for the CPU's rounding of different matmul shapes, which also pins the order of
    add and cast; in fp32, up to matmul rounding."""
    _, decoder, layers = slot_with_adapter(tiny_model_dir, graph_adapters, dequantize=dequantize)
    fused = loaded_slot(decoder, layers)
    unfused = loaded_slot(decoder, layers, groups=[])
    assert len(fused.groups) == 2 * len(decoder.layers)
    torch.manual_seed(0)
    with torch.inference_mode():
        for names in fused.groups:
            x = torch.randn(2, 5, fused.modules[names[0]].in_features, dtype=dtype)
            want = {name: layers[name](x) for name in names}
            got: dict[str, torch.Tensor] = {}
            alone: dict[str, torch.Tensor] = {}
            with fused.hooked():
                got = {name: fused.modules[name](x) for name in names}
            with unfused.hooked():
                alone = {name: unfused.modules[name](x) for name in names}
            for name in names:
                assert got[name].dtype == want[name].dtype == dtype
                if dtype == torch.bfloat16:
                    assert_bf16_equal(got[name], want[name])
                    assert_bf16_equal(got[name], alone[name])
                else:
                    scale = float(want[name].abs().max())
                    torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6 * scale)
                    torch.testing.assert_close(got[name], alone[name], rtol=0, atol=1e-6 * scale)


def test_a_member_whose_input_is_not_the_groups_computes_its_own_term(
    tiny_model_dir: Path, graph_adapters: dict[str, Path]
) -> None:
    _, decoder, layers = slot_with_adapter(tiny_model_dir, graph_adapters)
    slot = loaded_slot(decoder, layers)
    q, k, v = next(names for names in slot.groups if len(names) == 3)
    torch.manual_seed(0)
    x, y = torch.randn(2, 2, 5, slot.modules[q].in_features, dtype=torch.bfloat16)
    with torch.inference_mode(), slot.hooked():
        got_q = slot.modules[q](x)  # its pre-hook computes the group's product for x
        got_k = slot.modules[k](y)  # another input: k must not take x's slice
        got_v = slot.modules[v](x)  # still x: v reads the cached product
        got_y = slot.modules[v](y.clone())  # an equal tensor that is not the input either
    with torch.inference_mode():
        assert_bf16_equal(got_q, layers[q](x))
        assert_bf16_equal(got_k, layers[k](y))
        assert_bf16_equal(got_v, layers[v](x))
        assert_bf16_equal(got_y, layers[v](y))
        # The check above could fail: k's term on x is far from its term on y.
        assert not torch.allclose(layers[k](x), got_k, atol=0.1)


def count_ops(slot: LoraSlot, decoder: Any, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The decoder's hidden states with ``slot`` hooked in, and how many matmuls that ran."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with slot.hooked():
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    return hidden, sum(event.name == "aten::mm" for event in prof.events())


def test_fused_decoder_runs_fewer_matmuls_and_a_wrong_group_is_harmless(
    tiny_model_dir: Path, graph_adapters: dict[str, Path]
) -> None:
    classifier, decoder, layers = slot_with_adapter(tiny_model_dir, graph_adapters)
    fused = loaded_slot(decoder, layers)
    unfused = loaded_slot(decoder, layers, groups=[])
    # o_proj reads the attention's output, not q's input: the guess is wrong at run time.
    wrong = loaded_slot(
        decoder,
        layers,
        groups=[
            [f"layers.{i}.self_attn.{p}_proj" for p in "qo"] for i in range(len(decoder.layers))
        ],
    )
    ids = torch.tensor(classifier.encode(PAIRS[:1]))
    with classifier.model.disable_adapter():
        got, fused_mm = count_ops(fused, decoder, ids)
        want, unfused_mm = count_ops(unfused, decoder, ids)
        wrong_got, wrong_mm = count_ops(wrong, decoder, ids)
    # A layer's one-step bf16 differences (assert_bf16_equal) grow through the next layers: up
    # to ~0.7% of the hidden states' largest value on an AVX512-BF16 CPU, where the adapter
    # itself moves them by ~25% (median) and another input's product would move them as much.
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * scale)
    torch.testing.assert_close(wrong_got, want, rtol=0, atol=0.02 * scale)
    # One A matmul per group instead of one per member: 2 saved on q/k/v, 1 on gate/up.
    assert unfused_mm - fused_mm == 3 * len(decoder.layers)
    assert wrong_mm == unfused_mm  # q's share of [q; o] in one matmul, o's own: no saving


def test_graphs_recorded_ahead_of_traffic_serve_later_batches(
    classifier: NLIClassifier, graph_adapters: dict[str, Path]
) -> None:
    graphs = classifier.graphs
    assert graphs is not None
    before = graphs.recorded  # the fixture's first scoring
    assert SETTINGS.buckets(40) == [(n, length) for length in (16, 32, 48) for n in (1, 2, 4)]
    assert SETTINGS.buckets(0) == []
    for rows, length in SETTINGS.buckets(40):
        assert classifier.record_graph(rows, length)
    assert graphs.recorded == sorted({*before, *SETTINGS.buckets(40)})
    assert classifier.record_graph(3, 20)  # an existing bucket (4, 32): nothing new
    assert not classifier.record_graph(SETTINGS.max_batch + 1, 10)  # too many rows for a graph
    assert not classifier.record_graph(1, SETTINGS.max_length + 1)  # too long
    assert len(graphs.recorded) == len({*before, *SETTINGS.buckets(40)})
    # The pad-filled recordings leave nothing behind: adapters and the base score as before.
    classifier.attach_adapter(graph_adapters["first"], name="first")
    for adapter in ("first", None):
        got = classifier.score_pairs(PAIRS, adapter)
        np.testing.assert_allclose(got, reference(classifier, PAIRS, adapter), atol=ATOL)
    classifier.graphs = None
    assert not classifier.record_graph(1, 10)  # graphs off
