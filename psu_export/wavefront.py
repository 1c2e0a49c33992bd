"""The wavefront schedule of a static build: chained neuron layers share their step kernels.

In a static build (:mod:`psu_export.cuda_graph`) each neuron layer's ``Scan`` is unrolled
into a few kernels a step, and under a CUDA graph a step costs its kernels' launches (about
1.1-1.5 us each on an H200), whatever the layer's width.  Two layers in a chain, ``A ->
(per-step synaptic ops) -> B``, run ``2 T`` such steps one after the other, although step
``t`` of ``B`` needs only ``A``'s steps up to ``t``.  This pass cuts time into ``K`` chunks
of ``C`` steps and runs *waves*: in wave ``w`` the chain's layer ``d`` processes chunk
``w - d``, so the layers of one wave are independent of each other and their steps run as
one: each step flattened to ``[B, neurons]``, the states and inputs are concatenated along
the neuron axis and one ``Scan`` over the chunk runs the common step body, its constants
made one value per neuron where the layers' differ.  Between waves the synaptic ops in
front of layer ``d`` run on the chunk that layer ``d - 1`` has just finished.  ``D``
layers then take ``T + (D - 1) C`` steps instead of ``D T``, for a few kernels a wave (the
chunk's synaptic ops, a ``Concat`` of the inputs, ``Split``s of the outputs).

The layers compute what they computed before, in the same order, on the same operands:
each neuron's step runs the same elementwise operations on its own lane, a per-neuron
constant equals the layer's broadcast one, and the synaptic ops compute each step's rows
alone (:func:`_row_wise`), so running them on a chunk computes each row as before.  On
onnxruntime's CPU provider that is bit for bit (its matrix products and convolutions give
a row the same sum whatever the row count; see the tests); cuBLAS and cuDNN choose their
algorithms by shape, so on CUDA a chunk's product may round differently.

A chain is formed where, after the input's shape is fixed (every ``Shape`` then folds):

* each layer is a forward ``Scan`` over axis 0 with one scan input, whose states have the
  per-step shape of that input, and whose body is elementwise only;
* layer ``d``'s scan input is computed from layer ``d - 1``'s per-step outputs by
  :data:`SEGMENT_OPS` (:func:`_row_wise`), and nothing else reads the scan input (other
  intermediate values read elsewhere, and the layers' outputs, are rebuilt by a ``Concat``
  of the chunks), and its initial states do not depend on layer ``d - 1``;
* a chain is cut into runs of layers whose bodies are the same operations on the same
  operands apart from constants that broadcast over a sample (thresholds, decays), with
  the same batch; a run of two or more layers takes the waves.  (A zero reset's threshold
  that is one value for the whole layer is an attribute of its ``ThresholdedRelu``, part
  of the operation: such layers share a run only with the same threshold.)

The pass runs before :func:`psu_export.cuda_graph.unroll_scans`, which unrolls the waves'
``Scan`` nodes like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import CaptureError
from .ops.linear import node_reads

#: the CUDA provider's Concat takes at most this many inputs while a CUDA graph is captured
CONCAT_MAX_INPUTS = 32

#: operations that act on each neuron's lane alone (constants broadcast over a sample's neurons)
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sum", "Max", "Min", "Greater", "Less",
                             "GreaterOrEqual", "LessOrEqual", "Equal", "Not", "And", "Or", "Xor", "Where", "Cast",
                             "Identity", "Relu", "ThresholdedRelu", "Sigmoid", "Exp"})
#: operations allowed between two chained layers, on values whose first axis is time or
#: time folded with the batch (``[T * k, ...]``): each step's rows computed alone.  Their
#: constant operands: a ``MatMul``'s weight (second input, at most 2-D), convolution and
#: normalisation parameters, a ``Reshape``'s shape (its first entry rewritten per chunk),
#: elementwise operands that do not vary along the first axis
SEGMENT_OPS = frozenset({"Cast", "MatMul", "Add", "Sub", "Mul", "Div", "Identity", "Relu", "Reshape", "Flatten", "Conv",
                         "MaxPool", "AveragePool", "BatchNormalization"})
_SEGMENT_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})
#: kernels a wave costs besides its steps (synaptic ops, input Concat, input and output
#: Splits, output Concats), counted for the reference models, not timed: the chunk length
#: balances them against the waves' extra steps
WAVE_KERNELS = 8


@dataclass
class _Layer:
    scan: onnx.NodeProto
    body: onnx.GraphProto
    n_state: int
    step_shape: tuple[int, ...]  # one step's shape, the batch first
    segment: list[onnx.NodeProto]  # the nodes computing the scan input from the previous layer's outputs

    @property
    def lanes(self) -> int:
        """Neurons per sample: a step ``[B, ...]`` flattened to ``[B, lanes]``."""
        return math.prod(self.step_shape[1:])

    @property
    def source(self) -> str:
        return self.scan.input[self.n_state]

    @cached_property
    def canonical(self) -> "_Body":
        """The step body up to names (:func:`_canonical`), computed once."""
        return _canonical(self.body)


@dataclass(frozen=True)
class _Body:
    """A step body up to names: the operations over numbered inputs, and its constants."""

    signature: tuple
    outputs: tuple  # canonical ids of the body outputs
    constants: tuple[str, ...]  # outer names read, by slot
    cost: int  # kernels a step


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The values whose shape inference finds fully static, and their shapes."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(d.dim_value for d in dims)
    return shapes


def _canonical(body: onnx.GraphProto) -> _Body:
    ids = {v.name: ("input", k) for k, v in enumerate(body.input)}
    signature, constants = [], []

    def operand(name: str):  # a body value, or the next slot of an outer constant
        if name not in ids:
            constants.append(name)
            return "constant", len(constants) - 1
        return ids[name]

    for node in body.node:
        if node.op_type == "Identity":
            ids[node.output[0]] = operand(node.input[0])
            continue
        operands = tuple(operand(i) if i else None for i in node.input)
        attributes = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
        signature.append((node.domain, node.op_type, attributes, operands, len(node.output)))
        for j, o in enumerate(node.output):
            ids[o] = ("node", len(signature) - 1, j)
    return _Body(tuple(signature), tuple(operand(o.name) for o in body.output), tuple(constants), len(signature))


def pipeline_scan_chains(model: onnx.ModelProto) -> list[str]:
    """Rewrite every chain of neuron ``Scan``s (module docstring) into waves; in place.

    ``model`` has a static input shape, and its ``Shape`` nodes are folded.  Returns one
    line per chain rewritten: its layers' widths, chunk length and steps.
    """
    graph, shapes = model.graph, static_shapes(model)
    context = _Context(graph, shapes)
    layers = {id(n): layer for n in graph.node if n.op_type == "Scan" and (layer := _as_layer(n, shapes)) is not None}
    previous: dict[int, _Layer] = {}  # layer -> the layer feeding it through its segment
    for layer in layers.values():
        found = _segment(layer, layers, context)
        if found is not None:
            previous[id(layer.scan)], layer.segment = found
    followers: dict[int, list[_Layer]] = {}
    for layer_id, feeder in previous.items():
        followers.setdefault(id(feeder.scan), []).append(layers[layer_id])
    reports, new_nodes, drop = [], [], set()
    for head in [layer for layer in layers.values() if id(layer.scan) not in previous]:
        chain = [head]
        while len(followers.get(id(chain[-1].scan), [])) == 1:
            chain.append(followers[id(chain[-1].scan)][0])
        for run in [run for run in _runs(chain, context.constants) if len(run) > 1]:
            steps = shapes[run[0].source][0]
            chunk = _chunk_length(steps, len(run), run[0].canonical.cost)
            if chunk >= steps:
                continue
            new_nodes += _Waves(run, context, f"wave{len(reports)}_").build(steps, chunk)
            drop |= {id(run[0].scan)} | {id(n) for layer in run[1:] for n in [layer.scan, *layer.segment]}
            reports.append(f"{len(run)} chained layers ({', '.join(str(layer.lanes) for layer in run)} neurons) in waves of "
                           f"{chunk} steps: {steps + (len(run) - 1) * chunk} steps instead of {len(run) * steps}")
    if reports:
        ordered = _topological([n for n in graph.node if id(n) not in drop] + new_nodes)
        del graph.node[:]
        graph.node.extend(ordered)
    return reports


def _runs(chain: list[_Layer], constants: dict) -> list[list[_Layer]]:
    """``chain`` cut into runs of consecutive layers that can share a step (:func:`_mergeable`)."""
    runs = [[chain[0]]]
    for layer in chain[1:]:
        if _mergeable(runs[-1] + [layer], constants):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


class _Context:
    """What the passes read of the graph: constants, producers, readers, outputs."""

    def __init__(self, graph: onnx.GraphProto, shapes: dict):
        self.graph, self.shapes = graph, shapes
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.position = {id(n): k for k, n in enumerate(graph.node)}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def read_outside(self, value: str, inside: set[int]) -> bool:
        """Whether a graph output or a node not in ``inside`` (ids) reads ``value``."""
        return value in self.outputs or any(id(r) not in inside for r in self.readers.get(value, []))


def _as_layer(scan: onnx.NodeProto, shapes: dict) -> _Layer | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in scan.attribute}
    if set(attrs) != {"body", "num_scan_inputs"} or attrs["num_scan_inputs"] != 1:
        return None
    body, n_state = attrs["body"], len(scan.input) - 1
    source = shapes.get(scan.input[n_state])
    if source is None or len(source) < 2 or any(n.op_type not in ELEMENTWISE_OPS or n.domain for n in body.node):
        return None
    if any(shapes.get(s) != source[1:] for s in scan.input[:n_state]):
        return None
    return _Layer(scan, body, n_state, source[1:], [])


def _segment(layer: _Layer, layers: dict, context: _Context) -> tuple[_Layer, list[onnx.NodeProto]] | None:
    """``(feeding layer, segment nodes)`` when ``layer``'s scan input is computed row by row
    in time from one other layer's per-step outputs (module docstring), else None."""
    constants, steps = context.constants, context.shapes[layer.source][0]
    segment, sources, stack = {}, set(), [layer.source]
    while stack:
        node = context.producer.get(stack.pop())
        if node is None:
            return None  # the graph input: the head of a chain
        if id(node) in segment or id(node) in sources:
            continue
        if node.op_type == "Scan":
            if id(node) not in layers:
                return None
            sources.add(id(node))
            continue
        if not _row_wise(node, constants, context.shapes, steps):
            return None
        stack += [i for i in node.input if i and i not in constants]
        segment[id(node)] = node
    if len(sources) != 1 or context.read_outside(layer.source, {id(layer.scan)}):
        return None
    feeder = layers[sources.pop()]
    if any(v in feeder.scan.output[:feeder.n_state] for n in segment.values() for v in n.input):
        return None  # reads the feeder's final state, not its steps
    dependent = {o for n in [feeder.scan, *segment.values()] for o in n.output}
    if any(v in dependent for s in layer.scan.input[:layer.n_state] for v in _ancestors(s, context.producer)):
        return None  # the layer's initial state depends on the feeder
    return feeder, sorted(segment.values(), key=lambda n: context.position[id(n)])


def _row_wise(node: onnx.NodeProto, constants: dict, shapes: dict, steps: int) -> bool:
    """Whether ``node`` computes each of ``steps`` time steps' rows from that step's rows
    alone: a :data:`SEGMENT_OPS` node on values of static shape ``[steps * k, ...]``."""
    if node.op_type not in SEGMENT_OPS:
        return False
    data = [i for i in node.input if i and i not in constants]
    values = data + list(node.output)
    if not data or any(v not in shapes or not shapes[v] or shapes[v][0] % steps for v in values):
        return False
    out_rank = len(shapes[node.output[0]])
    if node.op_type == "MatMul":  # the sequence times a weight (not a constant's rows times it), or a batched product
        left, right = node.input
        return left in data and (constants[right].ndim <= 2 if right in constants else min(len(shapes[left]), len(shapes[right])) >= 3)
    if node.op_type == "Reshape":  # the shape's first entry: the time axis's (a chunk's copy rewrites it) or -1
        shape = constants.get(node.input[1])
        return (shape is not None and node.input[0] in data and len(shape) > 0
                and shape[0] in (-1, shapes[node.output[0]][0]))
    if node.op_type == "Flatten":
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1) >= 1
    if node.op_type in _SEGMENT_ELEMENTWISE:  # a constant must not vary along the first axis
        return all(i in data or constants[i].ndim < out_rank or constants[i].shape[-out_rank] == 1 for i in node.input)
    return node.input[0] in data and all(i in constants for i in node.input[1:] if i)  # convolution, pooling, norm


def _ancestors(value: str, producer: dict) -> set[str]:
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if v not in seen:
            seen.add(v)
            if v in producer:
                stack.extend(i for i in producer[v].input if i)
    return seen


def _mergeable(chain: list[_Layer], constants: dict) -> bool:
    """The same step up to constants that broadcast over a sample's neurons, the same
    states, and the same batch (a step ``[B, ...]`` runs flattened to ``[B, lanes]``)."""
    bodies = [layer.canonical for layer in chain]
    first, n_state, batch = bodies[0], chain[0].n_state, chain[0].step_shape[0]
    if any(b.signature != first.signature or layer.n_state != n_state or b.outputs[:n_state] != first.outputs[:n_state]
           or layer.step_shape[0] != batch for b, layer in zip(bodies, chain)):
        return False
    for slot in range(len(first.constants)):
        names = [b.constants[slot] for b in bodies]
        if len(set(names)) > 1 and any(_lane_values(constants.get(n), layer) is None for n, layer in zip(names, chain)):
            return False
    return True


def _lane_values(value: np.ndarray | None, layer: _Layer) -> np.ndarray | None:
    """``value`` as one entry per neuron of a flattened step ``[1, lanes]``, or None."""
    sample = (1, *layer.step_shape[1:])
    if value is None or value.ndim > len(sample):
        return None
    try:
        if np.broadcast_shapes(value.shape, sample) != sample:
            return None  # varies along the batch
    except ValueError:
        return None
    return np.broadcast_to(value, sample).reshape(1, layer.lanes)


def _chunk_length(steps: int, depth: int, step_kernels: int) -> int:
    """The divisor ``C`` of ``T`` (the layers of a wave take chunks of one length) nearest to
    the one minimising ``step_kernels (T + (D-1) C) + WAVE_KERNELS (T / C + D - 1)``, if it is
    within a factor of two of it; otherwise ``T`` (no waves)."""
    best = math.sqrt(WAVE_KERNELS * steps / (step_kernels * (depth - 1)))
    near = [c for c in range(1, steps) if steps % c == 0 and best / 2 <= c <= best * 2]
    return min(near, key=lambda c: abs(math.log(c / best)), default=steps)


class _Waves:
    """Builds the nodes of one chain's wave schedule; the chain's output names are kept."""

    def __init__(self, chain: list[_Layer], context: _Context, prefix: str):
        self.chain, self.context, self.prefix = chain, context, prefix
        self.bodies = [layer.canonical for layer in chain]
        self.n_state = chain[0].n_state
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.constants: dict[tuple, str] = {}  # initializers written, by dtype, shape and bytes
        self.merged_bodies: dict[tuple[int, ...], tuple] = {}  # merged_body's results, by set of layers

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}{self.count}"

    def constant(self, value: np.ndarray, hint: str) -> str:
        """An initializer holding ``value``, written once however often it is asked for."""
        value = np.ascontiguousarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.constants:
            self.constants[key] = self.fresh(hint)
            self.context.graph.initializer.append(numpy_helper.from_array(value, self.constants[key]))
        return self.constants[key]

    def split(self, value: str, sizes: list[int], axis: int) -> list[str]:
        parts = [self.fresh("part") for _ in sizes]
        self.nodes.append(helper.make_node("Split", [value, self.constant(np.array(sizes, np.int64), "sizes")], parts, axis=axis))
        return parts

    def reshaped(self, value: str, shape: tuple[int, ...]) -> str:
        out = self.fresh("reshaped")
        self.nodes.append(helper.make_node("Reshape", [value, self.constant(np.array(shape, np.int64), "shape")], [out]))
        return out

    def flat(self, value: str, d: int, stacked: bool) -> str:
        """Layer ``d``'s step (``stacked``: a chunk of steps) as ``[B, lanes]`` (``[C, B, lanes]``)."""
        layer = self.chain[d]
        if len(layer.step_shape) == 2:
            return value
        return self.reshaped(value, ((self.chunk,) if stacked else ()) + (layer.step_shape[0], layer.lanes))

    def unflat(self, value: str, d: int, stacked: bool) -> str:
        """The inverse of :meth:`flat`."""
        layer = self.chain[d]
        return value if len(layer.step_shape) == 2 else self.reshaped(value, ((self.chunk,) if stacked else ()) + layer.step_shape)

    def build(self, steps: int, chunk: int) -> list[onnx.NodeProto]:
        chain, n_state, depth = self.chain, self.n_state, len(self.chain)
        self.steps, self.chunk = steps, chunk
        sizes = [chunk] * (steps // chunk)
        inputs = [{} for _ in chain]  # inputs[d][c]: layer d's scan input, chunk c
        inputs[0] = dict(enumerate(self.split(chain[0].source, sizes, 0)))
        pieces = [[{} for _ in layer.scan.output[n_state:]] for layer in chain]  # pieces[d][j][c]
        states = [list(layer.scan.input[:n_state]) for layer in chain]
        rebuilt: dict[str, list[str]] = {}  # segment values read elsewhere, by chunk
        merged = ((), [])  # the layers whose states are concatenated, and those states
        for wave in range(len(sizes) + depth - 1):
            active = tuple(d for d in range(depth) if 0 <= wave - d < len(sizes))
            for d in active:
                if d > 0:
                    inputs[d][wave - d] = self.segment_chunk(d, wave - d, pieces, rebuilt)
            if merged[0] and merged[0] != active:  # the set changes: one state per layer again
                self.unmerge(merged, states)
                merged = ((), [])
            if len(active) == 1:
                d = active[0]
                outs = [self.fresh("state") for _ in range(n_state)]
                stacked = [self.fresh("y") if o else "" for o in chain[d].scan.output[n_state:]]
                self.nodes.append(_scan(chain[d].body, states[d] + [inputs[d][wave - d]], outs + stacked))
                states[d] = outs
                for j, value in enumerate(stacked):
                    pieces[d][j][wave - d] = value
                continue
            if not merged[0]:
                merged = (active, [self.fresh("states") for _ in range(n_state)])
                self.nodes += [helper.make_node("Concat", [self.flat(states[d][k], d, False) for d in active], [merged[1][k]], axis=-1)
                               for k in range(n_state)]
            joined = self.fresh("x")
            self.nodes.append(helper.make_node("Concat", [self.flat(inputs[d][wave - d], d, True) for d in active], [joined], axis=-1))
            body, owners = self.merged_body(active)
            outs, stacked = [self.fresh("states") for _ in range(n_state)], [self.fresh("y") for _ in owners]
            self.nodes.append(_scan(body, merged[1] + [joined], outs + stacked))
            merged = (active, outs)
            for value, owned in zip(stacked, owners):
                parts = self.split(value, [chain[d].lanes for d in active], -1)
                for d, j in owned:
                    pieces[d][j][wave - d] = self.unflat(parts[active.index(d)], d, True)
        if merged[0]:
            self.unmerge(merged, states)
        for d, layer in enumerate(chain):
            self.nodes += [helper.make_node("Identity", [s], [o]) for s, o in zip(states[d], layer.scan.output[:n_state]) if o]
            for j, output in enumerate(layer.scan.output[n_state:]):
                if output:
                    self.nodes += _stack([pieces[d][j][c] for c in range(len(sizes))], output)
        for value, parts in rebuilt.items():
            self.nodes += _stack(parts, value)
        return self.nodes

    def unmerge(self, merged: tuple, states: list[list[str]]) -> None:
        active, values = merged
        for k, value in enumerate(values):
            for d, part in zip(active, self.split(value, [self.chain[d].lanes for d in active], -1)):
                states[d][k] = self.unflat(part, d, False)

    def segment_chunk(self, d: int, c: int, pieces: list, rebuilt: dict) -> str:
        """Copies of layer ``d``'s segment computing chunk ``c`` of its input; returns that chunk's name."""
        feeder, layer = self.chain[d - 1], self.chain[d]
        rename = {name: pieces[d - 1][j][c] for j, name in enumerate(feeder.scan.output[feeder.n_state:]) if name}
        inside = {id(n) for n in layer.segment} | {id(layer.scan)}
        for node in layer.segment:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = ""
            copy.input[:] = [rename.get(i, i) for i in node.input]
            if node.op_type == "Reshape" and self.context.constants[node.input[1]][0] != -1:  # time's entry T * k: C * k
                shape = self.context.constants[node.input[1]].copy()
                shape[0] = shape[0] // self.steps * self.chunk
                copy.input[1] = self.constant(shape, "chunk_shape")
            for k, o in enumerate(node.output):
                rename[o] = copy.output[k] = self.fresh("segment")
                if self.context.read_outside(o, inside):
                    rebuilt.setdefault(o, []).append(copy.output[k])
            self.nodes.append(copy)
        return rename[layer.source]

    def merged_body(self, active: tuple[int, ...]) -> tuple[onnx.GraphProto, list[list[tuple[int, int]]]]:
        """The step body of the ``active`` layers run as one, and for each of its per-step
        outputs the ``(layer, output index)`` pairs it stands for (built once per set)."""
        if active not in self.merged_bodies:
            self.merged_bodies[active] = self._merged_body(active)
        return self.merged_bodies[active]

    def _merged_body(self, active: tuple[int, ...]) -> tuple[onnx.GraphProto, list[list[tuple[int, int]]]]:
        chain, bodies, n_state = self.chain, self.bodies, self.n_state
        first = bodies[active[0]]
        names = {("input", k): f"in{k}" for k in range(n_state + 1)}
        for slot in range(len(first.constants)):
            used = [bodies[d].constants[slot] for d in active]
            names[("constant", slot)] = used[0] if len(set(used)) == 1 else self.constant(np.concatenate(
                [_lane_values(self.context.constants[n], chain[d]) for n, d in zip(used, active)], axis=-1), "lane_constant")
        nodes = [node for node in chain[active[0]].body.node if node.op_type != "Identity"]
        step = []
        for position, (node, op) in enumerate(zip(nodes, first.signature)):
            outputs = [f"n{position}_{j}" for j in range(op[4])]
            copy = helper.make_node(node.op_type, [names[i] if i else "" for i in op[3]], outputs)
            copy.attribute.extend(node.attribute)
            step.append(copy)
            names.update({("node", position, j): o for j, o in enumerate(outputs)})
        per_step, owners, elem = [], [], {}
        for d in active:
            for k, (canonical, value) in enumerate(zip(bodies[d].outputs, chain[d].body.output)):
                elem[canonical] = value.type.tensor_type.elem_type
                if k < n_state or not chain[d].scan.output[k]:
                    continue
                if canonical not in per_step:
                    per_step.append(canonical)
                    owners.append([])
                owners[per_step.index(canonical)].append((d, k - n_state))
        outputs = []
        for k, canonical in enumerate(list(first.outputs[:n_state]) + per_step):
            step.append(helper.make_node("Identity", [names[canonical]], [f"out{k}"]))
            outputs.append(helper.make_tensor_value_info(f"out{k}", elem[canonical], None))
        template = chain[active[0]].body.input
        inputs = [helper.make_tensor_value_info(f"in{k}", v.type.tensor_type.elem_type, None) for k, v in enumerate(template)]
        return helper.make_graph(step, "wave_step", inputs, outputs), owners


def _scan(body: onnx.GraphProto, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    return helper.make_node("Scan", inputs, outputs, body=body, num_scan_inputs=1)


def concat_tree(values: list[str], output: str) -> list[onnx.NodeProto]:
    """Nodes concatenating ``values`` on axis 0 into ``output``, none wider than the limit."""
    if len(values) <= CONCAT_MAX_INPUTS:
        return [helper.make_node("Concat", values, [output], axis=0)]
    groups = [values[i:i + CONCAT_MAX_INPUTS] for i in range(0, len(values), CONCAT_MAX_INPUTS)]
    parts = [f"{output}_part{k}" for k in range(len(groups))]
    nodes = [helper.make_node("Concat", g, [p], axis=0) for g, p in zip(groups, parts)]
    return nodes + concat_tree(parts, output)


def _stack(parts: list[str], output: str) -> list[onnx.NodeProto]:
    return concat_tree(parts, output) if len(parts) > 1 else [helper.make_node("Identity", parts, [output])]


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` reordered so that every value is computed before it is read, otherwise in their order."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    order, placed, visiting = [], set(), set()
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            k, expanded = stack.pop()
            if k in placed:
                continue
            if expanded:
                placed.add(k)
                order.append(nodes[k])
                continue
            if k in visiting:
                raise CaptureError("--cuda-graph: the wavefront schedule made a cycle (a psu-export bug, please report it)")
            visiting.add(k)
            stack.append((k, True))
            stack += [(producer[i], False) for i in sorted(node_reads(nodes[k])) if i in producer and producer[i] not in placed]
    return order
