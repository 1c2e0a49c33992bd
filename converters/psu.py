"""The project's own Parallel Spiking Units (:mod:`psu_export.psu`): ``PSU``, ``IPSU``, ``RPSU``.

These modules take the whole ``[T, B, ...]`` sequence in one call and carry no state
between calls, so capture treats each as one *sequence* call
(:attr:`~psu_export.converters.CallConvention.sequence`) and the rewrite runs the module's
own dynamics on it: one ``psu.PSU_*`` / ``psu.IPSU_*`` / ``psu.RPSU_*`` node per layer
(:mod:`psu_export.ops.reset`), whose ONNX function body is the same program as the
module's ``forward``, so the conversion is exact in every ``--reset`` mode (the modes
concern converted LIF layers; a PSU already is the probabilistic form).

``IPSU`` / ``RPSU`` learn ``max_steps x max_steps`` time matrices: their models are
exported with T fixed to ``--time-steps`` (which must not exceed ``max_steps``); models
made only of ``PSU`` layers accept any T.  The spec reported for a site describes the
LIF neuron the unit approximates (decay, threshold, same-step subtract reset, ``>``);
the site's algorithm (``psu_module``) and its reason state what is really computed.
"""

from __future__ import annotations

import torch

from psu_export.spec import NeuronSpec

from . import CallConvention, FrameworkConverter, exact, register


class PsuConverter(FrameworkConverter):
    name = "psu"
    import_name = "psu_export"
    version_range = "(this package)"

    def neuron_classes(self):
        from psu_export.psu import IPSU, PSU, RPSU

        return (PSU, IPSU, RPSU)

    def coverage(self):
        # site_kernel: the module's own dynamics in every --reset mode (no NeuronSpec decides the algorithm)
        both = "code_compat=False (the paper) or True (the authors' code); any tau, threshold"
        return [
            exact("PSU", f"{both}; any T"),
            exact("IPSU", f"{both}, init='kaiming' or 'lif'; T <= max_steps (the ONNX model's T is fixed to --time-steps)"),
            exact("RPSU", f"{both}, init='kaiming' or 'lif'; T <= max_steps (the ONNX model's T is fixed to --time-steps)"),
        ]

    def installed_version(self) -> str | None:
        from psu_export import __version__

        return __version__

    def to_spec(self, module) -> NeuronSpec:
        return NeuronSpec(decay=torch.tensor(module.decay), threshold=torch.tensor(module.threshold), reset="subtract", reset_timing="same_step", compare="gt")

    def consumes_sequence(self, module) -> bool:
        return True

    def call_convention(self, module) -> CallConvention:
        def make_forward(call):
            def forward(x):
                return call(x, [])[0]

            return forward

        return CallConvention(state_roles=(), forward=make_forward, sequence=True, max_time_steps=module.max_steps)

    def site_kernel(self, module):
        """``(Algorithm, ResetOptions, {name: tensor})`` of the module's own dynamics (detached)."""
        from psu_export.kernels import Algorithm

        options = module.reset_options()
        with torch.no_grad():
            params = {name: value.detach().clone().float().cpu() for name, value in module.reset_params().items()}
        flavour = "the authors' code (code_compat=True)" if module.code_compat else "the paper"
        limit = f"; learned {module.max_steps} x {module.max_steps} time matrices (T <= {module.max_steps})" if module.max_steps else "; any T"
        reason = f"{type(module).__name__} as in {flavour}: its own parallel dynamics, exactly (no sequential dependency){limit}"
        return Algorithm("psu_module", reason), options, params


register(PsuConverter())
