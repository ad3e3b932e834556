"""CUDA graphs for small scoring batches, shared by every adapter through one LoRA slot.

A batch of one to a few pairs is launch-bound: the GPU finishes each of a forward's ~1,500
kernels long before Python has issued the next (BENCHMARKS.md, batch-1 profile). A CUDA graph
records the forward once per shape bucket (rows x padded length) and replays it with one launch.

Graphs record memory addresses, so they cannot follow PEFT from one adapter's weights to
another's. Instead the graphs are recorded with a **LoRA slot**: a rank-``R`` pair of float32
matrices beside every linear layer of the decoder, added to the layer's output by forward hooks
that exist only while a graph is recorded (PEFT's own LoRA layers are disabled then). Serving
adapter X copies X's ``A`` and ``scaling * B`` into the slot (zero-padded to rank ``R``; zeros
elsewhere, and everywhere for the bare base): a few fused copies on the GPU, no re-recording, so
hot swaps keep their graphs. The slot computes what PEFT's plain LoRA layer computes
(``result + B(A(x_fp32)) * scaling``, with PEFT's casts), exactly when the scaling is a power
of two (``alpha / r = 2``, the recipes' choice) and up to float rounding otherwise.

On a floating-point base (``NLI_DEQUANTIZE=1``, or an unquantized base) a **merged slot** is used
instead: a copy of every linear layer's weight, which the graphs read in place of the layer's
own. Serving adapter X writes ``W + scaling * B @ A`` into the copies (computed in float32, then
rounded once to the weight's dtype): the recorded forward is then the bare base's, with no LoRA
kernels at all, for any rank. It costs one more copy of the decoder's linear weights (SmolLM2:
~0.2 GB; a 1.5B model: ~2.6 GB) and a merge per adapter change (a few ms on a GPU); the scores
differ from PEFT's unmerged LoRA by the bf16 rounding of the merged weights.

Batch-1 latency is bound by kernel count, and the LoRA slot costs a few kernels per layer (casts,
two matmuls, an add). Sibling layers that read the same input (attention's q/k/v, the MLP's gate/up)
share the first half: their ``A`` matrices are views into one concatenated buffer, and the input
is cast and multiplied by it once per group; each member then applies its ``B`` to its slice.
Groups are guessed from names and checked at run time by the input's identity, so a wrong guess
only costs the sharing, never correctness.

Rows are right-padded and run without an attention mask: causal attention never lets a real
token see the padding that follows it, and only each row's last real position is read.

Only plain LoRA adapters on the decoder's linear layers (of rank <= ``R`` in the LoRA slot) use
the graphs; others (DoRA, LoRA on embeddings, higher ranks in the LoRA slot), mixed-adapter
batches and larger batches run eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from nli.scoring import LabelTokens, project_labels, split_peft

logger = logging.getLogger(__name__)

_BASE_SUFFIX = ".base_layer"


@dataclass(frozen=True)
class GraphSettings:
    """Which batches are graphed: up to ``max_batch`` rows (buckets 1, 2, 4, ...) and
    ``max_length`` tokens (buckets of ``length_step``); LoRA slot rank ``lora_rank``;
    ``merge``: use the merged slot where the base's weights are floating point."""

    max_batch: int = 64
    max_length: int = 256
    length_step: int = 32
    lora_rank: int = 64
    merge: bool = True

    def bucket(self, rows: int, longest: int) -> tuple[int, int] | None:
        """(rows, length) of the graph for a batch, or None when it is too large for one."""
        if rows < 1 or rows > self.max_batch or longest < 1 or longest > self.max_length:
            return None
        return self._rows(rows), self._length(longest)

    def buckets(self, max_tokens: int) -> list[tuple[int, int]]:
        """Every (rows, length) bucket for prompts of up to ``max_tokens`` tokens, shortest
        first (what ``NLIClassifier.record_graph`` records ahead of traffic)."""
        rows = sorted({self._rows(n) for n in range(1, self.max_batch + 1)})
        tokens = min(max_tokens, self.max_length)
        lengths = sorted({self._length(n) for n in range(1, tokens + 1)})
        return [(n, length) for length in lengths for n in rows]

    def _rows(self, rows: int) -> int:
        return min(1 << (rows - 1).bit_length(), self.max_batch)

    def _length(self, longest: int) -> int:
        return min(-(-longest // self.length_step) * self.length_step, self.max_length)


def slot_modules(decoder: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers, by name without PEFT's ``.base_layer`` (the same module
    object whether or not PEFT wraps it)."""
    found: dict[str, torch.nn.Linear] = {}
    for name, module in decoder.named_modules():
        if ".lora_" in f".{name}" or not isinstance(module, torch.nn.Linear):
            continue
        found[name.removesuffix(_BASE_SUFFIX)] = module
    return found


def lora_layers(decoder: torch.nn.Module) -> dict[str, Any]:
    """PEFT's LoRA layers in the decoder, by the name of the linear layer they wrap."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module for name, module in decoder.named_modules() if isinstance(module, LoraLayer)
    }


# Sibling layers that read the same input in Llama, Qwen2 and SmolLM2 decoders.
_SHARED_INPUT_NAMES = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
)


def input_groups(modules: dict[str, torch.nn.Linear]) -> list[list[str]]:
    """Groups of ``modules`` that should read the same input, in ``modules``' order: siblings
    (same parent) named like attention's q/k/v or the MLP's gate/up, with equal input widths.

    Only a guess from names: the slot's hooks check at run time that the input is shared.
    """
    found: dict[tuple[str, int, int], list[str]] = {}
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        for kind, names in enumerate(_SHARED_INPUT_NAMES):
            if leaf in names:
                found.setdefault((parent, kind, module.in_features), []).append(name)
    return [names for names in found.values() if len(names) > 1]


class _SharedDown:
    """One group's ``x_fp32 @ A_group^T``: computed once per input by a pre-hook on the group's
    first member, read by every member whose input is that very tensor.

    Held only until every member has read its slice (or the slot's hooks are removed), so the
    products of earlier layers do not pile up in a recorded graph's memory pool.
    """

    def __init__(self, a: torch.Tensor, rank: int, members: int) -> None:
        self.a = a  # [members * rank, in_features]
        self.rank = rank
        self.members = members
        self.input: torch.Tensor | None = None
        self.product: torch.Tensor | None = None
        self.unread = 0

    def pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.input = args[0]
        self.product = F.linear(args[0].to(self.a.dtype), self.a)
        self.unread = self.members

    def take(self, x: torch.Tensor, member: int) -> torch.Tensor | None:
        """Member ``member``'s ``x_fp32 @ A^T`` (a view), or None when ``x`` is not the input
        the product was computed from (the member then computes its own)."""
        if self.product is None or x is not self.input:
            return None
        down = self.product[..., member * self.rank : (member + 1) * self.rank]
        self.unread -= 1
        if self.unread == 0:
            self.clear()
        return down

    def clear(self) -> None:
        self.input = self.product = None


class _Slot:
    """What both slots share: the linear layers the graphs read through them, the adapter they
    hold, which adapters fit, and where those layers' weights were when the slot was made."""

    max_rank: int | None = None  # highest LoRA rank the slot holds (None: any)

    def __init__(self, modules: dict[str, torch.nn.Linear]) -> None:
        self.modules = modules
        self.holds: str | None = None  # the adapter the slot holds (None: the bare base)
        self._addresses = self._weight_addresses()

    def fit(self, layers: dict[str, Any], adapter: str) -> str | None:
        """Why ``adapter``'s LoRA layers cannot run in this slot, or None when they can."""
        for name, layer in layers.items():
            if adapter not in layer.lora_A:
                continue
            if name not in self.modules:
                return f"LoRA on {name}, which has no slot"
            if adapter in getattr(layer, "lora_variant", {}) or layer.merged:
                return f"{name} is not plain LoRA (DoRA or another variant, or merged)"
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            if not isinstance(a, torch.nn.Linear) or a.bias is not None or b.bias is not None:
                return f"{name} is not a plain LoRA linear pair"
            if self.max_rank is not None and a.weight.shape[0] > self.max_rank:
                return f"rank {a.weight.shape[0]} is above the slot's {self.max_rank}"
        return None

    def _weight_addresses(self) -> list[int]:
        return [m.weight.data_ptr() for m in self.modules.values()]

    def weights_moved(self) -> bool:
        """True when a module's weight is no longer where the graphs recorded it."""
        return self._weight_addresses() != self._addresses


class LoraSlot(_Slot):
    """Rank-``rank`` float32 LoRA weights beside each of ``modules``; see the module docstring.

    ``groups``: lists of modules that read the same input, whose ``A`` share one buffer and one
    matmul (default ``input_groups(modules)``; ``[]`` shares nothing).
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Linear],
        rank: int,
        device: torch.device,
        groups: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__(modules)
        self.rank = self.max_rank = rank
        self.groups = [list(g) for g in (input_groups(modules) if groups is None else groups)]
        self._shared: dict[str, tuple[_SharedDown, int]] = {}  # member -> its group, its index
        views: dict[str, torch.Tensor] = {}
        for names in self.groups:
            views.update(self._share(names, device))
        # A grouped module's A is a view into its group's buffer: load() writes it in place.
        self.a = {
            name: views[name]
            if name in views
            else torch.zeros(rank, m.in_features, dtype=torch.float32, device=device)
            for name, m in modules.items()
        }
        self.b = {
            name: torch.zeros(m.out_features, rank, dtype=torch.float32, device=device)
            for name, m in modules.items()
        }

    def _share(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """One concatenated A buffer ``[len(names) * rank, in]`` for a group of modules: each
        member's A, a view into it, by name."""
        widths = {self.modules[name].in_features for name in names}
        if len(widths) != 1 or len(set(names)) != len(names) or self._shared.keys() & set(names):
            raise ValueError(f"cannot share one input between {names}")
        a = torch.zeros(len(names) * self.rank, widths.pop(), dtype=torch.float32, device=device)
        shared = _SharedDown(a, self.rank, len(names))
        views = {}
        for index, name in enumerate(names):
            self._shared[name] = (shared, index)
            views[name] = a[index * self.rank : (index + 1) * self.rank]
        return views

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Add the slot's LoRA to every module's output while the block runs; a group's first
        member also computes the group's ``x_fp32 @ A_group^T`` (before its own forward)."""
        handles = []
        for name, module in self.modules.items():
            shared, index = self._shared.get(name, (None, 0))
            if shared is not None and index == 0:
                handles.append(module.register_forward_pre_hook(shared.pre_hook))
            hook = _slot_hook(
                self.a[name],
                self.b[name],
                add_in_output_dtype=_is_bnb(module),
                shared=None if shared is None else functools.partial(shared.take, member=index),
            )
            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for group, _ in self._shared.values():
                group.clear()  # no input or product outlives the block

    @torch.no_grad()
    def load(self, layers: dict[str, Any], adapter: str | None) -> None:
        """Hold ``adapter``'s weights (None: zeros, the bare base); ``fit`` must have passed."""
        everything = list(self.a.values()) + list(self.b.values())
        torch._foreach_zero_(everything)
        if adapter is not None:
            dst_a, src_a, dst_b, src_b, scales = [], [], [], [], []
            for name, layer in layers.items():
                if adapter not in layer.lora_A:
                    continue
                a = layer.lora_A[adapter].weight
                rank = a.shape[0]
                dst_a.append(self.a[name][:rank])
                src_a.append(a)
                dst_b.append(self.b[name][:, :rank])
                src_b.append(layer.lora_B[adapter].weight)
                scales.append(float(layer.scaling[adapter]))
            if dst_a:
                torch._foreach_copy_(dst_a, src_a)
                torch._foreach_copy_(dst_b, src_b)
                torch._foreach_mul_(dst_b, scales)
        self.holds = adapter


class MergedSlot(_Slot):
    """A copy of each of ``modules``' weights holding ``W + scaling * B @ A`` of one adapter (the
    plain ``W`` for the bare base); see the module docstring. Floating-point weights only."""

    def __init__(self, modules: dict[str, torch.nn.Linear]) -> None:
        if not self.supports(modules):
            raise ValueError("a merged slot needs floating-point linear layers")
        super().__init__(modules)
        with torch.no_grad():
            self.weights = {name: m.weight.detach().clone() for name, m in modules.items()}
        self._changed: set[str] = set()  # copies that differ from the base weight now

    @staticmethod
    def supports(modules: dict[str, torch.nn.Linear]) -> bool:
        return bool(modules) and all(
            not _is_bnb(m) and m.weight.dtype.is_floating_point for m in modules.values()
        )

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Every module computes with its merged copy while the block runs."""
        originals: dict[str, Any] = {}
        try:
            for name, module in self.modules.items():
                originals[name] = module.weight
                module.weight = torch.nn.Parameter(self.weights[name], requires_grad=False)
            yield
        finally:
            for name, weight in originals.items():
                self.modules[name].weight = weight

    @torch.no_grad()
    def load(self, layers: dict[str, Any], adapter: str | None) -> None:
        """Hold ``adapter`` merged (None: the base weights); ``fit`` must have passed."""
        merged = {
            name: layer
            for name, layer in layers.items()
            if adapter is not None and adapter in layer.lora_A
        }
        for name in self._changed - merged.keys():
            self.weights[name].copy_(self.modules[name].weight)
        for name, layer in merged.items():
            base = self.modules[name].weight
            update = torch.addmm(
                base.float(),
                layer.lora_B[adapter].weight.float(),
                layer.lora_A[adapter].weight.float(),
                alpha=float(layer.scaling[adapter]),
            )
            self.weights[name].copy_(update)
        self._changed = set(merged)
        self.holds = adapter


def _is_bnb(module: torch.nn.Module) -> bool:
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False
    return isinstance(module, (Linear4bit, Linear8bitLt))


def _slot_hook(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    add_in_output_dtype: bool,
    shared: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> Callable[..., torch.Tensor]:
    # ``shared`` gives this module's x_fp32 @ A^T from its group's one matmul when the input is
    # the group's (the same numbers up to matmul rounding); otherwise the module computes its own.
    # PEFT's LoRA layer for bitsandbytes bases casts the LoRA term to the output's dtype before
    # adding it (peft.tuners.lora.bnb); its plain Linear adds in float32 and casts the sum.
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        down = None if shared is None else shared(args[0])
        if down is None:
            down = F.linear(args[0].to(a.dtype), a)
        lora = F.linear(down, b)
        if add_in_output_dtype:
            return output + lora.to(output.dtype)
        return (output + lora).to(output.dtype)

    return hook


@dataclass
class _Graph:
    ids: torch.Tensor  # [rows, length] static input
    last: torch.Tensor  # [rows] static answer positions
    probs: torch.Tensor  # [rows, 3] static output
    replay: Callable[[], None]


T = TypeVar("T")
CaptureErrorMode = Literal["global", "thread_local", "relaxed"]


class GraphRecorder:
    """Records CUDA graphs into one memory pool shared by all of them (graphs replayed one at a
    time may share it: what one replay leaves behind is dead once it ends). Used by serving
    (``SmallBatchGraphs``) and training (``training.step_graphs``).

    Each recording first runs ``warm_up`` on a side stream: lazy initialisation (cuBLAS
    workspaces, compiled code for a new shape, autotuning) must not be recorded. The pool is
    created on the first recording, so building a recorder touches no GPU.
    """

    def __init__(self, *, capture_error_mode: CaptureErrorMode = "global") -> None:
        self.capture_error_mode = capture_error_mode
        self._pool: Any = None  # torch.cuda.graph_pool_handle()

    def record(
        self, body: Callable[[], T], *, warm_up: Callable[[], object], device: torch.device
    ) -> tuple[T, Callable[[], None]]:
        """Warm up, then record ``body`` into a new graph: (what ``body`` returned, the graph's
        replay). The returned tensors are the graph's outputs: each replay rewrites them."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm_up()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=self.capture_error_mode):
            out = body()
        return out, graph.replay


class SmallBatchGraphs:
    """Graphed scoring of small single-adapter batches (``NLIClassifier(cuda_graphs=True)``).

    ``record=False`` runs the same slot-and-bucket path eagerly (how the CPU tests check it).
    Not thread-safe: the classifier calls it under its forward lock.
    """

    def __init__(
        self, device: torch.device, settings: GraphSettings | None = None, *, record: bool = True
    ) -> None:
        self.device = device
        self.settings = settings or GraphSettings()
        self.record = record
        self._slot: LoraSlot | MergedSlot | None = None
        self._decoder: Any = None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._layers: dict[str, Any] | None = None  # PEFT's LoRA layers; walked again after forget
        self._recorder = GraphRecorder()
        self._unfit: dict[str, str] = {}  # adapter -> why it runs eagerly (logged once)
        self.broken: str | None = None  # why recording failed; the classifier stops using us

    def fits(self, rows: int, longest: int) -> bool:
        return self.broken is None and self.settings.bucket(rows, longest) is not None

    def forget(self, adapter: str | None = None, *, everything: bool = False) -> None:
        """An adapter is being attached or detached: its weights in the slot are stale, and the
        LoRA layers may change.

        ``everything``: PEFT wrapped or unwrapped the model. The graphs survive that (they hold
        the base layers, which PEFT keeps), unless a base weight moved: then they are dropped.
        """
        self._layers = None
        if self._slot is not None and (everything or self._slot.holds == adapter):
            self._slot.load({}, None)
        if everything:
            self._unfit.clear()
            if self._slot is not None and self._slot.weights_moved():
                logger.info("base weights moved: CUDA graphs will be recorded again")
                self._decoder = None
        elif adapter is not None:
            self._unfit.pop(adapter, None)

    @property
    def recorded(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def score(
        self,
        model: Any,
        seqs: Sequence[Sequence[int]],
        adapter: str | None,
        *,
        tokens: LabelTokens,
        pad_id: int,
        disable_peft: Callable[[], None],
    ) -> torch.Tensor | None:
        """Probabilities ``[rows, 3]`` on the device, or None when this batch must run eagerly.

        ``disable_peft`` turns PEFT's own LoRA layers off before a graph is recorded.
        """
        bucket = self.settings.bucket(len(seqs), max(map(len, seqs)))
        if bucket is None or self.broken is not None:
            return None
        causal_lm, _ = split_peft(model)
        decoder = causal_lm.get_decoder()
        if self._decoder is not decoder:
            self._reset(decoder)
        assert self._slot is not None
        if adapter is not None and adapter in self._unfit:
            return None
        if self._slot.holds != adapter:
            layers: dict[str, Any] = {}
            if adapter is not None:
                if self._layers is None:
                    self._layers = lora_layers(decoder)
                layers = self._layers
            why = None if adapter is None else self._slot.fit(layers, adapter)
            if why is not None:
                assert adapter is not None
                self._unfit[adapter] = why
                logger.info("adapter %s scores without CUDA graphs: %s", adapter, why)
                return None
            self._slot.load(layers, adapter)
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._make(causal_lm, decoder, bucket, tokens, disable_peft)
            if graph is None:
                return None
        rows, length = bucket
        ids = np.full((rows, length), pad_id, dtype=np.int64)
        last = np.zeros(rows, dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            last[row] = len(seq) - 1
        _copy_in(graph.ids, ids)
        _copy_in(graph.last, last)
        if not self.record:
            disable_peft()  # the eager stand-in runs PEFT's layers, which other batches enable
        graph.replay()
        return graph.probs[: len(seqs)].clone()

    def _reset(self, decoder: Any) -> None:
        self._graphs.clear()
        self._layers = None
        self._unfit.clear()
        self._decoder = decoder
        modules = slot_modules(decoder)
        # Normal tensors, not inference ones: attach/detach write them outside inference mode.
        with torch.inference_mode(False):
            if self.settings.merge and MergedSlot.supports(modules):
                self._slot = MergedSlot(modules)
                logger.info("CUDA-graph merged slot: %d linear layers", len(modules))
            else:
                self._slot = LoraSlot(modules, self.settings.lora_rank, self.device)
                logger.info(
                    "CUDA-graph LoRA slot: rank %d on %d linear layers",
                    self.settings.lora_rank,
                    len(modules),
                )

    def _make(
        self,
        causal_lm: Any,
        decoder: Any,
        bucket: tuple[int, int],
        tokens: LabelTokens,
        disable_peft: Callable[[], None],
    ) -> _Graph | None:
        assert self._slot is not None
        rows, length = bucket
        ids = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        last = torch.zeros(rows, dtype=torch.long, device=self.device)
        slot = self._slot

        # Every tensor a graph reads must outlive it: the static inputs live in _Graph, the
        # weights in the model and the slot; anything else is made inside the recording.
        def forward() -> torch.Tensor:
            with slot.hooked():
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            index = torch.arange(rows, device=ids.device)
            logits = project_labels(causal_lm, hidden[index, last], tokens)
            return torch.softmax(logits, dim=-1)

        disable_peft()
        if not self.record:
            holder = {"probs": forward()}

            def eager() -> None:
                holder["probs"].copy_(forward())

            graph = _Graph(ids, last, holder["probs"], eager)
            self._graphs[bucket] = graph
            return graph
        try:
            probs, replay = self._record(forward)
        except torch.OutOfMemoryError:
            raise  # the classifier retries smaller batches
        except RuntimeError as exc:
            self.broken = f"recording a CUDA graph failed: {exc}"
            logger.warning("%s; scoring without CUDA graphs from now on", self.broken)
            return None
        logger.info("recorded a CUDA graph for %d rows x %d tokens", rows, length)
        graph = _Graph(ids, last, probs, replay)
        self._graphs[bucket] = graph
        return graph

    def _record(
        self, forward: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, Callable[[], None]]:
        """Record ``forward`` into a CUDA graph: (its output, the graph's replay)."""

        def warm_up() -> None:
            for _ in range(2):
                forward()

        return self._recorder.record(forward, warm_up=warm_up, device=self.device)


def _copy_in(static: torch.Tensor, values: np.ndarray) -> None:
    source = torch.from_numpy(values)
    if static.device.type == "cuda":
        source = source.pin_memory()
    static.copy_(source, non_blocking=True)
