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


# ----------------------------------------------------------------------------- runtime choice on T


def _branch(fn: onnx.FunctionProto, prefix: str, name: str) -> onnx.GraphProto:
    """``fn``'s body as an ``If`` branch: internal names prefixed (subgraphs may not shadow)."""
    produced = {o for n in fn.node for o in n.output if o}
    rename = lambda v: prefix + v if v in produced else v  # noqa: E731
    nodes = []
    for n in fn.node:
        new = onnx.NodeProto()
        new.CopyFrom(n)
        del new.input[:]
        new.input.extend(rename(i) for i in n.input)
        del new.output[:]
        new.output.extend(rename(o) for o in n.output)
        nodes.append(new)
    outputs = [helper.make_tensor_value_info(rename(o), TensorProto.FLOAT, None) for o in fn.output]
    return helper.make_graph(nodes, name, [], outputs)


def choose_on_steps(node: onnx.NodeProto, short: onnx.FunctionProto, long: onnx.FunctionProto, max_short_steps: int, opset: int) -> onnx.FunctionProto:
    """One function that runs ``short`` when the runtime ``T <= max_short_steps``, else ``long``.

    Both bodies take the same inputs and return the same outputs.  The node count stays
    independent of T; a closed form guarded this way never builds a T x T matrix for a
    long sequence (``long`` is the O(T) exact scan).
    """
    b = OnnxBuilder("g")
    steps = b.node("Shape", ["x"], start=0, end=1)
    small = b.node("LessOrEqual", [b.node("Squeeze", [steps, _i64(b, [0])]), b.const_array(np.array(max_short_steps, dtype=np.int64))])
    outputs = list(short.output)
    b.nodes.append(helper.make_node("If", [small], outputs, then_branch=_branch(short, "s_", "short"), else_branch=_branch(long, "l_", "long")))
    return make_function(node, b.nodes, list(short.input), outputs, opset)


# ----------------------------------------------------------------------------- hoisting out of the scan

#: elementwise ops whose per-step application equals one application over the stacked steps
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "Cast",
                "Where", "Identity", "Sigmoid", "Neg", "Not", "And", "Or", "Constant"}


def hoist_out_of_scan(fn: onnx.FunctionProto) -> onnx.FunctionProto:
    """Move the per-step work that does not feed the recurrence out of the ``Scan``.

    In the exact neuron body, the spike of step t (e.g. ``g * H(v_t - theta)``) is computed
    from the new membrane but nothing at step t+1 reads it.  Such elementwise chains are
    computed once over the stacked ``[T, ...]`` membrane after the scan instead of T times
    on ``[B, ...]`` inside it: the same float operations on the same values (bit-identical
    results), but 3 fewer nodes per step, and onnxruntime's per-node overhead is what the
    scan costs on small layers.  Returns ``fn`` unchanged when nothing can be hoisted.
    """
    scans = [n for n in fn.node if n.op_type == "Scan"]
    if len(scans) != 1:
        return fn
    scan = scans[0]
    attrs = {a.name: a for a in scan.attribute}
    if set(attrs) - {"body", "num_scan_inputs"}:
        return fn  # axes / directions: keep the simple case only
    body = attrs["body"].g
    n_scan_in = attrs["num_scan_inputs"].i
    n_state = len(scan.input) - n_scan_in
    state_out = [o.name for o in body.output[:n_state]]
    seq_out = [o.name for o in body.output[n_state:]]
    body_inputs = {i.name for i in body.input}
    producer = {o: n for n in body.node for o in n.output}

    def ancestors(names):
        seen, stack = set(), list(names)
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.input)
        return seen

    recurrent = ancestors(state_out)
    hoisted_outputs = []  # indices into seq_out
    hoisted_nodes: dict[int, onnx.NodeProto] = {}
    leaves: set[str] = set()  # values of the recurrent path the hoisted chains read
    for j, name in enumerate(seq_out):
        chain = ancestors([name]) - recurrent
        nodes = [n for n in body.node if id(n) in chain]
        if not nodes or any(n.op_type not in _ELEMENTWISE for n in nodes):
            continue
        reads = {i for n in nodes for i in n.input if i and (i not in producer or id(producer[i]) not in chain)}
        if reads & body_inputs:
            continue  # reads the previous state or the step input: not a function of the outputs
        hoisted_outputs.append(j)
        hoisted_nodes.update({id(n): n for n in nodes})
        leaves |= {i for i in reads if i in producer}
    if not hoisted_outputs:
        return fn

    # the body: drop the hoisted chains and outputs, expose the leaves as new sequence outputs
    keep_seq = [j for j in range(len(seq_out)) if j not in hoisted_outputs]
    new_body_nodes = [n for n in body.node if id(n) not in hoisted_nodes]
    # loop-invariant leaves (constants) are copied after the scan, not stacked over time
    constants = {leaf for leaf in leaves if producer[leaf].op_type == "Constant"}
    leaves -= constants
    # a leaf already returned per step (membrane = Identity(v)) is read from that output
    exposed = {}
    for j in keep_seq:
        node = producer.get(seq_out[j])
        if node is not None and node.op_type == "Identity" and node.input[0] in leaves:
            exposed.setdefault(node.input[0], scan.output[n_state + j])
    leaf_list = sorted(leaves - set(exposed))
    leaf_out = {}
    for leaf in leaf_list:
        leaf_out[leaf] = f"hoist_{leaf}"
        new_body_nodes.append(helper.make_node("Identity", [leaf], [leaf_out[leaf]]))
    outputs = list(body.output[:n_state]) + [body.output[n_state + j] for j in keep_seq]
    # a state returned through an Identity of a body value: return the value itself (one copy less per step)
    output_names = {o.name for o in outputs}
    for k in range(n_state):
        node = producer.get(outputs[k].name)
        if node is not None and node.op_type == "Identity" and node.input[0] in producer and node.input[0] not in output_names:
            new_body_nodes.remove(node)
            output_names.add(node.input[0])
            outputs[k] = helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None)
    outputs += [helper.make_tensor_value_info(leaf_out[leaf], TensorProto.FLOAT, None) for leaf in leaf_list]
    new_body = helper.make_graph(new_body_nodes, body.name, list(body.input), outputs)

    # the scan node: same states, the kept outputs, then the stacked leaves
    outer_state_out = list(scan.output[:n_state])
    outer_seq = list(scan.output[n_state:])
    stacked = {leaf: f"hoisted_{leaf}" for leaf in leaf_list}
    new_scan = helper.make_node("Scan", list(scan.input), outer_state_out + [outer_seq[j] for j in keep_seq] + [stacked[leaf] for leaf in leaf_list],
                                num_scan_inputs=n_scan_in, body=new_body)

    # after the scan: the hoisted chains over [T, ...], body names prefixed
    rename = {**exposed, **{leaf: stacked[leaf] for leaf in leaf_list}}
    after = []
    for n in body.node:
        if n.output and n.output[0] in constants:
            const = onnx.NodeProto()
            const.CopyFrom(n)
            const.output[0] = f"h_{n.output[0]}"
            after.append(const)
        if id(n) not in hoisted_nodes:
            continue
        new = onnx.NodeProto()
        new.CopyFrom(n)
        del new.input[:]
        new.input.extend(rename.get(i, f"h_{i}" if i in producer else i) for i in n.input)
        del new.output[:]
        new.output.extend(f"h_{o}" for o in n.output)
        after.append(new)
    for j in hoisted_outputs:
        after.append(helper.make_node("Identity", [f"h_{seq_out[j]}"], [outer_seq[j]]))

    nodes = []
    for n in fn.node:
        nodes.extend([new_scan] + after if n is scan else [n])
    out = onnx.FunctionProto()
    out.CopyFrom(fn)
    del out.node[:]
    out.node.extend(nodes)
    return out
