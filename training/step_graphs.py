"""CUDA graphs for the training step: forward, loss and backward recorded once per batch shape.

At the recipe's batch of 128 the 135M model's step is bound by Python, not by the GPU: even
with the decoder layers compiled, the GPU works ~30 ms of a ~150 ms step while the host issues
~1,700 matrix products and the fused kernels around them (BENCHMARKS.md, "CUDA graphs for the
training step"). A CUDA graph replays the whole forward and backward with one launch.

How it fits into training (``train.cuda_graphs``, ``NLITrainer.training_step``):

- One graph per batch shape (rows x padded length). Lengths are padded to a multiple of 8
  (``LabelCollator``): a whole 4-epoch SNLI run of the SmolLM2 recipe recorded 10. The first batch
  of a shape runs once eagerly (a warm-up: lazy initialisation and compilation must not be
  recorded), is recorded, then replayed; later batches of that shape only replay.
- Rows run with a plain causal mask (``causal_mask``) instead of their padding mask: they are
  right-padded, causal attention never lets a real token see the padding after it, and the loss
  reads only each row's answer position, so the padding reaches neither the loss nor the
  gradients. The mask is passed explicitly, 4-D, because transformers builds the mask
  differently while a CUDA graph records (no mask when it can check for padding, a materialised
  one while recording): compiled layers would recompile in the middle of the recording.
- The graphs share one memory pool. A replay's activations are dead once it ends (forward and
  backward are in the same graph), so every graph may reuse the same memory.
- Gradients: a graph writes each trainable parameter's gradient into buffers recorded with it.
  After a replay the parameters' ``.grad`` point at those buffers, so gradient clipping and the
  optimizer step (outside the graph, as before) read them as usual; ``zero_grad`` drops the
  references and the buffers stay with their graph. The returned loss is a copy, so the next
  replay cannot overwrite a loss still waiting to be logged.

Limits: one CUDA process (no DDP: gradient all-reduce hooks are not recorded), no gradient
accumulation (a replay overwrites gradients instead of adding to them), and the trainable
parameters must stay where they are (an in-place optimizer step; resuming loads weights before
the first step). Shapes past ``max_graphs`` and a failed recording train eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nli.cuda_graphs import GraphRecorder

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]


def causal_mask(length: int, device: torch.device | str) -> torch.Tensor:
    """A ``[1, 1, length, length]`` boolean causal mask (True: may attend), for every row.

    transformers passes a 4-D mask to the attention layers as it is, whether or not a CUDA graph
    is recording, so the warm-up and the recording run the same code.
    """
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


@dataclass
class _StepGraph:
    inputs: Batch
    loss: torch.Tensor
    grads: list[torch.Tensor | None]
    replay: Callable[[], None]


class StepGraphs:
    """Runs a training step's forward and backward through a CUDA graph per batch shape.

    ``run(loss_fn, batch)`` leaves the step's gradients in the parameters' ``.grad`` and returns
    the (detached) loss, as ``loss_fn(batch).backward()`` would. ``record=False`` keeps every
    bookkeeping step (static inputs, one set of gradient buffers per shape) but runs eagerly
    instead of recording: for tests on machines without a GPU.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        record: bool = True,
        max_graphs: int = 64,
    ) -> None:
        if not params:
            raise ValueError("no trainable parameters to record gradients for")
        self.params = list(params)
        self.record = record
        self.max_graphs = max_graphs
        self.broken: str | None = None
        self.eager_steps = 0
        self._graphs: dict[tuple[tuple[str, tuple[int, ...]], ...], _StepGraph] = {}
        # thread_local: the data loader's pinning thread may call CUDA during a recording.
        self._recorder = GraphRecorder(capture_error_mode="thread_local")

    @property
    def recorded(self) -> int:
        """How many shapes have a graph."""
        return len(self._graphs)

    def summary(self) -> dict[str, Any]:
        """What the report says: graphs recorded, steps run eagerly, why recording stopped."""
        return {"recorded": self.recorded, "eager_steps": self.eager_steps, "failed": self.broken}

    def run(self, loss_fn: LossFn, batch: Batch) -> torch.Tensor:
        """Forward, loss and backward of ``batch``; the detached loss.

        ``loss_fn`` must be pure GPU work on the tensors it is given (no host reads), and give
        the same computation for every batch of a shape.
        """
        if any(p.grad is not None for p in self.params):
            raise RuntimeError(
                "StepGraphs.run needs the gradients cleared (set to None) before each step: a "
                "replay overwrites gradients, it cannot add to them (gradient accumulation)"
            )
        key = tuple((name, tuple(value.shape)) for name, value in sorted(batch.items()))
        graph = self._graphs.get(key)
        if graph is None:
            if self.broken is not None or len(self._graphs) >= self.max_graphs:
                return self._eager(loss_fn, batch)
            graph = self._make(key, loss_fn, batch)
            if graph is None:
                return self._eager(loss_fn, batch)
        for name, value in batch.items():
            graph.inputs[name].copy_(value, non_blocking=True)
        graph.replay()
        for param, grad in zip(self.params, graph.grads, strict=True):
            param.grad = grad
        return graph.loss.detach().clone()

    def _eager(self, loss_fn: LossFn, batch: Batch) -> torch.Tensor:
        self.eager_steps += 1
        loss = loss_fn(batch)
        loss.backward()
        return loss.detach()

    def _make(
        self, key: tuple[tuple[str, tuple[int, ...]], ...], loss_fn: LossFn, batch: Batch
    ) -> _StepGraph | None:
        inputs = {name: value.clone() for name, value in batch.items()}
        try:
            graph = self._record(inputs, loss_fn) if self.record else self._emulate(inputs, loss_fn)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            self.broken = f"recording the training step failed: {exc}"
            logger.warning("%s; training eagerly from now on", self.broken)
            self._clear_grads()
            return None
        self._graphs[key] = graph
        shape = "x".join(str(size) for size in next(iter(batch.values())).shape)
        logger.info(
            "recorded the training step for batch shape %s (%d graphs)", shape, self.recorded
        )
        return graph

    def _record(self, inputs: Batch, loss_fn: LossFn) -> _StepGraph:
        def warm_up() -> None:
            # This step's real gradients come from the first replay, not from the warm-up.
            loss_fn(inputs).backward()
            self._clear_grads()

        def step() -> torch.Tensor:
            loss = loss_fn(inputs)
            loss.backward()
            return loss

        device = next(iter(inputs.values())).device
        loss, replay = self._recorder.record(step, warm_up=warm_up, device=device)
        grads = [p.grad for p in self.params]
        self._clear_grads()
        return _StepGraph(inputs, loss, grads, replay)

    def _emulate(self, inputs: Batch, loss_fn: LossFn) -> _StepGraph:
        """What ``_record`` builds, run eagerly: the same static inputs and gradient buffers."""
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(p) if p.requires_grad else None for p in self.params
        ]
        loss = torch.zeros((), device=next(iter(inputs.values())).device)

        def replay() -> None:
            step_loss = loss_fn(inputs)
            step_loss.backward()
            loss.copy_(step_loss.detach())
            for index, param in enumerate(self.params):
                buffer = grads[index]
                if param.grad is None or buffer is None:
                    grads[index] = None  # not reached by the loss: no gradient, as recorded
                else:
                    buffer.copy_(param.grad)
                param.grad = None

        return _StepGraph(inputs, loss, grads, replay)

    def _clear_grads(self) -> None:
        for param in self.params:
            param.grad = None
