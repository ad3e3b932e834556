"""``NLIClassifier``: a loaded base model, its adapters, and batched scoring of pairs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nli.errors import AdapterConflictError, AdapterInvalidError, AdapterNotFoundError
from nli.loading import LoadedBase, free_device_memory, keep_cpu_packed_weights
from nli.manifest import AdapterManifest, check_base_model, read_manifest
from nli.prompt import CURRENT_PROMPT_FORMAT, PairEncoder, get_prompt_format
from nli.scoring import PEFT_BASE_ROW, collate, label_logits, label_tokens, plan_batches, split_peft

logger = logging.getLogger(__name__)

Pair = tuple[str, str]


@dataclass
class LoadedAdapter:
    """An adapter attached to the base model under a PEFT adapter name."""

    name: str
    path: Path
    manifest: AdapterManifest
    encoder: PairEncoder


class NLIClassifier:
    """Scores (premise, hypothesis) pairs with the base model or any attached adapter.

    Adapter names here are PEFT adapter names; ``None`` means the bare base model. Attaching
    and detaching are not thread-safe with respect to scoring: callers that mix them (the
    service) serialise them; read-only concurrent scoring is the caller's choice too.
    """

    def __init__(
        self,
        base: LoadedBase,
        *,
        max_length: int = 512,
        max_batch_size: int = 64,
        max_tokens_per_batch: int = 16384,
    ) -> None:
        self.base = base
        self.model: Any = base.model
        self.tokenizer = base.tokenizer
        self.tokens = label_tokens(base.tokenizer)
        self.max_length = max_length
        self.max_batch_size = max_batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.base_encoder = PairEncoder(
            base.tokenizer, get_prompt_format(CURRENT_PROMPT_FORMAT), max_length=max_length
        )
        self.adapters: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()  # guards attach/detach against each other

    @property
    def base_model(self) -> str:
        return self.base.ref.name

    @property
    def device(self) -> torch.device:
        return self.base.device

    # -- adapters ---------------------------------------------------------------------------

    def attach_adapter(self, path: str | Path, *, name: str) -> LoadedAdapter:
        """Load an adapter folder under ``name`` after checking its manifest and base model."""
        from peft import PeftModel

        path = Path(path)
        manifest = read_manifest(path)
        check_base_model(manifest, self.base.ref, adapter=name)
        encoder = PairEncoder(
            self.tokenizer, get_prompt_format(manifest.prompt_format), max_length=self.max_length
        )
        with self._lock:
            if name in self.adapters:
                raise AdapterConflictError(f"adapter {name!r} is already attached")
            try:
                _, peft_model = split_peft(self.model)
                if peft_model is None:
                    with keep_cpu_packed_weights(self.model):
                        self.model = PeftModel.from_pretrained(
                            self.model, str(path), adapter_name=name, is_trainable=False
                        )
                else:
                    with keep_cpu_packed_weights(self.model):
                        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                self._drop_partial(name)
                raise AdapterInvalidError(f"adapter {name!r} cannot be loaded: {exc}") from None
            self.model.eval()
            loaded = LoadedAdapter(name, path, manifest, encoder)
            self.adapters[name] = loaded
        logger.info("attached adapter %s from %s", name, path)
        return loaded

    def detach_adapter(self, name: str) -> None:
        """Remove an adapter and free its weights. Detaching the last one unwraps the model."""
        with self._lock:
            if name not in self.adapters:
                raise AdapterNotFoundError(f"adapter {name!r} is not attached")
            _, peft_model = split_peft(self.model)
            del self.adapters[name]
            if peft_model is not None:
                if self.adapters:
                    peft_model.delete_adapter(name)
                else:
                    # PEFT cannot delete its last adapter and stay usable: take the LoRA layers
                    # out and keep the bare base model instead.
                    self.model = peft_model.unload()
            free_device_memory(self.device)
        logger.info("detached adapter %s", name)

    def _drop_partial(self, name: str) -> None:
        _, peft_model = split_peft(self.model)
        if peft_model is None or name not in peft_model.peft_config:
            return
        if len(peft_model.peft_config) > 1:
            peft_model.delete_adapter(name)
        else:
            self.model = peft_model.unload()

    def encoder_for(self, adapter: str | None) -> PairEncoder:
        """The prompt encoder an adapter was trained with (the current format for the base)."""
        if adapter is None:
            return self.base_encoder
        try:
            return self.adapters[adapter].encoder
        except KeyError:
            raise AdapterNotFoundError(f"adapter {adapter!r} is not attached") from None

    # -- scoring ----------------------------------------------------------------------------

    def encode(self, pairs: Sequence[Pair], adapter: str | None = None) -> list[list[int]]:
        """Token ids of each pair in the prompt format of ``adapter``."""
        return self.encoder_for(adapter).encode(pairs)

    def score_pairs(
        self,
        pairs: Sequence[Pair],
        adapter: str | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Probabilities ``[N, 3]`` (label order) for each pair, with one adapter or the base."""
        encoded = self.encode(pairs, adapter)
        return self.score_encoded(encoded, [adapter] * len(encoded), progress=progress)

    @torch.inference_mode()
    def score_encoded(
        self,
        encoded: Sequence[Sequence[int]],
        adapters: Sequence[str | None],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Probabilities for already-encoded pairs; ``adapters`` names one adapter per row."""
        out = np.zeros((len(encoded), 3), dtype=np.float32)
        batches = plan_batches(
            [len(seq) for seq in encoded],
            max_batch_size=self.max_batch_size,
            max_tokens=self.max_tokens_per_batch,
        )
        for rows in batches:
            probs = self._score_rows(encoded, adapters, rows)
            out[rows] = probs
            if progress is not None:
                progress(len(rows))
        return out

    def _score_rows(
        self, encoded: Sequence[Sequence[int]], adapters: Sequence[str | None], rows: list[int]
    ) -> np.ndarray:
        try:
            return self._forward([encoded[i] for i in rows], [adapters[i] for i in rows])
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
            free_device_memory(self.device)
            half = len(rows) // 2
            logger.warning("out of memory on a batch of %d: retrying as two halves", len(rows))
            first = self._score_rows(encoded, adapters, rows[:half])
            second = self._score_rows(encoded, adapters, rows[half:])
            return np.concatenate([first, second])

    def _forward(self, seqs: list[Sequence[int]], adapters: list[str | None]) -> np.ndarray:
        for name in set(adapters):
            if name is not None and name not in self.adapters:
                raise AdapterNotFoundError(f"adapter {name!r} is not attached")
        batch = collate(seqs, pad_id=self.tokenizer.pad_token_id, device=self.device)
        _, peft_model = split_peft(self.model)
        names = None
        if peft_model is not None:
            names = [PEFT_BASE_ROW if name is None else name for name in adapters]
        logits = label_logits(self.model, batch, self.tokens, adapter_names=names)
        return torch.softmax(logits, dim=-1).cpu().numpy()
