"""The ``psu`` custom ONNX domain: each custom op is defined once, in one class.

A :class:`CustomOp` ties together the three roles of DESIGN.md section 4:

* a ``torch.library`` custom op that the rewritten PyTorch model calls (its eager
  implementation is also the checker's reference);
* a translation used by ``torch.onnx.export`` that emits one bare node of the ``psu``
  domain (the exporter would otherwise inline function bodies);
* the model-local ONNX function (standard ops only) attached after export, so a stock
  onnxruntime, CPU or CUDA, runs the model with no extra library while a viewer still
  shows one ``psu`` node per neuron layer.
"""

from __future__ import annotations

import functools
from typing import Callable, ClassVar

import onnx
from onnx import helper
from onnx.defs import OpSchema

DOMAIN = "psu"
#: Version of the ``psu`` domain: bump when an op's semantics change.
DOMAIN_VERSION = 1


class CustomOp:
    """Base class of a ``psu`` op.  Subclasses set ``torch_op`` and implement two methods."""

    #: the torch overload the rewritten model calls, e.g. ``torch.ops.psu.exact_neuron.default``
    torch_op: ClassVar[Callable]
    #: op types of this op are ``<prefix>_<variant>``; one function per variant
    op_type_prefixes: ClassVar[tuple[str, ...]]

    def translate(self, *args):
        """Called by the exporter with symbolic tensors; returns the output(s) of one psu node."""
        raise NotImplementedError

    def function(self, node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
        """The body of ``node``'s op type, from its attributes, in standard ONNX ops of ``opset``."""
        raise NotImplementedError


_REGISTRY: dict[Callable, CustomOp] = {}


def register(op: CustomOp) -> CustomOp:
    """Add ``op`` to the domain; refuses to silently replace an op already registered."""
    if op.torch_op in _REGISTRY:
        raise ValueError(f"a psu op is already registered for {op.torch_op}")
    _REGISTRY[op.torch_op] = op
    return op


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export`` (plain functions, as it requires)."""

    def plain(method):
        @functools.wraps(method)
        def translate(*args, **kwargs):
            return method(*args, **kwargs)

        return translate

    return {target: plain(op.translate) for target, op in _REGISTRY.items()}


@functools.lru_cache(maxsize=None)
def _onnxscript_op(op_type: str, n_inputs: int, n_outputs: int, attributes: tuple[tuple[str, str], ...]):
    """An onnxscript handle that emits a bare ``psu.<op_type>`` node (no body is inlined)."""
    from onnxscript import values

    attr_types = {"str": OpSchema.AttrType.STRING, "int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    schema = OpSchema(
        op_type,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter(f"in{i}", "T") for i in range(n_inputs)],
        outputs=[OpSchema.FormalParameter(f"out{i}", "T") for i in range(n_outputs)],
        type_constraints=[("T", ["tensor(float)"], "float32 tensors")],
        attributes=[OpSchema.Attribute(name, attr_types[kind], "") for name, kind in attributes],
    )
    return values.Op(values.Opset(DOMAIN, DOMAIN_VERSION), op_type, schema)


def emit_node(op_type: str, inputs: list, n_outputs: int, **attributes):
    """Emit one ``psu`` node from inside a translation function."""
    kinds = tuple((k, "str" if isinstance(v, str) else "float" if isinstance(v, float) else "int") for k, v in sorted(attributes.items()))
    handle = _onnxscript_op(op_type, len(inputs), n_outputs, kinds)
    return handle(*inputs, **attributes)


def make_function(node: onnx.NodeProto, body: list[onnx.NodeProto], inputs: list[str], outputs: list[str], opset: int) -> onnx.FunctionProto:
    """A model-local function for ``node``'s op type with the given body."""
    return helper.make_function(
        DOMAIN,
        node.op_type,
        inputs,
        outputs,
        body,
        [helper.make_opsetid("", opset)],
        attributes=[a.name for a in node.attribute],
    )


def walk_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and, depth first, of its subgraphs (Scan / Loop / If bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)


def _names_read(model: onnx.ModelProto) -> set[str]:
    """Every name read by a node (at any depth) or returned by the model or a subgraph."""
    read = {o.name for o in model.graph.output}
    for node in walk_nodes(model.graph):
        read.update(node.input)
        read.update(o.name for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for o in a.g.output)
    return read


#: op type suffix of a call whose only output read is the spikes (:func:`attach_functions`)
SPIKES_ONLY = "_spikes"


def _return_spikes_only(model: onnx.ModelProto) -> None:
    """A ``psu`` node whose outputs after the spikes nothing reads returns the spikes only.

    Its op type gets the :data:`SPIKES_ONLY` suffix: a function of its own, whose scan no
    longer stacks the membrane (:func:`psu_export.ops.linear.keep_outputs`).
    """
    read = _names_read(model)
    for node in walk_nodes(model.graph):
        if node.domain == DOMAIN and len(node.output) > 1 and not read.intersection(node.output[1:]):
            del node.output[1:]
            node.op_type += SPIKES_ONLY


#: op type suffix of a call whose input is one step's drive repeated over time (:func:`attach_functions`)
STATIC_DRIVE = "_static"


def _repeated_drive(node: onnx.NodeProto, producer: dict, initializers: dict) -> tuple[str, str] | None:
    """``(drive, shape)`` when ``node``'s input is ``Expand(Unsqueeze(drive, [0]), shape)`` (in
    the main graph, axes an initializer): one step's input repeated over time; else None."""
    expand = producer.get(node.input[0])
    unsqueeze = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) != 2:
        return None
    axes = initializers.get(unsqueeze.input[1])
    if axes is None or onnx.numpy_helper.to_array(axes).reshape(-1).tolist() != [0]:
        return None
    return unsqueeze.input[0], expand.input[1]


def _remove_unread(model: onnx.ModelProto, values: list[str]) -> None:
    """Remove what produces ``values`` in the main graph (nodes, in turn their inputs'
    producers, initializers) once nothing reads it: the ``Expand`` / ``Unsqueeze`` of a
    repeated drive and their shape constants."""
    pending = list(values)
    while pending:
        name = pending.pop()
        read = _names_read(model)
        node = next((n for n in model.graph.node if name in n.output), None)
        if node is not None and not read.intersection(node.output):
            model.graph.node.remove(node)
            pending.extend(node.input)
        initializer = next((t for t in model.graph.initializer if t.name == name), None)
        if initializer is not None and name not in read:
            model.graph.initializer.remove(initializer)


def layer_spike_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """``{layer: spike value}`` of every ``psu`` node of ``model``'s graph (its first output)."""
    out = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            layer = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "layer"), None)
            if layer is not None:
                out[layer.decode() if isinstance(layer, bytes) else layer] = node.output[0]
    return out


def attach_functions(model: onnx.ModelProto) -> list[str]:
    """Add the body of every ``psu`` op used in ``model`` as a model-local function.

    A node whose outputs after the spikes are read by nothing is first specialised to
    return its spikes only (:func:`_return_spikes_only`), and one whose input is one step
    repeated over time (:func:`_repeated_drive`) to read that step (op type suffix
    :data:`STATIC_DRIVE`, :func:`psu_export.ops.linear.read_static_drive`).  Returns the op
    types that were attached.  Idempotent.
    """
    from . import neuron  # noqa: F401  (registers the ops)
    from .linear import keep_outputs, read_static_drive

    _return_spikes_only(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    have = {(f.domain, f.name) for f in model.functions}
    by_op_type: dict[str, CustomOp] = {}
    for op in _REGISTRY.values():
        for op_type_prefix in op.op_type_prefixes:
            by_op_type[op_type_prefix] = op
    functions: dict[str, onnx.FunctionProto] = {}

    def function_of(node):  # the body of node's op type, built once
        if node.op_type not in functions:
            prefix = node.op_type.split("_", 1)[0]
            if prefix not in by_op_type:
                raise KeyError(f"no psu op defines {node.op_type}")
            function = by_op_type[prefix].function(node, opset)
            if len(node.output) < len(function.output):
                function = keep_outputs(function, len(node.output))
            functions[node.op_type] = function
        return functions[node.op_type]

    producer = {o: n for n in model.graph.node for o in n.output}
    initializers = {t.name: t for t in model.graph.initializer}
    repeated_inputs = []
    for node in walk_nodes(model.graph):
        if node.domain != DOMAIN or (DOMAIN, node.op_type) in have:
            continue
        repeated = _repeated_drive(node, producer, initializers)
        static = read_static_drive(function_of(node)) if repeated else None
        if static is not None:  # a static input current: the function reads its one step
            static.name = node.op_type = node.op_type + STATIC_DRIVE
            functions.setdefault(static.name, static)
            repeated_inputs.append(node.input[0])
            inputs = list(repeated) + list(node.input[1:])
            del node.input[:]
            node.input.extend(inputs)
    _remove_unread(model, repeated_inputs)
    attached = []
    for node in walk_nodes(model.graph):
        if node.domain == DOMAIN and (DOMAIN, node.op_type) not in have:
            model.functions.append(function_of(node))
            have.add((DOMAIN, node.op_type))
            attached.append(node.op_type)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return attached
