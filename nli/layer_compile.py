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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


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
    ``torch.compile`` (tests use ``"eager"``). Not thread-safe: while a call runs, the decoder's
    layers have their ``forward`` replaced (restored when it returns); callers serialise forwards
    (``NLIClassifier`` holds its forward lock).
    """

    def __init__(self, decoder: Any, cache_argument: str, *, backend: str = "inductor") -> None:
        self.decoder = decoder
        self.cache_argument = cache_argument
        self.layers = list(decoder.layers)
        # One compiled function per layer class, shared by every layer of that class.
        self._compiled: dict[type, Callable[..., Any]] = {}
        for layer in self.layers:
            cls = type(layer)
            if cls not in self._compiled:
                self._compiled[cls] = torch.compile(cls.forward, dynamic=True, backend=backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Duck shaping gives equal sizes one symbol, so a batch of 64 rows would be specialised to
        # a head size of 64 and the next batch size would recompile.
        with _no_duck_shapes(), self._installed():
            return self.decoder.forward(*args, **kwargs)

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        for index, layer in enumerate(self.layers):
            layer.forward = self._layer_forward(layer, index)
        try:
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


def disable_duck_shapes() -> None:
    """For the rest of the process, compiled code gives equal sizes no shared symbol.

    For compiles that start where no context manager can reach (inside ``Trainer``).
    """
    config = _duck_shape_config()
    if config is not None:
        config.use_duck_shape = False


def _no_duck_shapes() -> contextlib.AbstractContextManager[Any]:
    config = _duck_shape_config()
    if config is None or not hasattr(config, "patch"):
        return contextlib.nullcontext()
    return config.patch(use_duck_shape=False)


def _duck_shape_config() -> Any | None:
    """PyTorch's (private, torch 2.13) shape settings, if they hold ``use_duck_shape``; without
    the setting the cost is only an occasional recompile."""
    from torch.fx.experimental import _config as fx_config

    return fx_config if hasattr(fx_config, "use_duck_shape") else None
