"""Property tests of the exact mode: random neuron options against snnTorch's own run.

For random snnTorch ``Leaky`` / ``Synaptic`` configurations (decays including 0 and 1
and outside [0, 1], per-channel parameters, thresholds, every reset and timing, graded
spikes, integer-valued inputs that produce exact ties at the threshold) and random T and
shapes, the torch kernel and the ONNX function (under onnxruntime) must reproduce
snnTorch's spikes and membranes.  The kernels do the same float operations in the same
order as snnTorch, so the comparison is bitwise; an exact tie at the threshold is decided
identically on both sides and needs no tolerance.

Profiles: ``HYPOTHESIS_PROFILE=ci`` (default, 150 examples per test) or ``nightly`` (3000).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

snn = pytest.importorskip("snntorch")

from psu_export.converters.snntorch import SnnTorchConverter  # noqa: E402
from psu_export.ops import attach_functions  # noqa: E402
from psu_export.ops.neuron import StepOptions, exact_neuron  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CONVERTER = SnnTorchConverter()


@st.composite
def neuron_cases(draw):
    features = draw(st.integers(1, 12))
    batch = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 300))

    def param(low, high, specials):
        if draw(st.booleans()):
            values = draw(st.lists(st.sampled_from(specials) | st.floats(low, high).map(lambda v: float(np.float32(v))), min_size=features, max_size=features))
            return torch.tensor(values, dtype=torch.float32)
        return draw(st.sampled_from(specials) | st.floats(low, high).map(lambda v: float(np.float32(v))))

    options = {
        "beta": param(-0.2, 1.2, [0.0, 1.0, 0.5, 0.9]),
        "threshold": param(0.05, 2.0, [1.0, 0.5]),
        "reset_mechanism": draw(st.sampled_from(["subtract", "zero", "none"])),
        "reset_delay": draw(st.booleans()),
    }
    synaptic = draw(st.booleans())
    if synaptic:
        options["alpha"] = param(-0.1, 1.1, [0.0, 1.0, 0.6])
    else:
        options["graded_spikes_factor"] = draw(st.sampled_from([1.0, 2.5, 0.5]))
    integer_inputs = draw(st.booleans())  # exact ties at the threshold
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if integer_inputs:
        x = torch.randint(-1, 3, (steps, batch, features), generator=gen).float()
    else:
        x = torch.randn((steps, batch, features), generator=gen) * draw(st.sampled_from([0.3, 1.0, 3.0]))
    return synaptic, options, x


def snntorch_run(synaptic: bool, options: dict, x: torch.Tensor):
    neuron = snn.Synaptic(**options) if synaptic else snn.Leaky(**options)
    states = list(neuron.init_synaptic()) if synaptic else [neuron.init_leaky()]
    spikes, mems = [], []
    with torch.no_grad():
        for t in range(x.shape[0]):
            out = neuron(x[t], *states)
            spikes.append(out[0])
            states = list(out[1:])
            mems.append(out[-1])
    return neuron, torch.stack(spikes), torch.stack(mems)


def one_node_model(options_key: str, param_ranks: tuple[int, ...], spikes_only: bool = False):
    """A one-node model: the psu op of this variant with its parameters as graph inputs.

    ``spikes_only``: the model returns the spikes alone (as a hidden layer, whose membrane
    nothing reads), so the node is specialised to its spikes-only function.
    """
    import onnx
    from onnx import TensorProto, helper

    o = StepOptions.parse(options_key)
    names = ["x", *o.param_names]
    node = helper.make_node(f"LIF_{o.variant}", names, ["spikes", "membrane"] + (["current"] if o.two_state else []), domain="psu", layer="l", **o.attributes())
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", "N"])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"] * r) for n, r in zip(o.param_names, param_ranks)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["T", "B", "N"]) for n in node.output[: 1 if spikes_only else None]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    attach_functions(model)
    onnx.checker.check_model(model)
    return model


@functools.lru_cache(maxsize=None)
def onnx_session(options_key: str, param_ranks: tuple[int, ...], spikes_only: bool = False):
    import onnxruntime as ort

    model = one_node_model(options_key, param_ranks, spikes_only)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@given(neuron_cases())
def test_exact_kernel_and_onnx_match_snntorch(case):
    synaptic, options, x = case
    neuron, ref_spikes, ref_mems = snntorch_run(synaptic, options, x)
    spec = CONVERTER.to_spec(neuron)
    o = StepOptions.of(spec)
    params = [getattr(spec, n) for n in o.param_names]
    outputs = exact_neuron(x, params, o.key(), "l")
    assert torch.equal(outputs[0], ref_spikes)
    assert torch.equal(outputs[1], ref_mems)

    session = onnx_session(o.key(), tuple(p.dim() for p in params))
    feeds = {"x": x.numpy(), **{n: p.numpy() for n, p in zip(o.param_names, params)}}
    got = session.run(None, feeds)
    np.testing.assert_array_equal(got[0], ref_spikes.numpy())
    np.testing.assert_array_equal(got[1], ref_mems.numpy())
    spikes_only = onnx_session(o.key(), tuple(p.dim() for p in params), spikes_only=True)
    np.testing.assert_array_equal(spikes_only.run(None, feeds)[0], ref_spikes.numpy())


def _scan_body(function):
    scan = next(n for n in function.node if n.op_type == "Scan")
    return next(a.g for a in scan.attribute if a.name == "body")


@pytest.mark.parametrize("threshold", [1.0, 0.5])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_snntorch_reset_test_is_carried_not_recomputed(reset, threshold):
    """snnTorch's reset test of step t is its spike test of step t-1: evaluated once per step.

    The hidden-layer (spikes-only) body returns per step only the spike decisions (bool),
    not the membrane's operands; a threshold of exactly 1 saves the reset's multiply.  The
    zero reset with its one threshold does not read the test at all (``v - ThresholdedRelu(v)``):
    the spike test then runs after the scan on the returned membrane, or in the spikes-only
    body for its bool.
    """
    import onnx

    spec = CONVERTER.to_spec(snn.Leaky(beta=0.5, reset_mechanism=reset, threshold=threshold))
    o = StepOptions.of(spec)
    ranks = tuple(getattr(spec, n).dim() for n in o.param_names)
    full_function = one_node_model(o.key(), ranks).functions[0]
    full = _scan_body(full_function)
    assert [n.op_type for n in full.node].count("Greater") == (1 if reset == "subtract" else 0)
    # every per-step output the scan writes is read (the membrane's recomputation once
    # stacked an operand for a candidate it then gave up, and wrote it every step for nothing)
    scan = next(n for n in full_function.node if n.op_type == "Scan")
    read = {i for n in full_function.node for i in n.input} | set(full_function.output)
    assert [o for o in scan.output[len(full.input) - 1:] if o not in read] == []
    hidden = one_node_model(o.key(), ranks, spikes_only=True)
    assert hidden.graph.node[0].op_type == f"LIF_{o.variant}_spikes"
    body = _scan_body(hidden.functions[0])
    n_states = len(body.input) - 1
    per_step = body.output[n_states:]
    assert [v.type.tensor_type.elem_type for v in per_step] == [onnx.TensorProto.BOOL]
    if reset == "subtract":  # charge (Mul, Add), reset (Mul unless threshold 1, Sub), spike test (Greater, Cast)
        assert len(body.node) == (5 if threshold == 1.0 else 6)
    else:  # reset (ThresholdedRelu, Sub), charge (Mul, Add), spike test (Greater)
        assert [n.op_type for n in body.node] == ["ThresholdedRelu", "Sub", "Mul", "Add", "Greater"]


def _bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("reset_value", [0.0, -0.0, 0.5])
def test_zero_reset_to_plus_zero_keeps_every_bit(reset_value):
    """A ``v_reset`` of +0 drops ``spike * v_reset`` but still adds +0: ``-0 + (+0)`` is +0.

    Integrate-and-fire from ``v_init`` = -0 with inputs of -0 charges to -0 (no spike); the
    framework's ``spike * v_reset + (1 - spike) * h`` then gives +0, which the shortcut
    must reproduce (an inputs-only check would miss it: spikes agree either way).
    """
    from psu_export.spec import NeuronSpec

    spec = NeuronSpec(decay=1.0, threshold=1.0, reset="zero", reset_value=reset_value, v_init=-0.0)
    o = StepOptions.of(spec)
    assert ("reset_value" in o.identities) == (str(reset_value) == "0.0")
    plain = dataclasses.replace(o, identity_params="")
    x = torch.tensor([[-0.0, 0.3, -0.0, 0.9, -0.0]]).T.reshape(5, 1, 1).repeat(1, 2, 3)
    x[:, 1] = torch.tensor([-0.0, -0.0, 1.5, -0.0, -0.0]).reshape(5, 1)
    params = [getattr(spec, n) for n in o.param_names]
    expected = exact_neuron(x, params, plain.key(), "l")
    got = exact_neuron(x, params, o.key(), "l")
    # step 0 charges -0 + (-0) = -0 without a spike; the reset sum gives 0 * v_reset + (-0)
    assert bool(torch.signbit(expected[1][0, 0, 0])) == (math.copysign(1.0, reset_value) < 0 and reset_value == 0)
    np.testing.assert_array_equal(_bits(got[1]), _bits(expected[1]))
    np.testing.assert_array_equal(_bits(got[0]), _bits(expected[0]))
    # parameters as initializers, as in a converted model: onnxruntime then rewrites an
    # Add of a zero initializer to the other operand (NoopElimination)
    import onnxruntime as ort

    model = one_node_model(o.key(), tuple(p.dim() for p in params))
    model.graph.initializer.extend(onnx.numpy_helper.from_array(p.numpy(), n) for n, p in zip(o.param_names, params))
    kept = [i for i in model.graph.input if i.name == "x"]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"x": x.numpy()})
    np.testing.assert_array_equal(_bits(onnx_out[1]), _bits(expected[1]))
    np.testing.assert_array_equal(_bits(onnx_out[0]), _bits(expected[0]))


def test_product_zero_reset_keeps_every_bit():
    """``reset_form="product"`` is ``mem * (1 - spike)`` (BrainCog, hand-written loops): nothing
    is added, so a -0 membrane stays -0 (the ``standard`` form's ``+0`` would turn it into +0),
    in the torch kernel and in onnxruntime, bit for bit."""
    from psu_export.spec import NeuronSpec

    spec = NeuronSpec(decay=1.0, charge="if", threshold=1.0, reset="zero", reset_form="product", v_init=-0.0)
    o = StepOptions.of(spec)
    x = torch.tensor([-0.0, 0.3, -0.0, 0.9, -0.0, -2.0]).reshape(6, 1, 1).repeat(1, 2, 3)
    x[:, 1] = torch.tensor([-0.0, -0.0, 1.5, -0.0, -1.0, -0.0]).reshape(6, 1)
    mem, spikes, membranes = torch.full((2, 3), -0.0), [], []
    for step in x:  # BrainCog's IFNode: mem = mem + x * dt (dt 1); spike; mem = mem * (1 - spike)
        mem = mem + step
        spike = (mem - 1.0).gt(0.0).float()
        mem = mem * (1 - spike)
        spikes.append(spike)
        membranes.append(mem)
    expected = [torch.stack(spikes), torch.stack(membranes)]
    assert bool(torch.signbit(expected[1][0, 0, 0]))  # -0 charged, no spike: -0 * (1 - 0) stays -0
    params = [getattr(spec, n) for n in o.param_names]
    got = exact_neuron(x, params, o.key(), "l")
    import onnxruntime as ort

    model = one_node_model(o.key(), tuple(p.dim() for p in params))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"x": x.numpy(), **{n: p.numpy() for n, p in zip(o.param_names, params)}})
    for out in (got, onnx_out):
        np.testing.assert_array_equal(_bits(out[0]), _bits(expected[0]))
        np.testing.assert_array_equal(_bits(out[1]), _bits(expected[1]))


def _sj_hard_reset(x: torch.Tensor, v: torch.Tensor, charge) -> list[torch.Tensor]:
    """SpikingJelly's fire and hard reset to ``v_reset`` 0.0 written out step by step, with
    the charge ``charge(v, x_t)``: ``[spikes, membranes]`` stacked over time."""
    spikes, membranes = [], []
    for step in x:
        h = charge(v, step)
        spike = (h >= 1.0).float()
        v = spike * 0.0 + (1.0 - spike) * h
        spikes.append(spike)
        membranes.append(v)
    return [torch.stack(spikes), torch.stack(membranes)]


def _kernel_and_onnx(o: StepOptions, params: list[torch.Tensor], x: torch.Tensor) -> list:
    """The exact kernel's ``[spikes, membrane]`` in torch and in onnxruntime (a one-node model)."""
    import onnxruntime as ort

    model = one_node_model(o.key(), tuple(p.dim() for p in params))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"x": x.numpy(), **{n: p.numpy() for n, p in zip(o.param_names, params)}})
    return [exact_neuron(x, params, o.key(), "l"), onnx_out]


@pytest.mark.parametrize("charge", ["if", "sj_decay_input"])
def test_a_membrane_that_is_never_minus_zero_skips_the_plus_zero(charge):
    """A standard zero reset to +0 with a threshold > 0, a start without -0 and a charge ``v + y``
    (SpikingJelly's, Norse's) runs as the ``product`` form: ``(1 - spike) * h`` is never -0
    there, so adding the framework's ``spike * v_reset`` = +0 changes no bit.  Checked against
    SpikingJelly's step written out, on inputs of -0 and of negative denormals (whose
    charge underflows), in torch and onnxruntime; a runtime initial membrane of -0 is made
    +0 first (``plus_zero``) and then gives the framework's bits too."""
    from psu_export.ops.neuron import plus_zero
    from psu_export.spec import NeuronSpec

    extra = {"tau": 2.0, "v_rest": 0.0} if charge == "sj_decay_input" else {}
    spec = NeuronSpec(decay=1.0, charge=charge, threshold=1.0, reset="zero", reset_value=0.0, v_init=0.0, compare="ge", **extra)
    o = StepOptions.of(spec)
    assert o.reset_form == "product" and "Sum" not in str(one_node_model(o.key(), (0,) * len(o.param_names)))
    assert StepOptions.of(dataclasses.replace(spec, threshold=torch.tensor(-0.5))).reset_form == "standard"
    assert StepOptions.of(dataclasses.replace(spec, v_init=torch.tensor(-0.0))).reset_form == "standard"
    assert StepOptions.of(dataclasses.replace(spec, v_init=torch.tensor([0.2, 0.0]))).reset_form == "product"  # Norse's v_leak start
    tiny = -1.4e-45  # the smallest negative denormal: halved, it rounds to -0
    x = torch.tensor([-0.0, tiny, -0.0, 2.5, -0.0, tiny, -3.0, 0.7, -0.0]).reshape(9, 1, 1).repeat(1, 2, 3)
    x[:, 1] = torch.tensor([tiny, -0.0, -0.0, -0.0, 1.5, -0.0, -0.0, tiny, -0.0]).reshape(9, 1)

    def framework(v):  # SpikingJelly's charge, fire and hard reset (v_reset 0.0), step by step
        return _sj_hard_reset(x, v, (lambda v, step: v + (step - v) / 2.0) if charge == "sj_decay_input" else (lambda v, step: v + step))

    expected = framework(torch.zeros(2, 3))
    params = [getattr(spec, n) for n in o.param_names]
    for out in _kernel_and_onnx(o, params, x):
        np.testing.assert_array_equal(_bits(out[0]), _bits(expected[0]))
        np.testing.assert_array_equal(_bits(out[1]), _bits(expected[1]))
    # a runtime initial membrane of -0 (a state passed in): made +0, the framework's bits again
    start = torch.full((2, 3), -0.0)
    runtime = [plus_zero(start) if n == "v_init" else p for n, p in zip(o.param_names, params)]
    got = exact_neuron(x, runtime, o.key(), "l")
    for a, b in zip(got, framework(start)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    # a start other than 0 (Norse's v_leak) keeps the shortcut, bit for bit
    warm = [torch.full((2, 3), 0.2) if n == "v_init" else p for n, p in zip(o.param_names, params)]
    for a, b in zip(exact_neuron(x, warm, o.key(), "l"), framework(torch.full((2, 3), 0.2))):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("tau", [2.0, 4.0, 0.5, 2.0 ** 127])  # 2^-127: a subnormal reciprocal, still exact
def test_a_power_of_two_tau_multiplies_with_the_same_bits(tau, decay_input):
    """SpikingJelly's ``/ tau`` runs as ``* (1 / tau)`` when ``tau`` is a power of two
    (``step_spec``): bit for bit SpikingJelly's step written out, on normal, subnormal,
    -0, infinite and NaN inputs, in torch and onnxruntime (the ONNX step has a ``Mul`` and
    no ``Div``).  Any other ``tau`` keeps the division."""
    from psu_export.ops.neuron import step_spec
    from psu_export.spec import NeuronSpec

    charge = "sj_decay_input" if decay_input else "sj_no_decay_input"
    spec = NeuronSpec(decay=1.0 - 1.0 / tau, charge=charge, tau=tau, v_rest=0.0, threshold=1.0, reset="zero",
                      reset_value=0.0, v_init=0.0, compare="ge")
    fast = step_spec(spec)
    assert fast.charge == charge + "_mul" and float(fast.inv_tau) == 1.0 / tau
    # not a power of two, a reciprocal that overflows (2^128), not finite, not all elements
    for other in (3.0, 1.5, 2.0 ** -128, -0.0, float("inf"), float("nan"), [2.0, 3.0]):
        assert step_spec(dataclasses.replace(spec, tau=torch.tensor(other))).charge == charge
    o = StepOptions.of(fast)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((12, 2, 8)).astype(np.float32)) * 2
    x[:, 0, :6] = torch.tensor([1.4e-45, -1.4e-45, -0.0, 3e-39, float("inf"), float("nan")])
    x[:, 1, :3] = torch.tensor([1e38, -3e38, 1.2e-38])

    # SpikingJelly's LIFNode step (v_reset 0.0) with its division
    charge_step = (lambda v, step: v + (step - v) / tau) if decay_input else (lambda v, step: v - v / tau + step)
    expected = _sj_hard_reset(x, torch.zeros(2, 8), charge_step)
    params = [getattr(fast, n) for n in o.param_names]
    body = str(one_node_model(o.key(), tuple(p.dim() for p in params)))
    assert "Mul" in body and "Div" not in body
    for out in _kernel_and_onnx(o, params, x):
        np.testing.assert_array_equal(_bits(out[0]), _bits(expected[0]))
        np.testing.assert_array_equal(np.isnan(np.asarray(out[1])), np.isnan(expected[1].numpy()))
        finite = ~np.isnan(expected[1].numpy())
        np.testing.assert_array_equal(_bits(out[1])[finite], _bits(expected[1])[finite])


@pytest.mark.parametrize("drive_batch", [3, 1])
def test_a_repeated_drive_is_read_once_with_the_same_bits(drive_batch):
    """``Expand(Unsqueeze(drive, [0]), [T, B, N])`` into a neuron becomes the ``_static``
    function, which reads the drive at every step instead (also a drive that broadcasts
    over the batch): same outputs, bit for bit, as the neuron over the expanded input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = CONVERTER.to_spec(snn.Leaky(beta=0.9, threshold=0.5))
    o = StepOptions.of(spec)
    params = [getattr(spec, n) for n in o.param_names]
    steps, batch, n = 40, 3, 5
    node = helper.make_node(f"LIF_{o.variant}", ["x", *o.param_names], ["spikes", "membrane"], domain="psu", layer="l", **o.attributes())
    expand = [helper.make_node("Unsqueeze", ["drive", "axes"], ["lifted"]), helper.make_node("Expand", ["lifted", "shape"], ["x"])]
    inits = [onnx.numpy_helper.from_array(np.array([0], np.int64), "axes"), onnx.numpy_helper.from_array(np.array([steps, batch, n], np.int64), "shape")]
    inits += [onnx.numpy_helper.from_array(p.numpy(), name) for name, p in zip(o.param_names, params)]
    graph = helper.make_graph(expand + [node], "g", [helper.make_tensor_value_info("drive", TensorProto.FLOAT, [drive_batch, n])],
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, [steps, batch, n]) for v in node.output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    attach_functions(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == [f"LIF_{o.variant}_static"]
    drive = torch.rand(drive_batch, n) * 0.6
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"drive": drive.numpy()})
    expected = exact_neuron(drive.expand(steps, batch, n).contiguous(), params, o.key(), "l")
    assert 0 < float(expected[0].mean()) < 1
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(_bits(g), _bits(e))


def _special_values(threshold: float, shape, seed: int = 0) -> torch.Tensor:
    """Inputs around ``threshold`` and at float32's edges: NaN, infinities, -0, subnormals,
    the threshold and its neighbours, mixed with normal draws."""
    t = np.float32(threshold)
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):  # (a threshold near float32's maximum: inputs of +-inf)
        specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.4e-45, -1.4e-45, t, np.nextafter(t, np.float32(-np.inf)),
                             np.nextafter(t, np.float32(np.inf)), 1.5 * t, -t, 3e38, -3e38], dtype=np.float32)
        x = rng.standard_normal(shape).astype(np.float32) * t
    pick = rng.random(shape) < 0.3
    x[pick] = rng.choice(specials, size=int(pick.sum()))
    return torch.from_numpy(x)


@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.3, 1e-30, 3e38])
@pytest.mark.parametrize("compare", ["ge", "gt"])
@pytest.mark.parametrize("form", ["same_step_product", "same_step_standard", "previous_step"])
def test_a_zero_reset_with_a_constant_threshold_keeps_every_bit(form, compare, threshold):
    """With one threshold > 0 for the whole layer, the zero reset ``(1 - spike) * v`` runs as
    ``v - ThresholdedRelu(v)`` (the threshold, or the float32 below it for ``ge``, as the
    attribute): the reset no longer reads the float spike.  Against the multiplying form, bit
    for bit (NaN where it is NaN) on NaN, infinite, -0, subnormal and tie inputs, in torch
    and onnxruntime (4,099 neurons: the vectorised loops and their tails); thresholds that
    differ between neurons keep the multiply."""
    from psu_export.spec import NeuronSpec

    timing = "previous_step" if form == "previous_step" else "same_step"
    product = form == "same_step_product"
    spec = NeuronSpec(decay=1.0 if product else 0.5, threshold=threshold, reset="zero", reset_value=0.0, v_init=0.0,
                      compare=compare, reset_timing=timing, charge="if" if product else "leaky", reset_form="product" if product else "standard")
    o = StepOptions.of(spec)
    assert o.constant_threshold == float(np.float32(threshold))
    assert o.reset_form == ("product" if product else "standard")
    multiplying = dataclasses.replace(o, identity_params=o.identity_params.replace("threshold", "").strip("+"), uniform_threshold="")
    assert multiplying.constant_threshold is None
    x = _special_values(threshold, (8, 2, 4099))
    params = [getattr(spec, n) for n in o.param_names]
    expected = exact_neuron(x, params, multiplying.key(), "l")
    assert "ThresholdedRelu" in str(one_node_model(o.key(), tuple(p.dim() for p in params)))
    assert "ThresholdedRelu" not in str(one_node_model(multiplying.key(), tuple(p.dim() for p in params)))
    assert 0 < float(expected[0].mean()) < 1 and bool(torch.isnan(expected[1]).any())
    for out in _kernel_and_onnx(o, params, x):
        np.testing.assert_array_equal(_bits(out[0]), _bits(expected[0]))
        nan = np.isnan(expected[1].numpy())
        np.testing.assert_array_equal(np.isnan(np.asarray(out[1])), nan)
        np.testing.assert_array_equal(_bits(out[1])[~nan], _bits(expected[1])[~nan])
    per_neuron = dataclasses.replace(spec, threshold=torch.tensor([threshold, 2 * threshold]).repeat(2050)[:4099])
    assert StepOptions.of(per_neuron).constant_threshold is None
    assert StepOptions.of(dataclasses.replace(spec, threshold=torch.tensor(-threshold))).constant_threshold is None
