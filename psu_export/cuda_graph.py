"""Static builds for onnxruntime's CUDA graphs (``convert --cuda-graph``).

On the GPU the exact ``Scan`` costs one round of onnxruntime's subgraph executor on the
host per step and layer, and every node of the naive export is a kernel launch of its
own: both spend their time launching, not computing (an H200 at T = 64, batch 1: a few
microseconds of work per launch).  onnxruntime's CUDA provider can record a whole run
as one CUDA graph (provider option ``enable_cuda_graph``) and replay it with one launch,
but only for a graph without control flow, with static shapes, every node on the GPU,
no ``Concat`` of more than :data:`~psu_export.wavefront.CONCAT_MAX_INPUTS` inputs, and
inputs and outputs bound to fixed device buffers (IOBinding).

:func:`static_build` turns a converted model into such a graph, each neuron computing the
same operations on the same operands (onnxruntime may still round a synaptic product
differently: on CUDA step 3's chunks, on the CPU a MatMul and bias fused once shapes are
static; docs/ARCHITECTURE.md):

1. the input's batch and time dimensions are fixed;
2. the model-local ``psu`` functions are inlined and the shape computations folded
   (onnxscript's optimizer; a ``T <= limit`` choice between closed form and scan is then
   a constant and keeps its branch; a closed form's ``T x T`` kernel of decay powers is
   folded too, computed by numpy instead of onnxruntime, so a reset-free layer's membrane
   may differ in the last bit, and a spike only at a float tie with the threshold, which
   verify reports);
3. chained layers with the same step run in waves (:mod:`psu_export.wavefront`): their
   steps of different time chunks share kernels, ``T + (D - 1) C`` steps for ``D``
   layers instead of ``D T``;
4. every ``Scan`` is unrolled over T (:func:`unroll_scans`): step t's copy of the body
   reads slice t of the scan input and the states of step t-1, the same nodes in the same
   order as the scan ran them, so membranes and spikes are bit-identical;
5. arithmetic on a spike's two values folds into one ``Where`` a step, and snnTorch's
   subtract reset ``(m + x) - spike * threshold`` into one ``Sum``; the spikes are cast to
   float once after stacking (:func:`fold_spike_arithmetic`): the same floats, a kernel or
   two fewer a step.

A probabilistic reset (``--reset psu|stochastic``, the PSU modules) writes its first
doubling levels as plain nodes and loops over further levels only past T = 256 (past
T = :data:`~psu_export.ops.builders.LOOP_FREE_STEPS`, 2,048, where its recurrences run in
chunks, on layers of :data:`~psu_export.ops.builders.CHUNKED_SCAN_MIN_ELEMENTS` elements or
more a run; the ``If`` between the two folds with the shapes): its idle ``Loop`` is dropped
(:func:`_drop_idle_loops`); a longer T is refused.
:class:`psu_export.runtime.GraphRunner` runs a static build under a CUDA graph.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import CaptureError, UsageError
from .ops.builders import CHUNKED_SCAN_MIN_ELEMENTS, LOOP_FREE_STEPS
from .ops.linear import without_dead_nodes
from .ops.registry import walk_nodes
from .wavefront import concat_tree, pipeline_scan_chains, static_shapes

#: ONNX operators with subgraphs: none may remain in a static build
CONTROL_FLOW = ("Scan", "Loop", "If")
#: metadata keys of a static build (the last: the wave schedule, one line per chain of layers)
STATIC_KEY, LAYER_OUTPUTS_KEY, WAVES_KEY = "psu_export.cuda_graph", "psu_export.layer_outputs", "psu_export.waves"


def static_build(model: onnx.ModelProto, input_shape: tuple[int, ...], layer_outputs: dict[str, str], waves: bool = True) -> onnx.ModelProto:
    """``model`` (one input, as :func:`psu_export.emit.export_onnx` writes it) with the input
    fixed to ``input_shape``, functions inlined and every ``Scan`` unrolled (module docstring).

    ``layer_outputs`` (``{layer: spike value}``) are kept as values of the result and
    recorded in its metadata (:data:`LAYER_OUTPUTS_KEY`) for per-layer parity; the wave
    schedule is described in :data:`WAVES_KEY`.  ``waves`` False keeps chained layers one
    after the other (for comparison: module docstring, 3).
    """
    import onnxscript.optimizer

    model = with_input_shape(model, input_shape)
    own_outputs = [o.name for o in model.graph.output]
    # layer spikes as temporary graph outputs: the optimizer keeps graph outputs' names
    model.graph.output.extend(helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                              for v in layer_outputs.values() if v not in own_outputs)
    model = onnxscript.optimizer.optimize(model)
    while _drop_idle_loops(model.graph):  # shapes after a dropped Loop may fold the next one's condition
        model = onnxscript.optimizer.optimize(model)
    if _fold_static_shapes(model):
        model = onnxscript.optimizer.optimize(model)
    schedule = pipeline_scan_chains(model) if waves else []
    model = unroll_scans(model)
    del model.graph.output[len(own_outputs):]
    fold_spike_arithmetic(model, keep=set(layer_outputs.values()))
    model = with_static_output_shapes(model)
    left = sorted({n.op_type for n in walk_nodes(model.graph) if n.op_type in CONTROL_FLOW})
    if "Loop" in left and set(left) <= {"If", "Loop"}:  # an If holding the Loop may stay unfolded with it
        raise UsageError("--cuda-graph needs a graph without control flow, but a Loop remained: a probabilistic reset "
                         "(--reset psu/stochastic, PSU modules) runs its doubling levels past 256 steps in a Loop (past "
                         f"{LOOP_FREE_STEPS} on layers of {CHUNKED_SCAN_MIN_ELEMENTS:,} elements or more a run); "
                         "build for a shorter T, a larger batch, or convert with --reset exact.")
    if left:
        raise CaptureError(f"--cuda-graph: {', '.join(left)} remained in the static build; this is a psu-export limitation, please report it.")
    for key, value in ((LAYER_OUTPUTS_KEY, layer_outputs), (WAVES_KEY, schedule)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return model


def with_static_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every graph output's shape as shape inference finds it (static in a
    static build: :class:`psu_export.runtime.GraphRunner` allocates the output buffers from it)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known = {v.name: v for v in inferred.graph.value_info}
    for out in model.graph.output:
        if out.name in known:
            out.type.CopyFrom(known[out.name].type)
        elif not out.type.tensor_type.HasField("shape"):
            found = next((o for o in inferred.graph.output if o.name == out.name), None)
            if found is not None:
                out.type.CopyFrom(found.type)
    return model


def with_input_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
    """A copy of ``model`` whose (single) input has the static ``shape``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dims = copy.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise UsageError(f"the model's input has {len(dims)} dimensions, the static build was given {list(shape)}")
    for d, size in zip(dims, shape):
        d.Clear()
        d.dim_value = int(size)
    return copy


def _fold_static_shapes(model: onnx.ModelProto) -> int:
    """Replace each ``Shape`` of a value whose shape inference finds static by its constant;
    in place.  Returns how many were replaced (the optimizer leaves those behind a ``Scan``)."""
    shapes = static_shapes(model)
    folded = 0
    for k, node in enumerate(model.graph.node):
        if node.op_type == "Shape" and node.input[0] in shapes:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dims = list(shapes[node.input[0]][attrs.get("start", 0):attrs.get("end")])
            model.graph.node[k].CopyFrom(helper.make_node(
                "Constant", [], list(node.output), value=numpy_helper.from_array(np.array(dims, np.int64))))
            folded += 1
    return folded


def _drop_idle_loops(graph: onnx.GraphProto) -> int:
    """Replace each ``Loop`` that runs no iteration (no trip count, a constant false
    condition, no per-iteration outputs) by copies of its initial loop-carried values.

    The doubling scan of the probabilistic reset (over the steps, or over the chunk ends of
    its chunked form) writes its first levels as plain nodes and loops over the rest only
    while ``2^level`` is below the steps or chunks it scans
    (:data:`psu_export.ops.builders.UNROLLED_LEVELS`): with few enough of them, static, that
    condition folds to false.  Returns how many were dropped.
    """
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    dropped = 0
    for node in list(graph.node):
        if node.op_type != "Loop" or node.input[0] or node.input[1] not in constants:
            continue
        carried = node.input[2:]
        if bool(constants[node.input[1]].reshape(-1)[0]) or len(node.output) != len(carried):
            continue
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for k, (src, dst) in enumerate(zip(carried, node.output)):
            graph.node.insert(at + k, helper.make_node("Identity", [src], [dst]))
        dropped += 1
    return dropped


def _static_length(graph: onnx.GraphProto, name: str, axis: int) -> int:
    """The static size of ``name``'s dimension ``axis`` (from shape inference)."""
    known = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    dims = known[name].type.tensor_type.shape.dim if name in known else []
    if axis >= len(dims) or not dims[axis].HasField("dim_value"):
        raise CaptureError(f"--cuda-graph: cannot unroll the scan over {name!r}: its length is not static (please report it)")
    return dims[axis].dim_value


def unroll_scans(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every ``Scan`` of the main graph unrolled over its (static) length; in place.

    Only forward scans over axis 0 occur in psu-export's graphs; others are refused.
    Per-step outputs are stacked again by ``Concat`` trees no wider than
    :data:`~psu_export.wavefront.CONCAT_MAX_INPUTS`.
    """
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    nodes = []
    for k, node in enumerate(graph.node):
        if node.op_type != "Scan":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - {"body", "num_scan_inputs"}:
            raise CaptureError(f"--cuda-graph: cannot unroll the Scan {node.name!r}: only forward scans over axis 0 are supported")
        body, n_scan = attrs["body"], attrs["num_scan_inputs"]
        n_state = len(node.input) - n_scan
        steps = _static_length(graph, node.input[n_state], 0)
        pre, axis0 = f"unrolled{k}_", f"unrolled{k}_axis0"
        graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axis0))
        slices = []
        for j, name in enumerate(node.input[n_state:]):
            parts = [f"{pre}x{j}_{t}" for t in range(steps)]
            nodes.append(helper.make_node("Split", [name], parts, axis=0, num_outputs=steps) if steps > 1
                         else helper.make_node("Identity", [name], parts))
            nodes += [helper.make_node("Squeeze", [p, axis0], [p + "_t"]) for p in parts]
            slices.append([p + "_t" for p in parts])
        internal = {o for n in body.node for o in n.output}
        states, stacked = list(node.input[:n_state]), [[] for _ in body.output[n_state:]]
        for t in range(steps):
            rename = {i.name: src for i, src in zip(body.input, states + [s[t] for s in slices])}
            rename.update({name: f"{pre}{t}_{name}" for name in internal})
            for n in body.node:
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                copy.name = ""
                del copy.metadata_props[:]  # the exporter's provenance notes, not T copies of them
                copy.input[:] = [rename.get(v, v) for v in n.input]
                copy.output[:] = [rename.get(v, v) for v in n.output]
                nodes.append(copy)
            outs = [rename.get(o.name, o.name) for o in body.output]
            states = outs[:n_state]
            for j, value in enumerate(outs[n_state:]):
                stacked[j].append(f"{pre}y{j}_{t}")
                nodes.append(helper.make_node("Unsqueeze", [value, axis0], [stacked[j][-1]]))
        nodes += [helper.make_node("Identity", [s], [o]) for s, o in zip(states, node.output[:n_state]) if o]
        for values, output in zip(stacked, node.output[n_state:]):
            if output:
                nodes += concat_tree(values, output)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model


def fold_spike_arithmetic(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Fewer kernels for the arithmetic on spikes in an unrolled graph, the same bits; in place.

    A float cast of a boolean test ``Cast(test)`` takes two values, 1 and 0, and so does
    any elementwise ``Add``/``Sub``/``Mul``/``Div`` of it with a constant: the pass carries
    such a value as a select ``(test, value if true, value if false)``, both arms computed
    by numpy in float32 (the same IEEE operation on the same operands), and writes one
    ``Where(test, ...)`` where a non-constant operation reads it: SpikingJelly's hard reset
    ``(1 - spike) * h`` becomes ``Where(test, +0, 1) * h``, one kernel instead of a cast and
    a subtraction.  A subtract reset ``(m + x) - select`` (snnTorch's ``- spike *
    threshold``) becomes ``Sum(m, x, Where(test, -a, -b))``: IEEE defines ``y - r`` as
    ``y + (-r)``, and onnxruntime's ``Sum`` adds left to right (one CUDA kernel for inputs
    of one shape); only where ``m + x`` has no other reader and the three have one shape.
    The casts then read only by stacked outputs move after the ``Concat``.  snnTorch's step
    goes from five kernels to four (``Mul``, ``Sum``, ``Greater``, ``Where``): on an H200
    under a CUDA graph the reference MLP at T = 64 took 0.746 against 0.857 ms.  On the CPU
    the ``Scan`` keeps its arithmetic (its ``Sum`` / ``Where`` body measured 1.1-1.4x
    slower there), so this is a static-build pass.  ``keep``: values to leave in place
    (graph outputs are kept too).  Returns how many operations were folded.
    """
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    types = {v.name: v.type.tensor_type for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    protected = set(keep) | {o.name for o in graph.output}
    readers = _reader_counts(graph.node)

    def shape(name):
        t = types.get(name)
        if t is None or not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
            return None
        return tuple(d.dim_value for d in t.shape.dim)

    def is_bool(name):
        return name in types and types[name].elem_type == onnx.TensorProto.BOOL

    producer = {o: n for n in graph.node for o in n.output}
    selects: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}  # value -> (test, if true, if false)
    folded: set[str] = set()  # select values whose node was dropped: a reader needs their Where
    arms: dict[tuple, str] = {}  # initializers of the arms, by value
    nodes, dropped, folds = [], set(), 0

    def constant(value: np.ndarray) -> str:
        key = (value.shape, value.tobytes())
        if key not in arms:
            arms[key] = f"spike_select{len(arms)}"
            graph.initializer.append(numpy_helper.from_array(value, arms[key]))
        return arms[key]

    def where(select, output):
        test, when_true, when_false = select
        return helper.make_node("Where", [test, constant(when_true), constant(when_false)], [output])

    def summable(sub, select):  # Sub(Add(m, x), select) that one Sum can take
        add, step = producer.get(sub.input[0]), shape(sub.output[0])
        return (add is not None and add.op_type == "Add" and id(add) not in dropped and sub.input[0] not in folded
                and readers[sub.input[0]] == 1 and sub.input[0] not in protected and step is not None
                and shape(add.input[0]) == shape(add.input[1]) == shape(select[0]) == step
                and np.broadcast_shapes(step, select[1].shape, select[2].shape) == step)

    for n in graph.node:
        ins, out = list(n.input), n.output[0]
        if n.op_type == "Cast" and is_bool(ins[0]) and _attribute(n, "to") == onnx.TensorProto.FLOAT:
            selects[out] = (ins[0], np.array(1.0, np.float32), np.array(0.0, np.float32))
        elif n.op_type == "Identity" and ins[0] in selects and out not in protected:
            selects[out] = selects[ins[0]]
            if ins[0] in folded:
                folded.add(out)
                continue
        elif n.op_type in _ARITHMETIC and out not in protected and [i in selects for i in ins].count(True) == 1 \
                and any(i in constants for i in ins):
            on_left = ins[0] in selects
            test, when_true, when_false = selects[ins[0] if on_left else ins[1]]
            c = constants[ins[1] if on_left else ins[0]]
            with np.errstate(all="ignore"):
                values = [_ARITHMETIC[n.op_type](*((v, c) if on_left else (c, v))).astype(np.float32) for v in (when_true, when_false)]
            selects[out] = (test, *values)
            folded.add(out)
            folds += 1
            continue
        elif n.op_type == "Sub" and ins[1] in selects and out not in protected and summable(n, selects[ins[1]]):
            add = producer[ins[0]]
            test, when_true, when_false = selects[ins[1]]
            dropped.add(id(add))
            nodes += [where((test, -when_true, -when_false), out + "_negated"),
                      helper.make_node("Sum", [add.input[0], add.input[1], out + "_negated"], [out])]
            folds += 1
            continue
        for i in ins:  # a select that a kept node reads: its Where, once
            if i in folded:
                nodes.append(where(selects[i], i))
                folded.discard(i)
        nodes.append(n)
    nodes = [n for n in nodes if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(_cast_after_stacking(nodes, is_bool, protected))
    return folds


def _attribute(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


#: elementwise operations folded over the two values of a select (numpy, float32)
_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _cast_after_stacking(nodes: list[onnx.NodeProto], is_bool, protected: set[str]) -> list[onnx.NodeProto]:
    """``Concat`` of ``Unsqueeze(Cast(test_t))`` for boolean tests becomes
    ``Cast(Concat(Unsqueeze(test_t)))`` (a cast commutes with moving values); the per-step
    casts nobody reads any more are dropped."""
    producer = {o: n for n in nodes for o in n.output}
    readers = _reader_counts(nodes)

    def cast_of_bool(unsqueeze):  # the Cast under an Unsqueeze read only by the Concat, or None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or readers[unsqueeze.output[0]] != 1:
            return None
        cast = producer.get(_through_identities(unsqueeze.input[0], producer))
        return cast if cast is not None and cast.op_type == "Cast" and is_bool(cast.input[0]) else None

    result = []
    for n in nodes:
        ups = [producer.get(i) for i in n.input] if n.op_type == "Concat" else []
        casts = [cast_of_bool(u) for u in ups]
        if not casts or None in casts:
            result.append(n)
            continue
        for u, cast in zip(ups, casts):
            u.input[0] = cast.input[0]
            u.output[0] += "_test"
        stacked = onnx.NodeProto()
        stacked.CopyFrom(n)
        stacked.input[:] = [u.output[0] for u in ups]
        stacked.output[0] = n.output[0] + "_tests"
        result += [stacked, helper.make_node("Cast", [stacked.output[0]], [n.output[0]], to=onnx.TensorProto.FLOAT)]
    return without_dead_nodes(result, protected)


def _reader_counts(nodes) -> dict[str, int]:
    """How many node inputs read each value."""
    return collections.Counter(i for n in nodes for i in n.input)


def _through_identities(name: str, producer: dict) -> str:
    """The value ``name`` copies through a chain of ``Identity`` nodes."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name
