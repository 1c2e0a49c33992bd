"""Parallel neuron algorithms and the per-layer choice between them.

======================  ===============================================================
algorithm               when
======================  ===============================================================
``closed_form``         reset-free neuron with scalar decays: the membrane is linear in
                        the input, ``v = K X (+ decay^(t+1) v_init)``, one T x T product
                        (O(T^2 N)); chosen up to :data:`CLOSED_FORM_MAX_STEPS`
``scan``                everything else: the exact recursion as one ONNX ``Scan`` whose
                        body is a handful of elementwise ops; the synaptic layers around
                        it still run once over all steps
======================  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import NeuronSpec

#: above this many steps the T x T kernel costs more than the scan (measured on CPU)
CLOSED_FORM_MAX_STEPS = 64


@dataclass(frozen=True)
class Algorithm:
    name: str
    reason: str


def choose_algorithm(spec: NeuronSpec, time_steps: int) -> Algorithm:
    """The parallel algorithm for one layer, and why."""
    if spec.reset != "none":
        return Algorithm("scan", f"{spec.reset} reset makes each step depend on the previous spikes: exact scan")
    scalar = spec.decay.numel() == 1 and (spec.syn_decay is None or spec.syn_decay.numel() == 1)
    if not scalar:
        return Algorithm("scan", "reset-free but per-channel decay: exact scan")
    if time_steps > CLOSED_FORM_MAX_STEPS:
        return Algorithm("scan", f"reset-free, but T={time_steps} > {CLOSED_FORM_MAX_STEPS}: the T x T kernel would cost more than a scan")
    return Algorithm("closed_form", f"reset-free with scalar decay and T={time_steps} <= {CLOSED_FORM_MAX_STEPS}: one T x T product")
