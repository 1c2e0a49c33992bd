"""SpikingJelly 2.0: every supported neuron and option converts exactly, checked against
SpikingJelly's own sequential run at the conversion T and at other T."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("spikingjelly.activation_based.neuron")

from conftest import reference_outputs, run_onnx  # noqa: E402

from psu_export.errors import NotConvertibleError  # noqa: E402
from psu_export.ops.registry import STATIC_DRIVE  # noqa: E402
from psu_export.models import ref_spikingjelly as R  # noqa: E402
from psu_export.pipeline import prepare  # noqa: E402
from psu_export.verify import run_parallel  # noqa: E402

MODELS = "psu_export.models.ref_spikingjelly"


def _check(factory: str, shape, time_steps, tmp_path, other_steps=(11,), batch=3, scale=1.5):
    conversion = prepare(f"{MODELS}:{factory}", input_shape=shape, time_steps=time_steps)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    model, kind = conversion.loaded.module, conversion.layout.kind
    rates = []
    for steps in (time_steps, *other_steps):
        base = conversion.layout.example(batch, steps, generator=torch.Generator().manual_seed(steps))
        for gain in (scale, 2 * scale, 4 * scale):  # strong enough that the outputs spike
            x = base * gain
            ref = reference_outputs(model, x, kind)
            if any(0.0 < float(r.mean()) < 1.0 for r in ref if torch.isin(r, torch.tensor([0.0, 1.0])).all()):
                break
        got = run_onnx(path, x)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            r = r.numpy()
            assert g.shape == r.shape
            if np.isin(r, [0.0, 1.0]).all():
                np.testing.assert_array_equal(g, r)  # spikes: bit for bit
                rates.append(float(r.mean()))
            else:
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert any(0.0 < f < 1.0 for f in rates), rates  # meaningful only if it spiked, and not always
    return conversion, path


@pytest.mark.parametrize("variant", sorted(R.VARIANTS))
def test_neuron_options(variant, tmp_path):
    conversion, _ = _check(f"make_mlp_{variant}", (R.SAMPLE,), 8, tmp_path)
    mode = R.VARIANTS[variant][1]
    assert conversion.layout.kind == ("sequence" if mode == "m" else "step")
    for site in conversion.sites:
        assert site.spec.compare == "ge" and site.spec.reset_timing == "same_step"


def test_charge_forms_and_params_read_from_attributes():
    from spikingjelly.activation_based import neuron

    from psu_export.converters.spikingjelly import SpikingJellyConverter

    conv = SpikingJellyConverter()
    lif = conv.to_spec(neuron.LIFNode(tau=3.0, decay_input=False, v_reset=None, v_threshold=0.7))
    assert (lif.charge, lif.reset, float(lif.tau), float(lif.threshold)) == ("sj_no_decay_input", "subtract", 3.0, pytest.approx(0.7))
    plif = conv.to_spec(neuron.ParametricLIFNode(init_tau=2.5, v_reset=-0.5))
    assert plif.charge == "sj_decay_input_mul" and plif.reset == "zero" and float(plif.reset_value) == -0.5 and float(plif.v_init) == -0.5
    assert float(plif.inv_tau) == pytest.approx(1 / 2.5, rel=1e-6)
    assert conv.to_spec(neuron.IFNode()).charge == "if"


def test_multi_step_conv_net_layers(tmp_path):
    """layer.Conv2d / BatchNorm2d / MaxPool2d / SeqToANNContainer / AvgPool2d / Flatten / Dropout / Linear, 'm' mode."""
    conversion, path = _check("make_conv", (1, 12, 12), 6, tmp_path, other_steps=(2,))
    assert [s.source_class for s in conversion.sites] == ["spikingjelly.LIFNode", "spikingjelly.ParametricLIFNode", "spikingjelly.IFNode"]
    report = conversion.verify(path, providers=("cpu",))
    assert report.passed, report.to_json()
    assert report.to_json()["spike_agreement"] == 1.0
    assert all(check["passed"] for check in report.to_json().get("extra_checks", report.extra_checks))


def test_layers_run_step_by_step_between_multi_step_neurons(tmp_path):
    """``layer.MultiStepContainer`` / ``functional.multi_step_forward`` loop over T in Python; the
    capture runs their stateless layers on all steps at once, so T stays variable."""
    conversion, _ = _check("make_stepwise_layers", (1, 12, 12), 6, tmp_path, other_steps=(3, 13))
    assert conversion.layout.dynamic_time and len(conversion.sites) == 2


def test_multi_step_model_that_repeats_one_input(tmp_path):
    """SpikingJelly's tutorial CSNN takes ``[B, 1, 28, 28]`` and repeats it over T itself."""
    from psu_export.errors import UsageError

    model = R.make_repeating_csnn(time_steps=5)
    conversion = prepare(model, input_shape=(1, 28, 28))
    assert (conversion.layout.kind, conversion.layout.time_steps) == ("static", 5)
    # the first convolution and batch norm see the same image at every step: they run once
    assert "repeated over time): conv_fc.0, conv_fc.1" in " ".join(conversion.captured.notes)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    graph = onnx.load(path).graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    assert conv.input[0] == graph.input[0].name  # [B, 1, 28, 28]
    neuron = next(n for n in graph.node if n.domain == "psu")
    assert neuron.op_type.endswith(STATIC_DRIVE) and neuron.input[0] == conv.output[0]  # no copy over T either
    x = torch.rand(3, 1, 28, 28) * 2
    last = []
    handle = model.conv_fc[-1].register_forward_hook(lambda module, args, out: last.append(out))
    ref = reference_outputs(model, x, "static")[0]
    handle.remove()
    assert 0.0 < float(last[0].mean()) < 1.0  # the output layer spikes, not always
    np.testing.assert_array_equal(run_onnx(path, x)[0], ref.numpy())  # rates of identical spikes
    report = conversion.verify(path, providers=("cpu",))
    assert report.passed and report.to_json()["spike_agreement"] == 1.0
    with pytest.raises(UsageError, match=r"neither on a sequence \[T, B, \.\.\.\] nor on one input"):
        prepare(model, input_shape=(1, 28, 28), input_kind="sequence")


def test_multi_step_conv_soft_reset(tmp_path):
    _check("make_conv_soft", (1, 12, 12), 5, tmp_path, other_steps=(9,))


def test_single_step_neurons_in_a_forward_loop(tmp_path):
    conversion, _ = _check("make_single_step_loop", (R.SAMPLE,), 7, tmp_path)
    assert conversion.layout.kind == "sequence"


@pytest.mark.parametrize("factory, kind", [("make_lif_fc_mnist", "step"), ("make_lif_fc_mnist_multi_step", "sequence")])
def test_single_layer_tutorial_network(factory, kind, tmp_path):
    """The single-layer tutorial's network (docs/PERFORMANCE.md times it), as published
    (single-step, driven over time) and multi-step."""
    conversion, _ = _check(factory, (1, 28, 28), 16, tmp_path, other_steps=(5,))
    assert conversion.layout.kind == kind
    assert [site.algorithm.name for site in conversion.sites] == ["scan"]


@pytest.mark.parametrize("style", ["if_first", "before_loop"])
def test_running_sum_started_by_assignment_at_step_0(style, tmp_path):
    """lif_fc_mnist's ``out = f_0``, then ``out += f_t``: step 0 has one add fewer than the
    others (and so the neuron calls were unevenly spaced)."""
    conversion = prepare(R.make_firing_rate_net(style), input_shape=(1, 28, 28), time_steps=8)
    assert conversion.layout.kind == "static" and len(conversion.loop.accumulators) == 1
    path = tmp_path / "m.onnx"
    conversion.export(path)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 1.5
    ref = reference_outputs(conversion.loaded.module, x, "static")[0]
    assert 0 < float(ref.mean()) < 1
    np.testing.assert_array_equal(run_onnx(path, x)[0], ref.numpy())


def test_reset_net_state_is_not_baked_in(tmp_path):
    """State left in the neurons by an earlier call must not leak into the export."""
    from spikingjelly.activation_based import functional

    model = R.make_mlp_lif_step()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, R.SAMPLE) * 3)
    conversion = prepare(model, input_shape=(R.SAMPLE,), time_steps=6)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    x = torch.rand(6, 2, R.SAMPLE) * 2
    functional.reset_net(model)
    ref = reference_outputs(model, x, "step")[0]
    np.testing.assert_array_equal(run_onnx(path, x)[0], ref.numpy())


@pytest.mark.parametrize("factory, shape", [
    ("make_sew_resnet18", (3, 32, 32)),
    ("make_spiking_vgg", (3, 32, 32)),
    ("make_spikformer", (3, 32, 32)),
    ("make_spike_driven_transformer", (3, 32, 32)),
    ("make_qkformer", (3, 32, 32)),
    ("make_maxformer", (3, 32, 32)),
    ("make_plif_mnist_net", (1, 28, 28)),
    ("make_plif_mnist_net_step", (1, 28, 28)),  # single-step mode: psu-export drives it over time
])
def test_model_zoo(factory, shape, tmp_path):
    conversion = prepare(f"{MODELS}:{factory}", input_shape=shape, time_steps=3)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    report = conversion.verify(path, batch=2, providers=("cpu",), extra_time_steps=False)
    summary = report.to_json()
    assert report.passed, summary
    assert summary["spike_agreement"] == 1.0
    assert len(conversion.sites) == len(conversion.neurons) >= 4
    _, layers = conversion.inputs(batch=2).reference  # the original on the inputs verify checked: most layers spiked, none always
    rates = [float(s.float().mean()) for s in layers.values()]
    assert sum(0.0 < r < 1.0 for r in rates) >= 0.75 * len(rates), rates
    x = torch.rand(4, 1, *shape) * 2  # another T and batch
    ref = reference_outputs(conversion.loaded.module, x, conversion.layout.kind)[0]
    np.testing.assert_allclose(run_onnx(path, x)[0], ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_spiking_resnet18(tmp_path):
    """The rewrite is bit-exact; onnxruntime's 7x7 stem convolution sums in another order than
    torch, which can flip a spike whose input lies within float rounding of the threshold:
    verify must attribute any such difference to a float tie (and what follows from it)."""
    conversion = prepare(f"{MODELS}:make_spiking_resnet18", input_shape=(3, 32, 32), time_steps=3)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    report = conversion.verify(path, batch=2, providers=("cpu",), extra_time_steps=False)
    assert report.rewrite.passed
    assert report.passed, report.to_json()


def test_unsupported_neurons_are_refused():
    from spikingjelly.activation_based import layer, neuron, surrogate

    for module in (neuron.SimpleLIFNode(tau=2.0, decay_input=True), neuron.IzhikevichNode(), neuron.PSN(T=4)):
        model = torch.nn.Sequential(layer.Linear(4, 4, step_mode="m"), module)
        with pytest.raises(NotConvertibleError) as info:
            prepare(model, input_shape=(4,), time_steps=4)
        assert type(module).__name__ in str(info.value.reasons)
    not_spiking = neuron.LIFNode(surrogate_function=surrogate.ATan(spiking=False), step_mode="m")
    with pytest.raises(NotConvertibleError, match="surrogate"):
        prepare(torch.nn.Sequential(layer.Linear(4, 4, step_mode="m"), not_spiking), input_shape=(4,), time_steps=4)


def test_cli_convert(tmp_path):
    out, report = tmp_path / "sj.onnx", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "psu_export.cli", "convert", f"{MODELS}:make_mlp_lif_soft", str(out), "--input-shape", str(R.SAMPLE),
         "--time-steps", "8", "--input-kind", "sequence", "--report", str(report)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["passed"] and data["spike_agreement"] == 1.0
    assert {s["source_class"] for s in data["neuron_sites"]} == {"spikingjelly.LIFNode"}


@pytest.mark.parametrize("v_reset, skipped", [(0.0, True), (-0.0, False), (0.5, False)])
def test_a_v_rest_and_v_reset_of_plus_zero_simplify_the_step(v_reset, skipped):
    """``v - v_rest`` is ``v`` and ``spike * v_reset`` is +0 bit for bit only for +0.0
    (``-0 - (-0)`` is +0; ``1 * (-0)`` is -0); with +0 (the default) the membrane is never
    -0, so the step adds nothing after the reset product (``ops.neuron.never_minus_zero``)."""
    from spikingjelly.activation_based import neuron

    from psu_export.converters.spikingjelly import SpikingJellyConverter
    from psu_export.ops.neuron import StepOptions

    spec = SpikingJellyConverter().to_spec(neuron.LIFNode(tau=2.0, v_reset=v_reset, step_mode="m"))
    options = StepOptions.of(spec)
    assert options.identities >= {"v_rest"} if skipped else not options.identities & {"v_rest", "reset_value"}
    assert (options.reset_form == "product") == skipped
    assert options.variant.endswith("_product_th1_g1_vr0") == skipped


def test_the_tie_analysis_recomputes_the_charge_the_kernel_ran():
    """verify tells float ties from real mismatches by recomputing the membrane each spike was
    decided on (``Conversion._decided_on``).  It must use the options and parameters the
    kernel ran with: a LIF whose ``/ tau`` runs as ``* inv_tau`` (``step_spec``), recomputed
    with the spec's division options, divided by ``inv_tau`` and so found no real ties (the
    zoo's Spikformer then failed verify at T = 128).  Where a neuron did not spike, the
    membrane it was decided on is the stored one."""
    conversion = prepare(f"{MODELS}:make_mlp_lif_tau2_hard", input_shape=(R.SAMPLE,), time_steps=8)
    assert {o.charge for o in conversion.parallel.site_options} == {"sj_decay_input_mul"}
    seen = {}

    def observe(index, cur, params, outputs):
        seen[conversion.parallel.sites[index].name] = (conversion._decided_on(index, cur, params, outputs), outputs[0], outputs[1])

    run_parallel(conversion.parallel, conversion.layout.example(3, 8, generator=torch.Generator().manual_seed(0)) * 3, observe)
    for site in conversion.parallel.sites:
        decided_on, spikes, membrane = seen[site.name]
        quiet = spikes == 0
        assert quiet.any() and not quiet.all()
        assert torch.equal(decided_on[quiet], membrane[quiet])
