"""Two interpreters for elementwise tensor programs: eager torch and ONNX nodes.

A custom op writes its per-element arithmetic once, against the small interface below;
:class:`TorchBuilder` runs it on tensors (the rewritten PyTorch model and the checker's
reference) and :class:`OnnxBuilder` records the same operations, in the same order, as
ONNX nodes (the body of the op's model-local function).  Same operations in the same
order means torch and onnxruntime compute the same floats.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper


class TorchBuilder:
    """Evaluate the program eagerly on float32 torch tensors."""

    def const(self, value: float):
        return torch.tensor(value, dtype=torch.float32)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def sigmoid(self, a):
        return torch.sigmoid(a)

    def step(self, a, b, compare: str):
        """Heaviside of ``a - b`` as float: 1 where ``a > b`` (``gt``) or ``a >= b`` (``ge``)."""
        hit = a > b if compare == "gt" else a >= b
        return hit.to(torch.float32)


class OnnxBuilder:
    """Record the program as ONNX nodes; values are tensor names."""

    def __init__(self, prefix: str = "n"):
        self.nodes: list[onnx.NodeProto] = []
        self._names = (f"{prefix}{i}" for i in itertools.count())

    def fresh(self) -> str:
        return next(self._names)

    def node(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: float) -> str:
        tensor = helper.make_tensor(self.fresh(), TensorProto.FLOAT, [], [float(value)])
        return self.node("Constant", [], value=tensor)

    def const_array(self, array: np.ndarray) -> str:
        return self.node("Constant", [], value=onnx.numpy_helper.from_array(np.asarray(array), self.fresh()))

    def add(self, a, b):
        return self.node("Add", [a, b])

    def sub(self, a, b):
        return self.node("Sub", [a, b])

    def mul(self, a, b):
        return self.node("Mul", [a, b])

    def div(self, a, b):
        return self.node("Div", [a, b])

    def sigmoid(self, a):
        return self.node("Sigmoid", [a])

    def step(self, a, b, compare: str):
        hit = self.node("Greater" if compare == "gt" else "GreaterOrEqual", [a, b])
        return self.node("Cast", [hit], to=TensorProto.FLOAT)
