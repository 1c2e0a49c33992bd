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

    reset_timing="same_step_guarded"   (snnTorch ``reset_delay=False``)
        as "previous_step" to get v_t and s_t, then with δ = s_t / g - r_t:
        subtract: v_t = v_t - δ * θ;   zero: v_t = v_t - δ * v_t  # post-reset v_t returned

    reset_timing="same_step"   (SpikingJelly, Norse, BrainCog)
        h_t = C(v_{t-1}, d_t);  s_t = g * H(h_t - θ)
        subtract: v_t = h_t - s_t * θ;  zero: v_t = s_t * v_reset + (1 - s_t) * h_t;  none: v_t = h_t

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

#: Parameter tensors of a spec, in the order the kernels receive them.
PARAM_NAMES = ("decay", "syn_decay", "threshold", "spike_scale", "reset_value", "v_init", "i_init")


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

    @property
    def two_state(self) -> bool:
        return self.syn_decay is not None

    @property
    def variant(self) -> str:
        """The discrete options, as an identifier: one ONNX function per variant."""
        parts = [self.reset, self.reset_timing, self.compare]
        if self.reset == "zero":
            parts.append(self.zero_scope)
        if self.two_state:
            parts.append("syn")
        return "_".join(parts)

    def params(self) -> list[torch.Tensor]:
        """The parameter tensors the kernels use, in :data:`PARAM_NAMES` order (absent ones skipped)."""
        return [getattr(self, n) for n in self.param_names()]

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
        for name in self.param_names():
            out[name] = getattr(self, name).tolist()
        return out
