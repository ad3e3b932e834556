"""On a CPU, the adapter that keeps being asked for is scored with its LoRA merged into a copy of
the weights (``NLIClassifier(cpu_merge=True)``, the service's ``NLI_CPU_MERGE``).

For one pair on 2 CPU cores, PEFT's LoRA layers cost ~20-40 ms of an ~75-120 ms request: six
small operations on each of SmolLM2's 210 linear layers, each mostly dispatch overhead
(BENCHMARKS.md, "`/classify` on CPU"). ``nli.cuda_graphs.MergedSlot`` holds one adapter's
``W + scaling * B @ A`` in a copy of the linear weights; a batch of that adapter then runs the
bare base's forward on the copy, with PEFT's layers off, at the base's cost.

Merging costs ~180 ms on 2 CPU cores (SmolLM2), about what 5-8 requests spend in LoRA layers, so
it is bought only after renting: an adapter is merged once it has been the sole adapter of
``MERGE_AFTER`` batches in a row. Steady traffic (the default adapter, one client) pays one
merge; traffic that alternates between adapters never merges and never pays for it. Batches of
several adapters, of the bare base, and of adapters a merge cannot hold (DoRA, LoRA outside the
linear layers) take PEFT's path as before.

Floating-point bases only (``NLI_DEQUANTIZE=1`` or an unquantized base): bitsandbytes' packed
4-bit weights cannot hold a merge. The copy costs as much memory as the decoder's linear
weights (SmolLM2 in bf16: ~0.2 GB). Scores differ from PEFT's unmerged LoRA by the rounding of
the merged weights to the base's dtype, as on a GPU with the merged slot: for the shipped
adapter on SNLI dev rows 0-3,999, 87.98% merged against 87.95% unmerged, the same label for
3,973 of 4,000 pairs (``bench.merge_accuracy``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from nli.cuda_graphs import MergedSlot, lora_layers, slot_modules

logger = logging.getLogger(__name__)

MERGE_AFTER = 8


class SteadyMerge:
    """Which weights a single-adapter batch runs with: a merged copy, or PEFT's layers (None)."""

    def __init__(self, after: int = MERGE_AFTER) -> None:
        if after < 1:
            raise ValueError(f"after must be at least 1, not {after}")
        self.after = after
        self._lock = threading.Lock()  # the forward thread merges, attach/detach forget
        self._slot: MergedSlot | None = None
        self._decoder: Any = None  # the decoder whose linear layers the slot copied
        self._streak: tuple[str | None, int] = (None, 0)  # (adapter, batches in a row)
        self._unfit: set[str] = set()  # adapters a merge cannot hold (logged once)
        self.unsupported = False  # the base's weights are not floating point: never merge

    @property
    def holds(self) -> str | None:
        """The adapter merged now (None: none)."""
        slot = self._slot
        return None if slot is None else slot.holds

    def weights_for(self, decoder: Any, adapter: str | None) -> MergedSlot | None:
        """Count a batch of ``adapter`` (None: the bare base) and return the merged copy to run
        it with, merging first when its streak reaches ``after``; None for PEFT's path."""
        with self._lock:
            name, count = self._streak
            count = count + 1 if name == adapter else 1
            self._streak = (adapter, count)
            if adapter is None or self.unsupported or adapter in self._unfit:
                return None
            slot = self._slot if self._decoder is decoder else None
            if slot is not None and slot.holds == adapter:
                return slot
            if count < self.after:
                return None
            return self._merge(decoder, adapter, slot)

    def _merge(self, decoder: Any, adapter: str, slot: MergedSlot | None) -> MergedSlot | None:
        started = time.perf_counter()
        if slot is None:
            modules = slot_modules(decoder)
            if not MergedSlot.supports(modules):
                self.unsupported = True
                logger.info("CPU merge off: the base's linear weights are not floating point")
                return None
            with torch.inference_mode(False):
                slot = MergedSlot(modules)
            self._slot, self._decoder = slot, decoder
        layers = lora_layers(decoder)
        why = slot.fit(layers, adapter)
        if why is not None:
            self._unfit.add(adapter)
            logger.info("adapter %s scores through PEFT's layers on CPU: %s", adapter, why)
            return None
        with torch.inference_mode(False):
            slot.load(layers, adapter)
        logger.info(
            "merged adapter %s into a copy of the weights after %d batches in a row (%.0f ms)",
            adapter,
            self.after,
            (time.perf_counter() - started) * 1000,
        )
        return slot

    def forget(self, adapter: str | None, *, everything: bool = False) -> None:
        """``adapter`` is being attached or detached (``everything``: PEFT wrapped or unwrapped
        the model): drop a merge that may be stale, and the copy's memory with it."""
        with self._lock:
            self._streak = (None, 0)
            if everything:
                self._unfit.clear()
            elif adapter is not None:
                self._unfit.discard(adapter)
            if self._slot is not None and (everything or self._slot.holds == adapter):
                self._slot, self._decoder = None, None
