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

from . import CallConvention, FrameworkConverter, exact, register, spec_options, step_with_held_state, unsupported


class NirConverter(FrameworkConverter):
    name = "nir"
    import_name = "nir"
    version_range = ">=1.0.8,<2"

    def neuron_classes(self):
        from psu_export.nir_import import NirNeuron

        return (NirNeuron,)

    def coverage(self):
        # rows per NIR node type (NirNeuron.kind), see psu_export/nir_import.py
        rows = []
        for kind, two_state in (("LIF", False), ("IF", False), ("CubaLIF", True)):
            rows += [
                exact(kind, "--nir-reset zero (default, NIR's own: v <- v_reset)", spec_options("zero", two_state=two_state)),
                exact(kind, "--nir-reset subtract (v <- v - v_threshold; for graphs from subtract-reset models)",
                      spec_options("subtract", two_state=two_state)),
                unsupported(kind, "--nir-reset subtract with a nonzero v_reset", "refused (usage error): subtract reset ignores v_reset"),
            ]
        rows += [
            exact("LI", "no spikes: the population outputs v", spec_options("none")),
            exact("I", "no spikes: the population outputs v", spec_options("none")),
        ]
        for kind in ("LIF", "CubaLIF", "LI"):
            rows.append(unsupported(kind, "--dt larger than a time constant", "forward Euler needs dt <= tau (usage error)"))
        rows += [
            unsupported("NIRGraph", "nested graph (e.g. snnTorch's RLeaky export)", "nested NIR graphs (e.g. snnTorch's RLeaky export) are not supported"),
            unsupported("any node", "in a cycle of edges", "is part of a recurrent loop (a cycle of edges): recurrent feedback cannot be parallelised over time"),
        ]
        return rows

    def coverage_class(self, module) -> str:
        return module.kind

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
                return tuple(step_with_held_state(module, call, module.drive(x)))

            return forward

        return CallConvention(state_roles=roles, forward=make_forward)

    def reset_state(self, module) -> None:
        module._psu_state = []
        module.reset_state()

    def initial_state(self, module, role, value, step_input):
        return value


register(NirConverter())
