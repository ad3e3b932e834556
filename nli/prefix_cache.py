"""Shared-prefix key/value cache for inference: the prompt template's opening tokens run once.

Every prompt of one format starts with the same tokens (system line, chat-template markers and
"Premise:", ``PairEncoder.prefix``). Their key/value states depend only on those tokens and on
the adapter (LoRA changes the k/v projections), so they are computed once per (adapter, prefix)
and only each pair's remaining tokens run through the decoder, at positions offset by the
prefix length, attending to the cached states through a mask that covers prefix + suffix.
Right padding stays, so every row's positions are those of the full prompt.

Training never uses this: its loss is ``nli.scoring.label_logits`` on the whole prompt, with
gradients through the prefix.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nli.scoring import (
    EncodedBatch,
    LabelTokens,
    decoder_hidden_states,
    project_labels,
    split_peft,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixStates:
    """Key/value states of a prefix under one adapter, per layer ``[1, kv_heads, P, head_dim]``."""

    ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return len(self.ids)


_CACHE_ARGUMENTS: dict[Any, str] = {}


def _cache_argument_of(decoder_cls: Any) -> str:
    # transformers 5.24 names the decoder's cache argument `cache`; 5.17 `past_key_values`.
    if decoder_cls not in _CACHE_ARGUMENTS:
        params = inspect.signature(decoder_cls.forward).parameters
        found = [name for name in ("cache", "past_key_values") if name in params]
        _CACHE_ARGUMENTS[decoder_cls] = found[0] if found else ""
    return _CACHE_ARGUMENTS[decoder_cls]


def cache_argument(decoder: Any) -> str:
    """The name of the decoder's key/value cache argument (``ValueError`` if it takes none)."""
    name = _cache_argument_of(type(decoder))
    if not name:
        raise ValueError(f"{type(decoder).__name__}.forward takes no key/value cache")
    return name


def supports_prefix_cache(model: Any) -> bool:
    """True when the decoder takes a cache and every layer attends to the whole sequence.

    Sliding-window or linear-attention layers keep other cache layouts; such models score
    without the prefix cache.
    """
    causal_lm, _ = split_peft(model)
    decoder = causal_lm.get_decoder()
    if not _cache_argument_of(type(decoder)):
        return False
    config = getattr(decoder, "config", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        return False
    return not getattr(config, "use_sliding_window", False)


def compute_prefix_states(model: Any, ids: Sequence[int], *, device: torch.device) -> PrefixStates:
    """Run ``ids`` alone (batch 1) through the decoder as the model stands (adapter selected)."""
    from transformers import DynamicCache

    causal_lm, _ = split_peft(model)
    decoder = causal_lm.get_decoder()
    cache = DynamicCache()
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {cache_argument(decoder): cache, "use_cache": True}
    decoder_hidden_states(model, input_ids, None, **kwargs)
    layers: list[Any] = list(cache.layers)
    return PrefixStates(
        tuple(ids), tuple(layer.keys for layer in layers), tuple(layer.values for layer in layers)
    )


class PrefixCache:
    """Prefix states per (adapter, prefix ids); the owner computes and stores missing ones.

    The owner drops an adapter's entries whenever that adapter name is attached or detached
    (a new adapter under an old name has other k/v projections) and everything when the model
    object changes (PEFT wrapping or unwrapping).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str | None, tuple[int, ...]], PrefixStates] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def adapters(self) -> set[str | None]:
        """The adapters (None = base) that have cached prefixes."""
        with self._lock:
            return {adapter for adapter, _ in self._entries}

    def get(self, adapter: str | None, ids: Sequence[int]) -> PrefixStates | None:
        """The cached states of ``ids`` under ``adapter``, if computed before."""
        return self._entries.get((adapter, tuple(ids)))

    def put(self, adapter: str | None, states: PrefixStates) -> None:
        """Keep ``states`` (computed with ``adapter`` selected)."""
        with self._lock:
            self._entries[(adapter, states.ids)] = states
        logger.debug("cached %d prefix tokens for adapter %s", states.length, adapter or "base")

    def drop(self, adapter: str | None) -> None:
        """Forget every prefix computed with ``adapter``."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == adapter]:
                del self._entries[key]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()


def _prefilled_cache(
    prefixes: Sequence[PrefixStates], rows: torch.Tensor | None, batch_size: int
) -> Any:
    from transformers import DynamicCache

    first = prefixes[0]
    # A fresh cache per forward (the decoder appends the suffix's states to it), filled through
    # the public constructor with the batch-1 states (a small copy) ...
    cache = DynamicCache(ddp_cache_data=list(zip(first.keys, first.values, strict=True)))
    layers: list[Any] = list(cache.layers)
    for index, layer in enumerate(layers):
        # ... then pointed at the batch's states: one prefix is an expanded view (no copy), several
        # are gathered by row. The decoder's concatenation with the suffix is then the only copy.
        if rows is None:
            layer.keys = first.keys[index].expand(batch_size, -1, -1, -1)
            layer.values = first.values[index].expand(batch_size, -1, -1, -1)
        else:
            layer.keys = torch.cat([p.keys[index] for p in prefixes]).index_select(0, rows)
            layer.values = torch.cat([p.values[index] for p in prefixes]).index_select(0, rows)
    return cache


def prefixed_label_logits(
    model: Any,
    batch: EncodedBatch,
    tokens: LabelTokens,
    prefixes: Sequence[PrefixStates],
    *,
    rows: torch.Tensor | None = None,
    adapter_names: list[str] | None = None,
    decoder_forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """``label_logits`` of full prompts whose first ``P`` tokens have cached states.

    ``batch`` holds the whole prompts (every row starts with its prefix; all prefixes have the
    same length ``P``); only the tokens after ``P`` run through the decoder. ``rows`` picks each
    row's entry of ``prefixes`` (``None``: the single prefix for every row). The label words'
    first tokens must be distinct (the collision fallback has no cached variant).
    """
    length = prefixes[0].length
    if any(p.length != length for p in prefixes) or not tokens.distinct:
        raise ValueError("prefixed scoring needs equal prefix lengths and distinct label tokens")
    causal_lm, peft_model = split_peft(model)
    decoder = causal_lm.get_decoder()
    cache = _prefilled_cache(prefixes, rows, len(batch))
    total = batch.input_ids.shape[1]
    positions = torch.arange(length, total, device=batch.input_ids.device)[None]
    kwargs: dict[str, Any] = {cache_argument(decoder): cache, "use_cache": True}
    _, hidden = decoder_hidden_states(
        model,
        batch.input_ids[:, length:],
        batch.attention_mask,  # prefix + suffix columns, as the cache expects
        adapter_names=adapter_names,
        decoder_forward=decoder_forward,
        position_ids=positions,
        **kwargs,
    )
    index = torch.arange(len(batch), device=hidden.device)
    return project_labels(causal_lm, hidden[index, batch.last_index - length], tokens)
