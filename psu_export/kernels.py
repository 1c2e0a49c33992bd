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
``probabilistic_reset`` ``--reset psu``, leaky subtract-reset layers: the paper's reset
                        estimate replaces the spikes in the reset term
                        (:mod:`psu_export.ops.reset`); two linear recurrences, no
                        step waits for earlier spikes; approximate
``stochastic_reset``    ``--reset stochastic``: Bernoulli samples of that estimate from the
                        hash RNG keyed by (seed, layer, element); approximate, reproducible
``psu_module``          the project's own PSU / IPSU / RPSU modules (any mode): their own
                        dynamics, exactly (:mod:`psu_export.psu`)
======================  ===============================================================

In the approximate modes, layers that have nothing to estimate or no linear reset keep
an exact algorithm, and their ``algorithm_reason`` says why: reset-free layers (exact
already), zero / to-``v_reset`` resets (the reset removes the data-dependent membrane, so
it is not linear in the spikes: no probabilistic form), and charge forms other than
``leaky`` or Norse's blended reset (not yet mapped to the estimate).  The double-reset
guard of snnTorch ``reset_delay=False`` is not modelled by the estimate (it applies the
standard same-step kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import NeuronSpec

#: above this many steps the T x T kernel costs more than the scan (measured on CPU)
CLOSED_FORM_MAX_STEPS = 64


@dataclass(frozen=True)
class Algorithm:
    """A layer's parallel algorithm and why.

    ``reason`` is the whole sentence reports show.  Chosen in an approximate ``--reset``
    mode, ``mode_reason`` is that mode's own part of it (why the estimate applies, with its
    ``caveat``, what it does not model, if any; or why the layer is kept exact, in which
    case ``reason`` goes on with the exact algorithm's reason).
    """

    name: str
    reason: str
    mode_reason: str = ""
    caveat: str = ""


def _in_mode(name: str, mode: str, why: str, caveat: str = "") -> Algorithm:
    own = why + (f" ({caveat})" if caveat else "")
    return Algorithm(name, f"--reset {mode}: {own}", own, caveat)


APPROXIMATE_MODES = ("psu", "stochastic")


def choose_algorithm(spec: NeuronSpec, time_steps: int, mode: str = "exact") -> Algorithm:
    """The parallel algorithm for one layer in reset ``mode``, and why."""
    if mode in APPROXIMATE_MODES:
        approximate = _approximate_algorithm(spec, mode)
        if approximate.name != "exact":
            return approximate
        exact = choose_algorithm(spec, time_steps)
        return Algorithm(exact.name, f"{approximate.reason}; {exact.reason}", approximate.mode_reason)
    if spec.reset != "none":
        return Algorithm("scan", f"{spec.reset} reset makes each step depend on the previous spikes: exact scan")
    if spec.spike_from != "updated":
        return Algorithm("scan", "the spike tests the stored membrane of the previous step: exact scan")
    if getattr(spec, "charge", "leaky") != "leaky":
        return Algorithm("scan", f"charge form {spec.charge!r} is reproduced bit for bit only by the exact scan")
    scalar = spec.decay.numel() == 1 and (spec.syn_decay is None or spec.syn_decay.numel() == 1)
    if not scalar:
        return Algorithm("scan", "reset-free but per-channel decay: exact scan")
    if time_steps > CLOSED_FORM_MAX_STEPS:
        return Algorithm("scan", f"reset-free, but T={time_steps} > {CLOSED_FORM_MAX_STEPS}: the T x T kernel would cost more than a scan")
    return Algorithm("closed_form", f"reset-free with scalar decay and T={time_steps} <= {CLOSED_FORM_MAX_STEPS}: one T x T product")


def _approximate_algorithm(spec: NeuronSpec, mode: str) -> Algorithm:
    """``probabilistic_reset`` / ``stochastic_reset`` where the estimate applies, else ``exact`` and why not."""
    if spec.reset == "none":
        return _in_mode("exact", mode, "reset-free, nothing to estimate (exact)")
    if spec.reset == "zero":
        return _in_mode("exact", mode, "zero/to-v_reset reset is not linear in the spikes, so it has no probabilistic form; kept exact")
    if spec.spike_from != "updated":
        return _in_mode("exact", mode, "a spike that tests the stored membrane is not mapped to the estimate yet; kept exact")
    if getattr(spec, "charge", "leaky") != "leaky" or getattr(spec, "reset_form", "standard") != "standard":
        return _in_mode("exact", mode, f"charge form {getattr(spec, 'charge', 'leaky')!r} / reset form "
                        f"{getattr(spec, 'reset_form', 'standard')!r} is not mapped to the estimate yet; kept exact")
    name = "probabilistic_reset" if mode == "psu" else "stochastic_reset"
    what = "sigmoid(a u + b) of the reset-free potential u" if mode == "psu" else "Bernoulli samples of sigmoid(a u + b) (hash RNG)"
    guard = "the reset_delay=False double-reset guard is not modelled" if spec.reset_timing == "same_step_guarded" else ""
    return _in_mode(name, mode, f"the spikes in the subtract-reset term replaced by {what}; no sequential dependency; approximate", guard)


def reset_kernel(spec: NeuronSpec, algorithm: str, seed: int, layer: str):
    """The :class:`~psu_export.ops.reset.ResetOptions` and parameters of an approximate-mode layer.

    ``u`` integrates with the spec's own decay(s) and initial state; the reset term is
    ``threshold * sum_j decay^(t-1-j) Z_j`` for snnTorch's previous-step reset (its
    pre-reset membrane is reported) and ``threshold * sum_j decay^(t-j) Z_j`` for same-step
    resets (post-reset membrane).  ``prob_scale`` / ``prob_offset`` (a, b) start at the
    paper's 1, 0; ``psu-export calibrate`` fits them.
    """
    import torch

    from .ops.reset import ResetOptions, derive_keys

    stochastic = algorithm == "stochastic_reset"
    key_mul, key_add = derive_keys(seed, layer) if stochastic else (1, 0)
    previous = spec.reset_timing == "previous_step"
    options = ResetOptions(
        kind="StochasticReset" if stochastic else "ProbabilisticReset",
        integration="lif",
        estimate="membrane",
        reset_timing="previous_step" if previous else "same_step",
        compare=spec.compare,
        membrane="pre" if previous else "post",
        two_state=spec.two_state,
        key_mul=key_mul,
        key_add=key_add,
    )
    params = {
        "decay": spec.decay, "threshold": spec.threshold, "reset_scale": spec.threshold, "spike_scale": spec.spike_scale,
        "input_scale": torch.tensor(1.0), "v_init": spec.v_init, "prob_scale": torch.tensor(1.0), "prob_offset": torch.tensor(0.0),
    }
    if spec.two_state:
        params.update(syn_decay=spec.syn_decay, i_init=spec.i_init)
    return options, {name: params[name].detach().clone().float() for name in options.param_names}
