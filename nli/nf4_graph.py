"""Packed NF4 linear layers in plain torch ops, so that compiled scoring can fuse them.

On a packed NF4 base, every linear layer's forward goes through bitsandbytes' ``gemm_4bit``,
whose CUDA implementation is Python: past 1,536 token rows it rebuilds the layer's block scales
(absmax) from their 8-bit form, dequantizes the weight through two ctypes calls, then runs
``F.linear``. In a compiled evaluation those calls were most of the host's work: on an H100
host, scoring one pass over SNLI test took 0.65-0.66 s with the weights packed and 0.32-0.40 s
with them held dequantized, while the GPU was busy for at most 0.30-0.32 s (BENCHMARKS.md,
"Evaluation throughput").

``installed(modules)`` gives each eligible ``Linear4bit`` a forward of torch ops while the block
runs: split every byte into its two 4-bit codes, look them up in the NF4 table, scale by the
block's absmax in float32, round to the compute dtype, ``F.linear``. Inductor turns the
dequantization into one fused kernel per layer. The absmax is expanded to float32 once per layer
with bitsandbytes' own functions (4 bytes per 64 weights, kept on the module), so the result
equals bitsandbytes' dequantize-then-linear result exactly: the path it takes on CUDA past 1,536
rows and on the CPU. For fewer rows bitsandbytes runs a fused kernel whose rounding differs
slightly.

Eligible: NF4 layers whose compute dtype is set, whose weight was quantized as stored
(``[out, in]``) in whole blocks, and which bitsandbytes has not repacked for its CPU kernel.
Others keep bitsandbytes' forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

# Attributes set on a Linear4bit by _prepare: its packed bytes (a view of weight.data), the NF4
# table, the float32 absmax per block, and the block size.
_PACKED, _CODE, _ABSMAX, _BLOCK = (
    "_nli_nf4_packed",
    "_nli_nf4_code",
    "_nli_nf4_absmax",
    "_nli_nf4_block",
)


def linear4bit_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Every bitsandbytes ``Linear4bit`` under ``root`` (none where bitsandbytes is missing)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return []
    return [module for module in root.modules() if isinstance(module, Linear4bit)]


def expanded_absmax(quant_state: Any) -> torch.Tensor:
    """A layer's per-block scales as float32, as bitsandbytes computes them before dequantizing
    (nested: the 8-bit scales decoded blockwise, then the offset added)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise

    absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
    return (absmax + quant_state.offset).float()


def dequantize_nf4(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    *,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` from its packed bytes (high nibble first), the 16-value
    ``code`` table and one float32 scale per ``blocksize`` weights."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1).long()
    values = code[codes].view(-1, blocksize) * absmax.view(-1, 1)
    return values.view(shape).to(dtype)


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    # Linear4bit.forward's casts around the matrix product, with the weight dequantized in torch.
    out_dtype = x.dtype
    x = x.to(self.compute_dtype)
    weight = dequantize_nf4(
        getattr(self, _PACKED),
        getattr(self, _CODE),
        getattr(self, _ABSMAX),
        blocksize=getattr(self, _BLOCK),
        shape=(self.out_features, self.in_features),
        dtype=x.dtype,
    )
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, weight, bias).to(out_dtype)


def _prepare(module: Any) -> bool:
    """Set the module's NF4 attributes, once per weight tensor; False where it is not eligible."""
    data = module.weight.data
    packed = getattr(module, _PACKED, None)
    if packed is not None and packed.data_ptr() == data.data_ptr() and packed.device == data.device:
        return True  # prepared for this very weight (bitsandbytes' repacking makes a new one)
    state = getattr(module.weight, "quant_state", None)
    if (
        state is None
        or state.quant_type != "nf4"
        or getattr(state, "packing_format_for_cpu", False)
        or not getattr(module, "compute_type_is_set", False)
        or module.compute_dtype is None
        or tuple(state.shape) != (module.out_features, module.in_features)
        or data.numel() * 2 != module.out_features * module.in_features
        or (module.out_features * module.in_features) % state.blocksize
    ):
        return False
    setattr(module, _PACKED, data)
    setattr(module, _CODE, state.code.to(device=data.device, dtype=torch.float32))
    setattr(module, _ABSMAX, expanded_absmax(state).to(data.device))
    setattr(module, _BLOCK, int(state.blocksize))
    return True


@contextlib.contextmanager
def installed(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While the block runs, the eligible ``modules`` (``Linear4bit``) use the torch forward;
    yields how many do. Not thread-safe: callers serialise forwards."""
    done = []
    try:
        for module in modules:
            if _prepare(module):
                module.forward = types.MethodType(_forward, module)
                done.append(module)
        yield len(done)
    finally:
        for module in done:
            del module.forward  # the class's forward again
