"""Time-axis building blocks for the ``psu`` neuron functions (ONNX bodies, standard ops).

* :func:`chunked_scan_function`: the exact recursion as a ``Scan`` over chunks of ``K``
  steps whose body is the step arithmetic (:func:`~psu_export.ops.neuron.exact_step`)
  unrolled ``K`` times.  Same float operations in the same order as the plain scan (the
  spikes stay bit-exact), but ``K`` times fewer ``Scan`` iterations: onnxruntime's CPU
  ``Scan`` costs tens of microseconds per iteration (slicing the inputs, copying state
  and outputs), which dominated small layers.  The input is padded with zeros to a
  multiple of ``K`` (the padded steps come after the real ones, so they cannot change
  them) and the outputs are cut back to ``T``: the node count does not depend on ``T``
  and any ``T`` is accepted.
* :func:`chunked_closed_form`: reset-free neurons with a scalar decay without a ``T x T``
  matrix: ``C x C`` Toeplitz blocks (one batched product) plus a carry between blocks
  solved by a scan over ``T / C`` blocks, O(T C N) work and O(C^2 + T N) memory, so it
  handles 100,000 steps.  Used by the torch kernel for long sequences.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .builders import OnnxBuilder
from .registry import make_function


def _i64(b: OnnxBuilder, values) -> str:
    return b.const_array(np.array(values, dtype=np.int64))


def chunked_scan_function(node: onnx.NodeProto, o, opset: int, chunk: int) -> onnx.FunctionProto:
    """Body of an exact neuron op as a ``Scan`` over chunks of ``chunk`` unrolled steps.

    ``o`` is the op's :class:`~psu_export.ops.neuron.StepOptions`.  Inputs ``x`` ``[T, ...]``
    and the parameters (``o.param_names``); outputs spikes, membrane (, current).
    """
    from .neuron import exact_step  # the one definition of a step's arithmetic

    inputs = ["x", *o.param_names]
    b = OnnxBuilder("f")
    k = _i64(b, [chunk])
    x_shape = b.node("Shape", ["x"])
    steps = b.node("Shape", ["x"], start=0, end=1)
    step_shape = b.node("Shape", ["x"], start=1)
    n_chunks = b.node("Div", [b.node("Add", [steps, _i64(b, [chunk - 1])]), k])
    padded = b.node("Mul", [n_chunks, k])
    pad_len = b.node("Sub", [padded, steps])
    # pad along time on a [T, M] view (rank-independent), then split time into chunks
    flat = b.node("Reshape", ["x", b.node("Concat", [steps, _i64(b, [-1])], axis=0)])
    pads = b.node("Concat", [_i64(b, [0, 0]), pad_len, _i64(b, [0])], axis=0)
    flat = b.node("Pad", [flat, pads], mode="constant")
    xc = b.node("Reshape", [flat, b.node("Concat", [n_chunks, k, step_shape], axis=0)])
    state_shape = b.node("Concat", [_i64(b, [1]), step_shape], axis=0)
    states = ([b.node("Expand", ["i_init", state_shape])] if o.two_state else []) + [b.node("Expand", ["v_init", state_shape])]

    body = OnnxBuilder("b")
    p = {name: name for name in o.param_names}
    xs = body.node("Split", ["x_c"], n_out=chunk, axis=0, num_outputs=chunk) if chunk > 1 else ["x_c"]
    v, i = "v_prev", ("i_prev" if o.two_state else None)
    spikes, membranes, currents = [], [], []
    for x_t in xs:
        v, i, s = exact_step(body, o, p, v, i, x_t)
        spikes.append(s)
        membranes.append(v)
        currents.append(i)

    def stacked(values):
        return body.node("Concat", values, axis=0) if len(values) > 1 else body.node("Identity", values)

    seq_out = [stacked(spikes), stacked(membranes)] + ([stacked(currents)] if o.two_state else [])
    state_out = ([body.node("Identity", [i])] if o.two_state else []) + [body.node("Identity", [v])]
    state_in = (["i_prev"] if o.two_state else []) + ["v_prev"]
    graph = helper.make_graph(
        body.nodes,
        "chunk",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in state_in + ["x_c"]],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in state_out + seq_out],
    )
    scan_out = [b.fresh() for _ in states] + [b.fresh() for _ in seq_out]
    b.nodes.append(helper.make_node("Scan", states + [xc], scan_out, num_scan_inputs=1, body=graph))
    names = ["spikes", "membrane"] + (["current"] if o.two_state else [])
    padded_shape = b.node("Concat", [padded, step_shape], axis=0)
    for name, value in zip(names, scan_out[len(states):]):
        full = b.node("Reshape", [value, padded_shape])
        b.nodes.append(helper.make_node("Slice", [full, _i64(b, [0]), steps, _i64(b, [0])], [name]))
    del x_shape
    return make_function(node, b.nodes, inputs, names, opset)


# ----------------------------------------------------------------------------- torch: long sequences


def chunked_closed_form(x: torch.Tensor, decay: torch.Tensor, v0: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``v_t = decay * v_{t-1} + x_t`` (scalar decay) for ``x`` ``[T, ...]`` without a T x T matrix.

    Blocks of ``block`` steps: inside a block one ``[C, C]`` Toeplitz product, between blocks
    a carry ``v_end(m) = local_end(m) + decay^C v_end(m-1)``.  O(T C N) work.
    """
    steps = x.shape[0]
    if steps == 0:
        return x.clone()
    c = min(block, steps)
    n_blocks = -(-steps // c)
    flat = x.reshape(steps, -1)
    if n_blocks * c != steps:
        flat = torch.cat([flat, flat.new_zeros(n_blocks * c - steps, flat.shape[1])])
    d = decay.reshape(())
    idx = torch.arange(c)
    diff = idx[:, None] - idx[None, :]
    kernel = torch.where(diff >= 0, d ** diff.clamp(min=0).to(torch.float32), torch.zeros(()))
    local = torch.matmul(kernel, flat.reshape(n_blocks, c, -1))  # [M, C, N]
    powers = d ** torch.arange(1, c + 1, dtype=torch.float32)  # decay^(j+1)
    carry = v0.expand(x.shape[1:]).reshape(-1).to(flat.dtype)
    out = torch.empty_like(local)
    for m in range(n_blocks):
        out[m] = local[m] + powers[:, None] * carry
        carry = out[m, -1]
    return out.reshape(n_blocks * c, *x.shape[1:])[:steps]
