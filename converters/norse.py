"""Norse (1.1): ``LIFCell``, ``LIFBoxCell``, ``LICell``, ``LILinearCell`` (per step, state passed explicitly), ``LIF`` and ``LI`` (sequence).

Semantics (NEURON_SEMANTICS.md section 1.3, checked against ``functional/lif.py`` and
``functional/lif_box.py``): strict ``>``; reset in the same step; the parameters live in
``module.p`` (a NamedTuple, not in the state dict) and ``module.dt``.

* ``LIFCell`` / ``LIF`` (``lif_feed_forward_step``)::

      i' = i + x;  v' = v + (dt * tau_mem_inv) * ((v_leak - v) + i')
      i  = i' + (-dt * tau_syn_inv) * i';  z = H(v' - v_th);  v = (1 - z) * v' + z * v_reset

  initial ``v = v_leak``, ``i = 0``; states ``LIFFeedForwardState(v, i)``.
* ``LIFBoxCell`` (``lif_box_feed_forward_step``)::

      v' = v + (dt * tau_mem_inv) * ((x + v_leak) - v);  z = H(v' - v_th)
      reset_value:    v = (1 - z) * v' + z * v_reset
      reset_subtract: v = (1 - z) * v' + z * (v' - v_th)

* ``LICell`` / ``LI`` (``li_feed_forward_step``): the ``LIFCell`` charge with no threshold
  and no reset; it returns the membrane ``v'`` (a readout layer), state ``LIState(v, i)``.
  ``LILinearCell`` (``li_step``) is ``LICell`` with ``x = W u`` (``F.linear(u, input_weights)``):
  the product is written before the neuron call, so it runs over all steps at once.

Call styles: cells called as ``z, s = cell(x, s)`` inside a user loop, cells and ``LIF``
inside ``SequentialState`` driven one step at a time as ``out, state = model(x, state)``
(:meth:`NorseConverter.threads_state`: our step driver threads the returned state), and
the sequence module ``LIF`` over ``[T, B, ...]`` (the capture op takes the whole sequence).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from psu_export.spec import NEVER_FIRES, NeuronSpec

from . import CallConvention, FrameworkConverter, Unsupported, classes_by_name, exact, is_step_function, register, spec_options, unsupported

# reasons given by to_spec (and listed by coverage())
ADJOINT = "method='adjoint' runs a different (adjoint) step function"
RECORD_STATES = "record_states=True (stacked states) is not supported"
_RECURRENT = "recurrent spike feedback (z_{t-1} W_rec enters the current) cannot be parallelised over time"
_REFRACTORY = "the refractory counter holds the membrane and blocks spikes for several steps after each spike (a second, spike-driven state)"
_ADAPTIVE = "adaptive neurons carry a second state that feeds back into the membrane or threshold"
_IZHIKEVICH = "Izhikevich neurons carry a recovery variable coupled to the membrane"
_EXPONENTIAL = "the exponential LIF charge (exp of the membrane) is not supported"
_LIF_ENCODER = ("an encoder that runs its own LIF over seq_length steps from the static input is not converted yet: "
                "run it outside the model and convert the network that takes its spikes [T, B, ...]")
_RANDOM_ENCODER = "draws random spikes (outputs change from run to run): run it outside the model and feed its spikes as the input"
#: Norse neuron classes recognised and refused, by name (known without Norse installed)
UNSUPPORTED_CLASSES = (
    ("ConstantCurrentLIFEncoder", _LIF_ENCODER),
    ("SpikeLatencyLIFEncoder", _LIF_ENCODER),
    ("PoissonEncoder", _RANDOM_ENCODER),
    ("SignedPoissonEncoder", _RANDOM_ENCODER),
    ("LIFRecurrentCell", _RECURRENT),
    ("LIFRecurrent", _RECURRENT),
    ("LIFRefracCell", _REFRACTORY),
    ("LIFRefracRecurrentCell", _REFRACTORY),
    ("LIFRefracRecurrent", _REFRACTORY),
    ("LIFAdExCell", _ADAPTIVE),
    ("LIFAdEx", _ADAPTIVE),
    ("LIFAdExRecurrentCell", _RECURRENT),
    ("LIFAdExRecurrent", _RECURRENT),
    ("LIFAdExRefracCell", _REFRACTORY),
    ("LIFAdExRefracRecurrentCell", _REFRACTORY),
    ("LIFAdExRefracRecurrent", _REFRACTORY),
    ("LIFExCell", _EXPONENTIAL),
    ("LIFEx", _EXPONENTIAL),
    ("LIFExRecurrentCell", _RECURRENT),
    ("LIFExRecurrent", _RECURRENT),
    ("LSNNCell", _ADAPTIVE),
    ("LSNN", _ADAPTIVE),
    ("LSNNRecurrentCell", _RECURRENT),
    ("LSNNRecurrent", _RECURRENT),
    ("LIFMCRecurrentCell", _RECURRENT),
    ("LIFMCRefracRecurrentCell", _RECURRENT),
    ("IzhikevichCell", _IZHIKEVICH),
    ("Izhikevich", _IZHIKEVICH),
    ("IzhikevichRecurrentCell", _RECURRENT),
    ("IzhikevichRecurrent", _RECURRENT),
    ("CobaLIFCell", "conductance-based LIF (input scaled by the membrane) is not supported"),
    ("IAFCell", "IAF neurons are not supported yet"),
    ("IAF", "IAF neurons are not supported yet"),
)


def _norse():
    try:
        import norse.torch as nt
    except Exception:
        return None
    return nt


def _synaptic(p, dt, mem_gain) -> dict:
    """The two-state charge of ``LIFCell`` and ``LICell`` (current jump, then its decay)."""
    syn_gain = (-dt * p.tau_syn_inv).detach()
    return dict(decay=1.0 - mem_gain, syn_decay=1.0 + syn_gain, charge="norse_lif", syn_gain=syn_gain, i_init=0.0)


class NorseConverter(FrameworkConverter):
    name = "norse"
    import_name = "norse"
    version_range = ">=1.0,<1.2"

    def available(self) -> bool:
        return _norse() is not None

    def neuron_classes(self):
        nt = _norse()
        if nt is None:
            return ()
        return (nt.LIFCell, nt.LIFBoxCell, nt.LIF, nt.LICell, nt.LI, nt.LILinearCell)

    def unsupported_classes(self):
        return classes_by_name(_norse(), UNSUPPORTED_CLASSES)

    def coverage(self):
        params = "parameters read from p (LIFParameters: tau_syn_inv, tau_mem_inv, v_leak, v_th, v_reset) and dt"
        lif = spec_options("zero", "same_step", "gt", "norse_lif", two_state=True)
        rows = [
            exact("LIFCell", f"method='super' (default) or another threshold that fires as H(v - v_th > 0); {params}", lif),
            exact("LIFCell", "called as z, s = cell(x, s) in a loop over time, inside SequentialState driven step by step, "
                             "or as the whole model (step by step)"),
            exact("LIF", f"the whole [T, B, ...] sequence in one call (alone or in SequentialState); {params}", lif),
            exact("LIFBoxCell", "reset_method=reset_value (default)", spec_options("zero", "same_step", "gt", "norse_box")),
            exact("LIFBoxCell", "reset_method=reset_subtract", spec_options("subtract", "same_step", "gt", "norse_box", "blend")),
            exact("LIFBoxCell", "parameters read from p (LIFBoxParameters: tau_mem_inv, v_leak, v_th, v_reset) and dt; "
                                "called in a loop, in SequentialState, or as the whole model"),
            unsupported("LIFBoxCell", "another reset_method", "reset_method ... is not reset_value or reset_subtract"),
            unsupported("LIF", "record_states=True", RECORD_STATES),
        ]
        for cls in ("LIFCell", "LIF", "LIFBoxCell"):
            rows += [
                unsupported(cls, "method='adjoint'", ADJOINT),
                unsupported(cls, "a threshold method that does not fire as H(v - v_th > 0)", "threshold method ... does not fire as H(v - v_th > 0)"),
            ]
        li = spec_options("none", "same_step", "gt", "norse_lif", two_state=True)
        rows += [
            exact("LICell", "parameters read from p (LIParameters: tau_syn_inv, tau_mem_inv, v_leak) and dt; returns the "
                            "membrane (no threshold, no reset); called in a loop, in SequentialState, or as the whole model", li),
            exact("LI", "the whole [T, B, ...] sequence in one call (alone or in SequentialState)", li),
            exact("LILinearCell", "LICell with its input weights (i = i + W x): the product runs over all steps before "
                                  "the neuron; called in a loop (the readout of Norse's ConvNet / ConvNet4)", li),
        ]
        rows += [unsupported(cls, "any", why) for cls, why in UNSUPPORTED_CLASSES]
        return rows

    # ---------------------------------------------------------------- spec
    def to_spec(self, module) -> NeuronSpec:
        nt = _norse()
        from norse.torch.functional.reset import reset_subtract, reset_value
        from norse.torch.functional.threshold import threshold

        p, dt = module.p, module.dt
        mem_gain = (dt * p.tau_mem_inv).detach()  # exactly the framework's expression
        v_leak = torch.as_tensor(p.v_leak).detach()
        shared = dict(reset_timing="same_step", compare="gt", mem_gain=mem_gain, v_rest=v_leak, v_init=v_leak)
        if self._integrator(module):
            return NeuronSpec(threshold=torch.tensor(NEVER_FIRES), reset="none", reset_value=torch.tensor(0.0),
                              **_synaptic(p, dt, mem_gain), **shared)
        problems = []
        if p.method == "adjoint":
            problems.append(ADJOINT)
        elif not is_step_function(lambda x: threshold(x, p.method, p.alpha), "gt"):
            problems.append(f"threshold method {p.method!r} does not fire as H(v - v_th > 0)")
        if isinstance(module, nt.LIF) and getattr(module, "record_states", False):
            problems.append(RECORD_STATES)
        if problems:
            raise Unsupported("; ".join(problems))
        fires = dict(threshold=torch.as_tensor(p.v_th).detach(), reset_value=torch.as_tensor(p.v_reset).detach(), **shared)
        if isinstance(module, nt.LIFBoxCell):
            if p.reset_method is reset_value:
                reset, form = "zero", "standard"
            elif p.reset_method is reset_subtract:
                reset, form = "subtract", "blend"
            else:
                raise Unsupported(f"reset_method {getattr(p.reset_method, '__name__', p.reset_method)!r} is not reset_value or reset_subtract")
            return NeuronSpec(decay=1.0 - mem_gain, charge="norse_box", reset=reset, reset_form=form, **fires)
        return NeuronSpec(reset="zero", **_synaptic(p, dt, mem_gain), **fires)

    @staticmethod
    def _integrator(module) -> bool:
        """``LICell`` / ``LI`` / ``LILinearCell``: no threshold, the membrane is the output."""
        nt = _norse()
        return isinstance(module, (nt.LICell, nt.LI, nt.LILinearCell))

    # ---------------------------------------------------------------- calls
    def consumes_sequence(self, module) -> bool:
        nt = _norse()
        return nt is not None and isinstance(module, (nt.LIF, nt.LI))

    @contextlib.contextmanager
    def capture_scope(self, model):
        """``Lift(m)`` of a stateless ``m`` (``Lift(torch.nn.Conv2d(...))`` before a ``LIF``) runs
        ``m`` on each step in a Python loop, which the capture would unroll at its own T.  While
        capturing, ``m`` runs once on all steps with time folded into its batch (``m`` takes
        one step's ``[B, ...]``, so each sample is computed as in the loop)."""
        nt = _norse()
        lifts = [m for m in model.modules() if isinstance(m, nt.Lift) and not m.is_stateful] if nt is not None else []
        for lift in lifts:
            lift.forward = functools.partial(_lifted_on_all_steps, lift)
        try:
            yield
        finally:
            for lift in lifts:
                del lift.forward

    def threads_state(self, model) -> bool:
        nt = _norse()
        return nt is not None and isinstance(model, (nt.SequentialState, nt.LIFCell, nt.LIFBoxCell, nt.LIF, nt.LICell, nt.LI, nt.LILinearCell))

    def call_convention(self, module) -> CallConvention:
        from norse.torch.functional.lif import LIFFeedForwardState
        from norse.torch.functional.lif_box import LIFBoxFeedForwardState

        nt = _norse()
        if isinstance(module, nt.LIFBoxCell):
            def make_forward(call):
                def forward(input_tensor, state=None):
                    outs = call(input_tensor, [] if state is None else [state.v])
                    return outs[0], LIFBoxFeedForwardState(v=outs[1])
                return forward

            return CallConvention(state_roles=("membrane",), forward=make_forward)

        sequence = self.consumes_sequence(module)
        if self._integrator(module):
            from norse.torch.functional.leaky_integrator import LIState

            linear = isinstance(module, nt.LILinearCell)  # i = i + W x: the product outside the neuron

            def make_forward(call):
                def forward(input_tensor, state=None):  # (the weights read at call time: export swaps them)
                    drive = torch.nn.functional.linear(input_tensor, module.input_weights) if linear else input_tensor
                    _, i, v = call(drive, [] if state is None else [state.i, state.v])
                    return v, (LIState(v=v[-1], i=i[-1]) if sequence else LIState(v=v, i=i))
                return forward

            return CallConvention(state_roles=("current", "membrane"), forward=make_forward, sequence=sequence, returns_spikes=False)

        def make_forward(call):
            def forward(input_tensor, state=None):
                outs = call(input_tensor, [] if state is None else [state.i, state.v])
                if sequence:  # the op returns every step; the module returns the last state
                    return outs[0], LIFFeedForwardState(v=outs[2][-1], i=outs[1][-1])
                return outs[0], LIFFeedForwardState(v=outs[2], i=outs[1])
            return forward

        return CallConvention(state_roles=("current", "membrane"), forward=make_forward, sequence=sequence)


def _lifted_on_all_steps(lift, x):
    """``Lift.forward`` of a stateless module, time folded into the batch."""
    if isinstance(x, tuple):  # (input, state): Lift ignores the state
        x = x[0]
    return lift.lifted_module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


register(NorseConverter())
