"""Hoist: the layers that read one input repeated over time run once, not T times.

SpikingJelly's and BrainCog's static-image models repeat each sample over a new time
axis before their first layers (``x.unsqueeze(0).repeat(T, 1, 1, 1, 1)``, then a
convolution and a batch norm over the ``[T*B, ...]`` fold): T copies of one computation,
in the original and in its naive export alike.  :func:`hoist_repeated_inputs` moves the
repeat down the captured graph of a multi-step model, past the operations that act on
each sample alone, so that they run once on ``[B, ...]``; their result is repeated where
something that depends on time (a neuron) reads it.  Each sample goes through the same
operations; only the copies are dropped.

A value of the graph is tracked in one of two forms of a base ``b[B, ...]``:

* ``repeated``: ``v[T, B, ...]`` with ``v[t] = b`` at every step;
* ``folded``: ``v[T*B, ...]``, the repeated tensor with time folded into the batch
  (``v[t*B + i] = b[i]``).

Rules, on ``aten`` operations:

* ``repeat(unsqueeze(b, 0), [T, 1, ...])`` and ``expand(unsqueeze(b, 0), [T, -1, ...])``
  are ``repeated``;
* ``flatten(v, 0, 1)`` or a ``view`` / ``reshape`` to ``[-1, ...]`` (rows that tile one
  sample) of a ``repeated`` value is ``folded``; ``unflatten(v, 0, [T, B])`` or a ``view`` /
  ``reshape`` to ``[T, B, ...]`` of a ``folded`` one is ``repeated`` (the view may reshape
  the sample dimensions too);
* an operation on each sample (:data:`PER_SAMPLE`: convolution, pooling; batch norm in
  evaluation) of a ``folded`` value, and an operation on the trailing dimensions
  (:data:`PER_ELEMENT`: linear, activations; dropout in evaluation; :data:`ARITHMETIC`
  with a number or a constant that does not broadcast over the leading axes; ``flatten``
  of the sample dimensions) of either form, is the same form of that operation applied
  to the base.

Any other reader gets the repeated tensor, rebuilt from the base just before it: an
``expand`` for a neuron (whose exported function then reads the one step, no copy over
time), a ``repeat`` for anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from .capture import OPAQUE_NEURON, module_path

aten = torch.ops.aten

#: operations on each sample alone, where dimension 0 is the batch (``args[0]`` the input)
PER_SAMPLE = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
}
#: operations on each element or on the last dimension alone (``args[0]`` the input)
PER_ELEMENT = {
    aten.linear.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default, aten.gelu.default,
    aten.silu.default, aten.elu.default, aten.leaky_relu.default, aten.hardtanh.default, aten.abs.default,
    aten.neg.default, aten.clone.default, aten.contiguous.default,
}
#: elementwise arithmetic: per element when the other operand is a number or a constant
#: with fewer dimensions than the tracked value (so it does not broadcast over time or batch)
ARITHMETIC = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def repeat_source(node: fx.Node) -> tuple[fx.Node, int, object] | None:
    """``(x, d, n)`` when ``node`` is ``x`` repeated ``n`` times along a new axis ``d``:
    ``x.unsqueeze(d).expand(...)`` (``einops.repeat(x, 'b ... -> t b ...')``) or
    ``x.unsqueeze(d).repeat(...)`` with every other axis kept; else None."""
    if node.op != "call_function" or node.target not in (aten.expand.default, aten.repeat.default):
        return None
    base, sizes = node.args[0], node.args[1]
    if not (isinstance(base, fx.Node) and base.target is aten.unsqueeze.default and isinstance(base.args[1], int)):
        return None
    shape = base.meta["val"].shape if "val" in base.meta else None
    dim = base.args[1] % len(shape) if shape is not None else -1
    if shape is None or len(sizes) != len(shape) or dim < 0:
        return None
    # the other axes keep their size: expand by -1 or their own size, repeat once
    kept = (lambda s, n: s in (-1, n)) if node.target is aten.expand.default else (lambda s, n: s == 1)
    if not all(kept(s, n) for i, (s, n) in enumerate(zip(sizes, shape)) if i != dim):
        return None
    return base.args[0], dim, sizes[dim]


@dataclass(frozen=True)
class _Form:
    kind: str  # "repeated" | "folded"
    base: fx.Node  # the value of one step, [B, ...]
    steps: object  # T: an int or a SymInt node
    ndim: int  # the base's number of dimensions


def hoist_repeated_inputs(graph: fx.Graph) -> list[str]:
    """Run the operations on a repeated input once (module docstring); returns the names
    of the operations now run once (those of their modules where known), empty when the
    graph is unchanged."""
    varying = _depends_on_input(graph)
    forms: dict[fx.Node, _Form] = {}
    hoisted: list[fx.Node] = []
    created: list[fx.Node] = []
    for node in list(graph.nodes):
        source = repeat_source(node)
        if source is not None and source[1] == 0 and _ndim(source[0]) is not None:
            forms[node] = _Form("repeated", source[0], source[2], _ndim(source[0]))
            continue
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node) or node.args[0] not in forms:
            continue  # (a tracked value read other than as the first argument gets the repeat)
        form = forms[node.args[0]]
        with graph.inserting_before(node):
            result = _apply(graph, node, form, varying)
        if result is None:
            continue
        forms[node], new_nodes, computes = result
        created.extend(new_nodes)
        if computes:
            hoisted.append(node)
    if not hoisted:
        for node in reversed(created):
            graph.erase_node(node)
        return []
    for node, form in forms.items():
        readers = [u for u in node.users if u not in forms]
        for by_neuron in (True, False):
            group = [u for u in readers if (u.target is OPAQUE_NEURON) == by_neuron]
            if group:
                with graph.inserting_before(node):
                    whole = _materialize(graph, form, copy=not by_neuron)
                for reader in group:
                    reader.replace_input_with(node, whole)
    for node in reversed(list(graph.nodes)):
        if node in forms and not node.users:
            graph.erase_node(node)
            for arg in node.args:  # the unsqueeze under a repeat
                if isinstance(arg, fx.Node) and arg.target is aten.unsqueeze.default and not arg.users:
                    graph.erase_node(arg)
    graph.lint()
    return _names(hoisted)


def _apply(graph: fx.Graph, node: fx.Node, form: _Form, varying: set[fx.Node]):
    """``(form of node, nodes created, whether it computes)`` or None when ``node`` must read the
    repeated tensor itself."""
    target, args = node.target, node.args
    out_ndim = _ndim(node)
    if out_ndim is None or any(isinstance(a, fx.Node) and a in varying for a in list(args[1:]) + list(node.kwargs.values())
                               if target not in _VIEWS):
        return None
    repeated = form.kind == "repeated"
    lead = 1 if repeated else 0  # dimensions before the base's own in the tracked value

    def same(new_target, new_args, kind=form.kind, computes=True):  # the same op on the base
        new = graph.call_function(new_target, (form.base, *new_args), dict(node.kwargs))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        return _Form(kind, new, form.steps, out_ndim - (1 if kind == "repeated" else 0)), [new], computes

    if target is aten.flatten.using_ints:
        start, end = (a % (form.ndim + lead) for a in (args[1] if len(args) > 1 else 0, args[2] if len(args) > 2 else -1))
        if repeated and (start, end) == (0, 1):
            return _Form("folded", form.base, form.steps, form.ndim), [], False
        return same(target, (start - lead, end - lead), computes=False) if start > lead else None
    if target is aten.unflatten.int:
        dim, sizes = args[1] % (form.ndim + lead), list(args[2])
        if not repeated and dim == 0 and len(sizes) == 2 and _same(sizes[0], form.steps):
            return _Form("repeated", form.base, form.steps, form.ndim), [], False
        return same(target, (dim - lead, sizes), computes=False) if dim > lead else None
    if target in _VIEWS:
        shape = list(args[1])
        if len(shape) >= 2 and _same(shape[0], form.steps):  # -> [T, B, ...]: v[t] is the base, reshaped
            return same(target, ([shape[1], *shape[2:]],), kind="repeated", computes=False)
        if (shape and _divides(shape[1:], args[0], lead + 1)
                and (shape[0] == -1 or (not repeated and _same_size(node, args[0], 0)))):
            # -> [-1, ...] of whole samples: time stays the outermost axis of the fold
            return same(target, ([-1, *shape[1:]],), kind="folded", computes=False)
        return None
    if target in PER_SAMPLE and not repeated:
        return same(target, args[1:])
    if target is aten.batch_norm.default and not repeated and len(args) > 5 and args[5] is False:
        return same(target, args[1:])
    if target is aten.dropout.default and len(args) > 2 and args[2] is False:
        return same(target, args[1:])
    if target in PER_ELEMENT:
        return same(target, args[1:])
    if target in ARITHMETIC and len(args) >= 2:
        other_ndim = 0 if isinstance(args[1], (int, float)) else _ndim(args[1])
        if other_ndim is not None and other_ndim < _ndim(args[0]):
            return same(target, args[1:])
    return None


def _materialize(graph: fx.Graph, form: _Form, copy: bool) -> fx.Node:
    """The tracked value itself, the base over T, folded for a folded value: a ``repeat``
    (a contiguous copy, as the original made: later views need one) or, for a neuron
    (``copy`` False), an ``expand``, which the exported neuron reads as its one step
    (:func:`psu_export.ops.registry.attach_functions`: no ``[T, B, ...]`` copy is written)."""
    step = graph.call_function(aten.unsqueeze.default, (form.base, 0))
    if copy:
        whole = graph.call_function(aten.repeat.default, (step, [form.steps] + [1] * form.ndim))
    else:  # to the base's own sizes, which the export writes as the expanded shape
        sizes = [graph.call_function(aten.sym_size.int, (form.base, d)) for d in range(form.ndim)]
        whole = graph.call_function(aten.expand.default, (step, [form.steps, *sizes]))
    return graph.call_function(aten.flatten.using_ints, (whole, 0, 1)) if form.kind == "folded" else whole


def _depends_on_input(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on a graph input (anything else is a constant or a parameter)."""
    varying: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in varying for a in node.all_input_nodes):
            varying.add(node)
    return varying


def _ndim(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _same(a, b) -> bool:
    """Whether two size arguments are the same number or the same node."""
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b)


def _same_size(node: fx.Node, source: fx.Node, dim: int) -> bool:
    """Whether ``node`` keeps ``source``'s size at ``dim`` (compared as recorded, no guard)."""
    a, b = node.meta.get("val"), source.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and str(a.shape[dim]) == str(b.shape[dim])


def _divides(sizes: list, source: fx.Node, first: int) -> bool:
    """Whether ``sizes`` (numbers) tile the sample of ``source``: the dimensions from ``first`` on."""
    value = source.meta.get("val")
    if not all(isinstance(n, int) and n > 0 for n in sizes) or not isinstance(value, torch.Tensor):
        return False
    sample = 1
    for n in value.shape[first:]:
        if not isinstance(n, int):
            return False
        sample *= n
    return sample % math.prod(sizes) == 0


def _names(nodes: list[fx.Node]) -> list[str]:
    """Each hoisted operation by its module's path where the capture recorded one, else its node."""
    return list(dict.fromkeys(module_path(node) for node in nodes))
