"""The canonical description of one spiking-neuron layer in discrete time.

Every framework converter maps its neuron modules to a :class:`NeuronSpec`; the
parallel kernels (:mod:`psu_export.kernels`) and the ONNX functions
(:mod:`psu_export.ops`) read only this spec.

State per neuron: membrane ``v`` and, for two-state neurons (``syn_decay`` set), a
synaptic current ``i``.  One step with layer input ``x_t`` (H is ``>`` for
``compare="gt"`` and ``>=`` for ``"ge"``; θ the threshold; g the spike scale)::

    drive:   d_t = x_t                               (one-state)
             i_t = syn_decay * i_{t-1} + x_t;  d_t = i_t   (two-state)
    charge:  C(v, d) = decay * v + d                 (charge="leaky")

    reset_timing="previous_step"   (snnTorch ``reset_delay=True``)
        r_t = H(v_{t-1} - θ)                          # decided from the stored membrane
        subtract: v_t = C(v_{t-1}, d_t) - r_t * θ
        zero, zero_scope="membrane": v_t = C((1 - r_t) * v_{t-1}, d_t)
        zero, zero_scope="total":    u = C(v_{t-1}, d_t);  v_t = u - u * r_t
        none:     v_t = C(v_{t-1}, d_t)
        s_t = g * H(v_t - θ)                          # v_t is returned (pre-reset)
        with spike_from="stored": s_t = g * r_t       # the spike is the test of the stored
                                                      # membrane (snnTorch tutorial 2's
                                                      # hand-written LIF: spk = mem > thr, then
                                                      # mem = beta * mem + x - spk * thr)

    reset_timing="same_step_guarded"   (snnTorch ``reset_delay=False``)
        as "previous_step" to get v_t and s_t, then with δ = s_t / g - r_t:
        subtract: v_t = v_t - δ * θ;   zero: v_t = v_t - δ * v_t  # post-reset v_t returned

    reset_timing="same_step"   (SpikingJelly, Norse, BrainCog)
        h_t = C(v_{t-1}, d_t);  s_t = g * H(h_t - θ)
        subtract: v_t = h_t - s_t * θ;  zero: v_t = s_t * v_reset + (1 - s_t) * h_t;  none: v_t = h_t
        subtract with reset_form="blend" (Norse ``reset_subtract``):
                  v_t = (1 - s_t) * h_t + s_t * (h_t - θ)
        zero with reset_form="product" (BrainCog, hand-written ``v * (1 - s)``; v_reset 0):
                  v_t = (1 - s_t) * h_t        # nothing added: a -0 membrane stays -0

Charge forms (``charge``): the same leaky integration written in each framework's own
float operation order, so the exact kernels reproduce it bit for bit (``decay`` then
holds the mathematically equivalent per-step decay, for the approximate modes)::

    "leaky"                   C = decay * v + d                       (snnTorch)
    "if"                      C = v + d                               (SpikingJelly IFNode)
    "sj_decay_input"          C = v + (d - (v - v_rest)) / tau        (SpikingJelly LIFNode)
    "sj_no_decay_input"       C = v - (v - v_rest) / tau + d
    "sj_decay_input_mul"      C = v + (d - (v - v_rest)) * inv_tau    (ParametricLIFNode,
    "sj_no_decay_input_mul"   C = v - (v - v_rest) * inv_tau + d       inv_tau = sigmoid(w))
    "norse_box"               C = v + mem_gain * ((d + v_rest) - v)   (Norse LIFBoxCell)
    "norse_lif"  (two-state)  i' = i_{t-1} + x_t                      (Norse LIFCell / LIF)
                              C = v + mem_gain * ((v_rest - v) + i')
                              i_t = i' + syn_gain * i'                 (syn_gain = -dt/tau_syn)

For "norse_lif" the drive is the jumped current i' and the stored current is i_t (the
``syn_decay`` recursion above is not used).  ``mem_gain`` is ``dt * tau_mem_inv`` and
``syn_gain`` is ``-dt * tau_syn_inv``, each computed as the framework computes it.

Parameters (``decay``, ``syn_decay``, ``threshold``, ``spike_scale``, ``reset_value``,
``v_init``, ``i_init``) are float tensors that broadcast against one step's input
``[B, ...]`` on its trailing dimensions (scalars, or per-channel such as ``[C, 1, 1]``).
The arithmetic order above is the one each framework uses, so the exact kernels
reproduce the original bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Compare = Literal["gt", "ge"]
Reset = Literal["subtract", "zero", "none"]
ResetTiming = Literal["previous_step", "same_step_guarded", "same_step"]
ZeroScope = Literal["membrane", "total"]
Charge = Literal[
    "leaky", "if", "sj_decay_input", "sj_no_decay_input", "sj_decay_input_mul", "sj_no_decay_input_mul", "norse_lif", "norse_box"
]
ResetForm = Literal["standard", "blend", "product"]
SpikeFrom = Literal["updated", "stored"]

#: per charge form, the extra parameters its arithmetic reads (besides threshold etc.)
CHARGE_PARAMS: dict[str, tuple[str, ...]] = {
    "leaky": ("decay",),
    "if": (),
    "sj_decay_input": ("tau", "v_rest"),
    "sj_no_decay_input": ("tau", "v_rest"),
    "sj_decay_input_mul": ("inv_tau", "v_rest"),
    "sj_no_decay_input_mul": ("inv_tau", "v_rest"),
    "norse_lif": ("mem_gain", "syn_gain", "v_rest"),
    "norse_box": ("mem_gain", "v_rest"),
}

#: Parameter tensors of a spec, in the order the kernels receive them.
PARAM_NAMES = (
    "decay", "syn_decay", "threshold", "spike_scale", "reset_value", "v_init", "i_init",
    "tau", "inv_tau", "v_rest", "mem_gain", "syn_gain",
)


#: threshold of a non-spiking integrator (NIR ``LI`` / ``I``, Norse ``LICell``, hand-written): never reached by a
#: finite membrane (and valid JSON, unlike inf)
NEVER_FIRES = float(torch.finfo(torch.float32).max)


def _as_tensor(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().clone()


@dataclass(frozen=True, eq=False)
class NeuronSpec:
    """One neuron layer; see the module docstring for the exact update equations."""

    decay: torch.Tensor
    threshold: torch.Tensor
    reset: Reset = "subtract"
    reset_timing: ResetTiming = "same_step"
    compare: Compare = "gt"
    syn_decay: torch.Tensor | None = None
    spike_scale: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0))
    reset_value: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    zero_scope: ZeroScope = "membrane"
    v_init: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    i_init: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    charge: Charge = "leaky"
    reset_form: ResetForm = "standard"
    spike_from: SpikeFrom = "updated"
    tau: torch.Tensor | None = None
    inv_tau: torch.Tensor | None = None
    v_rest: torch.Tensor | None = None
    mem_gain: torch.Tensor | None = None
    syn_gain: torch.Tensor | None = None

    def __post_init__(self):
        for name in PARAM_NAMES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_tensor(value))
        if self.reset not in ("subtract", "zero", "none"):
            raise ValueError(f"unknown reset {self.reset!r}")
        if self.reset_timing not in ("previous_step", "same_step_guarded", "same_step"):
            raise ValueError(f"unknown reset timing {self.reset_timing!r}")
        if self.compare not in ("gt", "ge"):
            raise ValueError(f"unknown comparison {self.compare!r}")
        if self.zero_scope not in ("membrane", "total"):
            raise ValueError(f"unknown zero scope {self.zero_scope!r}")
        if self.charge not in CHARGE_PARAMS:
            raise ValueError(f"unknown charge form {self.charge!r}")
        if self.reset_form not in ("standard", "blend", "product"):
            raise ValueError(f"unknown reset form {self.reset_form!r}")
        if self.reset_form == "product" and not (self.reset == "zero" and self.reset_timing == "same_step" and bool(torch.all(self.reset_value == 0))):
            raise ValueError("reset_form='product' is the same-step zero reset to 0")
        missing = [n for n in CHARGE_PARAMS[self.charge] if getattr(self, n) is None]
        if missing:
            raise ValueError(f"charge form {self.charge!r} needs {missing}")
        if self.charge == "norse_lif" and self.syn_decay is None:
            raise ValueError("charge form 'norse_lif' is two-state: set syn_decay (the equivalent current decay)")
        if self.spike_from not in ("updated", "stored"):
            raise ValueError(f"unknown spike source {self.spike_from!r}")
        if self.spike_from == "stored" and self.reset_timing != "previous_step":
            raise ValueError("spike_from='stored' (the spike tests the stored membrane) needs reset_timing='previous_step'")
        if self.charge != "leaky" and self.reset_timing != "same_step":
            raise ValueError(f"charge form {self.charge!r} is only defined with reset_timing='same_step'")

    @property
    def two_state(self) -> bool:
        return self.syn_decay is not None

    def param_names(self) -> list[str]:
        return [n for n in PARAM_NAMES if getattr(self, n) is not None]

    def to_json(self) -> dict:
        """A JSON-able description (parameters as nested lists) for reports and ONNX metadata."""
        out: dict = {
            "reset": self.reset,
            "reset_timing": self.reset_timing,
            "compare": self.compare,
            "two_state": self.two_state,
        }
        if self.reset == "zero":
            out["zero_scope"] = self.zero_scope
        if self.charge != "leaky":
            out["charge"] = self.charge
        if self.reset_form != "standard":
            out["reset_form"] = self.reset_form
        if self.spike_from != "updated":
            out["spike_from"] = self.spike_from
        for name in self.param_names():
            out[name] = getattr(self, name).tolist()
        return out
