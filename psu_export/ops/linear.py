"""Graph passes over the ``psu`` neuron functions (ONNX bodies, standard ops).

* :func:`choose_on_steps`: an ``If`` on the runtime T between a short-sequence body
  (the T x T closed form) and a long one (the exact scan): any T runs, no T x T matrix is
  built past the limit.
* :func:`hoist_out_of_scan`: work in the ``Scan`` body that does not feed the recurrence
  (e.g. the spike test of the new membrane) runs once over all steps after the scan.
* :func:`recompute_sequence_identities`: a per-step copy of a value that is both the next
  state and a per-step output is replaced by recomputing its last operation once over the
  stacked operands (bit-identical floats, one node fewer per step).
* :func:`keep_outputs`: a function specialised to the outputs its call site reads (a
  hidden layer's membrane is never read): the scan stops stacking what only they needed.
* :func:`carry_state_functions`: a function of the state that step t+1 recomputes from the
  state step t already applied it to (snnTorch's reset test ``H(v_{t-1} - theta)`` is the
  spike test of step t-1) is carried as a state instead (bit-identical, fewer nodes per step).
* :func:`read_static_drive`: a layer fed one step's input at every step reads that step
  from the outer scope instead of a stacked ``[T, B, ...]`` copy.

Measured and dropped (benchmarks on the 2-core CPU): unrolling K steps per ``Scan``
iteration (14-36% slower at batch 1), and ``Where`` instead of ``Cast`` x parameter in the
body (about 10% slower at batch 1).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .builders import OnnxBuilder
from .registry import make_function


def _i64(b: OnnxBuilder, values) -> str:
    return b.const_array(np.array(values, dtype=np.int64))


def _branch(fn: onnx.FunctionProto, prefix: str, name: str) -> onnx.GraphProto:
    """``fn``'s body as an ``If`` branch: internal names prefixed (subgraphs may not shadow)."""
    produced = {o for n in fn.node for o in n.output if o}
    rename = lambda v: prefix + v if v in produced else v  # noqa: E731
    nodes = []
    for n in fn.node:
        nodes.append(_copy_with(n, input=[rename(i) for i in n.input], output=[rename(o) for o in n.output]))
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


def _single_scan(fn: onnx.FunctionProto):
    """``(scan, body, n_scan_inputs, n_states)`` of ``fn``'s only ``Scan``; None when there is
    not exactly one, or it has axes / directions (the passes keep to the simple case)."""
    scans = [n for n in fn.node if n.op_type == "Scan"]
    if len(scans) != 1:
        return None
    attrs = {a.name: a for a in scans[0].attribute}
    if set(attrs) - {"body", "num_scan_inputs"}:
        return None
    n_scan_in = attrs["num_scan_inputs"].i
    return scans[0], attrs["body"].g, n_scan_in, len(scans[0].input) - n_scan_in


def _copy_with(proto, **fields):
    """A copy of the node or function ``proto`` with the repeated fields named (``node``,
    ``input``, ``output``) replaced by the given values."""
    out = type(proto)()
    out.CopyFrom(proto)
    for name, values in fields.items():
        del getattr(out, name)[:]
        getattr(out, name).extend(values)
    return out


def _with_scan_replaced(fn: onnx.FunctionProto, scan: onnx.NodeProto, nodes: list) -> onnx.FunctionProto:
    """``fn`` with ``nodes`` in place of its node ``scan``."""
    return _copy_with(fn, node=[m for n in fn.node for m in (nodes if n is scan else [n])])


# ----------------------------------------------------------------------------- hoisting out of the scan

#: elementwise ops whose per-step application equals one application over the stacked steps
_ELEMENTWISE = {"Add", "Sum", "Sub", "Mul", "Div", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "Cast",
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
    found = _single_scan(fn)
    if found is None:
        return fn
    scan, body, n_scan_in, n_state = found
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
    # a test of recurrent values that no per-step output returns stays in the body, its bool
    # stacked: stacking the float for a test after the scan costs more on large layers (a
    # one-layer zero-reset Scan, T = 64, batch 1, against the 7-node body: test in the body
    # 0.88-0.99x the time on 256-16,384 neurons, after the scan 0.79-0.83x on 256-1,024 but
    # 1.05-1.31x on 4,096-16,384)
    returned = {producer[o].input[0] for o in seq_out if o in producer and producer[o].op_type == "Identity"}

    def recurrent_operand(name):
        return name in producer and id(producer[name]) in recurrent and name not in returned

    staying = recurrent | {id(n) for n in body.node if n.op_type in _COMPARISONS and id(n) not in recurrent
                           and any(recurrent_operand(i) for i in n.input)
                           and all(recurrent_operand(i) or (i not in producer and i not in body_inputs) for i in n.input if i)}
    hoisted_outputs = []  # indices into seq_out
    hoisted_nodes: dict[int, onnx.NodeProto] = {}
    leaves: set[str] = set()  # values of the staying nodes the hoisted chains read
    for j, name in enumerate(seq_out):
        chain = ancestors([name]) - staying
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
    outputs = list(body.output[:n_state]) + [body.output[n_state + j] for j in keep_seq]
    leaf_out = {}
    taken = {o.name for o in outputs}
    for leaf in leaf_list:
        if leaf in taken:  # already an output: a name may be returned only once
            leaf_out[leaf] = f"hoist_{leaf}"
            new_body_nodes.append(helper.make_node("Identity", [leaf], [leaf_out[leaf]]))
        else:  # a node output: returned per step as it is (no copy node)
            leaf_out[leaf] = leaf
    new_body_nodes, outputs = _states_without_copies(new_body_nodes, outputs, n_state, set(leaf_out.values()))
    outputs += [helper.make_tensor_value_info(leaf_out[leaf], TensorProto.BOOL if producer[leaf].op_type in _BOOL_OPS else TensorProto.FLOAT, None)
                for leaf in leaf_list]
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
        after.append(_copy_with(n, input=[rename.get(i, f"h_{i}" if i in producer else i) for i in n.input],
                                output=[f"h_{o}" for o in n.output]))
    for j in hoisted_outputs:
        after.append(helper.make_node("Identity", [f"h_{seq_out[j]}"], [outer_seq[j]]))

    return _with_scan_replaced(fn, scan, [new_scan] + after)


# ----------------------------------------------------------------------------- fewer nodes per step

_COMPARISONS = {"Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal"}
_BOOL_OPS = _COMPARISONS | {"Not", "And", "Or", "Xor"}


def recompute_sequence_identities(fn: onnx.FunctionProto) -> onnx.FunctionProto:
    """A per-step output ``Identity(v)`` of a value ``v = op(a, b, ...)`` is recomputed after the scan.

    The membrane is both the next state and a per-step output; the state and the output
    cannot be the same name (onnxruntime then returns wrong values), so the body copied it
    with an ``Identity`` node every step.  Instead the operands of ``v``'s elementwise
    producer that the body computes are returned per step (node outputs: no copy node) and
    ``op`` runs once after the scan over the stacked ``[T, ...]`` operands: the same float
    operation on the same values (bit-identical), one node less per step.  Operands that
    are the scanned input map to the outer input, loop-invariant ones are read as they are,
    body constants are copied out; an operand that is the previous state disqualifies.
    """
    found = _single_scan(fn)
    if found is None:
        return fn
    scan, body, n_scan_in, n_state = found
    producer = {o: n for n in body.node for o in n.output}
    body_input_names = [i.name for i in body.input]
    state_in = set(body_input_names[:n_state])
    scan_in = dict(zip(body_input_names[n_state:], scan.input[n_state:]))
    outputs = list(body.output)
    state_names = {o.name for o in outputs[:n_state]}
    out_names = {o.name for o in outputs}
    remove, after, new_seq = set(), [], []  # new_seq: body names returned per step
    replace = {}  # seq index -> None (dropped)
    stacked = {}  # body name -> outer stacked name
    consumers: dict[str, int] = {}
    for n in body.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    # values v of the states returned as Identity(v)
    state_copy = {producer[o.name].input[0] for o in outputs[:n_state] if o.name in producer and producer[o.name].op_type == "Identity"}
    for j in range(n_state, len(outputs)):
        value = outputs[j].name
        ident = producer.get(value)
        if ident is not None and ident.op_type == "Identity" and not consumers.get(value):
            value = ident.input[0]
        else:
            ident = None
            if value not in state_copy:
                continue  # no copy to save
        src = producer.get(value)
        if src is None or src.op_type not in _ELEMENTWISE or src.op_type in ("Constant", "Identity") or len(src.output) != 1:
            continue
        operands = []
        fresh = []  # body values this candidate would add to the per-step outputs
        ok = True
        for i in src.input:
            if not i:
                operands.append(i)
            elif i in state_in:
                ok = False
            elif i in scan_in:
                operands.append(scan_in[i])
            elif i not in producer:
                operands.append(i)  # outer scope
            elif producer[i].op_type == "Constant":
                name = f"rc_{i}"
                const = onnx.NodeProto()
                const.CopyFrom(producer[i])
                const.output[0] = name
                after.append(const)
                operands.append(name)
            elif i in state_names or (i in out_names and i not in stacked):
                ok = False  # a state output cannot also be a per-step output
            else:
                if i not in stacked and i not in fresh:
                    fresh.append(i)
                operands.append(stacked.get(i, f"rc_stacked_{i}"))
            if not ok:
                break
        if not ok:
            continue  # (an operand stacked for a candidate that failed would be written every step for nothing)
        stacked.update({i: f"rc_stacked_{i}" for i in fresh})
        new_seq.extend(fresh)
        if ident is not None:
            remove.add(id(ident))
        replace[j] = None
        new = _copy_with(src, input=operands)
        new.output[0] = scan.output[j]
        after.append(new)
    if not replace:
        return fn
    keep = [j for j in range(n_state, len(outputs)) if j not in replace]
    new_outputs = outputs[:n_state] + [outputs[j] for j in keep]
    # a state copied by Identity(v) returns v itself once v is no longer a per-step output
    body_nodes, new_outputs = _states_without_copies([n for n in body.node if id(n) not in remove], new_outputs, n_state, set(new_seq))
    for name in new_seq:
        new_outputs.append(helper.make_tensor_value_info(name, TensorProto.BOOL if producer[name].op_type in _BOOL_OPS else TensorProto.FLOAT, None))
    graph = helper.make_graph(body_nodes, body.name, list(body.input), new_outputs)
    scan_out = list(scan.output[:n_state]) + [scan.output[j] for j in keep] + [stacked[name] for name in new_seq]
    new_scan = helper.make_node("Scan", list(scan.input), scan_out, num_scan_inputs=n_scan_in, body=graph)
    return _with_scan_replaced(fn, scan, [new_scan] + after)


# ----------------------------------------------------------------------------- carrying a repeated state function


def _attribute_key(node: onnx.NodeProto) -> tuple[bytes, ...]:
    return tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))


def carry_state_functions(fn: onnx.FunctionProto) -> onnx.FunctionProto:
    """Carry ``f(v_t)`` as a state when step t+1 would recompute it from ``v_t``.

    snnTorch decides the reset of step t from the stored membrane, ``r_t = H(v_{t-1} -
    theta)``, and its spike of step t-1 is ``H(v_{t-1} - theta)`` too: the body evaluates
    the same chain ``f`` (``Greater``, ``Cast``) once on the previous state for the
    recurrence and once on the new state for the output.  A body node whose operands are
    states and loop invariants is matched to the node applying the same op (same
    attributes) to the corresponding new states; matched chains grow node by node.  The
    value the recurrence reads, ``f(v_prev)``, becomes an extra state whose next value is
    ``f(v_new)`` and whose initial value is ``f`` applied to the initial state before the
    scan.  The same operations on the same operands, so the floats are bit-identical;
    ``f`` runs once per step instead of twice.  Returns ``fn`` unchanged when nothing matches.
    """
    found = _single_scan(fn)
    if found is None:
        return fn
    scan, body, n_scan_in, n_state = found
    producer = {o: n for n in body.node for o in n.output}
    body_inputs = [i.name for i in body.input]
    outputs = [o.name for o in body.output]

    def resolve(name):  # a state returned as Identity(v) is v
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    new_of = {body_inputs[k]: resolve(outputs[k]) for k in range(n_state)}
    initial_of = {body_inputs[k]: scan.input[k] for k in range(n_state)}
    invariant = lambda name: name not in producer and name not in body_inputs  # noqa: E731  (outer scope)
    by_key = {(n.op_type, _attribute_key(n), tuple(n.input)): n for n in body.node}
    mapping = dict(new_of)  # value on the previous state -> the same value on the new state
    chain: list[onnx.NodeProto] = []  # nodes applied to the previous state, in order
    for node in body.node:
        inputs = [i for i in node.input if i]
        if len(node.output) != 1 or not any(i in mapping for i in inputs) or not all(i in mapping or invariant(i) for i in inputs):
            continue
        twin = by_key.get((node.op_type, _attribute_key(node), tuple(mapping.get(i, i) for i in node.input)))
        if twin is not None and twin is not node:
            mapping[node.output[0]] = twin.output[0]
            chain.append(node)
    in_chain = {id(n) for n in chain}
    readers = {}
    for n in body.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    carried = [n.output[0] for n in chain
               if any(id(r) not in in_chain for r in readers.get(n.output[0], [])) and mapping[n.output[0]] not in outputs[:n_state]]
    carried = list(dict.fromkeys(carried))
    if not carried or len({mapping[c] for c in carried}) != len(carried):
        return fn

    carry_in = {value: f"carry_{value}" for value in carried}
    carried_next = {mapping[c] for c in carried}
    nodes = [_copy_with(n, input=[carry_in.get(i, i) for i in n.input]) for n in body.node]
    nodes = without_dead_nodes(nodes, set(outputs) | carried_next)
    # a next value that is also a per-step output (the spike, with no scale to multiply by)
    # is returned per step through a copy: a name is either a state or a per-step output;
    # recompute_sequence_identities later replaces the copy
    seq_outputs = list(body.output[n_state:])
    for k, value in enumerate(seq_outputs):
        if value.name in carried_next:
            nodes.append(helper.make_node("Identity", [value.name], [f"seq_{value.name}"]))
            seq_outputs[k] = helper.make_tensor_value_info(f"seq_{value.name}", value.type.tensor_type.elem_type, None)
    elem = {c: TensorProto.BOOL if producer[c].op_type in _BOOL_OPS else TensorProto.FLOAT for c in carried}
    graph = helper.make_graph(
        nodes, body.name,
        list(body.input[:n_state]) + [helper.make_tensor_value_info(carry_in[c], elem[c], None) for c in carried] + list(body.input[n_state:]),
        list(body.output[:n_state]) + [helper.make_tensor_value_info(mapping[c], elem[c], None) for c in carried] + seq_outputs,
    )
    # before the scan: the chain applied to the initial states
    before, initial = [], dict(initial_of)
    for n in chain:
        new = _copy_with(n, input=[initial.get(i, i) for i in n.input])
        initial[n.output[0]] = new.output[0] = f"carry_init_{n.output[0]}"
        before.append(new)
    before = without_dead_nodes(before, {initial[c] for c in carried})
    scan_inputs = list(scan.input[:n_state]) + [initial[c] for c in carried] + list(scan.input[n_state:])
    scan_outputs = list(scan.output[:n_state]) + [f"carry_last_{c}" for c in carried] + list(scan.output[n_state:])
    new_scan = helper.make_node("Scan", scan_inputs, scan_outputs, num_scan_inputs=n_scan_in, body=graph)
    return _with_scan_replaced(fn, scan, before + [new_scan])


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names ``node`` reads: its inputs and, over-approximated, every name read in its subgraphs."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names.update(name for n in attr.g.node for name in node_reads(n))
            names.update(o.name for o in attr.g.output)
    return names


def without_dead_nodes(nodes: list[onnx.NodeProto], needed: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs nothing in ``needed`` (transitively) reads."""
    live, keep = set(needed), []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(node_reads(n))
    return keep[::-1]


def _states_without_copies(nodes: list, outputs: list, n_state: int, other_names=frozenset()) -> tuple[list, list]:
    """A ``Scan`` body's state returned as ``Identity(v)`` returns ``v`` itself (one copy less a step).

    Only where ``v`` is computed by the body and returned by no other output (a name is
    either a state or a per-step output) and no body node reads the copy; ``other_names``:
    outputs about to be added.
    """
    producer = {o: n for n in nodes for o in n.output}
    read = {i for n in nodes for i in n.input}
    outputs, taken = list(outputs), {o.name for o in outputs} | set(other_names)
    for k in range(n_state):
        node = producer.get(outputs[k].name)
        if (node is not None and node.op_type == "Identity" and node.input[0] in producer and node.input[0] not in taken
                and node.output[0] not in read):
            nodes = [n for n in nodes if n is not node]
            taken.add(node.input[0])
            outputs[k] = helper.make_tensor_value_info(node.input[0], outputs[k].type.tensor_type.elem_type, None)
    return nodes, outputs


def _graph_keeping(graph: onnx.GraphProto, keep: list[int], n_state: int = 0) -> onnx.GraphProto:
    """``graph`` returning only its outputs at positions ``keep``, its dead work removed.

    ``n_state``: the graph is a ``Scan`` body with that many states (the first outputs),
    whose copies are dropped where no per-step output needs them any more.
    """
    outputs = [graph.output[k] for k in keep]
    nodes = _prune_nodes(list(graph.node), {o.name for o in outputs})
    nodes, outputs = _states_without_copies(nodes, outputs, n_state)
    return helper.make_graph(nodes, graph.name, list(graph.input), outputs, initializer=list(graph.initializer))


def _prune_nodes(nodes: list[onnx.NodeProto], needed: set[str]) -> list[onnx.NodeProto]:
    """Dead-node removal that also drops unread ``Scan`` per-step outputs and ``If`` outputs."""
    nodes = without_dead_nodes(nodes, needed)
    read = set(needed).union(*(node_reads(n) for n in nodes))
    pruned = []
    for n in nodes:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Scan" and set(attrs) == {"body", "num_scan_inputs"}:
            n_state = len(n.input) - attrs["num_scan_inputs"].i
            keep = list(range(n_state)) + [k for k in range(n_state, len(n.output)) if n.output[k] in read]
            if len(keep) < len(n.output):
                body = _graph_keeping(attrs["body"].g, keep, n_state)
                n = helper.make_node("Scan", list(n.input), [n.output[k] for k in keep], n.name or None,
                                     num_scan_inputs=attrs["num_scan_inputs"].i, body=body)
        elif n.op_type == "If":
            keep = [k for k in range(len(n.output)) if n.output[k] in read]
            if len(keep) < len(n.output):
                n = helper.make_node("If", list(n.input), [n.output[k] for k in keep], n.name or None,
                                     then_branch=_graph_keeping(attrs["then_branch"].g, keep),
                                     else_branch=_graph_keeping(attrs["else_branch"].g, keep))
        pruned.append(n)
    return without_dead_nodes(pruned, needed)


def keep_outputs(fn: onnx.FunctionProto, count: int) -> onnx.FunctionProto:
    """``fn`` returning only its first ``count`` outputs, with the work only the others needed removed.

    A hidden layer's membrane is read by nothing after the neuron (the recurrence keeps
    its own copy): the specialised body neither stacks the membrane's per-step operands
    nor recomputes it after the scan.  The values returned are unchanged.
    """
    return _copy_with(fn, node=_prune_nodes(list(fn.node), set(fn.output[:count])), output=fn.output[:count])


def read_static_drive(fn: onnx.FunctionProto) -> onnx.FunctionProto | None:
    """``fn`` for an input that is one step's drive repeated over time, read once, not stacked.

    A layer fed the same input at every step (snnTorch tutorial 5's ``fc1(x)``) would get
    ``x = Expand(drive, [T, B, ...])``: T copies written and read back, 32 MB a call for
    tutorial 5 at batch 32 and T = 256.  The specialised function takes ``drive`` (one step,
    ``[B, ...]`` or broadcasting to it) and ``x_shape`` (the shape it was expanded to); its body reads
    ``drive`` from the outer scope at every step and the scan runs over a ``[T]`` placeholder.
    The floats are unchanged.  ``None`` when ``fn`` reads ``x`` other than through its scan
    and the step shape (``Shape(x, start=1)``).
    """
    found = _single_scan(fn)
    if found is None or "x" not in fn.input:
        return None
    scan, body, n_scan_in, n_state = found
    if list(scan.input[n_state:]) != ["x"]:
        return None
    readers = [n for n in fn.node if "x" in node_reads(n)]
    step_shapes = [n for n in readers if n.op_type == "Shape" and {a.name: a.i for a in n.attribute} == {"start": 1}]
    if any(n is not scan and n not in step_shapes for n in readers) or any("x" in node_reads(n) for n in body.node):
        return None
    x_t = body.input[n_state].name
    b = OnnxBuilder("sd")
    steps = b.node("Slice", ["x_shape", _i64(b, [0]), _i64(b, [1])])
    placeholder = b.node("ConstantOfShape", [steps])  # [T] zeros: the scan's length
    step_shape = b.node("Slice", ["x_shape", _i64(b, [1]), _i64(b, [np.iinfo(np.int64).max])])  # the drive may broadcast
    new_body = helper.make_graph([_copy_with(n, input=["drive" if i == x_t else i for i in n.input]) for n in body.node],
                                 body.name, list(body.input), list(body.output),
                                 initializer=list(body.initializer))
    new_scan = helper.make_node("Scan", list(scan.input[:n_state]) + [placeholder], list(scan.output), num_scan_inputs=n_scan_in, body=new_body)
    nodes = b.nodes + [helper.make_node("Identity", [step_shape], list(n.output)) for n in step_shapes]
    nodes += [new_scan if n is scan else n for n in fn.node if n not in step_shapes]
    return _copy_with(fn, node=nodes, input=["drive", "x_shape"] + [i for i in fn.input if i != "x"])
