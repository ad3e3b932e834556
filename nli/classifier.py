"""``NLIClassifier``: a loaded base model, its adapters, and batched scoring of pairs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nli import lora_fast_attach
from nli.cpu_merge import SteadyMerge
from nli.cuda_graphs import GraphSettings, SmallBatchGraphs
from nli.errors import AdapterConflictError, AdapterInvalidError, AdapterNotFoundError
from nli.layer_compile import LayerCompiledDecoder, compile_settings
from nli.loading import LoadedBase, free_device_memory, keep_cpu_packed_weights
from nli.manifest import (
    PEFT_CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterManifest,
    check_base_model,
    read_manifest,
)
from nli.prefix_cache import (
    PrefixCache,
    PrefixStates,
    cache_argument,
    compute_prefix_states,
    prefixed_label_logits,
    supports_prefix_cache,
)
from nli.prompt import CURRENT_PROMPT_FORMAT, PairEncoder, get_prompt_format
from nli.scoring import (
    PEFT_BASE_ROW,
    collate,
    label_logits,
    label_tokens,
    plan_batches,
    split_peft,
)

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
# PEFT states of NLIClassifier._select besides "base" (None) and an adapter name. The NUL byte
# keeps them apart from any adapter name.
_PER_ROW = "\x00per-row"
_UNKNOWN = "\x00unknown"


def _is_embedding_layer_key(key: str) -> bool:
    """A whole embedding layer saved beside the LoRA weights (``save_embedding_layers``)."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    module = key.removesuffix(".weight").removesuffix(".base_layer")
    return "lora_" not in key and module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES


CompileScope = Literal["layers", "decoder"]  # what NLIClassifier(compile=True) compiles


@dataclass
class LoadedAdapter:
    """An adapter attached to the base model under a PEFT adapter name."""

    name: str
    path: Path
    manifest: AdapterManifest
    encoder: PairEncoder


@dataclass
class ReadAdapter:
    """An adapter folder read and checked, not attached yet (``NLIClassifier.read_adapter``)."""

    path: Path
    manifest: AdapterManifest
    encoder: PairEncoder
    prepared: lora_fast_attach.PreparedLora | None  # None: PEFT loads (or refuses) it
    seconds: float  # time spent reading and checking


class NLIClassifier:
    """Scores (premise, hypothesis) pairs with the base model or any attached adapter.

    Adapter names here are PEFT adapter names; ``None`` means the bare base model. Attaching
    and detaching are not thread-safe with respect to scoring: callers that mix them (the
    service) serialise them. Scoring calls are serialised internally (a batch whose rows share
    one adapter selects it as PEFT's active adapter for its forward).

    Inference speed-ups, all exact up to floating-point noise:

    - ``prefix_cache``: the prompt template's opening tokens (``PairEncoder.prefix``) run once
      per adapter; each forward runs only the rest of every prompt (``nli.prefix_cache``).
    - ``compile``: ``torch.compile`` with dynamic shapes on CUDA (ignored on CPU), by
      ``compile_scope``: ``"layers"`` (default) compiles one decoder layer's forward and runs
      every layer through it (``nli.layer_compile``: one trace instead of one per layer);
      ``"decoder"`` compiles the decoder's whole forward (a cold compile several times longer).
      Attaching or detaching an adapter, or switching between adapters, changes the modules the
      compiled code guards on, so the next forward recompiles: meant for evaluation runs with a
      fixed adapter set, not for a service that hot-swaps adapters. Batches mixing adapters run
      eagerly.
    - ``cuda_graphs``: batches of up to ``graph_settings.max_batch`` rows that share one adapter
      replay a CUDA graph per shape bucket instead of launching each kernel
      (``nli.cuda_graphs``; CUDA only). Adapters reach the graphs through one LoRA slot, so
      attaching, detaching and switching adapters record nothing new.
    - ``encode_chunk_size``: ``score_pairs`` tokenises chunks of up to this many pairs on a
      background thread while the device scores the previous chunk (0: tokenise everything
      first); the first chunk is one batch, so scoring starts early (``encode_chunks``). The
      default (None) is 4096 on CUDA and 0 on CPU, where both would compete for the same cores.
    - ``cpu_merge``: on a CPU with a floating-point base, an adapter that has been the sole
      adapter of several batches in a row is merged into a copy of the linear weights and its
      batches skip PEFT's LoRA layers (``nli.cpu_merge``; up to the merged weights' rounding).
    """

    def __init__(
        self,
        base: LoadedBase,
        *,
        max_length: int = 512,
        max_batch_size: int = 64,
        max_tokens_per_batch: int = 16384,
        prefix_cache: bool = True,
        compile: bool = False,
        compile_scope: CompileScope = "layers",
        cuda_graphs: bool = False,
        graph_settings: GraphSettings | None = None,
        encode_chunk_size: int | None = None,
        cpu_merge: bool = False,
    ) -> None:
        self.base = base
        self.model: Any = base.model
        self.tokenizer = base.tokenizer
        self.tokens = label_tokens(base.tokenizer)
        self.max_length = max_length
        self.max_batch_size = max_batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        if encode_chunk_size is None:
            encode_chunk_size = 4096 if base.device.type == "cuda" else 0
        self.encode_chunk_size = encode_chunk_size
        self.base_encoder = PairEncoder(
            base.tokenizer, get_prompt_format(CURRENT_PROMPT_FORMAT), max_length=max_length
        )
        self.adapters: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()  # guards attach/detach against each other
        self._forward_lock = threading.Lock()  # adapter selection + forward are one step
        self._selected: str | None = _UNKNOWN  # the PEFT state last set by _select
        # (PeftModel, its LoRA layers) for lora_fast_attach; None after PEFT changed the model
        self._lora_index: tuple[Any, lora_fast_attach.LoraIndex | None] | None = None
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache and self.tokens.distinct and supports_prefix_cache(self.model):
            self.prefix_cache = PrefixCache()
        elif prefix_cache:
            logger.info(
                "prefix cache unavailable for this model or tokenizer: scoring whole prompts"
            )
        # (the decoder, its compiled forward), made on first use
        self._compiled: tuple[Any, Callable[..., Any]] | None = None
        self.compile = compile and self.device.type == "cuda"
        if compile_scope not in ("layers", "decoder"):
            raise ValueError(f"compile_scope must be 'layers' or 'decoder', not {compile_scope!r}")
        self.compile_scope: CompileScope = compile_scope
        if compile and not self.compile:
            logger.info(
                "compile=True ignored on %s: torch.compile is only used on CUDA", self.device
            )
        self.graphs: SmallBatchGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and self.tokens.distinct:
            self.graphs = SmallBatchGraphs(self.device, graph_settings)
        elif cuda_graphs:
            logger.info("cuda_graphs=True ignored: CUDA graphs need a CUDA device")
        self.cpu_merge: SteadyMerge | None = None
        if cpu_merge and self.device.type == "cpu":
            self.cpu_merge = SteadyMerge()

    @property
    def base_model(self) -> str:
        return self.base.ref.name

    @property
    def device(self) -> torch.device:
        return self.base.device

    # -- adapters ---------------------------------------------------------------------------

    def read_adapter(
        self, path: str | Path, *, name: str | None = None, weights: bytes | None = None
    ) -> ReadAdapter:
        """Read and check an adapter folder (manifest, base model, weights) without touching the
        model: callers that serialise attaching with scoring (the service) run this first, while
        the model still scores, and pass the result to ``attach_adapter``. ``name`` is the
        adapter's name in error messages (default: the folder's). ``weights``: the weights
        file's bytes, when the caller has read them already (the service hashes them); the
        fast attach then loads these instead of reading the file again (PEFT's fallback path
        reads the folder)."""
        started = time.perf_counter()
        path = Path(path)
        manifest = read_manifest(path)
        check_base_model(manifest, self.base.ref, adapter=name or path.name)
        encoder = PairEncoder(
            self.tokenizer, get_prompt_format(manifest.prompt_format), max_length=self.max_length
        )
        prepared = lora_fast_attach.prepare(path, weights=weights)
        return ReadAdapter(path, manifest, encoder, prepared, time.perf_counter() - started)

    def attach_adapter(
        self, path: str | Path, *, name: str, read: ReadAdapter | None = None
    ) -> LoadedAdapter:
        """Load an adapter folder under ``name`` after checking its manifest and base model.

        ``read``: the folder as ``read_adapter`` returned it (else it is read here first).
        A plain LoRA adapter whose target modules already hold LoRA layers (an earlier adapter
        of the same recipe) takes ``nli.lora_fast_attach``, which leaves the model as PEFT's
        ``load_adapter`` would; any other adapter, or one whose files do not fit, is loaded (or
        refused) through PEFT.
        """
        if read is None or read.path != Path(path):
            read = self.read_adapter(path, name=name)
        started = time.perf_counter()
        path, manifest, encoder, prepared = read.path, read.manifest, read.encoder, read.prepared
        with self._lock:
            if name in self.adapters:
                raise AdapterConflictError(f"adapter {name!r} is already attached")
            self._forget_prefixes(name)
            locked = time.perf_counter()
            fast = False
            try:
                fast = prepared is not None and self._attach_fast(prepared, name)
                if not fast:
                    self._attach_with_peft(path, name)
                    self.model.eval()
            except AdapterInvalidError:
                self._drop_partial(name)
                raise
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                self._drop_partial(name)
                raise AdapterInvalidError(
                    f"adapter {path.name!r} cannot be loaded: {exc}"
                ) from None
            loaded = LoadedAdapter(name, path, manifest, encoder)
            self.adapters[name] = loaded
        done = time.perf_counter()
        logger.info(
            "attached adapter %s from %s: read in %.1f ms, then %.1f ms (waiting %.1f, %s %.1f)",
            name,
            path,
            1000 * read.seconds,
            1000 * (done - started),
            1000 * (locked - started),
            "fast attach" if fast else "PEFT load",
            1000 * (done - locked),
        )
        return loaded

    def _attach_fast(self, prepared: lora_fast_attach.PreparedLora, name: str) -> bool:
        """``lora_fast_attach.attach`` on the current PeftModel; False where it does not apply."""
        _, peft_model = split_peft(self.model)
        if peft_model is None:
            return False  # the first adapter wraps the model: PEFT's from_pretrained
        if self._lora_index is None or self._lora_index[0] is not peft_model:
            self._lora_index = (peft_model, lora_fast_attach.build_index(peft_model))
        index = self._lora_index[1]
        if index is None or not lora_fast_attach.attach(index, prepared, name):
            return False
        if self.model.training:  # only the new LoRA modules were put in eval mode
            self.model.eval()
        return True

    def _attach_with_peft(self, path: Path, name: str) -> None:
        from peft import PeftModel

        self._lora_index = None  # PEFT may add LoRA layers or wrap the model anew
        _, peft_model = split_peft(self.model)
        if peft_model is None:
            self._forget_prefixes(None, everything=True)  # the model gets wrapped
            with keep_cpu_packed_weights(self.model):
                self.model = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=name, is_trainable=False
                )
        else:
            with keep_cpu_packed_weights(self.model):
                peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self._check_loaded_weights(path, name)

    def _check_loaded_weights(self, path: Path, name: str) -> None:
        """Refuse weights that do not hold exactly the adapter's tensors, or hold NaN/inf.

        PEFT (0.21) gives tensors missing from the file their fresh initial values and only
        warns, and ignores tensors it does not expect: either way the adapter would score with
        weights nobody trained.
        """
        from peft import get_peft_model_state_dict
        from safetensors import safe_open

        _, peft_model = split_peft(self.model)
        assert peft_model is not None  # an adapter was just attached
        # The adapter's tensors, named as PEFT saves them, picked from the parameters rather than
        # from state_dict(): on CPU that re-quantizes the 4-bit weights (keep_cpu_packed_weights).
        params = dict(peft_model.named_parameters())
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
            stored = set(handle.keys())
        # PEFT's default ("auto") asks the hub whether the base's vocabulary was resized, a network
        # call per load for a base named by id, when the file already says whether it holds the
        # embedding layers.
        loaded = get_peft_model_state_dict(
            peft_model,
            state_dict=params,
            adapter_name=name,
            save_embedding_layers=any(map(_is_embedding_layer_key, stored)),
        )
        missing = sorted(set(loaded) - stored)
        unexpected = sorted(stored - set(loaded))
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"{len(missing)} of its {len(loaded)} tensors are missing")
            if unexpected:
                problems.append(f"{len(unexpected)} tensors are not the adapter's")
            example = (missing or unexpected)[0]
            raise AdapterInvalidError(
                f"{path.name}: {WEIGHTS_FILE} does not match {PEFT_CONFIG_FILE}: "
                f"{'; '.join(problems)} (e.g. {example})"
            )
        if loaded:
            finite = torch.stack([torch.isfinite(t).all() for t in loaded.values()])
            if not bool(finite.all()):
                bad = next(k for k, ok in zip(loaded, finite.tolist(), strict=True) if not ok)
                raise AdapterInvalidError(f"{path.name}: {WEIGHTS_FILE} holds NaN or inf ({bad})")

    def detach_adapter(self, name: str) -> None:
        """Remove an adapter and free its weights. Detaching the last one unwraps the model."""
        with self._lock:
            if name not in self.adapters:
                raise AdapterNotFoundError(f"adapter {name!r} is not attached")
            _, peft_model = split_peft(self.model)
            del self.adapters[name]
            self._forget_prefixes(name, everything=not self.adapters)
            if peft_model is not None:
                if self.adapters:
                    if peft_model.active_adapter == name:
                        # Scoring may have made it the active one; hand that role on first, so
                        # PEFT does not warn about deleting its active adapter.
                        peft_model.set_adapter(next(iter(self.adapters)), inference_mode=True)
                    peft_model.delete_adapter(name)
                else:
                    # PEFT cannot delete its last adapter and stay usable: take the LoRA layers
                    # out and keep the bare base model instead.
                    self.model = peft_model.unload()
                    self._lora_index = None
            free_device_memory(self.device)
        logger.info("detached adapter %s", name)

    def _forget_prefixes(self, name: str | None, *, everything: bool = False) -> None:
        # Attaching or detaching changes PEFT's state behind _select's back, too.
        self._selected = _UNKNOWN
        if self.cpu_merge is not None:
            self.cpu_merge.forget(name, everything=everything)
        if self.graphs is not None:
            self.graphs.forget(name, everything=everything)
        if self.prefix_cache is None:
            return
        if everything:
            self.prefix_cache.clear()
        else:
            self.prefix_cache.drop(name)

    def _drop_partial(self, name: str) -> None:
        _, peft_model = split_peft(self.model)
        if peft_model is None or name not in peft_model.peft_config:
            return
        if len(peft_model.peft_config) > 1:
            peft_model.delete_adapter(name)
        else:
            self.model = peft_model.unload()
            self._lora_index = None

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
        encoder = self.encoder_for(adapter)
        chunk = self.encode_chunk_size
        if chunk < 1 or len(pairs) <= chunk:
            encoded = encoder.encode(pairs)
            return self.score_encoded(encoded, [adapter] * len(encoded), progress=progress)
        parts: list[tuple[np.ndarray, torch.Tensor]] = []
        # Tokenising the next chunk on a thread overlaps the GPU's work on this one (the fast
        # tokenizer releases the GIL, and so do torch ops while they wait on the GPU queue).
        # The first chunk is one batch, so the device starts after a batch's tokenising.
        bounds = encode_chunks(len(pairs), chunk, self.max_batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nli-encode") as pool:
            pending: Future[list[list[int]]] = pool.submit(encoder.encode, pairs[: bounds[0][1]])
            for index, (start, _) in enumerate(bounds):
                encoded = pending.result()
                if index + 1 < len(bounds):
                    begin, end = bounds[index + 1]
                    pending = pool.submit(encoder.encode, pairs[begin:end])
                for rows, probs in self._score_on_device(
                    encoded, [adapter] * len(encoded), progress=progress
                ):
                    parts.append((rows + start, probs))
        return self._to_host(len(pairs), parts)

    @torch.inference_mode()
    def record_graph(self, rows: int, length: int) -> bool:
        """Record the CUDA graph of the ``(rows, length)`` bucket now, unless it exists, so no
        request waits for its recording later. False when graphs are off, broken or the bucket
        is too large for one. Takes the forward lock once: requests interleave with recordings.
        """
        graphs = self.graphs
        if graphs is None or not graphs.fits(rows, length):
            return False
        bucket = graphs.settings.bucket(rows, length)
        if bucket not in graphs.recorded:
            # Any ids do: a graph is recorded for a shape, and the bare base needs no adapter.
            self._forward([[self.tokenizer.pad_token_id] * length] * rows, [None] * rows)
        return bucket in graphs.recorded

    def score_encoded(
        self,
        encoded: Sequence[Sequence[int]],
        adapters: Sequence[str | None],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Probabilities for already-encoded pairs; ``adapters`` names one adapter per row."""
        parts = self._score_on_device(encoded, adapters, progress=progress)
        return self._to_host(len(encoded), parts)

    @torch.inference_mode()
    def _score_on_device(
        self,
        encoded: Sequence[Sequence[int]],
        adapters: Sequence[str | None],
        *,
        progress: Callable[[int], None] | None,
    ) -> list[tuple[np.ndarray, torch.Tensor]]:
        """(row indices, probabilities on the device) per batch; nothing waits for the device."""
        batches = plan_batches(
            [len(seq) for seq in encoded],
            max_batch_size=self.max_batch_size,
            max_tokens=self.max_tokens_per_batch,
        )
        parts = []
        for rows in batches:
            parts.append(
                (np.asarray(rows, dtype=np.int64), self._score_rows(encoded, adapters, rows))
            )
            if progress is not None:
                progress(len(rows))
        return parts

    @staticmethod
    def _to_host(count: int, parts: list[tuple[np.ndarray, torch.Tensor]]) -> np.ndarray:
        """One device->host transfer for all batches, scattered back into input order."""
        out = np.zeros((count, 3), dtype=np.float32)
        if parts:
            order = np.concatenate([rows for rows, _ in parts])
            out[order] = torch.cat([probs for _, probs in parts]).cpu().numpy()
        return out

    def _score_rows(
        self, encoded: Sequence[Sequence[int]], adapters: Sequence[str | None], rows: list[int]
    ) -> torch.Tensor:
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
            return torch.cat([first, second])

    def _forward(self, seqs: list[Sequence[int]], adapters: list[str | None]) -> torch.Tensor:
        """Probabilities ``[rows, 3]``, left on the device."""
        distinct = set(adapters)
        for name in distinct:
            if name is not None and name not in self.adapters:
                raise AdapterNotFoundError(f"adapter {name!r} is not attached")
        graphs = self.graphs
        if (
            graphs is not None
            and len(distinct) == 1
            and graphs.fits(len(seqs), max(map(len, seqs)))
        ):
            with self._forward_lock:
                _, peft_model = split_peft(self.model)
                probs = graphs.score(
                    self.model,
                    seqs,
                    next(iter(distinct)),
                    tokens=self.tokens,
                    pad_id=self.tokenizer.pad_token_id,
                    disable_peft=lambda: self._select(peft_model, None),
                )
            if probs is not None:
                return probs
        batch = collate(seqs, pad_id=self.tokenizer.pad_token_id, device=self.device)
        with self._forward_lock:
            causal_lm, peft_model = split_peft(self.model)
            prefixes = self._prefixes_for(peft_model, seqs, adapters, distinct)
            names = None
            merged = None
            if peft_model is not None and len(distinct) > 1:
                names = [PEFT_BASE_ROW if name is None else name for name in adapters]
                self._select(peft_model, _PER_ROW)
            else:
                only = next(iter(distinct))
                if self.cpu_merge is not None and peft_model is not None:
                    merged = self.cpu_merge.weights_for(causal_lm.get_decoder(), only)
                # A merged adapter runs the base's forward on the merged copy: PEFT's layers off.
                self._select(peft_model, None if merged is not None else only)
            # Compiled code would retrace per mix of per-row adapters: mixed batches stay eager.
            forward = self._compiled_forward() if names is None else None
            with merged.hooked() if merged is not None else contextlib.nullcontext():
                logits = self._label_logits(batch, prefixes, names, forward)
        return torch.softmax(logits, dim=-1)

    def _label_logits(
        self,
        batch: Any,
        prefixes: tuple[list[PrefixStates], torch.Tensor | None] | None,
        names: list[str] | None,
        forward: Callable[..., Any] | None,
    ) -> torch.Tensor:
        """The label logits of one collated batch, from its cached prefixes where it has them."""
        if prefixes is None:
            return label_logits(
                self.model, batch, self.tokens, adapter_names=names, decoder_forward=forward
            )
        states, rows = prefixes
        return prefixed_label_logits(
            self.model,
            batch,
            self.tokens,
            states,
            rows=rows,
            adapter_names=names,
            decoder_forward=forward,
        )

    def _select(self, peft_model: Any | None, target: str | None) -> None:
        """Put PEFT in the state a batch needs: ``None`` base, an adapter name, or ``_PER_ROW``.

        A batch of one adapter runs PEFT's plain LoRA path with that adapter active (or with the
        adapter layers disabled, for the base) instead of the per-row path, which loops over the
        rows in Python and gathers sub-batches in every LoRA layer. The state persists, so a run
        of batches for one adapter pays for the switch once.
        """
        if peft_model is None or target == self._selected:
            return
        tuner = peft_model.base_model
        if target is None:
            tuner.disable_adapter_layers()
        else:
            was_enabled = self._selected not in (None, _UNKNOWN)
            if not was_enabled:
                tuner.enable_adapter_layers()
            if target != _PER_ROW or not was_enabled:
                # inference_mode also re-freezes the LoRA weights, which enabling marks trainable.
                active = peft_model.active_adapter if target == _PER_ROW else target
                peft_model.set_adapter(active, inference_mode=True)
        self._selected = target

    def _prefixes_for(
        self,
        peft_model: Any | None,
        seqs: list[Sequence[int]],
        adapters: list[str | None],
        distinct: set[str | None],
    ) -> tuple[list[PrefixStates], torch.Tensor | None] | None:
        """Cached prefix states for a batch and each row's entry, or None to score whole prompts.

        None when the cache is off, when the batch's prompt formats have prefixes of different
        lengths, or when a row does not start with its format's prefix (or has nothing after it).
        """
        if self.prefix_cache is None:
            return None
        order = sorted(distinct, key=lambda name: (name is not None, name or ""))
        prefix_ids = {name: self.encoder_for(name).prefix for name in order}
        if len({len(ids) for ids in prefix_ids.values()}) != 1:
            return None
        length = len(prefix_ids[order[0]])
        for seq, name in zip(seqs, adapters, strict=True):
            ids = prefix_ids[name]
            if len(seq) <= length or tuple(seq[:length]) != ids:
                return None
        states = []
        for name in order:
            found = self.prefix_cache.get(name, prefix_ids[name])
            if found is None:
                # Computed with the adapter selected, exactly as a batch of that adapter runs.
                self._select(peft_model, name)
                found = compute_prefix_states(self.model, prefix_ids[name], device=self.device)
                self.prefix_cache.put(name, found)
            states.append(found)
        if len(states) == 1:
            return states, None
        slot = {name: index for index, name in enumerate(order)}
        rows = torch.tensor([slot[name] for name in adapters], dtype=torch.long)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return states, rows.to(self.device, non_blocking=True)

    def _compiled_forward(self) -> Callable[..., Any] | None:
        if not self.compile:
            return None
        causal_lm, _ = split_peft(self.model)
        decoder = causal_lm.get_decoder()
        if self._compiled is None or self._compiled[0] is not decoder:
            logger.info(
                "compiling the decoder (%s, dynamic shapes); the first batch waits",
                "one shared layer forward" if self.compile_scope == "layers" else "whole forward",
            )
            forward: Callable[..., Any]
            if self.compile_scope == "layers":
                name = cache_argument(decoder) if self.prefix_cache is not None else ""
                forward = LayerCompiledDecoder(decoder, name)
            else:
                # Compiling the decoder module itself would be bypassed (callers reach its
                # forward through get_decoder()); compiling the bound forward takes effect.
                forward = _under_compile_settings(torch.compile(decoder.forward, dynamic=True))
            self._compiled = (decoder, forward)
        return self._compiled[1]


def encode_chunks(count: int, chunk: int, first: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the chunks ``score_pairs`` tokenises ``count`` pairs in: ``first``
    pairs (the device waits for them), then twice as many each time, up to ``chunk``. Scoring
    a chunk takes longer than tokenising one twice its size (SNLI test on H100 hosts: 35-77
    against 13-19 us a pair, compiled), so each next chunk is ready in time."""
    bounds = []
    start, size = 0, max(1, min(first, chunk))
    while start < count:
        end = min(count, start + size)
        bounds.append((start, end))
        start, size = end, min(chunk, 2 * size)
    return bounds


def _under_compile_settings(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled`` run under ``nli.layer_compile.compile_settings`` (Dynamo traces at a call)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        with compile_settings():
            return compiled(*args, **kwargs)

    return forward
