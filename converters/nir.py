"""NIR graphs: the neuron populations built by :mod:`psu_export.nir_import`.

A ``.nir`` file is loaded as a single-step :class:`~psu_export.nir_import.NIRNet` (the
``step`` input kind); each neuron node is a :class:`~psu_export.nir_import.NirNeuron`
with the forward-Euler discretisation documented in that module, which maps one to one
onto :class:`NeuronSpec` (same-step reset, strict ``>``, the spec's op order):

=========  =====================  ======================================================
NIR node   spec                   notes
=========  =====================  ======================================================
LIF, IF    one-state, reset       ``--nir-reset zero`` (NIR) or ``subtract``
CubaLIF    two-state, reset       the synaptic current kept pre-scaled (``i_init`` = k v_leak)
LI, I      one-state, no reset    threshold never reached; the population outputs v
=========  =====================  ======================================================

NIR cannot express a subtract reset: ``--nir-reset`` chooses (default zero, NIR's own).
"""

from __future__ import annotations

import torch

from psu_export.spec import NeuronSpec

from . import CallConvention, FrameworkConverter, register


class NirConverter(FrameworkConverter):
    name = "nir"
    import_name = "nir"
    version_range = ">=1.0.8,<2"

    def neuron_classes(self):
        from psu_export.nir_import import NirNeuron

        return (NirNeuron,)

    def to_spec(self, module) -> NeuronSpec:
        reset = module.reset if module.spiking else "none"
        return NeuronSpec(
            decay=module.decay,
            threshold=module.threshold,
            reset=reset,
            reset_timing="same_step",
            compare="gt",
            syn_decay=module.syn_decay,
            reset_value=module.reset_value,
            v_init=torch.tensor(0.0),
            i_init=module.i_init,
        )

    def call_convention(self, module) -> CallConvention:
        roles = ("current", "membrane") if module.syn_decay is not None else ("membrane",)

        def make_forward(call):
            def forward(x):
                outs = call(module.drive(x), module._psu_state)
                module._psu_state = list(outs[1:])
                return tuple(outs)

            return forward

        return CallConvention(state_roles=roles, forward=make_forward)

    def reset_state(self, module) -> None:
        module._psu_state = []
        module.reset_state()

    def initial_state(self, module, role, value, step_input):
        return value


register(NirConverter())
