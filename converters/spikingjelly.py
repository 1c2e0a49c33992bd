"""SpikingJelly (2.0, ``spikingjelly.activation_based``): ``IFNode``, ``LIFNode``, ``ParametricLIFNode``.

Semantics (NEURON_SEMANTICS.md section 1.2, checked against ``_ops/{if_,lif,plif}/reference.py``):

* spike test ``>=`` (``surrogate(h - v_threshold)`` with forward ``h - θ >= 0``);
* charge, with ``V_r = v_reset`` or 0 when ``v_reset is None``:
  IF ``h = v + x``; LIF ``h = v + (x - (v - V_r)) / tau`` (``decay_input``) or
  ``h = v - (v - V_r) / tau + x``; PLIF the same with ``* sigmoid(w)`` instead of ``/ tau``;
* reset in the same step: hard ``v = s * v_reset + (1 - s) * h``, soft (``v_reset=None``)
  ``v = h - s * θ``; the initial ``v`` is ``V_r``;
* ``tau``, ``v_threshold``, ``v_reset`` are plain module attributes (not in the state dict);
  PLIF's ``w`` is a scalar parameter.

Both step modes: ``step_mode='s'`` (one step per call, state in the module, the time loop
outside) and ``step_mode='m'`` (the module takes the whole ``[T, B, ...]`` sequence and
loops inside): there the capture op takes the whole sequence
(:attr:`~psu_export.converters.CallConvention.sequence`).
"""

from __future__ import annotations

import contextlib

import torch

from psu_export.spec import NeuronSpec

from . import (CallConvention, FrameworkConverter, Unsupported, classes_by_name, exact, is_step_function, register, scalar_param, spec_options,
               step_with_held_state, unsupported)

# reasons given by to_spec (and listed by coverage())
OTHER_NODE = "is not one of the supported SpikingJelly neurons (IFNode, LIFNode, ParametricLIFNode); its update may differ"
REDUCED_PRECISION = "a reduced neuron precision (set_neuron_precision) changes the state arithmetic"
NOT_HEAVISIDE = "its surrogate function's forward is not the step H(h - v_threshold >= 0) (is surrogate.spiking False?)"
PLIF_VECTOR_W = "ParametricLIFNode with a non-scalar w is not supported"
#: SpikingJelly neuron classes recognised and refused, by name (known without SpikingJelly installed)
UNSUPPORTED_CLASSES = (
    ("PSN", "PSN is a non-causal learned T x T map with a fixed T, not a stateful neuron"),
    ("MaskedPSN", "MaskedPSN has a fixed T and a learned T x T map (not supported yet)"),
    ("SlidingPSN", "SlidingPSN (learned sliding-window kernel) is not supported yet"),
    ("SimpleLIFNode", "SimpleLIFNode charges as v + (v_reset - v + x) / tau, an operation order not supported yet (use LIFNode)"),
    ("SimpleIFNode", "SimpleIFNode is not supported yet (use IFNode)"),
    ("AdaptBaseNode", "adaptive-threshold neurons carry a second state that feeds back into the threshold"),
    ("IzhikevichNode", "Izhikevich neurons carry a recovery variable coupled to the membrane"),
    ("EIFNode", "the exponential integrate-and-fire charge (exp of the membrane) is not supported"),
    ("QIFNode", "the quadratic integrate-and-fire charge is not supported"),
    ("KLIFNode", "KLIF's learned scaled ReLU of the membrane is not supported"),
    ("LIAFNode", "LIAF outputs an analogue activation, not spikes"),
    ("CLIFNode", "CLIF carries a second (complementary) state"),
    ("GatedLIFNode", "gated LIF learns per-step gates over a fixed T"),
    ("NonSpikingLIFNode", "non-spiking integrator (no threshold)"),
    ("NonSpikingIFNode", "non-spiking integrator (no threshold)"),
)


def _neuron_module():
    try:
        from spikingjelly.activation_based import neuron
    except Exception:
        return None
    return neuron


class SpikingJellyConverter(FrameworkConverter):
    name = "spikingjelly"
    import_name = "spikingjelly"
    version_range = ">=2.0,<2.1"

    def available(self) -> bool:
        return _neuron_module() is not None

    def _supported(self) -> tuple[type, ...]:
        neuron = _neuron_module()
        if neuron is None:
            return ()
        return (neuron.IFNode, neuron.LIFNode, neuron.ParametricLIFNode)

    def neuron_classes(self):
        neuron = _neuron_module()
        if neuron is None:
            return ()
        # every SpikingJelly neuron is recognised; the ones we cannot reproduce are refused with a reason
        return self._supported() + (neuron.BaseNode,)

    def unsupported_classes(self):
        return classes_by_name(_neuron_module(), UNSUPPORTED_CLASSES)

    def coverage(self):
        rows = []
        for cls, forms in (
            ("IFNode", (("", "if"),)),
            ("LIFNode", (("decay_input=True (default)", "sj_decay_input"), ("decay_input=False", "sj_no_decay_input"))),
            ("ParametricLIFNode", (("decay_input=True (default)", "sj_decay_input_mul"), ("decay_input=False", "sj_no_decay_input_mul"))),
        ):
            for what, charge in forms:
                prefix = f"{what}, " if what else ""
                rows.append(exact(cls, f"{prefix}v_reset a number (hard reset, to v_reset)", spec_options("zero", "same_step", "ge", charge)))
                rows.append(exact(cls, f"{prefix}v_reset=None (soft reset, subtract v_threshold)", spec_options("subtract", "same_step", "ge", charge)))
            params = {"IFNode": "v_threshold, v_reset", "LIFNode": "tau, v_threshold, v_reset",
                      "ParametricLIFNode": "w (scalar, from init_tau), v_threshold, v_reset"}[cls]
            rows.append(exact(cls, "step_mode='s' (one step per call; the time loop in forward or driven by psu-export) "
                                   f"or step_mode='m' (the whole [T, B, ...] sequence); scalar {params}"))
            rows += [
                unsupported(cls, "set_neuron_precision (reduced precision)", REDUCED_PRECISION),
                unsupported(cls, "surrogate_function whose forward is not the step (spiking=False)", NOT_HEAVISIDE),
                unsupported(cls, "non-scalar v_threshold or v_reset", "a non-scalar v_threshold / v_reset is not supported"),
            ]
        rows.append(unsupported("ParametricLIFNode", "non-scalar w", PLIF_VECTOR_W))
        rows.append(unsupported("BaseNode", "any other subclass (not listed here)", OTHER_NODE))
        rows += [unsupported(cls, "any", why) for cls, why in UNSUPPORTED_CLASSES]
        return rows

    # ---------------------------------------------------------------- spec
    def to_spec(self, module) -> NeuronSpec:
        neuron = _neuron_module()
        cls = type(module)
        if cls not in self._supported():
            raise Unsupported(f"{cls.__module__}.{cls.__name__} {OTHER_NODE}")
        problems = []
        if getattr(module, "_neuron_precision", None) is not None:
            problems.append(REDUCED_PRECISION)
        if module.step_mode not in ("s", "m"):
            problems.append(f"unknown step_mode {module.step_mode!r}")
        if not is_step_function(module.surrogate_function, "ge"):
            problems.append(NOT_HEAVISIDE)
        threshold = scalar_param(module.v_threshold, "v_threshold", problems)
        v_reset = None if module.v_reset is None else scalar_param(module.v_reset, "v_reset", problems)
        if problems:
            raise Unsupported("; ".join(problems))
        rest = 0.0 if v_reset is None else v_reset
        common = dict(
            threshold=threshold,
            reset="subtract" if v_reset is None else "zero",
            reset_value=rest,
            reset_timing="same_step",
            compare="ge",
            v_init=rest,
        )
        if cls is neuron.IFNode:
            return NeuronSpec(decay=1.0, charge="if", **common)
        decay_input = bool(module.decay_input)
        if cls is neuron.LIFNode:
            tau = float(module.tau)
            return NeuronSpec(
                decay=1.0 - 1.0 / tau,
                charge="sj_decay_input" if decay_input else "sj_no_decay_input",
                tau=tau,
                v_rest=rest,
                **common,
            )
        w = module.w.detach()
        if w.numel() != 1:
            raise Unsupported(PLIF_VECTOR_W)
        inv_tau = w.float().sigmoid().reshape(())  # computed as SpikingJelly computes it
        return NeuronSpec(
            decay=1.0 - inv_tau,
            charge="sj_decay_input_mul" if decay_input else "sj_no_decay_input_mul",
            inv_tau=inv_tau,
            v_rest=rest,
            **common,
        )

    @contextlib.contextmanager
    def capture_scope(self, model):
        """``functional.multi_step_forward(x_seq, m)`` (also inside ``layer.MultiStepContainer``)
        runs ``m`` on each step in a Python loop, which the capture would unroll at its own T.
        While capturing, a stateless ``m`` (no SpikingJelly memory module in it) runs once on
        all steps with time folded into its batch, as ``functional.seq_to_ann_forward`` does."""
        try:
            from spikingjelly.activation_based import base
            from spikingjelly.activation_based.functional import forward as sj_forward
        except Exception:
            yield
            return
        looped = sj_forward._multi_step_forward

        def on_all_steps(x_seq, single_step_module, time_dim):
            items = single_step_module if isinstance(single_step_module, (list, tuple)) else (single_step_module,)
            owners = [getattr(item, "__self__", item) for item in items]  # a bound forward: its module
            stateful = any(isinstance(m, base.MemoryModule) for owner in owners if isinstance(owner, torch.nn.Module) for m in owner.modules())
            if stateful or time_dim not in (0, 1) or isinstance(x_seq, tuple):
                return looped(x_seq, single_step_module, time_dim)
            return sj_forward.seq_to_ann_forward(x_seq, single_step_module)  # folds dims 0 and 1, whichever is time

        sj_forward._multi_step_forward = on_all_steps
        try:
            yield
        finally:
            sj_forward._multi_step_forward = looped

    # ---------------------------------------------------------------- calls
    def consumes_sequence(self, module) -> bool:
        return getattr(module, "step_mode", "s") == "m"

    def call_convention(self, module) -> CallConvention:
        if self.consumes_sequence(module):
            def make_forward(call):
                def forward(x_seq, *args, **kwargs):
                    if args or kwargs:
                        raise TypeError("SpikingJelly multi-step neurons take only the input sequence")
                    return call(x_seq, [])[0]
                return forward

            return CallConvention(state_roles=("membrane",), forward=make_forward, sequence=True)

        def make_forward(call):
            def forward(x, *args, **kwargs):
                if args or kwargs:
                    raise TypeError("SpikingJelly single-step neurons take only the input")
                return step_with_held_state(module, call, x)[0]
            return forward

        return CallConvention(state_roles=("membrane",), forward=make_forward)

    def reset_state(self, module) -> None:
        module._psu_state = []
        module.reset()


register(SpikingJellyConverter())
