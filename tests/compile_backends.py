"""A ``torch.compile`` backend for tests that look at what Dynamo hands a compiler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class RecordingBackend:
    """Runs each graph as it was traced (like the ``"eager"`` backend) and keeps its inputs."""

    def __init__(self) -> None:
        self.inputs: list[Any] = []

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        self.inputs.extend(inputs)
        return graph.forward

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
