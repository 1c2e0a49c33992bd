"""BrainCog (0.2.7, ``braincog.base.node.node``): ``IFNode``, ``LIFNode``, ``PLIFNode``.

Semantics (braincog 0.2.7.19, ``base/node/node.py`` and ``base/strategy/surrogate.py``;
``tests/test_braincog.py`` checks them against the installed module):

* one step (``BaseNode.forward``): ``integral(x)``, then ``calc_spike()``; the membrane
  ``mem`` is kept in the module between calls and ``n_reset()`` sets it to ``v_reset``
  (default 0), which is the initial membrane;
* charge: IF ``m = m + x * dt``; LIF ``m = m + (x - m) / tau``; PLIF
  ``m = m + ((x - m) * sigmoid(w)) * dt``; with ``dt`` = 1 these are the spec's charges
  ``"if"``, ``"sj_decay_input"`` and ``"sj_decay_input_mul"`` with ``v_rest`` = 0;
* spike ``s = act_fun(m - θ)``: the forward of every BrainCog surrogate is ``x.gt(0)``,
  strict ``>``; θ is ``threshold`` (LIF) or ``get_thres()`` (IF, PLIF: its sigmoid when
  ``sigmoid_thres``);
* reset in the same step, hard: ``m = m * (1 - s)`` (to 0, whatever ``v_reset`` is).

``NEURON_SEMANTICS.md`` section 1.4 describes the BrainCog fork published with the PSU
paper, whose ``LIFNode`` resets softly (``m = m - s * θ``).  :meth:`BrainCogConverter.to_spec`
therefore reads the reset from the module itself: it runs a copy for a few steps and keeps
the reset (hard or soft) whose spec reproduces it bit for bit; a node whose steps match
neither (a subclass with its own ``integral`` / ``calc_spike``) is refused.

Call styles: one step per call (the time loop in the model's ``forward``, BrainCog's
default), or ``layer_by_layer=True``, where a node takes all ``step`` time steps folded
into the batch, ``[(T B), ...]`` (the capture op then takes the whole sequence).

BrainCog's package ``__init__`` imports its model zoo, which needs torchvision; this
converter never imports BrainCog: a model built from BrainCog nodes has imported
``braincog.base.node.node`` already, and the classes are taken from there.
"""

from __future__ import annotations

import copy
import sys

import torch

from psu_export.ops.neuron import StepOptions, exact_neuron
from psu_export.spec import NeuronSpec

from . import (CallConvention, FrameworkConverter, Unsupported, classes_by_name, exact, is_step_function, register, scalar_param, spec_options,
               step_with_held_state, unsupported)

NODE_MODULE = "braincog.base.node.node"
# reasons given by to_spec (and listed by coverage())
OTHER_NODE = "is not one of the supported BrainCog neurons (IFNode, LIFNode, PLIFNode); its update may differ"
NOT_HEAVISIDE = "its act_fun's forward is not the step H(mem - threshold > 0)"
GROUPS = "n_groups != 1 (the time steps folded into the channels, 'b (c t)') is not supported"
DT = "dt != 1 is not supported (the charge multiplies by dt; use dt = 1)"
NO_MATCH = ("its steps match neither the hard reset mem * (1 - spike) nor the soft reset mem - spike * threshold of "
            "this class (a subclass with its own integral / calc_spike?)")
_NOISE = "adds random noise to the membrane (outputs change from run to run)"
_COMPARTMENTS = "carries several compartments or a recovery variable coupled to the membrane"
#: BrainCog node classes recognised and refused, by name
UNSUPPORTED_CLASSES = (
    ("ReLUNode", "is the ReLU of an ANN (for ANN-SNN comparisons), not a spiking neuron: use torch.nn.ReLU"),
    ("BiasReLUNode", "is the ReLU of an ANN (for ANN-SNN comparisons), not a spiking neuron"),
    ("BurstLIFNode", "burst spikes (1.5 x the spike above 1) are not supported"),
    ("BackEINode", "self-feedback of the spikes into the membrane cannot be parallelised over time"),
    ("NoiseLIFNode", _NOISE),
    ("NoisePLIFNode", _NOISE),
    ("BiasLIFNode", "the constant bias current (+ 0.1 a step) is not supported"),
    ("BiasPLIFNode", "the constant bias current (+ 0.1 a step) is not supported"),
    ("LIFSTDPNode", "the charge mem * tau + x (an STDP node) is not supported"),
    ("DoubleSidePLIFNode", "two-sided spikes (-1, 0, 1) are not supported"),
    ("IzhNode", _COMPARTMENTS),
    ("IzhNodeMU", _COMPARTMENTS),
    ("CTIzhNode", _COMPARTMENTS),
    ("SimHHNode", _COMPARTMENTS),
    ("HHNode", _COMPARTMENTS),
    ("aEIF", "the adaptive exponential charge is not supported"),
    ("adth", "adaptive thresholds are not supported"),
    ("DGLIFNode", "graded spikes (the membrane above threshold) are not supported"),
    ("HTDGLIFNode", "graded spikes (the membrane above threshold) are not supported"),
    ("LIAFNode", "LIAF outputs an analogue activation, not spikes"),
    ("OnlineLIFNode", "the online-training node appends a firing-rate trace to its output"),
    ("ThreeCompNode", _COMPARTMENTS),
)
#: the neurons and steps of the copy that to_spec runs, and the input scales it tries
_PROBE_SHAPE, _PROBE_STEPS, _PROBE_GAINS = (64,), 8, (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)


def _node_module():
    """``braincog.base.node.node`` if the process has imported it (never imported here)."""
    return sys.modules.get(NODE_MODULE)


class BrainCogConverter(FrameworkConverter):
    name = "braincog"
    import_name = "braincog"
    version_range = ">=0.2.7,<0.3"

    def available(self) -> bool:  # installed, without importing it
        return self.installed_version() is not None

    def _supported(self) -> tuple[type, ...]:
        node = _node_module()
        return () if node is None else (node.IFNode, node.LIFNode, node.PLIFNode)

    def neuron_classes(self):
        node = _node_module()
        if node is None:
            return ()
        # every BrainCog node is recognised; the ones we cannot reproduce are refused with a reason
        return self._supported() + (node.BaseNode, node.BaseMCNode)

    def unsupported_classes(self):
        return classes_by_name(_node_module(), UNSUPPORTED_CLASSES)

    def coverage(self):
        rows = []
        for cls, charge, params in (("IFNode", "if", "threshold (get_thres(), sigmoid_thres too), v_reset (the initial membrane)"),
                                    ("LIFNode", "sj_decay_input", "tau, threshold, v_reset (the initial membrane)"),
                                    ("PLIFNode", "sj_decay_input_mul", "w (scalar), threshold (get_thres()), v_reset (the initial membrane)")):
            rows += [
                exact(cls, "this release's hard reset mem * (1 - spike)", spec_options("zero", "same_step", "gt", charge, reset_form="product")),
                exact(cls, "a soft reset mem - spike * threshold (the PSU paper's BrainCog fork)", spec_options("subtract", "same_step", "gt", charge)),
                exact(cls, f"one step per call (time loop in forward) or layer_by_layer=True ([(T B), ...]); scalar {params}"),
                unsupported(cls, "act_fun whose forward is not the step", NOT_HEAVISIDE),
                unsupported(cls, "n_groups != 1", GROUPS),
                unsupported(cls, "integral / calc_spike overridden so the steps match neither reset", NO_MATCH),
            ]
            if cls != "LIFNode":
                rows.append(unsupported(cls, "dt != 1", DT))
        rows += [unsupported(base, "any other subclass (not listed here)", OTHER_NODE) for base in ("BaseNode", "BaseMCNode")]
        rows += [unsupported(cls, "any", why) for cls, why in UNSUPPORTED_CLASSES]
        return rows

    # ---------------------------------------------------------------- spec
    def to_spec(self, module) -> NeuronSpec:
        node = _node_module()
        cls = type(module)
        if cls not in self._supported():
            raise Unsupported(f"{cls.__module__}.{cls.__name__} {OTHER_NODE}")
        problems = []
        if module.groups != 1:
            problems.append(GROUPS)
        if not is_step_function(module.act_fun, "gt"):
            problems.append(NOT_HEAVISIDE)
        if cls is not node.LIFNode and float(module.dt) != 1.0:
            problems.append(DT)
        threshold = module.threshold if cls is node.LIFNode else module.get_thres()
        threshold = scalar_param(threshold, "threshold", problems)
        v_init = scalar_param(module.v_reset, "v_reset", problems)
        if problems:
            raise Unsupported("; ".join(problems))
        common = dict(threshold=threshold, reset_timing="same_step", compare="gt", reset_value=0.0, v_init=v_init)
        if cls is node.IFNode:
            charge = dict(decay=1.0, charge="if")
        elif cls is node.LIFNode:
            tau = float(module.tau)
            charge = dict(decay=1.0 - 1.0 / tau, charge="sj_decay_input", tau=tau, v_rest=0.0)
        else:
            if module.w.numel() != 1:
                raise Unsupported("PLIFNode with a non-scalar w is not supported")
            inv_tau = module.w.detach().float().sigmoid().reshape(())  # as BrainCog computes it
            charge = dict(decay=1.0 - inv_tau, charge="sj_decay_input_mul", inv_tau=inv_tau, v_rest=0.0)
        observed = _run_copy(module, threshold)
        for reset, form in (("zero", "product"), ("subtract", "standard")):  # mem * (1 - spike): nothing added
            spec = NeuronSpec(reset=reset, reset_form=form, **common, **charge)
            if _reproduces(spec, *observed):
                return spec
        raise Unsupported(NO_MATCH)

    # ---------------------------------------------------------------- calls
    def consumes_sequence(self, module) -> bool:
        return bool(module.layer_by_layer)

    def as_sequence(self, module, value):
        return module.rearrange2node(value) if module.layer_by_layer else value

    def call_convention(self, module) -> CallConvention:
        if self.consumes_sequence(module):
            def make_forward(call):
                def forward(inputs):  # [(T B), ...] -> [T, B, ...] -> the op -> [(T B), ...]
                    return module.rearrange2op(call(module.rearrange2node(inputs), [])[0])
                return forward

            return CallConvention(state_roles=("membrane",), forward=make_forward, sequence=True)

        def make_forward(call):
            def forward(inputs):
                return step_with_held_state(module, call, inputs)[0]
            return forward

        return CallConvention(state_roles=("membrane",), forward=make_forward)

    def reset_state(self, module) -> None:
        module._psu_state = []
        module.n_reset()


def _run_copy(module, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A copy of ``module`` run one step per call from ``n_reset()``: ``(inputs, spikes,
    membranes)``, each ``[steps, 64]``, on inputs scaled up until it fires on some of them
    and not on others (a slow decay needs larger inputs), so the two resets differ."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((_PROBE_STEPS, *_PROBE_SHAPE), generator=generator) * 2.0 * max(abs(threshold), 1.0)
    for gain in _PROBE_GAINS:
        probe = copy.deepcopy(module)
        probe.layer_by_layer, probe.requires_fp, probe.requires_mem = False, False, False
        probe.n_reset()
        x, spikes, membranes = noise * gain, [], []
        with torch.no_grad():
            for step in x:
                spikes.append(type(probe).forward(probe, step).float())
                membranes.append(torch.as_tensor(probe.mem).expand(_PROBE_SHAPE))
        spikes = torch.stack(spikes)
        if 0.0 < float(spikes.mean()) < 1.0:
            break
    return x, spikes, torch.stack(membranes)


def _reproduces(spec: NeuronSpec, x: torch.Tensor, spikes: torch.Tensor, membranes: torch.Tensor) -> bool:
    """Whether ``spec``'s exact kernel gives the copy's spikes and membranes (:func:`_run_copy`) bit for bit."""
    options = StepOptions.of(spec)
    expected = exact_neuron(x, [getattr(spec, n) for n in options.param_names], options.key(), "probe")
    return torch.equal(spikes, expected[0]) and torch.equal(membranes, expected[1])

register(BrainCogConverter())
