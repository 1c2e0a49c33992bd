"""Find: re-roll the captured time loop and turn each neuron's chain of calls into a site.

The captured graph is ``prefix + T x body + suffix``: the Python time loop unrolled.
:func:`find_sites` locates the repeating body from the neuron calls, checks that the T
copies are the same computation, and that the only values carried from one step to the
next are neuron states (anything else is recurrent feedback, which is refused with the
node where matching stopped).  The result, :class:`TimeLoop`, tells the rewrite which
nodes run once (static), which run over all steps at once (body, iteration 0 standing for
every step), and how the suffix gathers per-step values.

Before matching, :func:`reroll` writes three Python idioms in the form a loop over
``range(T)`` has: a record grown by ``torch.cat`` each step and a buffer filled by
``out[t] = v`` become one ``cat`` / ``stack`` after the loop, and ``for x_t in x`` (an
``unbind`` before the loop) becomes ``x[t]`` at each step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .capture import OPAQUE_NEURON, CapturedGraph, NeuronModule, is_multi_step
from .errors import CaptureError, NotConvertibleError
from .invariant import hoist_repeated_inputs, repeat_source
from .kernels import Algorithm, choose_algorithm
from .spec import NeuronSpec


@dataclass
class NeuronSite:
    """One neuron layer of the model as it will be rewritten."""

    name: str
    source_class: str
    spec: NeuronSpec
    algorithm: Algorithm
    neuron: NeuronModule
    call: fx.Node  # the iteration-0 call standing for all steps
    init_states: list[fx.Node | None]  # per state role, the value passed in at step 0

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "source_class": self.source_class,
            "spec": self.spec.to_json(),
            "algorithm": self.algorithm.name,
            "algorithm_reason": self.algorithm.reason,
        }


@dataclass
class TimeLoop:
    """The re-rolled loop: how each node of the captured graph takes part."""

    steps: int
    static: set[fx.Node] = field(default_factory=set)
    body: list[fx.Node] = field(default_factory=list)  # iteration 0, in order
    copy_of: dict[fx.Node, tuple[fx.Node, int]] = field(default_factory=dict)  # any body node -> (iteration-0 node, k)
    suffix: list[fx.Node] = field(default_factory=list)
    time_selects: dict[fx.Node, tuple[fx.Node, int]] = field(default_factory=dict)  # select(x, dim, k) -> (x, dim)
    #: ``acc_k = acc_{k-1} + f_k`` (a running sum over steps, e.g. a spike count): step 0's add -> (initial value, f_0)
    accumulators: dict[fx.Node, tuple[object, fx.Node]] = field(default_factory=dict)
    #: no loop at all: every neuron takes the whole sequence (multi-step modules), so the
    #: captured graph already runs all steps at once; every node is ``static``
    sequence: bool = False
    #: node -> where its arguments hold the number of steps T: ``(i,)`` for ``args[i]``,
    #: ``(i, j)`` for ``args[i][j]`` (``x.view(x.size(0), ...)`` before a loop over ``x``,
    #: ``count / x.shape[0]`` in or after it: the capture wrote its own T as a number)
    time_length_args: dict[fx.Node, list[tuple[int, ...]]] = field(default_factory=dict)

    def ordered_nodes(self) -> list[fx.Node]:
        """The static prefix, the body (iteration 0) and the suffix, each in graph order."""
        graph = (next(iter(self.static), None) or (self.body or self.suffix)[0]).graph  # (a loop-free graph has static nodes only)
        return [n for n in graph.nodes if n in self.static] + self.body + self.suffix

    def reads_capture_length(self) -> bool:
        """Whether an argument is a number equal to the capture's T (it may be T itself:
        :func:`mark_time_length_args` tells by a second capture)."""
        return any(_is_number(a, self.steps) for node in self.ordered_nodes() for a in _numbers(node.args))


def _numbers(args) -> list:
    """The arguments and the items of list arguments."""
    return [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]


def _is_number(value, equal_to) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == equal_to


def mark_time_length_args(loop: TimeLoop, longer: TimeLoop) -> None:
    """Record in ``loop`` the arguments that are T: equal to ``loop.steps`` there and to
    ``longer.steps`` in ``longer``, the same model captured one step longer (its prefix, body
    and suffix the same nodes).  Other numbers derived from T stay as captured (verify's
    runs at other T catch them)."""
    mine, theirs = loop.ordered_nodes(), longer.ordered_nodes()
    if [n.target for n in mine] != [n.target for n in theirs]:
        return
    def follows_t(a, b) -> bool:
        return _is_number(a, loop.steps) and _is_number(b, longer.steps)

    for node, other in zip(mine, theirs):
        where = []
        for i, (a, b) in enumerate(zip(node.args, other.args)):
            if follows_t(a, b):
                where.append((i,))
            elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
                where += [(i, j) for j, (x, y) in enumerate(zip(a, b)) if follows_t(x, y)]
        if where:
            loop.time_length_args[node] = where


def _calls(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    calls: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is OPAQUE_NEURON:
            calls.setdefault(node.args[2], []).append(node)
    return calls


#: ops that only reorder, reshape, copy or cast their input: a loop may read time steps from
#: their result (a reshape must keep the time axis: :func:`_time_select` checks its length)
_INPUT_VIEWS = {
    torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default, torch.ops.aten.alias.default, torch.ops.aten._to_copy.default,
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.flatten.using_ints, torch.ops.aten.unflatten.int, torch.ops.aten.unsqueeze.default,
}


def _whole_slice_of(node) -> fx.Node | None:
    """``x`` when ``node`` is ``x[:]`` along some dim (``slice(x, dim, 0, >= 2**62)``, step 1)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor:
        return None
    x, _dim, start, end, step = list(node.args) + [0, 0, None, None, 1][len(node.args):]
    return x if start in (0, None) and (end is None or end >= 2**62) and step == 1 else None


def _is_input_view(node: fx.Node) -> bool:
    """The model's input, or a reordering / copy of it (``x.transpose(0, 1)`` before the loop)."""
    while node.op != "placeholder":
        inner = _whole_slice_of(node)
        if inner is None and node.op == "call_function" and node.target in _INPUT_VIEWS and isinstance(node.args[0], fx.Node):
            inner = node.args[0]
        if inner is None:
            return False
        node = inner
    return True


def _time_select(node: fx.Node, k: int, before_loop) -> tuple[fx.Node, int] | None:
    """``(x, dim)`` when ``node`` is ``select(x, dim, k)`` of the input ``x``, of a whole-range
    slice of it (``x[:, k]`` is ``select(slice(x, 0, 0, 2**63 - 1), 1, k)``), or of a view of
    it made before the loop (``before_loop(x)``), such as ``x = x.transpose(0, 1)``."""
    if node.op != "call_function" or node.target is not torch.ops.aten.select.int or node.args[2] != k:
        return None
    source = _whole_slice_of(node.args[0]) or node.args[0]
    if isinstance(source, fx.Node) and (source.op == "placeholder" or (before_loop(source) and _is_input_view(source))):
        return source, node.args[1]
    return None


def _accumulation(n0: fx.Node, nk: fx.Node, k: int, prev: fx.Node, step_copy) -> tuple[object, fx.Node] | None:
    """``(initial value, f_0)`` when step k's ``nk`` is ``add(prev, f_k)`` (either order, no alpha;
    or ``prev.add_(f_k)``),
    ``prev`` its own copy of step k - 1, and step 0's ``n0`` adds ``f_0`` to a value from before
    the loop or a number (``count = 0`` then ``count = count + spk``); ``step_copy(f_k, k)`` is
    f_k's step-0 node, None unless f_k belongs to step k."""
    if nk.kwargs.get("alpha", 1) != 1 or len(nk.args) != 2 or prev not in nk.args:
        return None
    in_place = nk.target is torch.ops.aten.add_.Tensor  # count += spk: the sum is the mutated first argument
    if not (nk.target is torch.ops.aten.add.Tensor or (in_place and nk.args[0] is prev)):
        return None
    f_k = nk.args[1] if nk.args[0] is prev else nk.args[0]
    f_0 = step_copy(f_k, k) if isinstance(f_k, fx.Node) else None
    if f_0 is None or len(n0.args) != 2 or f_0 not in n0.args or n0.kwargs.get("alpha", 1) != 1:
        return None
    return (n0.args[1] if n0.args[0] is f_0 else n0.args[0]), f_0


def _flat_args(node: fx.Node) -> list:
    return list(torch.utils._pytree.tree_leaves((node.args, node.kwargs)))


class _Mismatch(Exception):
    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"node {node.name} ({node.target}): {why}")
        self.node = node


def _check_states(call: fx.Node, k: int, calls: dict[int, list[fx.Node]], pos: dict, start: int, end: int) -> None:
    """Step 0 takes its states from outside the loop; step k > 0 from its own step k-1."""
    states = list(call.args[1])
    if k == 0:
        for s in states:
            if start <= pos[s] < end:
                raise _Mismatch(call, "the initial neuron state is computed inside the loop")
        return
    prev_call = calls[call.args[2]][k - 1]
    n_states = call.args[3] - 1
    ok = len(states) == n_states and all(
        s.target is operator.getitem and s.args[0] is prev_call and s.args[1] == slot + 1 for slot, s in enumerate(states)
    )
    if not ok:
        raise _Mismatch(call, "a neuron state is not carried over from the same neuron's previous step")


def _match_loop(nodes: list[fx.Node], start: int, period: int, steps: int, calls: dict[int, list[fx.Node]]) -> TimeLoop:
    """Check that nodes[start : start + steps*period] are ``steps`` copies of one body."""
    pos = {n: i for i, n in enumerate(nodes)}
    end = start + steps * period
    if end > len(nodes) or any(n.op in ("placeholder", "output") for n in nodes[start:end]):
        raise _Mismatch(nodes[min(end, len(nodes)) - 1], "the loop body does not tile the graph")
    loop = TimeLoop(steps)
    loop.body = nodes[start : start + period]
    before_loop = lambda node: pos[node] < start  # noqa: E731

    def step_copy(node: fx.Node, k: int) -> fx.Node | None:
        """Step 0's copy of ``node`` when it is a node of step k (else None)."""
        i = pos.get(node, -1) - start
        return nodes[start + i - k * period] if k * period <= i < (k + 1) * period else None

    for k in range(steps):
        for j in range(period):
            n0, nk = nodes[start + j], nodes[start + k * period + j]
            loop.copy_of[nk] = (n0, k)
            if nk.op != n0.op or nk.target != n0.target:
                raise _Mismatch(nk, f"step {k} differs from step 0 ({n0.name})")
            selected = _time_select(n0, 0, before_loop)
            if selected is not None:
                if _time_select(nk, k, before_loop) != selected:
                    raise _Mismatch(nk, f"step {k} does not read time step {k} of the input")
                source, dim = selected
                length = source.meta["val"].shape[dim] if source.meta.get("val") is not None else None
                if source.op != "placeholder" and length != steps:  # x.view(T * B, -1)[t] is no time step
                    raise _Mismatch(n0, f"reads {source.name} (a reshape of the input) along a dimension of {length}, not the {steps} time steps")
                loop.time_selects[n0] = selected
                continue
            if k > 0:
                accumulated = _accumulation(n0, nk, k, nodes[start + (k - 1) * period + j], step_copy)
                if accumulated is not None and (n0 not in loop.accumulators or loop.accumulators[n0] == accumulated):
                    init = accumulated[0]
                    if isinstance(init, fx.Node) and start <= pos[init] < end:
                        raise _Mismatch(n0, "a running sum that starts from a value computed inside the loop")
                    loop.accumulators[n0] = accumulated
                    continue
            if n0.target is OPAQUE_NEURON:
                _check_states(nk, k, calls, pos, start, end)
                a0, ak = [n0.args[0]], [nk.args[0]]
            else:
                a0, ak = _flat_args(n0), _flat_args(nk)
            if len(a0) != len(ak):
                raise _Mismatch(nk, "argument structure differs between steps")
            for x0, xk in zip(a0, ak):
                if isinstance(x0, fx.Node) != isinstance(xk, fx.Node):
                    raise _Mismatch(nk, "argument kinds differ between steps")
                if not isinstance(x0, fx.Node):
                    if x0 != xk:
                        raise _Mismatch(nk, f"constant argument {x0!r} at step 0 is {xk!r} at step {k}")
                    continue
                inside = start <= pos[x0] < end
                if (not inside and x0 is xk) or (inside and (k == 0 or pos.get(xk) == pos[x0] + k * period)):
                    continue
                if start <= pos.get(xk, -1) < start + k * period:
                    raise _Mismatch(
                        nk,
                        f"uses {xk.name} from an earlier step: a value carried between time steps that is not a "
                        "neuron state (recurrent feedback, or a running sum that feeds back), which cannot be parallelised",
                    )
                raise _Mismatch(nk, f"reads {xk.name} at step {k} where step 0 reads {x0.name}: the steps do not repeat one computation")
    return loop


_ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)


def _start_first_step_sums(graph: fx.Graph, calls: dict[int, list[fx.Node]], pos: dict) -> bool:
    """Give a running sum that step 0 starts by assignment an explicit first add; True if any.

    SpikingJelly's classic examples sum the output as ``out = f_0`` at step 0 and
    ``out += f_t`` (or ``out = out + f_t``) after it, so step 0 lacks the add every later
    step has and the neuron calls are unevenly spaced.  Each such chain ``a_1 = f_0 + f_1``,
    ``a_t = a_{t-1} + f_t`` gets ``a_0 = f_0 + 0`` at step 0's matching place (``a_1`` then
    adds to it): the running sum of ``count = 0`` style (:func:`_accumulation`), the same
    floats (``0 + f_0`` is ``f_0``, but for the sign of a zero).
    """
    first = [pos[c[1]] - pos[c[0]] for c in calls.values()]
    later = {pos[c[k + 1]] - pos[c[k]] for c in calls.values() for k in range(1, len(c) - 1)}
    if len(later) != 1 or len(set(first)) != 1:
        return False
    period, shift = later.pop(), first[0]  # step 1's nodes sit `shift` places after their step-0 copies
    missing = period - shift  # the adds step 0 lacks
    nodes = list(graph.nodes)
    steps = len(next(iter(calls.values())))
    call1 = min(pos[c[1]] for c in calls.values())
    chains = []
    for a1 in nodes[call1 - (period - 1):call1 + period]:
        if a1.op != "call_function" or a1.target not in _ADDS or len(a1.args) != 2 or a1.kwargs.get("alpha", 1) != 1:
            continue
        f0, f1 = a1.args
        if not (isinstance(f0, fx.Node) and isinstance(f1, fx.Node) and pos[f1] - pos[f0] == shift and len(f0.users) == 1):
            continue
        later_adds = [nodes[pos[a1] + k * period] if pos[a1] + k * period < len(nodes) else None for k in range(1, steps - 1)]
        prev, ok = a1, True
        for ak in later_adds:
            ok = ok and ak is not None and ak.target is a1.target and ak.args[0] is prev
            prev = ak
        if ok:
            chains.append((a1, f0))
    if not chains or len(chains) != missing:
        return False
    for a1, f0 in chains:
        with graph.inserting_before(nodes[pos[a1] - shift]):
            a0 = graph.call_function(a1.target, (f0, 0))
        a1.replace_input_with(f0, a0)
    graph.lint()
    return True


def _sums_after_loop(graph: fx.Graph) -> None:
    """Move a sum of the steps' values taken after the loop into it.

    ``sum(outputs)`` of a list of per-step outputs (BrainCog's model zoo returns ``sum(outputs)
    / len(outputs)``) is the chain ``a_0 = f_0 + 0``, ``a_t = a_{t-1} + f_t`` after the last
    step.  Each add is moved to just after the value it adds, which makes it the running sum
    that :func:`_accumulation` recognises, read at the last step: the same floats, added in
    the same order.  The start may also be a value from before the loop or another number.
    """
    calls = _calls(graph)
    counts = {len(c) for c in calls.values()}
    if len(counts) != 1:
        return
    steps = counts.pop()
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_call = min(order[c[0]] for c in calls.values())
    last_call = max(order[c[-1]] for c in calls.values())

    def adds(node) -> bool:
        return node.op == "call_function" and node.target is torch.ops.aten.add.Tensor and len(node.args) == 2 and not node.kwargs

    moved: set[fx.Node] = set()
    for a_0 in [n for n in graph.nodes if adds(n) and order[n] > last_call]:
        if a_0 in moved:
            continue

        def in_loop(value, a_0=a_0) -> bool:  # made by a step: after the first call, before the sum
            return isinstance(value, fx.Node) and first_call < order[value] < order[a_0]

        starts = [f for f, init in (a_0.args, a_0.args[::-1])
                  if in_loop(f) and (isinstance(init, (int, float)) or (isinstance(init, fx.Node) and order[init] < first_call))]
        if not starts:
            continue
        chain, values = [a_0], [starts[0]]
        while len(chain) < steps and len(chain[-1].users) == 1:
            (user,) = chain[-1].users
            f = None
            if adds(user) and chain[-1] in user.args:
                f = user.args[1] if user.args[0] is chain[-1] else user.args[0]
            if not in_loop(f):
                break
            chain.append(user)
            values.append(f)
        gaps = {order[b] - order[a] for a, b in zip(values, values[1:])}
        if len(chain) != steps or len(gaps) != 1 or gaps.pop() <= 0:
            continue
        for add, value in zip(chain, values):
            value.append(add)
        moved.update(chain)
    graph.lint()


def _repeated_selects(graph: fx.Graph) -> None:
    """Read one value repeated over a new time axis, step by step, as that value.

    ``x.unsqueeze(d).expand(T, ...)`` (``einops.repeat(x, 'b ... -> t b ...')``, BrainCog's
    ``direct`` encoder) or ``x.unsqueeze(d).repeat(..., T, ...)`` then ``[t]`` along ``d`` is ``x``
    at every step, so each step's select becomes ``x`` itself: the steps then read a static
    input, as a loop over ``range(T)`` that uses ``x`` directly does."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.select.int:
            continue
        source = repeat_source(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if source is None or source[1] != node.args[1]:
            continue
        repeat = node.args[0]
        node.replace_all_uses_with(source[0])
        graph.erase_node(node)
        for unused in (repeat, repeat.args[0]):
            if not unused.users:
                graph.erase_node(unused)
    graph.lint()


def _selects_from_unbind(graph: fx.Graph) -> None:
    """Write ``for x_t in x`` (``x.unbind(dim)``, one ``getitem`` per step, all made before
    the loop) as ``select(x, dim, t)`` at step t's first use, where a loop over
    ``range(T)`` reading ``x[t]`` has it: each step then reads its own time step."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for unbind in [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.unbind.int]:
        source, dim = unbind.args[0], (unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0))
        if not (isinstance(source, fx.Node) and _is_input_view(source)):
            continue
        for item in list(unbind.users):
            if item.target is not operator.getitem or not item.users:
                continue
            with graph.inserting_before(min(item.users, key=order.__getitem__)):
                select = graph.call_function(torch.ops.aten.select.int, (source, dim, item.args[1]))
            select.meta = dict(item.meta)
            item.replace_all_uses_with(select)
            graph.erase_node(item)
        if not unbind.users:
            graph.erase_node(unbind)
    graph.lint()


def _same_tensor_type(value, shape: tuple, dtype) -> bool:
    return value is not None and tuple(value.shape) == shape and value.dtype == dtype


def _stacks_from_step_writes(graph: fx.Graph) -> None:
    """Write ``out = torch.zeros(T, ...)`` filled by ``out[t] = v_t`` in the loop (one
    ``copy_`` into ``select(out, dim, t)`` per step, every index written once, ``out`` read only
    after the last write) as ``torch.stack([v_0, ..., v_{T-1}], dim)`` after the loop, which
    the suffix reads as a whole sequence (and at any T)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_buffer: dict[fx.Node, list] = {}  # buffer -> [(index, select, copy, whole slices of the select)]
    for copy in [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default and not n.users]:
        select, trailing = copy.args[0], []
        while _whole_slice_of(select) is not None and len(select.users) == 1:  # out[t, :, :] = v
            trailing.append(select)
            select = _whole_slice_of(select)
        if isinstance(select, fx.Node) and select.target is torch.ops.aten.select.int and len(select.users) == 1:
            buffer = _whole_slice_of(select.args[0]) or select.args[0]  # out[:, t] selects from out[:]
            by_buffer.setdefault(buffer, []).append((select.args[2], select, copy, trailing))
    for buffer, writes in by_buffer.items():
        if len(writes) < 2 or buffer.op != "call_function":  # a tensor made in forward (not an input or a parameter)
            continue
        writes.sort(key=lambda w: order[w[2]])
        dims = {w[1].args[1] for w in writes}
        full, values, last = buffer.meta.get("val"), [w[2].args[1] for w in writes], writes[-1][2]
        views = {w[1].args[0] for w in writes}
        reads = [u for u in buffer.users if u not in views and u not in {w[1] for w in writes}]
        if len(dims) != 1 or full is None or [w[0] for w in writes] != list(range(len(writes))):
            continue
        dim = dims.pop()
        step_shape = tuple(full.shape[:dim]) + tuple(full.shape[dim + 1:])
        if (not reads or full.shape[dim] != len(writes) or any(order[r] < order[last] for r in reads)
                or not all(isinstance(v, fx.Node) and _same_tensor_type(v.meta.get("val"), step_shape, full.dtype) for v in values)):
            continue
        with graph.inserting_before(min(reads, key=order.__getitem__)):  # after the loop: where it is first read
            stacked = graph.call_function(torch.ops.aten.stack.default, (values, dim))
        stacked.meta["val"] = full
        for read in reads:
            read.replace_input_with(buffer, stacked)
        for _, select, copy, trailing in writes:
            for node in [copy, *trailing, select]:
                graph.erase_node(node)
        for view in views - {buffer}:
            if not view.users:
                graph.erase_node(view)
        if not buffer.users:
            graph.erase_node(buffer)
    graph.lint()


def _cats_from_growing_records(graph: fx.Graph) -> None:
    """Write a record grown by one concatenation a step (``rec = torch.empty(0, ...)``, then
    ``rec = torch.cat((rec, v_t.unsqueeze(0)))`` in the loop) as one ``torch.cat([u_0, ...,
    u_{T-1}], dim)`` of the steps' pieces where the record is read after the loop."""
    order = {n: i for i, n in enumerate(graph.nodes)}

    def grows(node) -> bool:
        return (node.op == "call_function" and node.target is torch.ops.aten.cat.default and len(node.args[0]) == 2
                and isinstance(node.args[0][0], fx.Node))

    def dim_of(node) -> int:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    def grown(node) -> fx.Node | None:
        """The next step's concatenation onto ``node``, if that is its only reader."""
        (user,) = node.users if len(node.users) == 1 else (None,)
        return user if user is not None and grows(user) and user.args[0][0] is node else None

    erased = set()
    for first in [n for n in graph.nodes if grows(n)]:
        if first in erased:
            continue
        start = first.args[0][0]
        empty = start.meta.get("val")
        if grows(start) or empty is None or empty.dim() == 0 or empty.shape[dim_of(first)] != 0:
            continue
        chain = [first]
        while (nxt := grown(chain[-1])) is not None:
            chain.append(nxt)
        if len(chain) < 2 or len({dim_of(c) for c in chain}) != 1 or not chain[-1].users:
            continue
        reads = list(chain[-1].users)
        with graph.inserting_before(min(reads, key=order.__getitem__)):  # after the loop: where it is first read
            whole = graph.call_function(torch.ops.aten.cat.default, ([c.args[0][1] for c in chain], dim_of(first)))
        whole.meta = dict(chain[-1].meta)
        chain[-1].replace_all_uses_with(whole)
        for node in reversed(chain):
            graph.erase_node(node)
        erased.update(chain)
        if not start.users and start.op == "call_function":
            graph.erase_node(start)
    graph.lint()


def reroll(gm: fx.GraphModule) -> TimeLoop:
    """Find the repeating loop body in the captured graph (see module docstring)."""
    _cats_from_growing_records(gm.graph)
    _stacks_from_step_writes(gm.graph)
    _selects_from_unbind(gm.graph)
    _repeated_selects(gm.graph)
    _sums_after_loop(gm.graph)
    nodes = list(gm.graph.nodes)
    calls = _calls(gm.graph)
    if not calls:
        raise CaptureError("no neuron call was captured")
    counts = {len(c) for c in calls.values()}
    if len(counts) != 1:
        raise NotConvertibleError({"time loop": f"neuron layers are called different numbers of times ({sorted(counts)})"})
    steps = counts.pop()
    pos = {n: i for i, n in enumerate(nodes)}
    if steps == 1:
        raise CaptureError("the capture ran a single time step; at least two are needed to find the loop")
    periods = {pos[c[k + 1]] - pos[c[k]] for c in calls.values() for k in range(steps - 1)}
    if len(periods) != 1 and _start_first_step_sums(gm.graph, calls, pos):
        return reroll(gm)
    if len(periods) != 1:
        raise NotConvertibleError({"time loop": "the neuron calls are not evenly spaced: the time steps do not repeat the same computation"})
    period = periods.pop()
    first = min(pos[c[0]] for c in calls.values())
    # the earliest start whose copies still line up, then later ones until one matches fully
    earliest = first
    while earliest > 0 and nodes[earliest - 1].op == "call_function" and all(
        earliest - 1 + k * period < len(nodes) and nodes[earliest - 1 + k * period].target == nodes[earliest - 1].target
        for k in range(steps)
    ):
        earliest -= 1
    problem = None
    for start in range(earliest, first + 1):
        try:
            loop = _match_loop(nodes, start, period, steps, calls)
        except _Mismatch as exc:
            problem = problem or exc
            continue
        end = start + steps * period
        loop.static = set(nodes[:start])
        loop.suffix = nodes[end:]
        return loop
    raise NotConvertibleError({"time loop": f"matching the time steps stopped at {problem}"})


def sequence_graph(captured: CapturedGraph) -> TimeLoop:
    """The graph of a model of multi-step neurons: nothing to re-roll, each neuron called once."""
    gm = captured.graph_module
    calls = _calls(gm.graph)
    if not calls:
        raise CaptureError("no neuron call was captured")
    repeated = {n.name: f"called {len(calls[n.index])} times per forward; a multi-step neuron must see the whole sequence once"
                for n in captured.neurons if len(calls.get(n.index, [])) > 1}
    if repeated:
        raise NotConvertibleError(repeated)
    hoisted = hoist_repeated_inputs(gm.graph)
    if hoisted:
        gm.recompile()
        captured.notes.append(f"run once instead of at every step (their input is repeated over time): {', '.join(hoisted)}")
    loop = TimeLoop(captured.capture_steps, sequence=True)
    loop.static = {n for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    return loop


def _algorithm(neuron: NeuronModule, time_steps: int, mode: str) -> Algorithm:
    own = neuron.converter.site_kernel(neuron.module)  # modules with their own dynamics (PSU family)
    return own[0] if own is not None else choose_algorithm(neuron.spec, time_steps, mode)


def find_sites(captured: CapturedGraph, mode: str = "exact") -> tuple[list[NeuronSite], TimeLoop]:
    """Re-roll the loop and describe each neuron layer (algorithms for reset ``mode``)."""
    loop = sequence_graph(captured) if is_multi_step(captured.neurons) else reroll(captured.graph_module)
    calls = _calls(captured.graph_module.graph)
    sites = []
    for neuron in captured.neurons:
        if neuron.index not in calls:
            continue  # defined but never called
        first = calls[neuron.index][0]
        roles = neuron.convention.state_roles
        given = list(first.args[1])
        init = given + [None] * (len(roles) - len(given))
        sites.append(
            NeuronSite(
                name=neuron.name,
                source_class=neuron.source_class,
                spec=neuron.spec,
                algorithm=_algorithm(neuron, captured.layout.time_steps, mode),
                neuron=neuron,
                call=first,
                init_states=init,
            )
        )
    return sites, loop
