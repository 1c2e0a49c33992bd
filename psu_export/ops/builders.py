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

    def add_zero_safe(self, a, b):
        """``a + b`` also where an operand is a constant zero (see :meth:`OnnxBuilder.add_zero_safe`)."""
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

    def unfired(self, a, threshold: float, compare: str):
        """``a - (a if H(a - threshold) else 0)`` (see :meth:`OnnxBuilder.unfired`)."""
        hit = a > threshold if compare == "gt" else a >= threshold
        return a - torch.where(hit, a, torch.zeros_like(a))


class OnnxBuilder:
    """Record the program as ONNX nodes; values are tensor names."""

    def __init__(self, prefix: str = "n"):
        self.nodes: list[onnx.NodeProto] = []
        self._names = (f"{prefix}{i}" for i in itertools.count())
        #: names of parameters known to hold one value: :meth:`per_neuron` broadcasts them as they are
        self.scalars: set[str] = set()

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

    def add_zero_safe(self, a, b):
        """``a + b`` as ``Sum``: onnxruntime rewrites ``Add(x, zero initializer)`` to ``x``
        (NoopElimination), which keeps a -0 that the addition turns into +0; ``Sum`` is kept."""
        return self.node("Sum", [a, b])

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

    def unfired(self, a, threshold: float, compare: str):
        """``a - ThresholdedRelu(a)``: ``a`` where ``H(a - threshold)`` is 0, else ``a - a``.

        ``ThresholdedRelu(a, alpha)`` is ``a`` where ``a > alpha`` and 0 elsewhere (NaN
        included); ``a >= threshold`` is ``a > alpha`` for ``alpha`` the float32 just below
        ``threshold``.  A constant threshold only: ``alpha`` is an attribute.
        """
        alpha = threshold if compare == "gt" else float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
        return self.sub(a, self.node("ThresholdedRelu", [a], alpha=alpha))


# ----------------------------------------------------------------------------- sequence programs
#
# The ops below extend both interpreters from elementwise programs to programs over a
# whole layer ``x[T, B, ...]`` flattened to ``[T, N]`` (time first, every other axis
# folded into N): time shifts, per-neuron parameters, a learned T x T product, the
# log-depth linear recurrence, and int64 arithmetic for the counter-based hash RNG
# (only Add/Mul/Div/Mod/Cast: the CUDA provider has no Bitwise*/BitShift kernels).


def doubling_level(b, v, pw, shift):
    """One level of the log-depth scan of ``v_t = d * v_{t-1} + y_t``: ``v_t += d^s * v_{t-s}``
    for ``t >= s`` (the first ``s`` steps are kept as they are).

    After the levels ``s = 1, 2, 4, ... < T`` (``pw = d^s``, squared each level) ``v``
    holds the recurrence's solution; a level with ``s >= T`` changes nothing.  Written once
    for both interpreters, so torch and onnxruntime do the same float operations in the
    same order.
    """
    return b.add_shifted(v, pw, shift), b.mul(pw, pw)


#: steps a chunk of :func:`chunked_linear_scan` runs one after the other
SCAN_CHUNK = 8
#: ``linear_scan`` runs :func:`chunked_linear_scan` on ``[T, N]`` of at least this many
#: elements and the plain doubling scan on smaller ones, whose cost is its nodes' count
#: rather than their passes over memory (onnxruntime, 2-core AVX2 CPU, session 17: the
#: chunked scan took 1.46x the doubling scan's time on 384 elements, 1.05x on 12,288,
#: 0.89x on 16,384, 0.47x on 256,000 and 0.22x on 8,192,000)
CHUNKED_SCAN_MIN_ELEMENTS = 16_384


def chunked_linear_scan(b, y, decay):
    """``v_t = decay * v_{t-1} + y_t`` (``v_{-1} = 0``) over ``y[T, N]`` in chunks of
    ``L = SCAN_CHUNK`` steps, written once for both interpreters.

    ``y`` is zero-padded to ``C = ceil(T / L)`` whole chunks, ``[C, L, N]``.  Inside every
    chunk at once, the recurrence from zero: ``z_0 = y_0``, ``z_j = decay * z_{j-1} + y_j``
    (``L - 1`` steps over ``[C, N]``).  Across chunks, the value at each chunk's end,
    ``c_k = decay^L * c_{k-1} + z_{k, L-1}``, by the doubling scan over the ``C`` chunk ends
    (:func:`doubling_level`, ``1 / L`` of the data).  Then ``v_{k, j} = z_{k, j} + decay^(j+1)
    * c_{k-1}`` (``c_{-1} = 0``), the powers by repeated multiplication.  About five passes
    over the run instead of the doubling scan's four per level (``log2 T`` levels), whose
    memory traffic made ``--reset psu`` slower than the exact ``Scan`` on a CPU
    (docs/ARCHITECTURE.md, "The reset ops' ONNX body").
    """
    steps = b.steps_of(y)
    chunks = b.chunk_steps(y, steps, SCAN_CHUNK)  # L values [C, 1, N]
    local, powers = [chunks[0]], [decay]
    for j in range(1, SCAN_CHUNK):
        local.append(b.add(b.mul(decay, local[-1]), chunks[j]))
        powers.append(b.mul(powers[-1], decay))
    ends = b.doubling_scan(b.drop_chunk_step_axis(local[-1]), powers[-1])  # [C, N]
    carried = b.add_chunk_step_axis(b.shift_time(ends, 1))  # [C, 1, N]: c_{k-1}, 0 for the first chunk
    v = b.add(b.concat_chunk_steps(local), b.mul(b.stack_chunk_powers(powers), carried))
    return b.unchunk_steps(v, steps)


def _torch_sequence_ops(cls):
    def flatten_time(self, x):
        return x.reshape(x.shape[0], -1)

    def unflatten_like(self, flat, x):
        return flat.reshape(x.shape)

    def per_neuron(self, param, x):
        # a scalar broadcasts; elementwise results are identical to the expanded form
        if param.numel() == 1:
            return param.reshape(())
        return param.expand(x.shape[1:]).reshape(-1)

    def shift_time(self, a, shift: int):
        return torch.nn.functional.pad(a[: max(a.shape[0] - shift, 0)], (0, 0, min(shift, a.shape[0]), 0))

    def first_step_add(self, a, c):
        return torch.cat([a[:1] + c, a[1:]])

    def add_shifted(self, v, pw, shift: int):
        steps = v.shape[0]
        return torch.cat([v[:shift], v[shift:] + pw * v[: max(steps - shift, 0)]])

    def doubling_scan(self, y, decay):
        """``v_t = decay * v_{t-1} + y_t`` (``v_{-1} = 0``) by :func:`doubling_level`."""
        v, pw, shift = y, decay, 1
        while shift < y.shape[0]:
            v, pw = doubling_level(self, v, pw, shift)
            shift *= 2
        return v

    def linear_scan(self, y, decay):
        """``v_t = decay * v_{t-1} + y_t`` (``v_{-1} = 0``) over ``y[T, N]``: chunked from
        :data:`CHUNKED_SCAN_MIN_ELEMENTS` elements, else by doubling (the ONNX body chooses alike)."""
        if y.numel() >= CHUNKED_SCAN_MIN_ELEMENTS:
            return chunked_linear_scan(self, y, decay)
        return self.doubling_scan(y, decay)

    def steps_of(self, y):
        return y.shape[0]

    def chunk_steps(self, y, steps, length: int):
        """``y[T, N]`` (``steps``: its T) zero-padded to whole chunks, as ``length`` values
        ``[C, 1, N]`` (step j of every chunk)."""
        padded = torch.nn.functional.pad(y, (0, 0, 0, -steps % length))
        return list(padded.reshape(-1, length, y.shape[1]).split(1, dim=1))

    def drop_chunk_step_axis(self, a):
        return a.squeeze(1)

    def add_chunk_step_axis(self, a):
        return a.unsqueeze(1)

    def concat_chunk_steps(self, parts):
        return torch.cat(parts, dim=1)

    def stack_chunk_powers(self, powers):
        """``[L, N]`` (or ``[L, 1]`` for a scalar decay) from L per-neuron values."""
        return torch.stack(powers).reshape(len(powers), -1)

    def unchunk_steps(self, v, steps):
        return v.reshape(-1, v.shape[2])[:steps]

    def learned_product(self, weight, bias, flat):
        """``(W[:T, :T] @ X) + b[:T]`` for a causal ``W`` of a fixed maximum T."""
        steps = flat.shape[0]
        return self.add(weight[:steps, :steps] @ flat, bias[:steps].unsqueeze(1))

    def const_int(self, value: int):
        return torch.tensor(int(value), dtype=torch.int64)

    def mod(self, a, b):
        return torch.remainder(a, b)

    def floordiv(self, a, b):
        return torch.div(a, b, rounding_mode="floor")

    def to_float(self, a):
        return a.to(torch.float32)

    def element_index(self, flat):
        return torch.arange(flat.numel(), dtype=torch.int64).reshape(flat.shape)

    for name, fn in list(locals().items()):
        if callable(fn) and name != "cls":
            setattr(cls, name, fn)
    return cls


_torch_sequence_ops(TorchBuilder)


def _i64(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


#: doubling levels written out as nodes before the ONNX ``Loop`` takes over: up to 256
#: chunk ends run no ``Loop`` iteration (measured when the doubling ran over every step: a
#: PSU net at T = 256, 0.26 ms with the ``Loop`` for every level, 0.20 ms unrolled); fewer
#: pass the extra levels as no-ops
UNROLLED_LEVELS = 8
#: the longest T whose :func:`chunked_linear_scan` runs no ``Loop`` iteration
LOOP_FREE_STEPS = SCAN_CHUNK * 2**UNROLLED_LEVELS


def _onnx_sequence_ops(cls):
    def _shape(self, x, start=None, end=None):
        attrs = {}
        if start is not None:
            attrs["start"] = start
        if end is not None:
            attrs["end"] = end
        return self.node("Shape", [x], **attrs)

    def _steps(self, a):
        """T of a ``[T, ...]`` tensor as an int64 ``[1]``."""
        return self._shape(a, 0, 1)

    def flatten_time(self, x):
        return self.node("Reshape", [x, self.node("Concat", [self._steps(x), self.const_array(_i64([-1]))], axis=0)])

    def unflatten_like(self, flat, x):
        return self.node("Reshape", [flat, self._shape(x)])

    def per_neuron(self, param, x):
        if param in self.scalars:  # as the torch builder: a scalar broadcasts to the same floats
            return param
        expanded = self.node("Expand", [param, self._shape(x, 1)])
        return self.node("Reshape", [expanded, self.const_array(_i64([-1]))])

    def shift_time(self, a, shift):
        """``shift`` is an int64 ``[1]`` name or a Python int (``1 <= shift <= T``)."""
        if isinstance(shift, int):
            shift = self.const_array(_i64([shift]))
        keep = self.node("Sub", [self._steps(a), shift])
        head = self.node("Slice", [a, self.const_array(_i64([0])), keep, self.const_array(_i64([0]))])
        pads = self.node("Concat", [shift, self.const_array(_i64([0, 0, 0]))], axis=0)
        return self.node("Pad", [head, pads, self.const(0.0)], mode="constant")

    def first_step_add(self, a, c):
        first = self.node("Slice", [a, self.const_array(_i64([0])), self.const_array(_i64([1])), self.const_array(_i64([0]))])
        rest = self.node("Slice", [a, self.const_array(_i64([1])), self.const_array(_i64([np.iinfo(np.int64).max])), self.const_array(_i64([0]))])
        return self.node("Concat", [self.add(first, c), rest], axis=0)

    def add_shifted(self, v, pw, shift):
        """``shift`` is a Python int or an int64 ``[1]`` name (inside the ``Loop``)."""
        start = self.const_array(_i64([shift])) if isinstance(shift, int) else shift
        back = self.const_array(_i64([-shift])) if isinstance(shift, int) else self.node("Neg", [shift])
        axis = self.const_array(_i64([0]))
        head = self.node("Slice", [v, self.const_array(_i64([0])), start, axis])
        tail = self.node("Slice", [v, start, self.const_array(_i64([np.iinfo(np.int64).max])), axis])
        earlier = self.node("Slice", [v, self.const_array(_i64([0])), back, axis])  # empty once shift >= T
        return self.node("Concat", [head, self.add(tail, self.mul(pw, earlier))], axis=0)

    def linear_scan(self, y, decay):
        """An ``If`` on ``y``'s element count between :func:`chunked_linear_scan` and
        :meth:`doubling_scan`, as the torch builder chooses."""
        large = self.node("GreaterOrEqual", [self.node("Size", [y]), self.const_int(CHUNKED_SCAN_MIN_ELEMENTS)])
        branches = {}
        for key, program in (("then_branch", chunked_linear_scan), ("else_branch", type(self).doubling_scan)):
            branch = OnnxBuilder(self.fresh() + "_")
            result = program(branch, y, decay)
            branches[key] = helper.make_graph(branch.nodes, key, [], [helper.make_tensor_value_info(result, TensorProto.FLOAT, None)])
        return self.node("If", [large], **branches)

    def steps_of(self, y):
        return self._steps(y)

    def chunk_steps(self, y, steps, length: int):
        size = self.const_array(_i64([length]))
        pad = self.node("Mod", [self.node("Sub", [size, self.node("Mod", [steps, size])]), size])
        pads = self.node("Concat", [self.const_array(_i64([0, 0])), pad, self.const_array(_i64([0]))], axis=0)
        padded = self.node("Pad", [y, pads, self.const(0.0)], mode="constant")
        chunked = self.node("Reshape", [padded, self.node("Concat", [self.const_array(_i64([-1, length])), self._shape(y, 1)], axis=0)])
        return self.node("Split", [chunked], n_out=length, axis=1, num_outputs=length)

    def drop_chunk_step_axis(self, a):
        return self.node("Squeeze", [a, self.const_array(_i64([1]))])

    def add_chunk_step_axis(self, a):
        return self.node("Unsqueeze", [a, self.const_array(_i64([1]))])

    def concat_chunk_steps(self, parts):
        return self.node("Concat", parts, axis=1)

    def stack_chunk_powers(self, powers):
        rows = [self.node("Unsqueeze", [p, self.const_array(_i64([0]))]) for p in powers]
        return self.node("Reshape", [self.node("Concat", rows, axis=0), self.const_array(_i64([len(powers), -1]))])

    def unchunk_steps(self, v, steps):
        flat = self.node("Reshape", [v, self.node("Concat", [self.const_array(_i64([-1])), self._shape(v, 2)], axis=0)])
        return self.node("Slice", [flat, self.const_array(_i64([0])), steps, self.const_array(_i64([0]))])

    def doubling_scan(self, y, decay):
        """The levels ``s < 2^UNROLLED_LEVELS`` of :func:`doubling_level` as plain nodes (a level
        with ``s >= T`` is a no-op), then one ONNX ``Loop`` over any further levels ``s < T``."""
        v, pw = y, decay
        for level in range(UNROLLED_LEVELS):
            v, pw = doubling_level(self, v, pw, 2**level)
        steps = self._steps(y)
        start = self.const_array(_i64([2**UNROLLED_LEVELS]))
        go = self.node("Squeeze", [self.node("Less", [start, steps]), self.const_array(_i64([0]))])
        body = OnnxBuilder(self.fresh() + "_")
        v_next, pw_next = doubling_level(body, "v_in", "pw_in", "s_in")
        s_out = body.node("Mul", ["s_in", body.const_array(_i64([2]))])
        cond = body.node("Squeeze", [body.node("Less", [s_out, steps]), body.const_array(_i64([0]))])
        outs = [body.node("Identity", [n]) for n in (cond, v_next, pw_next, s_out)]
        graph = helper.make_graph(
            body.nodes,
            "doubling_level",
            [helper.make_tensor_value_info("iter", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None), helper.make_tensor_value_info("pw_in", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("s_in", TensorProto.INT64, [1])],
            [helper.make_tensor_value_info(outs[0], TensorProto.BOOL, []), helper.make_tensor_value_info(outs[1], TensorProto.FLOAT, None),
             helper.make_tensor_value_info(outs[2], TensorProto.FLOAT, None), helper.make_tensor_value_info(outs[3], TensorProto.INT64, [1])],
        )
        result = self.node("Loop", ["", go, v, pw, start], n_out=3, body=graph)
        return result[0]

    def learned_product(self, weight, bias, flat):
        steps = self._steps(flat)
        zero2, axes2 = self.const_array(_i64([0, 0])), self.const_array(_i64([0, 1]))
        square = self.node("Slice", [weight, zero2, self.node("Concat", [steps, steps], axis=0), axes2])
        column = self.node("Unsqueeze", [self.node("Slice", [bias, self.const_array(_i64([0])), steps, self.const_array(_i64([0]))]), self.const_array(_i64([1]))])
        return self.add(self.node("MatMul", [square, flat]), column)

    def const_int(self, value: int):
        return self.node("Constant", [], value=helper.make_tensor(self.fresh(), TensorProto.INT64, [], [int(value)]))

    def mod(self, a, b):
        return self.node("Mod", [a, b], fmod=0)

    def floordiv(self, a, b):
        # operands are non-negative: integer Div (truncation) is floor division
        return self.node("Div", [a, b])

    def to_float(self, a):
        return self.node("Cast", [a], to=TensorProto.FLOAT)

    def element_index(self, flat):
        size = self.node("Size", [flat])
        index = self.node("Range", [self.const_int(0), size, self.const_int(1)])
        return self.node("Reshape", [index, self._shape(flat)])

    for name, fn in list(locals().items()):
        if callable(fn) and name != "cls":
            setattr(cls, name, fn)
    return cls


_onnx_sequence_ops(OnnxBuilder)


# ----------------------------------------------------------------------------- reproducible sigmoid

#: Taylor coefficients 1/k! of exp, highest first (Horner), and the squarings that undo the scaling
_EXP_DEGREE, _EXP_SQUARINGS, _SIGMOID_CLAMP = 12, 5, 40.0


def exact_sigmoid(b, a):
    """``1 / (1 + exp(-a))`` from Abs/Min/Mul/Add/Div/Where only, so it is bit-identical everywhere.

    ``torch.sigmoid`` and ONNX ``Sigmoid`` (and ``Exp``) are implemented differently by
    each library and provider and disagree in the last bits; this form uses only
    correctly rounded operations: ``E = exp(-min(|a|, 40))`` as a degree-12 Taylor
    polynomial of ``-|a| / 32`` squared five times, then ``1 / (1 + E)`` for ``a >= 0``
    and ``E / (1 + E)`` otherwise.  Max abs error vs. the true sigmoid: 5e-7.
    """
    import math

    y = b.mul(b.minimum(b.abs(a), b.const(_SIGMOID_CLAMP)), b.const(-(2.0**-_EXP_SQUARINGS)))
    e = b.const(1.0 / math.factorial(_EXP_DEGREE))
    for k in range(_EXP_DEGREE - 1, -1, -1):
        e = b.add(b.mul(e, y), b.const(1.0 / math.factorial(k)))
    for _ in range(_EXP_SQUARINGS):
        e = b.mul(e, e)
    denominator = b.add(b.const(1.0), e)
    return b.where_nonneg(a, b.div(b.const(1.0), denominator), b.div(e, denominator))


def _torch_sigmoid_ops(cls):
    cls.abs = lambda self, a: torch.abs(a)
    cls.minimum = lambda self, a, c: torch.minimum(a, c)
    cls.where_nonneg = lambda self, x, a, c: torch.where(x >= 0, a, c)
    return cls


def _onnx_sigmoid_ops(cls):
    cls.abs = lambda self, a: self.node("Abs", [a])
    cls.minimum = lambda self, a, c: self.node("Min", [a, c])
    cls.where_nonneg = lambda self, x, a, c: self.node("Where", [self.node("GreaterOrEqual", [x, self.const(0.0)]), a, c])
    return cls


_torch_sigmoid_ops(TorchBuilder)
_onnx_sigmoid_ops(OnnxBuilder)
