"""Neuron-layer ops of the ``psu`` domain, for the exact reset mode.

* ``psu::exact_neuron`` (ONNX ``psu.LIF_<variant>``): the exact recursion of
  :class:`~psu_export.spec.NeuronSpec` over time, one ``Scan`` whose body is
  :func:`exact_step`.  Only the cheap elementwise recursion is sequential; the synaptic
  layers around it run once over all time steps.
* ``psu::closed_form_neuron`` (ONNX ``psu.LinearLIF_<variant>``): reset-free neurons,
  whose membrane is linear in the input: ``v = K X + decay^(t+1) v_init`` with the
  lower-triangular decay kernel ``K[t, j] = decay^(t-j)`` (and ``K_syn`` for two-state
  neurons, ``v = K K_syn X + ...``): one matrix product over time, no recursion.

Both take the layer's name (kept as the node's ``layer`` attribute) and its input ``x`` as ``[T, B, ...]`` and return ``[spikes, membrane]``
(plus the synaptic ``current`` for two-state neurons) stacked over time, each as the
framework reports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..spec import CHARGE_PARAMS, NeuronSpec
from .builders import OnnxBuilder, TorchBuilder
from .registry import CustomOp, emit_node, make_function, register

_RESET_CODE = {"subtract": "sub", "zero": "zero", "none": "noreset"}
_TIMING_CODE = {"previous_step": "prev", "same_step_guarded": "guard", "same_step": "same"}
_SCOPE_CODE = {"membrane": "mem", "total": "all"}

#: parameters whose operation in the step simplifies when the layer has this exact value
#: everywhere (StepOptions.identity_params), with their op type suffix: a threshold of 1
#: (the frameworks' default) and ungraded spikes multiply by 1, SpikingJelly's ``v_rest``
#: of +0.0 is subtracted (``v - (+0) == v`` bit for bit, -0 included), and a zero reset's
#: ``v_reset`` of +0.0 (SpikingJelly's and Norse's default) makes ``spike * v_reset`` the
#: constant +0 for spikes in {0, 1}
IDENTITY_PARAMS = {"threshold": (1.0, "th1"), "spike_scale": (1.0, "g1"), "v_rest": (0.0, "vr0"), "reset_value": (0.0, "vz0")}


def _is_exactly(t: torch.Tensor, value: float) -> bool:
    """Every element equals ``value``; a zero must be +0.0 (``v - (-0)`` turns -0 into +0)."""
    return bool(torch.all(t == value)) and not (value == 0.0 and bool(torch.signbit(t).any()))


def _uniform_positive_bits(t: torch.Tensor) -> str:
    """The float32 bits (hex) of ``t``'s one value where every element equals it and it is > 0, else ``""``."""
    values = t.detach().float().reshape(-1)
    if values.numel() == 0 or not bool(torch.all(values == values[0])) or not float(values[0]) > 0:
        return ""
    return f"{int(np.float32(values[0].item()).view(np.uint32)):08x}"


@dataclass(frozen=True)
class StepOptions:
    """The discrete options of a :class:`NeuronSpec`: what fixes the arithmetic of a step."""

    reset: str
    reset_timing: str
    compare: str
    zero_scope: str
    two_state: bool
    charge: str = "leaky"
    reset_form: str = "standard"
    #: parameters with their identity value everywhere (``+``-joined, of :data:`IDENTITY_PARAMS`):
    #: the step skips the multiply or subtraction by them (bit for bit), one node less each
    identity_params: str = ""
    #: :attr:`NeuronSpec.spike_from`: the spike tests the updated membrane, or is the reset
    #: test of the stored one (previous-step timing)
    spike_from: str = "updated"
    #: a zero reset's threshold, when it is one value > 0 everywhere other than 1 (``th1``),
    #: as its float32 bits in hex: the step tests it as a constant (:attr:`constant_threshold`)
    uniform_threshold: str = ""

    @classmethod
    def of(cls, spec: NeuronSpec) -> "StepOptions":
        reset_form = "product" if never_minus_zero(spec) else spec.reset_form
        base = cls(spec.reset, spec.reset_timing, spec.compare, spec.zero_scope, spec.two_state, spec.charge, reset_form,
                   spike_from=spec.spike_from)
        applies = {
            "v_rest": base.charge.startswith("sj_"),  # Norse's charge computes v_rest - v: no identity
            "reset_value": base.reset == "zero" and base.reset_timing == "same_step" and base.reset_form == "standard",  # the only step that reads it
        }
        names = [n for n, (value, _) in IDENTITY_PARAMS.items()
                 if n in base.param_names and applies.get(n, True) and _is_exactly(getattr(spec, n), value)]
        zero_reset_tests = base.reset == "zero" and (base.reset_timing == "same_step" or (
            base.reset_timing == "previous_step" and base.zero_scope == "membrane"))
        uniform = _uniform_positive_bits(spec.threshold) if zero_reset_tests and "threshold" not in names else ""
        return dataclasses.replace(base, identity_params="+".join(names), uniform_threshold=uniform)

    @property
    def identities(self) -> set[str]:
        return set(self.identity_params.split("+")) - {""}

    @property
    def constant_threshold(self) -> float | None:
        """The threshold as a number, where it is one value everywhere known to the step
        (``th1`` or :attr:`uniform_threshold`); else None (a parameter of the layer)."""
        if "threshold" in self.identities:
            return IDENTITY_PARAMS["threshold"][0]
        if self.uniform_threshold:
            return float(np.array(int(self.uniform_threshold, 16), dtype=np.uint32).view(np.float32))
        return None

    @property
    def variant(self) -> str:
        parts = [_RESET_CODE[self.reset], _TIMING_CODE[self.reset_timing], self.compare]
        if self.reset == "zero":
            parts.append(_SCOPE_CODE[self.zero_scope])
        if self.two_state:
            parts.append("syn")
        if self.charge != "leaky":
            parts.append(self.charge)
        if self.reset_form != "standard":
            parts.append(self.reset_form)
        if self.spike_from != "updated":
            parts.append(self.spike_from)
        parts.extend(suffix for name, (_, suffix) in IDENTITY_PARAMS.items() if name in self.identities)
        if self.uniform_threshold:
            parts.append(f"th{self.uniform_threshold}")
        return "_".join(parts)

    @property
    def param_names(self) -> list[str]:
        if self.charge == "leaky":
            names = ["decay", "syn_decay"] if self.two_state else ["decay"]
        else:
            names = list(CHARGE_PARAMS[self.charge])
        return names + ["threshold", "spike_scale", "reset_value", "v_init"] + (["i_init"] if self.two_state else [])

    @property
    def n_outputs(self) -> int:
        """spikes, membrane, and the synaptic current for two-state neurons."""
        return 3 if self.two_state else 2

    def key(self) -> str:
        """Serialised form passed through the torch custom op and stored as node attributes."""
        return ",".join(f"{k}={v}" for k, v in self.attributes().items())

    def attributes(self) -> dict:
        return {
            "reset": self.reset,
            "reset_timing": self.reset_timing,
            "compare": self.compare,
            "zero_scope": self.zero_scope,
            "two_state": int(self.two_state),
            "charge": self.charge,
            "reset_form": self.reset_form,
            "identity_params": self.identity_params,
            "spike_from": self.spike_from,
            "uniform_threshold": self.uniform_threshold,
        }

    @classmethod
    def parse(cls, key: str) -> "StepOptions":
        fields = dict(item.split("=", 1) for item in key.split(","))
        return cls(fields["reset"], fields["reset_timing"], fields["compare"], fields["zero_scope"], fields["two_state"] == "1",
                   fields.get("charge", "leaky"), fields.get("reset_form", "standard"), fields.get("identity_params", ""),
                   fields.get("spike_from", "updated"), fields.get("uniform_threshold", ""))

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "StepOptions":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if k != "layer"}
        return cls(text["reset"], text["reset_timing"], text["compare"], text["zero_scope"], bool(text["two_state"]),
                   text.get("charge", "leaky"), text.get("reset_form", "standard"), text.get("identity_params", ""),
                   text.get("spike_from", "updated"), text.get("uniform_threshold", ""))


#: charge forms whose ``h`` is -0 only if the stored ``v`` is: ``v + y`` (in round-to-nearest
#: -0 only when ``v`` and ``y`` both are) and SpikingJelly's ``(v - v / tau) + x`` (``v - v / tau``
#: is never -0: ``v / tau`` has the sign of ``v``); not ``decay * v + x``, whose product can
#: underflow to -0 from a tiny negative ``v``
_V_PLUS_CHARGES = {"if", "sj_decay_input", "sj_decay_input_mul", "sj_no_decay_input", "sj_no_decay_input_mul", "norse_lif", "norse_box"}


def never_minus_zero(spec: NeuronSpec) -> bool:
    """Whether a standard same-step zero reset to +0 can drop its ``+ v_reset``.

    The step is ``v = spike * v_reset + (1 - spike) * h``; for ``v_reset`` +0 the first term
    is +0, and adding it only turns a -0 ``(1 - spike) * h`` into +0.  That product is -0
    only if ``h`` is -0 (no spike) or negative while spiking (``h >= threshold``).  With a
    threshold > 0 the second cannot happen; with the charges of :data:`_V_PLUS_CHARGES` the
    first needs the stored ``v`` to be -0, which a ``v_init`` without -0 rules out step by
    step (a runtime initial membrane is made +0 where it is zero: :func:`plus_zero`).  Then
    the step is the ``product`` form, one node (a single-threaded ``Sum``) less a step, the
    same bits.
    """
    return (spec.reset == "zero" and spec.reset_timing == "same_step" and spec.reset_form == "standard"
            and spec.charge in _V_PLUS_CHARGES and _is_exactly(spec.reset_value, 0.0)
            and bool(torch.all(spec.threshold > 0)) and not bool(((spec.v_init == 0) & torch.signbit(spec.v_init)).any()))


#: SpikingJelly's charges that divide by ``tau``, and the forms that multiply by ``inv_tau``
_DIVIDING_CHARGES = {"sj_decay_input": "sj_decay_input_mul", "sj_no_decay_input": "sj_no_decay_input_mul"}


def exact_reciprocal(tau: torch.Tensor) -> torch.Tensor | None:
    """``1 / tau`` where ``y / tau == y * (1 / tau)`` bit for bit for every float32 ``y``, else None.

    That holds when every ``tau`` is +-2^k with 2^-k a float32 (normal or subnormal): both
    sides are then the one rounding of the same real ``y * 2^-k``, NaN, infinities and
    subnormal results included.  SpikingJelly's default ``tau`` = 2.0 is such a value.
    """
    tau = tau.float()
    inv = 1.0 / tau
    power_of_two = torch.frexp(tau).mantissa.abs() == 0.5  # (0, infinities and NaN have other mantissas)
    return inv if bool(power_of_two.all()) and bool(torch.isfinite(inv).all()) else None


def step_spec(spec: NeuronSpec) -> NeuronSpec:
    """``spec`` with the same bits computed by cheaper operations: a SpikingJelly charge that
    divides by a ``tau`` with an exact reciprocal (:func:`exact_reciprocal`) multiplies by
    ``inv_tau`` instead (a ``Mul`` a step where there was a ``Div``: 0.88-0.93x the time of a
    one-layer ``Scan`` on 4,096-100,352 neurons)."""
    inv_tau = exact_reciprocal(spec.tau) if spec.charge in _DIVIDING_CHARGES else None
    if inv_tau is None:
        return spec
    return dataclasses.replace(spec, charge=_DIVIDING_CHARGES[spec.charge], tau=None, inv_tau=inv_tau)


def plus_zero(v: torch.Tensor) -> torch.Tensor:
    """``v`` with -0 made +0 (elsewhere unchanged): a runtime initial membrane for a step
    that relies on a start without -0 (:func:`never_minus_zero`)."""
    return torch.where(v == 0, torch.zeros_like(v), v)


def exact_step(b, o: StepOptions, p: dict, v_prev, i_prev, x):
    """One time step of the spec's recursion (module docstring of :mod:`psu_export.spec`).

    ``b`` is a :class:`TorchBuilder` or :class:`OnnxBuilder`; returns ``(v, i, spike)``.
    """
    theta = p["threshold"]

    def times(value, name):  # value * p[name], skipped for a parameter that is exactly 1
        return value if name in o.identities else b.mul(value, p[name])

    def unfired(value, fired):  # (1 - fired) * value, fired = H(value - theta)
        if o.constant_threshold is not None:
            # value - (value if fired else 0): the same bits for every float32 value (a fired
            # value is >= theta > 0, so 0 * value and value - value are both +0, or NaN for
            # +inf), and the reset no longer reads the float spike: one node less a step
            return b.unfired(value, o.constant_threshold, o.compare)
        return b.mul(b.sub(b.const(1.0), fired), value)

    if o.charge == "norse_lif":
        drive = b.add(i_prev, x)  # the input jumps the synaptic current
        i = b.add(drive, b.mul(p["syn_gain"], drive))
    elif o.two_state:
        i = b.add(b.mul(p["syn_decay"], i_prev), x)
        drive = i
    else:
        i, drive = None, x

    def charge(v):
        return _charge(b, o.charge, p, v, drive, o.identities)

    if o.reset_timing == "same_step":
        h = charge(v_prev)
        fired = b.step(h, theta, o.compare)
        spike = times(fired, "spike_scale")
        if o.reset == "subtract" and o.reset_form == "blend":
            v = b.add(b.mul(b.sub(b.const(1.0), fired), h), b.mul(fired, b.sub(h, theta)))
        elif o.reset == "subtract":
            v = b.sub(h, times(fired, "threshold"))
        elif o.reset == "zero" and o.reset_form == "product":
            v = unfired(h, fired)
        elif o.reset == "zero":
            # spike * v_reset + (1 - spike) * h; for v_reset +0 the product is +0, still added:
            # x + (+0) turns a -0 membrane into +0, as the framework's sum does
            kept = unfired(h, fired)
            if "reset_value" in o.identities:
                v = b.add_zero_safe(p["reset_value"], kept)
            else:
                v = b.add(b.mul(fired, p["reset_value"]), kept)
        else:
            v = h
        return v, i, spike

    # snnTorch: the reset is decided from the stored membrane of the previous step
    r = b.step(v_prev, theta, o.compare)
    if o.reset == "subtract":
        v = b.sub(charge(v_prev), times(r, "threshold"))
    elif o.reset == "zero" and o.zero_scope == "membrane":
        v = charge(unfired(v_prev, r))
    elif o.reset == "zero":
        u = charge(v_prev)
        v = b.sub(u, b.mul(u, r))
    else:
        v = charge(v_prev)
    spike = times(r if o.spike_from == "stored" else b.step(v, theta, o.compare), "spike_scale")
    if o.reset_timing == "same_step_guarded" and o.reset != "none":
        delta = b.sub(b.div(spike, p["spike_scale"]), r)
        v = b.sub(v, b.mul(delta, theta if o.reset == "subtract" else v))
    return v, i, spike


def _charge(b, form: str, p: dict, v, d, identities=frozenset()):
    """The charge ``C(v, d)`` of one step in the framework's own operation order (spec docstring).

    ``identities``: :attr:`StepOptions.identities` (``v - v_rest`` is ``v`` for ``v_rest`` +0).
    """
    def rested():  # v - v_rest
        return v if "v_rest" in identities else b.sub(v, p["v_rest"])

    if form == "leaky":
        return b.add(b.mul(p["decay"], v), d)
    if form == "if":
        return b.add(v, d)
    if form in ("sj_decay_input", "sj_decay_input_mul"):
        inner = b.sub(d, rested())
        scaled = b.div(inner, p["tau"]) if form == "sj_decay_input" else b.mul(inner, p["inv_tau"])
        return b.add(v, scaled)
    if form in ("sj_no_decay_input", "sj_no_decay_input_mul"):
        leak = rested()
        leak = b.div(leak, p["tau"]) if form == "sj_no_decay_input" else b.mul(leak, p["inv_tau"])
        return b.add(b.sub(v, leak), d)
    if form == "norse_lif":
        return b.add(v, b.mul(p["mem_gain"], b.add(b.sub(p["v_rest"], v), d)))
    if form == "norse_box":
        return b.add(v, b.mul(p["mem_gain"], b.sub(b.add(d, p["v_rest"]), v)))
    raise ValueError(f"unknown charge form {form!r}")


def _param_dict(o: StepOptions, params: list[torch.Tensor]) -> dict:
    if len(params) != len(o.param_names):
        raise ValueError(f"expected parameters {o.param_names}, got {len(params)} tensors")
    return dict(zip(o.param_names, params))


def _initial_state(p: dict, step_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    v0 = p["v_init"].expand(step_shape)
    i0 = p["i_init"].expand(step_shape) if "i_init" in p else None
    return v0, i0


def charged_values(o: StepOptions, params: list[torch.Tensor], x: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The charged (pre-reset) membrane ``h_t`` of a ``same_step`` neuron, ``[T, B, ...]``.

    Recomputed from the layer input and the kernel's outputs (the post-reset membrane of
    step t-1 and, for two-state neurons, the current), elementwise over all steps at once:
    the value each spike was decided on, for telling float ties from real mismatches.
    """
    p = _param_dict(o, params)
    b = TorchBuilder()
    v0, i0 = _initial_state(p, x.shape[1:])
    v_prev = torch.cat([v0.unsqueeze(0), outputs[1][:-1]])
    if o.charge == "norse_lif":
        drive = b.add(torch.cat([i0.unsqueeze(0), outputs[2][:-1]]), x)
    elif o.two_state:
        drive = b.add(b.mul(p["syn_decay"], torch.cat([i0.unsqueeze(0), outputs[2][:-1]])), x)
    else:
        drive = x
    return _charge(b, o.charge, p, v_prev, drive, o.identities)


# ----------------------------------------------------------------------------- exact (Scan)


@torch.library.custom_op("psu::exact_neuron", mutates_args=())
def exact_neuron(x: torch.Tensor, params: list[torch.Tensor], options: str, layer: str) -> list[torch.Tensor]:
    """Exact neuron recursion over ``x`` ``[T, B, ...]``; returns ``[spikes, membrane(, current)]``."""
    o = StepOptions.parse(options)
    p = _param_dict(o, params)
    v, i = _initial_state(p, x.shape[1:])
    b = TorchBuilder()
    if x.shape[0] == 0:
        return [torch.empty_like(x) for _ in range(o.n_outputs)]
    out = []  # filled step by step (a list of steps stacked at the end would take twice the memory)
    for t in range(x.shape[0]):
        v, i, s = exact_step(b, o, p, v, i, x[t])
        values = (s, v, i)[:o.n_outputs]
        if not out:
            out = [value.new_empty((x.shape[0], *value.shape)) for value in values]
        for sequence, value in zip(out, values):
            sequence[t] = value
    return out


@exact_neuron.register_fake
def _exact_neuron_fake(x, params, options, layer):
    return [torch.empty_like(x) for _ in range(StepOptions.parse(options).n_outputs)]


class ExactNeuronOp(CustomOp):
    torch_op = torch.ops.psu.exact_neuron.default
    op_type_prefixes = ("LIF",)

    def translate(self, x, params, options: str, layer: str):
        o = StepOptions.parse(options)
        return emit_node(f"LIF_{o.variant}", [x, *params], o.n_outputs, layer=layer, **o.attributes())

    def function(self, node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
        from .linear import carry_state_functions, hoist_out_of_scan, recompute_sequence_identities, without_dead_nodes

        o = StepOptions.from_node(node)
        inputs = ["x", *o.param_names]
        outer = OnnxBuilder("f")
        step_shape = outer.node("Shape", ["x"], start=1)
        v0 = outer.node("Expand", ["v_init", step_shape])
        states = ([outer.node("Expand", ["i_init", step_shape])] if o.two_state else []) + [v0]

        body = OnnxBuilder("b")
        v_prev, i_prev = "v_prev", ("i_prev" if o.two_state else None)
        p = {name: name for name in o.param_names}
        v, i, spike = exact_step(body, o, p, v_prev, i_prev, "x_t")
        state_out = ([body.node("Identity", [i], )] if o.two_state else []) + [body.node("Identity", [v])]
        v_seq = body.node("Identity", [v])
        state_in = ([i_prev] if o.two_state else []) + [v_prev]
        seq_out = [spike, v_seq]
        outputs = ["spikes", "membrane"]
        if o.two_state:
            seq_out.append(body.node("Identity", [i]))
            outputs.append("current")
        # a call returning fewer outputs (the spikes only: registry.SPIKES_ONLY) gets a body
        # built for them, so the passes below see which per-step values are returned
        seq_out, outputs = seq_out[:len(node.output)], outputs[:len(node.output)]
        graph = helper.make_graph(
            without_dead_nodes(body.nodes, set(state_out + seq_out)),
            "step",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in state_in + ["x_t"]],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in state_out + seq_out],
        )
        scan_out = [outer.fresh() for _ in states] + outputs
        outer.nodes.append(helper.make_node("Scan", states + ["x"], scan_out, num_scan_inputs=1, body=graph))
        fn = make_function(node, outer.nodes, inputs, outputs, opset)
        # fewer nodes per step, same floats (each pass's docstring): a reset test that repeats
        # the previous step's spike test carried as a state; spikes etc. computed once over
        # [T, ...] after the scan; the membrane recomputed after the scan from its per-step
        # operands instead of an Identity copy
        return recompute_sequence_identities(hoist_out_of_scan(carry_state_functions(fn)))


# ----------------------------------------------------------------------------- closed form


def decay_kernel(decay: torch.Tensor, steps: int) -> torch.Tensor:
    """``K[t, j] = decay^(t-j)`` for ``j <= t``, else 0 (``[T, T]``, scalar decay)."""
    idx = torch.arange(steps)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff >= 0, decay.reshape(()) ** diff.clamp(min=0).to(torch.float32), torch.zeros(()))


@torch.library.custom_op("psu::closed_form_neuron", mutates_args=())
def closed_form_neuron(x: torch.Tensor, params: list[torch.Tensor], options: str, layer: str) -> list[torch.Tensor]:
    """Reset-free neuron with scalar decays as one product with the decay kernel."""
    from ..kernels import CLOSED_FORM_MAX_STEPS

    if x.shape[0] > CLOSED_FORM_MAX_STEPS:  # as the ONNX function: no T x T matrix for long sequences
        return exact_neuron(x, params, options, layer)
    o = StepOptions.parse(options)
    p = _param_dict(o, params)
    steps = x.shape[0]
    flat = x.reshape(steps, -1)
    powers = torch.arange(1, steps + 1, dtype=torch.float32).reshape((steps,) + (1,) * (x.dim() - 1))
    v0, i0 = _initial_state(p, x.shape[1:])
    current = None
    if o.two_state:
        current = (decay_kernel(p["syn_decay"], steps) @ flat).reshape(x.shape) + p["syn_decay"].reshape(()) ** powers * i0
        flat = current.reshape(steps, -1)
    membrane = (decay_kernel(p["decay"], steps) @ flat).reshape(x.shape) + p["decay"].reshape(()) ** powers * v0
    spikes = TorchBuilder().step(membrane, p["threshold"], o.compare) * p["spike_scale"]
    return [spikes, membrane] + ([current] if o.two_state else [])


@closed_form_neuron.register_fake
def _closed_form_fake(x, params, options, layer):
    return [torch.empty_like(x) for _ in range(StepOptions.parse(options).n_outputs)]


class ClosedFormNeuronOp(CustomOp):
    torch_op = torch.ops.psu.closed_form_neuron.default
    op_type_prefixes = ("LinearLIF",)

    def translate(self, x, params, options: str, layer: str):
        o = StepOptions.parse(options)
        return emit_node(f"LinearLIF_{o.variant}", [x, *params], o.n_outputs, layer=layer, **o.attributes())

    def function(self, node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
        import numpy as np

        o = StepOptions.from_node(node)
        b = OnnxBuilder("f")
        shape = b.node("Shape", ["x"])
        steps = b.node("Shape", ["x"], start=0, end=1)
        step_shape = b.node("Shape", ["x"], start=1)
        flat_shape = b.node("Concat", [steps, b.const_array(np.array([-1], dtype=np.int64))], axis=0)
        steps_scalar = b.node("Squeeze", [steps, b.const_array(np.array([0], dtype=np.int64))])
        idx = b.node("Range", [b.const_array(np.array(0, dtype=np.int64)), steps_scalar, b.const_array(np.array(1, dtype=np.int64))])
        diff = b.node("Sub", [b.node("Unsqueeze", [idx, b.const_array(np.array([1], dtype=np.int64))]),
                              b.node("Unsqueeze", [idx, b.const_array(np.array([0], dtype=np.int64))])])
        lower = b.node("GreaterOrEqual", [diff, b.const_array(np.array(0, dtype=np.int64))])
        exponent = b.node("Cast", [b.node("Max", [diff, b.const_array(np.array(0, dtype=np.int64))])], to=TensorProto.FLOAT)
        # powers 1..T, shaped [T, 1, ..., 1] to broadcast over one step's shape
        ones = b.node("ConstantOfShape", [b.node("Shape", [step_shape])], value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
        col_shape = b.node("Concat", [steps, ones], axis=0)
        powers = b.node("Reshape", [b.node("Cast", [b.node("Add", [idx, b.const_array(np.array(1, dtype=np.int64))])], to=TensorProto.FLOAT), col_shape])
        zero = b.const(0.0)

        def scalar(name):
            return b.node("Reshape", [name, b.const_array(np.array([], dtype=np.int64))])

        def kernel(decay):
            return b.node("Where", [lower, b.node("Pow", [scalar(decay), exponent]), zero])

        flat = b.node("Reshape", ["x", flat_shape])
        if o.two_state:
            current = b.node("Reshape", [b.node("MatMul", [kernel("syn_decay"), flat]), shape])
            i0 = b.node("Expand", ["i_init", step_shape])
            current = b.add(current, b.mul(b.node("Pow", [scalar("syn_decay"), powers]), i0))
            flat = b.node("Reshape", [current, flat_shape])
        v0 = b.node("Expand", ["v_init", step_shape])
        membrane = b.add(b.node("Reshape", [b.node("MatMul", [kernel("decay"), flat]), shape]),
                         b.mul(b.node("Pow", [scalar("decay"), powers]), v0))
        spikes = b.mul(b.step(membrane, "threshold", o.compare), "spike_scale")
        outputs = {"spikes": spikes, "membrane": membrane}
        if o.two_state:
            outputs["current"] = current
        for name, value in outputs.items():
            b.nodes.append(helper.make_node("Identity", [value], [name]))
        closed = make_function(node, b.nodes, ["x", *o.param_names], list(outputs), opset)
        # at run time, a long sequence takes the O(T) exact scan instead of the T x T product
        from ..kernels import CLOSED_FORM_MAX_STEPS
        from .linear import choose_on_steps

        return choose_on_steps(node, closed, EXACT.function(node, opset), CLOSED_FORM_MAX_STEPS, opset)


EXACT = register(ExactNeuronOp())
register(ClosedFormNeuronOp())
