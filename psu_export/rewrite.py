"""Rewrite: the captured model as a time-parallel PyTorch module.

:class:`ParallelModel` walks the captured graph once:

* static nodes (before the loop, or inside it but independent of time) run once;
* body nodes of iteration 0 stand for every step: each runs once on a value carrying
  all steps (``[T, ...]``, :class:`Timed`), per-step layers through ``torch.vmap`` over
  time, neuron calls through the parallel kernel of their site;
* the other iterations' copies are skipped, and the suffix reads stacked sequences or
  the last step directly from the time-parallel values.

It has the original's inputs and outputs (``[T, B, ...]`` in and out for single-step
modules), and exports to ONNX with one ``psu`` node per neuron layer.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .capture import METADATA_ASSERTS, OPAQUE_NEURON, CapturedGraph
from .errors import NotConvertibleError
from .find import NeuronSite, TimeLoop
from .kernels import CLOSED_FORM_MAX_STEPS, reset_kernel
from .ops.neuron import StepOptions, closed_form_neuron, exact_neuron, never_minus_zero, plus_zero, step_spec
from .ops.reset import reset_neuron


class Timed:
    """A value of every time step at once: ``value[t]`` is step t's tensor."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value


class _Folded(Timed):
    """A :class:`Timed` value kept with time folded into the batch, ``[T*B, ...]``.

    The output of a batch-foldable op (conv, pool, batch norm).  The next foldable op
    reads ``folded`` directly, so a chain such as conv -> max-pool runs on ``[T*B, ...]``
    without an unflatten / flatten pair between them: in the ONNX export that pair was a
    no-op ``Reshape`` between conv and pool, which kept onnxruntime from running the pool
    in the conv's NCHWc layout (plain MaxPool after a reorder; the bound's graph has no
    such Reshape).  Removing it measured 8-20% faster on the reference conv net at batch
    32 (CPU).  ``value`` gives the ``[T, B, ...]`` view.
    """

    __slots__ = ("folded", "steps", "batch")

    def __init__(self, folded: torch.Tensor, steps, batch):
        self.folded, self.steps, self.batch = folded, steps, batch

    @property
    def value(self) -> torch.Tensor:
        return self.folded.unflatten(0, (self.steps, self.batch))


_WHOLE = "whole"  # a suffix argument that lists every step's value in order

_aten = torch.ops.aten
#: dtype casts, elementwise: run once on all steps' values
_CASTS = {_aten.to.dtype, _aten._to_copy.default}
#: ops that treat dim 0 as the batch, with the rank of their batched input: time is folded
#: into the batch (``[T*B, ...]``) instead of vmapped, which keeps T and B symbolic in export
_BATCH_FOLDABLE = {
    _aten.conv1d.default: 3,
    _aten.conv2d.default: 4,
    _aten.conv3d.default: 5,
    _aten.max_pool1d.default: 3,
    _aten.max_pool2d.default: 4,
    _aten.max_pool3d.default: 5,
    _aten.max_pool2d_with_indices.default: 4,
    _aten.avg_pool1d.default: 3,
    _aten.avg_pool2d.default: 4,
    _aten.avg_pool3d.default: 5,
    _aten.adaptive_avg_pool1d.default: 3,
    _aten.adaptive_avg_pool2d.default: 4,
    _aten.adaptive_avg_pool3d.default: 5,
    _aten.adaptive_max_pool2d.default: 4,
    _aten.batch_norm.default: None,
    _aten._native_batch_norm_legit_no_training.default: None,
}


class ParallelModel(torch.nn.Module):
    """The time-parallel rewrite of a captured SNN (see module docstring)."""

    def __init__(self, captured: CapturedGraph, sites: list[NeuronSite], loop: TimeLoop, mode: str = "exact", seed: int = 0):
        super().__init__()
        self.graph_module = captured.graph_module
        self.layout = captured.layout
        self.loop = loop
        self.sites = sites
        #: ``--reset`` mode and the seed of the stochastic reset's hash RNG
        self.mode, self.seed = mode, seed
        self._site_of = {site.call: i for i, site in enumerate(sites)}
        #: per site, the options its kernel runs with: StepOptions (exact kernels, of
        #: :func:`~psu_export.ops.neuron.step_spec`, which may differ from ``site.spec``'s) or
        #: ResetOptions (psu::reset_neuron); the kernel's parameters match them
        self.site_options = []
        for i, site in enumerate(sites):
            options, params = self._site_kernel(site)
            self.site_options.append(options)
            for name in options.param_names:
                self.register_buffer(f"site{i}_{name}", params[name].clone())
        # (the output node reads loop values itself: _read_after_loop, checked by _check_output_reads)
        self._suffix_refs = {node: self._plan_suffix_args(node) for node in loop.suffix if node.op != "output"}
        self._input = next(n for n in captured.graph_module.graph.nodes if n.op == "placeholder")
        self._check_output_reads()
        #: called after each site's kernel as ``site_observer(index, input, parameters,
        #: outputs)`` (per-layer parity: :func:`~psu_export.verify.run_parallel`), once per
        #: chunk of steps in :meth:`run_in_chunks`; it keeps what it needs, the rest of a
        #: layer's values is freed as usual
        self.site_observer: Callable[[int, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], None] | None = None
        #: during :meth:`run_in_chunks`, each site's states at the end of the chunk before
        #: (``v_init`` / ``i_init`` of its kernel), by site index
        self._carried_states: dict[int, dict[str, torch.Tensor]] | None = None

    def _site_kernel(self, site: NeuronSite):
        """The options and parameters of the op that computes ``site``."""
        own = site.neuron.converter.site_kernel(site.neuron.module)
        if own is not None:  # the PSU family: its own dynamics (psu_module)
            return own[1], own[2]
        if site.algorithm.name in ("probabilistic_reset", "stochastic_reset"):
            return reset_kernel(site.spec, site.algorithm.name, self.seed, site.name)
        spec = step_spec(site.spec)
        options = StepOptions.of(spec)
        return options, {name: getattr(spec, name) for name in options.param_names}

    # -- planning ---------------------------------------------------------------------
    def _plan_suffix_args(self, node: fx.Node):
        """Map each suffix argument that refers to loop values to how it is read."""
        loop = self.loop

        def plan(arg):
            if isinstance(arg, (list, tuple)) and arg and all(isinstance(a, fx.Node) and a in loop.copy_of for a in arg):
                reps = {loop.copy_of[a][0] for a in arg}
                ks = [loop.copy_of[a][1] for a in arg]
                if len(reps) == 1 and ks == list(range(loop.steps)):
                    return (_WHOLE, reps.pop())
            if isinstance(arg, fx.Node) and arg in loop.copy_of:
                rep, k = loop.copy_of[arg]
                if k == loop.steps - 1:
                    return ("last", rep)
                if not self.layout.dynamic_time:
                    return ("at", rep, k)
                raise NotConvertibleError({node.name: f"the output uses time step {k} of {rep.name} only; with a variable number of steps only the last step or the whole sequence can be read"})
            return None

        planned = [plan(a) for a in node.args]
        if any(p and p[0] == _WHOLE for p in planned) and node.target not in (torch.ops.aten.stack.default, torch.ops.aten.cat.default):
            raise NotConvertibleError({node.name: f"{node.target} over all time steps is not supported (only stack / cat)"})
        return planned

    def _check_output_reads(self) -> None:
        """Refuse, before any export, an output that reads one time step other than the last
        when T varies (:meth:`_read_after_loop` could not give it at another T)."""
        if not self.layout.dynamic_time or self.loop.sequence:
            return
        output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        early = [n for n in tree_flatten(output.args[0])[0]
                 if isinstance(n, fx.Node) and n in self.loop.copy_of and self.loop.copy_of[n][1] != self.loop.steps - 1]
        if early:
            raise NotConvertibleError({early[0].name: (
                "the model returns values of single time steps (e.g. a Python list with one tensor per step); an ONNX "
                "model has a fixed number of outputs for any T: return torch.stack(...) of the list instead")})

    # -- execution --------------------------------------------------------------------
    def forward(self, x):
        return self._run_after_loop(self._run_loop(x), x)

    def run_in_chunks(self, x, steps: int):
        """``forward(x)`` ``steps`` time steps at a time, where :attr:`chunkable`: each neuron
        layer starts a chunk from the state (membrane, synaptic current) its kernel ended the
        previous chunk in, as the whole run carries it from step to step, so the values are
        the same bit for bit; the suffix then runs once on the concatenated values it reads.
        A layer's values over all steps (its input current, spikes and membranes, hundreds
        of MB each at T = 100,000) exist a chunk at a time; :attr:`site_observer` is called
        once per site and chunk, in time order."""
        axis = self.layout.time_axis
        if not self.chunkable or x.shape[axis] <= max(steps, CLOSED_FORM_MAX_STEPS):
            return self(x)  # (up to CLOSED_FORM_MAX_STEPS steps a closed-form site's whole run is not the scan)
        read = self._loop_values_read_after
        chunks: dict[fx.Node, list] = {node: [] for node in read}
        self._carried_states = {}
        try:
            for start in range(0, x.shape[axis], steps):
                env = self._run_loop(x.narrow(axis, start, min(steps, x.shape[axis] - start)))
                for node in read:
                    chunks[node].append(env[node])
        finally:
            self._carried_states = None
        for node, values in chunks.items():
            env[node] = Timed(torch.cat([v.value for v in values])) if isinstance(values[0], Timed) else values[0]
        return self._run_after_loop(env, x)

    @property
    def chunkable(self) -> bool:
        """Whether :meth:`run_in_chunks` may split time: a re-rolled loop whose steps see
        nothing of other steps but each neuron's state (no running sums, no T inside the
        body, nothing computed from the whole input before the loop), with the exact
        kernels, which carry no other state."""
        loop = self.loop
        if loop.sequence or not self.layout.dynamic_time or loop.accumulators:
            return False
        if any(node in loop.time_length_args for node in loop.body):
            return False
        sources = {source for source, _ in loop.time_selects.values()}
        before_loop = [node for node in loop.static if self._input in node.all_input_nodes and node.target != "_guards_fn"]
        if sources != {self._input} or before_loop:
            return False
        return all(site.algorithm.name in ("scan", "closed_form") for site in self.sites)

    @property
    def _loop_values_read_after(self) -> set[fx.Node]:
        """The loop's nodes (iteration 0) whose values the suffix and the output read."""
        read = {plan[1] for plans in self._suffix_refs.values() for plan in plans if plan is not None}
        output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        read.update(self.loop.copy_of[n][0] for n in tree_flatten(output.args[0])[0] if isinstance(n, fx.Node) and n in self.loop.copy_of)
        return read

    def _run_loop(self, x) -> dict[fx.Node, object]:
        """Every node but the suffix: the static ones, and the body once for all steps of ``x``."""
        env: dict[fx.Node, object] = {}
        loop = self.loop
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = _fetch_attr(self.graph_module, node.target)
            elif node.op == "call_module" and node.target == "_guards_fn":
                continue  # torch.export's shape guards pin the capture's T; the rewrite takes any T
            elif loop.sequence and node in self._site_of:
                env[node] = self._run_sequence_site(node, env)
            elif node in loop.static:
                args, kwargs = self._arguments(node, env)
                env[node] = node.target(*args, **kwargs)
            elif node in loop.copy_of:
                if loop.copy_of[node][1] == 0:
                    env[node] = self._run_body_node(node, env)
        return env

    def _run_after_loop(self, env: dict[fx.Node, object], x):
        """The suffix and the output, from the loop's values in ``env`` (the input: all of ``x``)."""
        env[self._input] = x
        for node in self.graph_module.graph.nodes:
            if node.op == "output":
                return tree_map(lambda a: self._read_after_loop(a, env) if isinstance(a, fx.Node) else a, node.args[0])
            if node in self._suffix_refs and node.op == "call_function":
                env[node] = self._run_suffix_node(node, env)
        raise RuntimeError("captured graph has no output")

    def _read_after_loop(self, node: fx.Node, env):
        """A node's value as seen after the loop: a loop value is read at its own step."""
        if node not in self.loop.copy_of:
            return env[node]
        rep, k = self.loop.copy_of[node]
        value = env[rep]
        if not isinstance(value, Timed):
            return value  # the same at every step
        if k == self.loop.steps - 1:
            return value.value[-1]
        if self.layout.dynamic_time:
            raise NotConvertibleError({node.name: f"the output uses time step {k} of {rep.name} only; with a variable number of steps only the last step or the whole sequence can be read"})
        return value.value[k]

    def _run_body_node(self, node: fx.Node, env):
        if node in self.loop.time_selects:
            source, dim = self.loop.time_selects[node]
            value = env[source].movedim(dim, 0)
            if not self.layout.dynamic_time:
                value = value[: self.loop.steps]
            return Timed(value)
        if node in self.loop.accumulators:
            return self._run_accumulator(node, env)
        if node.target is OPAQUE_NEURON:
            return self._run_site(self._site_of[node], node, env)
        if node.target in METADATA_ASSERTS:
            return None  # an assertion on one step's tensor (torch.export's, of a cast): nothing to compute
        if node.target is operator.getitem and isinstance(env[node.args[0]], list):
            return env[node.args[0]][node.args[1]]
        if node.target is torch.ops.aten.sym_size.int and isinstance(env[node.args[0]], Timed):
            return env[node.args[0]].value.shape[node.args[1] + 1]
        args, kwargs = self._arguments(node, env)
        leaves, spec = tree_flatten((args, kwargs))
        timed = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Timed)]
        if not timed:
            return node.target(*args, **kwargs)  # identical at every step: computed once
        if timed == [0] and node.target in _CASTS:  # (vmapped, export traced a metadata check on the batched tensor)
            return Timed(node.target(leaves[0].value, *args[1:], **kwargs))
        if timed == [0] and node.target in _BATCH_FOLDABLE:
            rank = _BATCH_FOLDABLE[node.target]
            if isinstance(leaves[0], _Folded):
                folded = leaves[0]
                if (rank is None and folded.folded.dim() >= 2) or folded.folded.dim() == rank:
                    return _folded_run(node.target, folded.folded, folded.steps, folded.batch, args[1:], kwargs)
            value = leaves[0].value
            if (rank is None and value.dim() >= 3) or value.dim() - 1 == rank:
                return _folded(node.target, value, args[1:], kwargs)

        def per_step(*values):
            filled = list(leaves)
            for i, v in zip(timed, values):
                filled[i] = v
            a, kw = tree_unflatten(filled, spec)
            return node.target(*a, **kw)

        out = torch.vmap(per_step)(*[leaves[i].value for i in timed])
        if isinstance(out, (tuple, list)):
            return [Timed(o) for o in out]
        return Timed(out)

    def _arguments(self, node: fx.Node, env) -> tuple[list, dict]:
        """``node``'s arguments from ``env``, this run's T where the capture wrote its own."""
        args, kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        return self._this_time_length(node, args, env), kwargs

    def _this_time_length(self, node: fx.Node, args, env) -> list:
        """``args`` with the capture's T written as a number (:attr:`TimeLoop.time_length_args`)
        replaced by this run's T, the length of the input's time axis."""
        args = list(args)
        for where in self.loop.time_length_args.get(node, ()):
            steps = env[self._input].shape[self.layout.time_axis]
            if len(where) == 1:
                args[where[0]] = steps
            else:
                i, j = where
                args[i] = [*args[i][:j], steps, *args[i][j + 1:]]
        return args

    def _run_accumulator(self, node: fx.Node, env) -> Timed:
        """``acc_t = acc_{t-1} + f_t`` from ``acc_{-1}`` = the initial value, for every t: a
        cumulative sum over ``[init, f_0, ..., f_{T-1}]`` (ONNX ``CumSum`` adds in that order
        in float, as the loop did; torch's CPU ``cumsum`` adds in double, so the rewritten torch
        model may differ from the original in the last bit of non-integer sums)."""
        init, f_0 = self.loop.accumulators[node]
        f = env[f_0]
        if not isinstance(f, Timed):
            raise NotConvertibleError({node.name: "a running sum of a value that is the same at every step (not a time series) is not supported"})
        steps = f.value
        start = (env[init] if isinstance(init, fx.Node) else torch.tensor(init, dtype=steps.dtype)) + torch.zeros_like(steps[0])
        sequence = torch.cat([start.unsqueeze(0), steps.expand(steps.shape[0], *start.shape)])
        return Timed(torch.cumsum(sequence, 0)[1:])

    def _run_sequence_site(self, node: fx.Node, env) -> list[torch.Tensor]:
        """A multi-step neuron call: its input already holds every step, ``[T, B, ...]``."""
        seen = dict(env)
        seen[node.args[0]] = Timed(env[node.args[0]])
        return [t.value for t in self._run_site(self._site_of[node], node, seen)]

    def _run_site(self, index: int, node: fx.Node, env) -> list[Timed]:
        site = self.sites[index]
        options = self.site_options[index]
        cur = env[node.args[0]]
        if isinstance(cur, Timed):
            cur = cur.value
        else:  # a static input current, identical at every step
            cur = cur.unsqueeze(0).expand(self.loop.steps, *cur.shape)
        params = {name: getattr(self, f"site{index}_{name}") for name in options.param_names}
        roles = site.neuron.convention.state_roles
        chunked = self._carried_states is not None
        carried = self._carried_states.get(index) if chunked else None
        for role, init in zip(roles, site.init_states):
            if init is None or carried is not None:
                continue
            value = site.neuron.converter.initial_state(site.neuron.module, role, env[init], cur[0])
            if value is not None and role == "membrane" and never_minus_zero(site.spec):
                value = plus_zero(value)  # the step relies on a start without -0
            if value is not None:
                params["v_init" if role == "membrane" else "i_init"] = value
        params.update(carried or {})
        op = {"closed_form": closed_form_neuron, "scan": exact_neuron}.get(site.algorithm.name, reset_neuron)
        if chunked:
            op = exact_neuron  # (a whole run past CLOSED_FORM_MAX_STEPS steps is the exact scan too)
        outputs = op(cur, [params[n] for n in options.param_names], options.key(), site.name)
        if chunked:
            self._carried_states[index] = {"v_init": outputs[1][-1].clone(), **({"i_init": outputs[2][-1].clone()} if options.two_state else {})}
        if self.site_observer is not None:
            self.site_observer(index, cur, [params[n] for n in options.param_names], outputs)
        by_role = {"spikes": outputs[0], "membrane": outputs[1]}
        if options.two_state:
            by_role["current"] = outputs[2]
        return [Timed(by_role["spikes"])] + [Timed(by_role[r]) for r in roles]

    def _run_suffix_node(self, node: fx.Node, env):
        planned = self._suffix_refs[node]
        args = []
        for arg, plan in zip(node.args, planned):
            if plan is None:
                args.append(tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, arg))
                continue
            value = env[plan[1]].value
            if plan[0] == _WHOLE:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if node.target is torch.ops.aten.stack.default:
                    return value.movedim(0, dim if dim >= 0 else dim + value.dim())
                # cat along dim of per-step tensors == stack then merge time into dim
                moved = value.movedim(0, dim if dim >= 0 else dim + value.dim())
                d = dim if dim >= 0 else dim + value.dim() - 1
                return moved.flatten(d, d + 1)
            args.append(value[-1] if plan[0] == "last" else value[plan[2]])
        args = self._this_time_length(node, args, env)
        kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, node.kwargs)
        return node.target(*args, **kwargs)


def _folded(target, value: torch.Tensor, rest, kwargs):
    """Run a batch-dim-0 op once on ``[T*B, ...]``; time stays folded (:class:`_Folded`)."""
    return _folded_run(target, value.flatten(0, 1), value.shape[0], value.shape[1], rest, kwargs)


def _folded_run(target, flat: torch.Tensor, steps, batch, rest, kwargs):
    out = target(flat, *rest, **kwargs)
    if isinstance(out, (tuple, list)):
        return [_Folded(o, steps, batch) if o.dim() > 0 and o.shape[0] == flat.shape[0] else o for o in out]
    return _Folded(out, steps, batch)


def _fetch_attr(module: torch.nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def rewrite(captured: CapturedGraph, sites: list[NeuronSite], loop: TimeLoop, mode: str = "exact", seed: int = 0) -> ParallelModel:
    model = ParallelModel(captured, sites, loop, mode, seed)
    model.training = False  # inference only (the captured GraphModule refuses .train())
    return model
