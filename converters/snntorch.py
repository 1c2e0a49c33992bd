"""snnTorch (1.0): ``Leaky`` and ``Synaptic``, both call styles.

Semantics (NEURON_SEMANTICS.md section 1.1): strict ``>``; with the default
``reset_delay=True`` the reset is decided from the previous stored membrane and the
returned membrane is pre-reset; ``reset_delay=False`` adds the double-reset guard;
``beta`` / ``alpha`` are clamped to [0, 1] each time they are used; ``Leaky``'s zero
reset zeroes only the previous membrane, ``Synaptic``'s the whole new value.
"""

from __future__ import annotations

import contextlib

import torch

from psu_export.spec import NeuronSpec

from . import (CallConvention, FrameworkConverter, Unsupported, classes_by_name, exact, is_step_function, register, spec_options,
               step_with_held_state, unsupported)

_RESETS = {0: "subtract", 1: "zero", 2: "none"}

# reasons given by to_spec (and listed by coverage())
INHIBITION = "inhibition=True (only the argmax over dim 1 may fire) couples neurons within a step"
STATE_QUANT = "state_quant quantises the membrane between steps"
NOT_HEAVISIDE = "its spike function's forward is not the step H(mem - threshold > 0)"
_RECURRENT = "recurrent spike feedback (rec(spk_{t-1}) enters the membrane) cannot be parallelised over time"
#: snnTorch neuron classes recognised and refused, by name (known without snnTorch installed)
UNSUPPORTED_CLASSES = (
    ("RLeaky", _RECURRENT),
    ("RSynaptic", _RECURRENT),
    ("Lapicque", "Lapicque neurons are not supported yet (use Leaky with beta = 1 - dt/(R*C))"),
    ("Alpha", "Alpha neurons are not supported yet"),
    ("SLSTM", "spiking LSTM cells are recurrent"),
    ("SConv2dLSTM", "spiking LSTM cells are recurrent"),
)


class SnnTorchConverter(FrameworkConverter):
    name = "snntorch"
    import_name = "snntorch"
    version_range = ">=0.9,<=1.0"

    def neuron_classes(self):
        try:
            import snntorch
        except Exception:
            return ()
        return (snntorch.Leaky, snntorch.Synaptic)

    def unsupported_classes(self):
        try:
            import snntorch
        except Exception:
            snntorch = None
        return classes_by_name(snntorch, UNSUPPORTED_CLASSES)

    def coverage(self):
        rows = []
        for cls, two_state, zero_scope in (("Leaky", False, "membrane"), ("Synaptic", True, "total")):
            state = "mem" if cls == "Leaky" else "syn, mem"
            opts = lambda reset, timing: spec_options(reset, timing, "gt", zero_scope=zero_scope, two_state=two_state)  # noqa: E731
            rows += [
                exact(cls, 'reset_mechanism="subtract" (default), reset_delay=True (default)', opts("subtract", "previous_step")),
                exact(cls, 'reset_mechanism="zero"', opts("zero", "previous_step")),
                exact(cls, 'reset_mechanism="none"', opts("none", "previous_step")),
                exact(cls, 'reset_delay=False, reset_mechanism="subtract"', opts("subtract", "same_step_guarded")),
                exact(cls, 'reset_delay=False, reset_mechanism="zero"', opts("zero", "same_step_guarded")),
                exact(cls, ("beta" if cls == "Leaky" else "alpha, beta") + ", threshold scalar or per channel, learned or not "
                      "(clamped to [0, 1] as snnTorch does); graded_spikes_factor"),
                exact(cls, f"called with explicit state ({state}) in a loop over time, without it (the state kept in the "
                      "module, reset_mem() first), or init_hidden=True (e.g. in nn.Sequential, output=True or False)"),
                unsupported(cls, "inhibition=True", INHIBITION),
                unsupported(cls, "state_quant", STATE_QUANT),
                unsupported(cls, "spike_grad whose forward is not the Heaviside step", NOT_HEAVISIDE),
            ]
        rows += [unsupported(cls, "any", why) for cls, why in UNSUPPORTED_CLASSES]
        return rows

    def to_spec(self, module) -> NeuronSpec:
        import snntorch

        problems = []
        if getattr(module, "inhibition", False):
            problems.append(INHIBITION)
        if getattr(module, "state_quant", False):
            problems.append(STATE_QUANT)
        if not is_step_function(module.spike_grad, "gt"):
            problems.append(NOT_HEAVISIDE)
        if problems:
            raise Unsupported("; ".join(problems))
        reset = _RESETS[int(module.reset_mechanism_val)]
        timing = "previous_step" if module.reset_delay else "same_step_guarded"
        spike_scale = getattr(module, "graded_spikes_factor", torch.tensor(1.0))
        common = dict(
            decay=module.beta.detach().clamp(0, 1),
            threshold=module.threshold.detach(),
            reset=reset,
            reset_timing=timing,
            compare="gt",
            spike_scale=torch.as_tensor(spike_scale).detach(),
        )
        if isinstance(module, snntorch.Synaptic):
            return NeuronSpec(syn_decay=module.alpha.detach().clamp(0, 1), zero_scope="total", **common)
        return NeuronSpec(zero_scope="membrane", **common)

    def call_convention(self, module) -> CallConvention:
        import snntorch

        roles = ("current", "membrane") if isinstance(module, snntorch.Synaptic) else ("membrane",)

        def make_forward(call):
            if module.init_hidden:
                def forward(input_):
                    outs = step_with_held_state(module, call, input_)
                    return tuple(outs) if module.output else outs[0]
                return forward

            def forward(input_, *states, **named):
                given = list(states) + [named[r] for r in ("syn", "mem") if r in named]
                if given and len(given) != len(roles):
                    raise TypeError(f"expected {len(roles)} state tensors, got {len(given)}")
                if not given:  # called without its state: snnTorch keeps it in the module (self.mem) between calls
                    return tuple(step_with_held_state(module, call, input_))
                return tuple(call(input_, given))
            return forward

        return CallConvention(state_roles=roles, forward=make_forward)

    @contextlib.contextmanager
    def tracing_scope(self, model):
        """``utils.reset(net)`` resets every entry of the class-wide ``SpikingNeuron.instances``,
        other models' neurons included; traced, that stores fake tensors on those models and a
        later trace that resets them fails. The list holds only ``model``'s neurons meanwhile."""
        import snntorch as snn

        instances = snn.SpikingNeuron.instances
        saved = list(instances)
        ours = {id(m) for m in model.modules()}
        instances[:] = [m for m in saved if id(m) in ours]
        try:
            yield
        finally:
            instances[:] = saved

    def reset_state(self, module) -> None:
        module._psu_state = []
        for name in ("mem", "syn"):
            state = getattr(module, name, None)
            if isinstance(state, torch.Tensor):
                setattr(module, name, torch.zeros(0, device=state.device))  # snnTorch re-creates it on this device

    def initial_state(self, module, role, value, step_input):
        # snnTorch replaces a state whose shape differs from the input by zeros
        if tuple(value.shape) != tuple(step_input.shape):
            return None
        return value


register(SnnTorchConverter())
