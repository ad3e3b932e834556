"""A ``torch.compile`` backend for tests that look at what Dynamo hands a compiler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class RecordingBackend:
    """Runs each graph as it was traced (like the ``"eager"`` backend) and keeps its inputs."""

    def __init__(self) -> None:
        self.inputs: list[Any] = []
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        self.inputs.extend(inputs)
        self.graphs.append(graph)
        return graph.forward

    def call_targets(self) -> list[str]:
        """What the recorded graphs' call nodes call, as text (e.g. ``bitsandbytes.gemm_4bit``)."""
        return [
            str(node.target)
            for graph in self.graphs
            for node in graph.graph.nodes
            if node.op.startswith("call_")
        ]

    def float_scalars(self) -> list[Any]:
        """Inputs that carry one Python float: a symbolic float, or the 0-d float64 tensor
        Dynamo lifts a Python float into. (A model's own 0-d tensors, such as a double-quantized
        NF4 layer's float32 offset, are real inputs: some torch releases pass them, some not.)"""
        return [
            x
            for x in self.inputs
            if isinstance(x, float | torch.SymFloat)
            or (isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64)
        ]
