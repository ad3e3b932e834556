"""Per-layer ``torch.compile`` of a decoder: one trace serves every decoder layer.

Compiling the decoder's whole forward makes Dynamo trace all of its layers one after another
(30 for SmolLM2, 28 for Qwen2-1.5B), and the cold compile of one evaluation run took ~100 s on
an H100 host. Every layer runs the same code on weights of the same shapes, so one compiled
graph of the layer's forward can serve them all (the weights are the graph's inputs): the trace
and the Inductor compile then happen once.

What stops one graph from serving every layer is the key/value cache: each attention layer
calls ``cache.update(keys, values, self.layer_idx)``, so the traced code reads the layer's index
and a cache holding every layer's states, and guards on both (a recompile per layer). While the
compiled forward runs, each layer is therefore handed a view of only its own slot of the cache,
whose ``update`` returns the cached states concatenated with the new ones and ignores the index.
The view does not extend the cache: this is for scoring, where the cache is dropped after the
forward (``nli.prefix_cache``).

On a packed NF4 base the layers' ``Linear4bit`` modules run torch ops instead of bitsandbytes'
Python while the compiled forward runs (``nli.nf4_graph``), so the compiled graph holds their
dequantization too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nli import nf4_graph


class _LayerSlot:
    """One layer's cached keys/values, in the shape of the cache a decoder layer expects."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)


class LayerCompiledDecoder:
    """A replacement for ``decoder.forward`` whose layers run one shared compiled forward.

    ``cache_argument`` is the name under which the decoder passes its key/value cache to its
    layers (``cache`` in transformers 5.24, ``past_key_values`` before); a cache must come
    filled (``nli.prefix_cache``) for its layers to share the compiled code. ``backend`` goes to
    ``torch.compile`` (tests use ``"eager"``). ``torch_nf4``: packed NF4 layers dequantize in
    the graph (``nli.nf4_graph``; False keeps bitsandbytes' forward). Not thread-safe: while a
    call runs, the decoder's layers (and their NF4 layers) have their ``forward`` replaced
    (restored when it returns); callers serialise forwards (``NLIClassifier`` holds its forward
    lock).
    """

    def __init__(
        self,
        decoder: Any,
        cache_argument: str,
        *,
        backend: str | Callable[..., Any] = "inductor",
        torch_nf4: bool = True,
    ) -> None:
        self.decoder = decoder
        self.cache_argument = cache_argument
        self.layers = list(decoder.layers)
        # The base's Linear4bit modules stay the same objects when PEFT wraps them in LoRA layers.
        self._nf4_modules = (
            [m for layer in self.layers for m in nf4_graph.linear4bit_modules(layer)]
            if torch_nf4
            else []
        )
        # One compiled function per layer class, shared by every layer of that class.
        self._compiled: dict[type, Callable[..., Any]] = {}
        for layer in self.layers:
            cls = type(layer)
            if cls not in self._compiled:
                self._compiled[cls] = torch.compile(cls.forward, dynamic=True, backend=backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with compile_settings(), self._installed():
            return self.decoder.forward(*args, **kwargs)

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        for index, layer in enumerate(self.layers):
            layer.forward = self._layer_forward(layer, index)
        try:
            with nf4_graph.installed(self._nf4_modules):
                yield
        finally:
            for layer in self.layers:
                del layer.forward  # the class's forward again

    def _layer_forward(self, layer: Any, index: int) -> Callable[..., Any]:
        compiled = self._compiled[type(layer)]
        name = self.cache_argument

        def forward(*args: Any, **kwargs: Any) -> Any:
            cache = kwargs.get(name)
            slots = getattr(cache, "layers", ())
            slot = slots[index] if index < len(slots) else None
            if getattr(slot, "keys", None) is not None:
                kwargs[name] = _LayerSlot(slot.keys, slot.values)  # type: ignore[union-attr]
            # else: no cache, or one not filled yet (the layers fill it): passed on as it is,
            # which is correct but recompiles per layer.
            return compiled(layer, *args, **kwargs)

        return forward


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """The Dynamo settings this project's compiles run under (``_SETTINGS``), while the block
    runs: hold it around the first call of compiled code, where Dynamo traces."""
    with contextlib.ExitStack() as stack:
        for config, name, value in _settings():
            stack.enter_context(config.patch(**{name: value}))
        yield


def use_compile_settings() -> None:
    """For the rest of the process, ``compile_settings``: for compiles that start where no
    context manager can reach (inside ``Trainer``)."""
    for config, name, value in _settings():
        setattr(config, name, value)


_SETTINGS = (
    # Duck shaping gives equal sizes one symbol: a batch of 64 rows would be specialised to a
    # head size of 64 (or batch 128 to a 128-token batch) and the next size would recompile.
    ("torch.fx.experimental._config", "use_duck_shape", False),
    # With dynamic shapes Dynamo also passes every Python float the layer reads (LoRA's
    # alpha/r, the norms' epsilon, the attention scale) into the graph as a float64 CPU
    # scalar, for which Inductor writes C++ kernels: a C++ compile, probes of the CPU's vector
    # instructions, file locks. That was most of the first training step (H100: 80.6 s with
    # empty caches, 61.2 s warm; 19.2 s and 5.7 s with floats specialised, BENCHMARKS.md).
    # Specialised, the values become constants the graph guards on; every layer holds the same
    # ones, and an adapter with another alpha/r recompiles once.
    ("torch._dynamo.config", "specialize_float", True),
)


@functools.cache
def _settings() -> list[tuple[Any, str, object]]:
    """``_SETTINGS`` that this PyTorch has (private modules, checked against torch 2.11 and
    2.13); a missing one costs compile time, never correctness. Resolved once: every compiled
    forward enters ``compile_settings``."""
    found: list[tuple[Any, str, object]] = []
    for module, name, value in _SETTINGS:
        config = importlib.import_module(module)
        if hasattr(config, name) and hasattr(config, "patch"):
            found.append((config, name, value))
    return found
