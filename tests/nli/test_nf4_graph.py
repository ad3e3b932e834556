"""NF4 layers in torch ops (``nli.nf4_graph``): bitsandbytes' results exactly, inside the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from nli import nf4_graph
from nli.layer_compile import LayerCompiledDecoder
from nli.loading import LoadedBase, load_base_model
from nli.prefix_cache import cache_argument
from nli.scoring import split_peft
from tests.compile_backends import RecordingBackend
from tests.nli.test_layer_compile import PAIRS, assert_inductor_agrees, prefixed_scores


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_bitsandbytes(nested: bool, dtype: torch.dtype) -> None:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=nested
    )
    assert state.nested is nested
    got = nf4_graph.dequantize_nf4(
        packed,
        state.code,
        nf4_graph.expanded_absmax(state),
        blocksize=64,
        shape=(96, 320),
        dtype=dtype,
    )
    expected = dequantize_4bit(packed, state)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # and it is the weight, up to 4-bit rounding (at most ~0.14 of a block's largest value)
    assert (got - weight).abs().max() < 0.2 * weight.abs().max()


def _used_base(tiny_model_dir: Path) -> LoadedBase:
    """A fresh NF4 base after one eager forward (which sets its layers' compute dtype).

    On CPUs with AVX512-BF16, bitsandbytes repacks a layer's bytes for its own CPU kernel at the
    first forward, after which the layer is not eligible; that is switched off here, so the
    tests run the same path on every CPU (GPUs never repack)."""
    base = load_base_model(str(tiny_model_dir), device="cpu")
    for module in nf4_graph.linear4bit_modules(base.model):
        module.support_avx512bf16_for_cpu = False
    prefixed_scores(base, PAIRS[:1], None)
    return base


def test_the_torch_forward_equals_linear4bit_and_is_removed_after(tiny_model_dir: Path) -> None:
    base = _used_base(tiny_model_dir)
    modules = nf4_graph.linear4bit_modules(base.model)
    assert modules
    x = torch.randn(5, 7, modules[0].in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = [m(x.to(m.compute_dtype)) for m in modules if m.in_features == x.shape[-1]]
        with nf4_graph.installed(modules) as count:
            assert count == len(modules)
            assert all("forward" in vars(m) for m in modules)
            got = [m(x.to(m.compute_dtype)) for m in modules if m.in_features == x.shape[-1]]
    assert all("forward" not in vars(m) for m in modules)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layers_it_cannot_reproduce_keep_bitsandbytes(tiny_model_dir: Path) -> None:
    modules = nf4_graph.linear4bit_modules(_used_base(tiny_model_dir).model)
    modules[0].weight.quant_state.packing_format_for_cpu = True  # another byte layout
    modules[1].compute_type_is_set = False  # bitsandbytes picks the dtype at its next forward
    modules[2].weight.quant_state.quant_type = "fp4"
    modules[3].weight.quant_state.shape = torch.Size(
        [modules[3].in_features, modules[3].out_features + 1]
    )
    with nf4_graph.installed(modules) as count:
        assert count == len(modules) - 4
        assert all("forward" not in vars(m) for m in modules[:4])


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("torch_nf4", [True, False])
def test_compiled_layers_hold_the_dequantization(tiny_model_dir: Path, torch_nf4: bool) -> None:
    """With ``torch_nf4`` the traced layer calls no bitsandbytes op, still one graph serves
    every layer, and the scores are the eager ones exactly (the eager backend runs the traced
    operations as they are)."""
    base = _used_base(tiny_model_dir)
    decoder = split_peft(base.model)[0].get_decoder()
    backend = RecordingBackend()
    compiled = LayerCompiledDecoder(
        decoder, cache_argument(decoder), backend=backend, torch_nf4=torch_nf4
    )
    expected = prefixed_scores(base, PAIRS, None)
    got = prefixed_scores(base, PAIRS, compiled)
    np.testing.assert_array_equal(got, expected)
    assert counters["stats"]["unique_graphs"] == 1
    calls_bnb = any("bitsandbytes" in target for target in backend.call_targets())
    assert calls_bnb is not torch_nf4


@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_compiles_the_dequantization(tiny_model_dir: Path) -> None:
    """The real backend (CPU Inductor here, Triton on a GPU) compiles the torch forward; the
    scores equal the eager ones up to the fused kernels' rounding."""
    assert_inductor_agrees(_used_base(tiny_model_dir))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels")
@pytest.mark.parametrize("rows", [2048, 64])
def test_on_cuda_it_equals_bitsandbytes_past_its_fused_kernel(rows: int) -> None:
    """Past 1,536 token rows bitsandbytes dequantizes and calls ``F.linear``: equal exactly.
    Below, its fused kernel rounds differently: equal up to bf16 rounding."""
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit(
        576, 1536, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
    ).cuda()  # quantized (nested block scales) on the way to the GPU
    x = torch.randn(rows, 576, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = layer(x)
        with nf4_graph.installed([layer]) as count:
            assert count == 1
            got = layer(x)
    if rows > 1536:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
