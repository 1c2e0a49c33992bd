"""Capture: an ATen graph of the model in which every neuron call is one opaque node.

Each registered neuron module's ``forward`` is swapped, for the duration of the
capture, for a call to the ``psu_capture::neuron`` custom op (its converter's
:class:`~psu_export.converters.CallConvention` maps the framework's arguments and
return values).  ``torch.export`` then records the model, Python time loop unrolled,
with every neuron call, its input and its state in and out visible.

Three call styles are handled (DESIGN.md section 2):

``sequence``  ``forward(x[T, B, ...])`` loops over time inside (or over ``x[:, t]`` of a
              batch-first ``x[B, T, ...]``: :attr:`InputLayout.batch_first`)
``static``    ``forward(x[B, ...])`` loops ``num_steps`` times over a static input
``step``      a single-step module; the time loop is ours (:class:`StepDriver`)

:func:`probe_input_kind` finds the style by running the model eagerly and counting
neuron calls (:func:`probe_sequence` tells time-first from batch-first).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from .converters import CallConvention, FrameworkConverter, Unsupported, find_converter
from .errors import CaptureError, NotConvertibleError, UsageError, one_line
from .spec import NeuronSpec

InputKind = Literal["sequence", "static", "step"]


# ------------------------------------------------------------------ the opaque neuron op


@torch.library.custom_op("psu_capture::neuron", mutates_args=())
def _opaque_neuron(x: torch.Tensor, states: list[torch.Tensor], site: int, n_out: int) -> list[torch.Tensor]:
    raise RuntimeError("psu_capture::neuron is a capture marker and is never run eagerly")


@_opaque_neuron.register_fake
def _opaque_neuron_fake(x, states, site, n_out):
    return [torch.empty_like(x) for _ in range(n_out)]


OPAQUE_NEURON = torch.ops.psu_capture.neuron.default
#: torch.export's dtype / shape assertions (``x.float()`` records one): nodes that compute nothing
METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default} if hasattr(torch.ops.aten, "_assert_tensor_metadata") else set()


def module_path(node: torch.fx.Node) -> str:
    """The path of the module whose forward made ``node`` (recorded by ``torch.export``), else
    the node's own name (an operation of the top-level forward, or no record)."""
    stack = node.meta.get("nn_module_stack") or {}
    return (list(stack.values())[-1][0] if stack else "") or node.name


@dataclass
class NeuronModule:
    """A neuron module found in the model, with its converter and spec (or why not)."""

    index: int
    name: str
    module: torch.nn.Module
    converter: FrameworkConverter
    spec: NeuronSpec | None
    reason: str | None
    convention: CallConvention | None = None

    @property
    def source_class(self) -> str:
        cls = type(self.module)
        return f"{cls.__module__.split('.')[0]}.{cls.__name__}"

    def over_time(self, calls: list[torch.Tensor]) -> torch.Tensor:
        """Tensors recorded from this module's calls in one forward as ``[T, B, ...]``: one per
        step stacked, or the one call of a multi-step module (in the capture op's layout)."""
        if self.converter.consumes_sequence(self.module) and len(calls) == 1:
            return self.converter.as_sequence(self.module, calls[0])
        return torch.stack(calls)


def find_neuron_modules(model: torch.nn.Module) -> list[NeuronModule]:
    """Every module of a registered framework's neuron classes, with its spec or the reason it has none."""
    found = []
    for name, module in model.named_modules():
        hit = find_converter(module)
        if hit is None:
            continue
        converter, reason = hit
        spec = None
        if reason is None:
            try:
                spec = converter.to_spec(module)
            except Unsupported as exc:
                reason = str(exc)
        found.append(NeuronModule(len(found), name or type(module).__name__, module, converter, spec, reason))
    return found


def refuse_unconvertible(neurons: list[NeuronModule]) -> None:
    """Exit 3 listing every neuron layer that cannot be converted faithfully, with why."""
    reasons = {n.name: f"{n.source_class}: {n.reason}" for n in neurons if n.reason}
    if reasons:
        raise NotConvertibleError(reasons)


def reset_neurons(neurons: list[NeuronModule]) -> None:
    for n in neurons:
        n.converter.reset_state(n.module)


@contextlib.contextmanager
def opaque_neurons(neurons: list[NeuronModule]):
    """Swap each neuron's forward for the opaque capture op (restored on exit)."""
    saved = []
    try:
        for n in neurons:
            n.convention = n.converter.call_convention(n.module)
            n_out = 1 + len(n.convention.state_roles)

            def call(x, states, _site=n.index, _n_out=n_out):
                return _opaque_neuron(x, list(states), _site, _n_out)

            saved.append((n.module, n.module.__dict__.get("forward")))
            n.module.forward = n.convention.forward(call)
            n.converter.reset_state(n.module)
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        reset_neurons(neurons)


@contextlib.contextmanager
def traced_alone(model: torch.nn.Module, capturing: bool = False):
    """Every installed framework's :meth:`~psu_export.converters.FrameworkConverter.tracing_scope`
    for ``model``; ``capturing``: its :meth:`~psu_export.converters.FrameworkConverter.capture_scope` too."""
    from .converters import converters

    with contextlib.ExitStack() as stack:
        for conv in converters():
            if conv.available():
                stack.enter_context(conv.tracing_scope(model))
                if capturing:
                    stack.enter_context(conv.capture_scope(model))
        yield


@contextlib.contextmanager
def counting_calls(neurons: list[NeuronModule]):
    """Count eager calls per neuron module (forward pre-hooks)."""
    counts = {n.index: 0 for n in neurons}
    handles = []
    for n in neurons:
        def hook(module, args, _i=n.index):
            counts[_i] += 1
        handles.append(n.module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ call styles


class StepDriver(torch.nn.Module):
    """Drives a single-step module over ``x[T, B, ...]`` and stacks every output over time.

    A model whose converter says it :meth:`~psu_export.converters.FrameworkConverter.threads_state`
    (``out, state = model(x_t, state)``, e.g. Norse ``SequentialState``) gets its returned
    state passed back in at the next step (``None`` at the first); only ``out`` is stacked.
    ``time_axis`` 1 drives a batch-first ``x[B, T, ...]`` and stacks the outputs along dim 1.
    """

    def __init__(self, model: torch.nn.Module, time_axis: int = 0):
        super().__init__()
        self.model = model
        self.time_axis = time_axis
        from .converters import converters

        self.threads_state = any(conv.threads_state(model) for conv in converters())

    def forward(self, x):
        steps = range(x.shape[self.time_axis])  # x.select inside the loop: each step's body stays together
        if self.threads_state:
            outputs, state = [], None
            for t in steps:
                out, state = self.model(x.select(self.time_axis, t), state)
                outputs.append(out)
        else:
            outputs = [self.model(x.select(self.time_axis, t)) for t in steps]
        first = outputs[0]
        if isinstance(first, (tuple, list)):
            return tuple(torch.stack([o[k] for o in outputs], self.time_axis) for k in range(len(first)))
        return torch.stack(outputs, self.time_axis)


@dataclass
class InputLayout:
    """What the model takes: its call style, the time steps it runs, and whether T follows the input."""

    kind: InputKind
    time_steps: int
    dynamic_time: bool
    sample_shape: tuple[int, ...]
    #: a sequence given batch-first, ``[B, T, ...]`` (the model reads ``x[:, t]``)
    batch_first: bool = False

    @property
    def batch_axis(self) -> int:
        """The input's batch dimension: 0 for a static input or a batch-first sequence, else 1."""
        return 0 if self.kind == "static" or self.batch_first else 1

    @property
    def time_axis(self) -> int | None:
        """The input's time dimension (None for a static input)."""
        return None if self.kind == "static" else 1 - self.batch_axis

    @property
    def order(self) -> str:
        """``batch_first`` or ``time_first``: the ``psu_export.layout`` metadata value (read by ``deploy``)."""
        return "batch_first" if self.batch_axis == 0 else "time_first"

    def driver(self, model: torch.nn.Module) -> torch.nn.Module:
        """What runs the whole input: the model itself, or a :class:`StepDriver` for a single-step module."""
        return StepDriver(model, self.time_axis) if self.kind == "step" else model

    def describe(self) -> str:
        """The input as the model takes it, e.g. ``[T, B, 1, 28, 28]``."""
        lead = "B" if self.kind == "static" else ("B, T" if self.batch_first else "T, B")
        return f"[{lead}, {', '.join(map(str, self.sample_shape))}]"

    def shape(self, batch: int, time_steps: int | None = None) -> tuple[int, ...]:
        """The input's shape for ``batch`` samples of ``time_steps`` steps (default: this T)."""
        steps = self.time_steps if time_steps is None else time_steps
        if self.kind == "static":
            return (batch, *self.sample_shape)
        return (batch, steps, *self.sample_shape) if self.batch_first else (steps, batch, *self.sample_shape)

    def example(self, batch: int, time_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform inputs in [0, 1) of :meth:`shape`."""
        return torch.rand(self.shape(batch, time_steps), generator=generator)


def _run_counting(model, neurons, x) -> dict[int, int]:
    reset_neurons(neurons)
    with counting_calls(neurons) as counts, torch.no_grad():
        model(x)
    reset_neurons(neurons)
    return dict(counts)


def probe_input_kind(model: torch.nn.Module, neurons: list[NeuronModule], sample_shape: tuple[int, ...], time_steps: int, kind: str = "auto", batch_first: bool = False,
                     full_length_run: Callable[[InputLayout], dict[int, int] | None] | None = None) -> InputLayout:
    """Find how the model consumes time by running it eagerly and counting neuron calls.

    ``batch_first``: the sequence is ``[B, T, ...]`` (without it, time-first is tried first,
    then batch-first); for a single-step module the exported model then takes ``[B, T, ...]``.
    ``full_length_run(layout)``: the one run at full length that confirms a long sequence's
    loop (:func:`probe_sequence`), returning the calls per neuron (as :func:`counting_calls`),
    or None to leave it to the default: the model run on one sample.
    """
    if not neurons:
        raise NotConvertibleError({"model": "no neuron module of a supported framework was found (see `psu-export list-converters`)"})
    probe_batch = 3
    errors = []
    whole = [n for n in neurons if n.converter.consumes_sequence(n.module)]
    if whole:
        if batch_first:
            raise UsageError("--batch-first: the model's neurons take the whole sequence (multi-step), which they read time-first [T, B, ...].")
        return _probe_multi_step(model, neurons, whole, sample_shape, time_steps, kind)

    def calls(x):
        return _calls_per_forward(_run_counting(model, neurons, x))

    if kind in ("auto", "static", "step"):
        try:
            n = calls(torch.rand(probe_batch, *sample_shape))
            if n == 1 and kind in ("auto", "step"):
                return InputLayout("step", time_steps, True, sample_shape, batch_first)
            if kind in ("auto", "static") and n > 1 and not (kind == "auto" and n == probe_batch):
                return InputLayout("static", n, False, sample_shape)
        except NotConvertibleError:
            raise
        except Exception as exc:  # the model did not accept a single-step input
            errors.append(f"as [B, {', '.join(map(str, sample_shape))}]: {type(exc).__name__}: {exc}")
    if kind in ("auto", "sequence"):
        def confirm(trial: InputLayout) -> int | None:
            counts = full_length_run(trial) if full_length_run else None
            return None if counts is None else _calls_per_forward(counts)

        layout = probe_sequence(calls, sample_shape, time_steps, batch_first, errors, lambda n1, n2, steps: (n1, n2) == (steps, steps + 1), confirm)
        if layout is not None:
            return layout
    raise UsageError(
        "Could not find how the model consumes its input with --input-shape "
        f"{','.join(map(str, sample_shape))} and --time-steps {time_steps} ({kind}): " + "; ".join(errors)
        + ". Check --input-shape (one time step's sample, without batch and time) or pass --input-kind."
    )


def _calls_per_forward(counts: dict[int, int]) -> int:
    """The one number of calls every neuron layer made in a forward (refusing layers that differ)."""
    distinct = set(counts.values())
    if len(distinct) != 1:
        raise NotConvertibleError({"model": f"neuron layers are called different numbers of times per forward ({sorted(distinct)})"})
    return distinct.pop()


#: a long sequence is probed at this many steps (and one more) first, then confirmed by one
#: run at its own T, rather than run twice at full length (:func:`probe_sequence`)
SHORT_PROBE_STEPS = 8


def probe_sequence(count, sample_shape: tuple[int, ...], time_steps: int, batch_first: bool, errors: list[str], follows_time, confirm=None) -> InputLayout | None:
    """The sequence layout that ``count`` (per forward on an input) shows, or None (``errors`` say why).

    Runs the model on ``[T, B, ...]`` and ``[T+1, B, ...]`` and, unless ``follows_time(n1, n2,
    T)``, on a second batch size: a count that follows T is a loop over the input's time, one
    that follows neither a loop of fixed length, and one that follows the batch size a loop
    over the wrong axis (the input is then tried batch-first, ``[B, T, ...]``).

    Past ``2 * SHORT_PROBE_STEPS`` steps, a count that follows time at ``S`` and ``S + 1``
    short steps (``n(S)``, ``n(S+1)``) and that one run at T confirms (``n(T) = n(S) + (T - S)
    (n(S+1) - n(S))``, a loop over all of the input's steps) settles it: one eager run at full
    length instead of two (100,000 steps of a Python loop take minutes).  Anything else,
    an error at the short length included (a loop of fixed length indexing past it), falls
    back to the runs at T.  ``confirm(layout)`` makes that run and returns its count, or None
    to leave it to ``count`` on one sample.
    """
    batches = [b for b in (3, 5, 7) if b not in (time_steps, time_steps + 1)][:2]
    for batch_first_try in ((True,) if batch_first else (False, True)):
        trial = InputLayout("sequence", time_steps, True, sample_shape, batch_first_try)
        if time_steps > 2 * SHORT_PROBE_STEPS and _follows_every_step(count, trial, batches[0], follows_time, confirm):
            return trial
        try:
            n1, n2 = count(trial.example(batches[0])), count(trial.example(batches[0], time_steps + 1))
            if follows_time(n1, n2, time_steps):
                return trial
            n3 = count(trial.example(batches[1]))
        except NotConvertibleError:
            raise
        except Exception as exc:  # noqa: BLE001 - the other order may fit
            errors.append(f"as {trial.describe()}: {type(exc).__name__}: {exc}")
            continue
        if n1 == n2 == n3 and n1 > 0:
            return InputLayout("sequence", n1, False, sample_shape, batch_first_try)
        if n1 == n2 and n1 != n3:
            errors.append(f"as {trial.describe()}: the model's loop followed the batch size ({n1} and {n3} neuron steps for batch {batches[0]} and {batches[1]})")
        else:
            errors.append(f"as {trial.describe()}: {n1} and {n2} neuron steps for T={time_steps} and T={time_steps + 1}")
    return None


def _follows_every_step(count, trial: InputLayout, batch: int, follows_time, confirm=None) -> bool:
    """Whether the count follows time at :data:`SHORT_PROBE_STEPS` (and one more) steps and
    extrapolates to the count of one run at ``trial``'s own T (see :func:`probe_sequence`).
    By default the run at T takes one sample: the count of steps does not depend on the batch,
    and its input is the probe's peak memory (a third of batch 3's 940 MB for 784 inputs at T
    = 100,000); a count that does, or a model that fails at batch 1, falls back to the runs at
    T.  ``confirm(trial)``, when given, makes the run at T instead (``pipeline.prepare``: on
    the inputs of the parity check that follows, which then reuses it)."""
    short = SHORT_PROBE_STEPS
    try:
        n1, n2 = count(trial.example(batch, short)), count(trial.example(batch, short + 1))
        if not follows_time(n1, n2, short):
            return False
        full = confirm(trial) if confirm else None
        if full is None:
            full = count(trial.example(1))
        return full == n1 + (trial.time_steps - short) * (n2 - n1)
    except Exception:  # noqa: BLE001 - the runs at full length decide, and say why
        return False


def _probe_multi_step(model, neurons, whole, sample_shape, time_steps, kind) -> InputLayout:
    """Multi-step neurons (one call per sequence): the model takes ``[T, B, ...]`` (any T), or
    one input ``[B, ...]`` that it repeats over its own T (SpikingJelly's tutorials:
    ``x.unsqueeze(0).repeat(T, 1, 1, 1, 1)``), read from the sequence its neurons receive."""
    if len(whole) != len(neurons):
        single = [n.name for n in neurons if n not in whole]
        raise NotConvertibleError({name: ("single-step neuron (called once per step, e.g. inside Norse's Lift) in a model whose other neurons "
                                          "take the whole sequence (multi-step); use one step mode: the multi-step form of this neuron "
                                          "(Norse LIF for Lift(LIFCell()), SpikingJelly step_mode='m')") for name in single})
    if kind == "step":
        raise UsageError("--input-kind step: the model's neurons take the whole sequence [T, B, ...] (multi-step); use --input-kind sequence or static.")
    attempts = {"sequence": (time_steps, 3, *sample_shape), "static": (3, *sample_shape)}
    errors = []
    for name, shape in attempts.items():
        if kind not in ("auto", name):
            continue
        try:
            counts, steps = _multi_step_calls(model, neurons, torch.rand(shape))
        except Exception as exc:  # noqa: BLE001 - the other input kind may fit
            errors.append(f"as [{'T, ' if name == 'sequence' else ''}B, {', '.join(map(str, sample_shape))}]: {type(exc).__name__}: {exc}")
            continue
        if counts != {1}:
            raise NotConvertibleError({"model": f"multi-step neuron layers must run once per forward; they ran {sorted(counts)} times"})
        if name == "static":
            return InputLayout("static", steps, False, sample_shape)
        # IPSU / RPSU learn T x T matrices: T is fixed to --time-steps (at most their max_steps)
        limits = [n.converter.call_convention(n.module).max_time_steps for n in neurons]
        limits = [m for m in limits if m is not None]
        if limits and time_steps > min(limits):
            raise UsageError(f"--time-steps {time_steps} is longer than the {min(limits)} steps the model's learned T x T time matrices cover (IPSU / RPSU max_steps).")
        return InputLayout("sequence", time_steps, not limits, sample_shape)
    raise UsageError(
        "The model's neurons take the whole sequence, but the model ran neither on a sequence [T, B, ...] nor on one "
        f"input [B, ...] that it repeats itself, with T={time_steps} and B=3: " + "; ".join(errors)
        + ". Check --input-shape (one time step's sample, without batch and time)."
    )


def _multi_step_calls(model, neurons, x) -> tuple[set[int], int]:
    """(calls per neuron, T of the first neuron's input) of one eager forward on ``x``."""
    seen = []
    first = neurons[0]
    handle = first.module.register_forward_pre_hook(lambda module, args: seen.append(first.converter.as_sequence(module, args[0]).shape[0]))
    try:
        counts = set(_run_counting(model, neurons, x).values())
    finally:
        handle.remove()
    return counts, (seen[0] if seen else 0)


def is_multi_step(neurons: list[NeuronModule]) -> bool:
    """True when every neuron consumes the whole sequence in one call (no time loop to re-roll)."""
    return bool(neurons) and all(n.converter.consumes_sequence(n.module) for n in neurons)


# ------------------------------------------------------------------ capture


@dataclass
class CapturedGraph:
    """The unrolled ATen graph of one capture, and what was captured."""

    graph_module: torch.fx.GraphModule
    neurons: list[NeuronModule]
    layout: InputLayout
    capture_steps: int
    dynamic_batch: bool
    notes: list[str] = field(default_factory=list)

    @property
    def writes_time_length(self) -> bool:
        """Whether the graph's T is a number (the capture ran a concrete T), so that a number
        equal to it may be T itself; multi-step neurons are captured with T a symbol."""
        x = next(n for n in self.graph_module.graph.nodes if n.op == "placeholder").meta.get("val")
        axis = self.layout.time_axis
        return x is None or axis is None or not isinstance(x.shape[axis], torch.SymInt)


def capture(model: torch.nn.Module, neurons: list[NeuronModule], layout: InputLayout, capture_steps: int | None = None) -> CapturedGraph:
    """Export ``model`` with opaque neurons at a small T (the loop is re-rolled later): 3 or 4
    steps, or ``capture_steps`` exactly (a second capture one step longer); the model's own T
    when it fixes T."""
    if not layout.dynamic_time:
        steps = layout.time_steps
    else:
        steps = capture_steps if capture_steps is not None else max(3, min(4, layout.time_steps))
    target = layout.driver(model)
    x = layout.example(batch=2, time_steps=steps)
    batch_dim = layout.batch_axis
    notes = []
    with opaque_neurons(neurons), traced_alone(model, capturing=True):
        try:
            axes = {batch_dim: torch.export.Dim("batch")}
            if is_multi_step(neurons):  # T is a symbolic size of the graph itself (no loop to re-roll);
                # DYNAMIC lets export refine the ranges (reshapes of T*B give guards a named Dim refuses)
                axes = {0: torch.export.Dim.DYNAMIC, batch_dim: torch.export.Dim.DYNAMIC}
                if layout.kind == "static":  # the model repeats x over its own, fixed T
                    axes = {batch_dim: torch.export.Dim.DYNAMIC}
            ep = torch.export.export(target, (x,), dynamic_shapes=(axes,), strict=False)
            dynamic_batch = True
        except Exception as exc:
            notes.append(f"batch size fixed at export: dynamic batch failed ({one_line(exc, 200)})")
            try:
                time_only = ({0: torch.export.Dim.DYNAMIC},) if is_multi_step(neurons) and layout.kind != "static" else None
                ep = torch.export.export(target, (x,), dynamic_shapes=time_only, strict=False)
            except Exception as exc2:
                raise CaptureError(f"torch.export could not capture the model: {type(exc2).__name__}: {exc2}") from exc2
            dynamic_batch = False
    graph_module = ep.module()
    _refuse_random_draws(graph_module.graph)
    return CapturedGraph(graph_module, neurons, layout, steps, dynamic_batch, notes)


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    """A call of a random op (``torch.rand_like``, ``bernoulli``, dropout in training mode, ...)."""
    tags = getattr(node.target, "tags", ())
    if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in tags:
        return False
    names = [a.name for a in node.target._schema.arguments]
    for flag in ("train", "training"):  # dropout & co. in eval mode draw nothing
        if flag in names:
            i = names.index(flag)
            return bool(node.args[i] if i < len(node.args) else node.kwargs.get(flag, False))
    return True


def _refuse_random_draws(graph: torch.fx.Graph) -> None:
    """A forward that draws random numbers (a Poisson encoder: ``torch.rand_like(x) < x``) gives
    other outputs at every run: refused, before any export, with where it draws."""
    draws = [n for n in graph.nodes if _draws_random_numbers(n)]
    if draws:
        raise NotConvertibleError({draws[0].name: (
            f"the forward draws random numbers ({draws[0].target}); its outputs change from run to run, so no "
            "conversion can be checked against it: move the random encoding out of the model and feed its spikes as the input")})
