"""BrainCog 0.2.7: IFNode, LIFNode and PLIFNode convert exactly, checked against BrainCog's
own sequential run at the conversion T and at other T; the rest is refused with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("braincog")

from conftest import reference_outputs, run_onnx  # noqa: E402

from psu_export.converters import REGISTRY  # noqa: E402
from psu_export.errors import NotConvertibleError  # noqa: E402
from psu_export.models import ref_braincog as R  # noqa: E402
from psu_export.ops.registry import STATIC_DRIVE  # noqa: E402
from psu_export.pipeline import prepare  # noqa: E402

node = R.import_nodes()
from braincog.base.strategy import surrogate  # noqa: E402 (after import_nodes: see there)


def _check(model, shape, time_steps, tmp_path, other_steps=(13,), batch=3):
    """Convert ``model``, then compare onnxruntime with BrainCog's own run: layer spikes through
    verify, the model's output (a mean of the steps' outputs) to float precision."""
    conversion = prepare(model, input_shape=shape, time_steps=time_steps)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    report = conversion.verify(path)
    assert report.passed and report.to_json()["spike_agreement"] == 1.0
    steps_list = (time_steps, *other_steps) if conversion.layout.dynamic_time else (time_steps,)
    for steps in steps_list:
        x = conversion.layout.example(batch, steps, generator=torch.Generator().manual_seed(steps)) * 2.0
        (ref,) = reference_outputs(model, x, conversion.layout.kind)
        (got,) = run_onnx(path, x)
        assert 0.0 < float(ref.mean()) < 1.0  # it fired, and not always
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-6)
    return conversion


@pytest.mark.parametrize("factory, charge", [("make_mlp_lif", "sj_decay_input"), ("make_mlp_if", "if"), ("make_mlp_plif", "sj_decay_input_mul")])
def test_nodes_in_a_forward_loop_with_the_sum_of_outputs(factory, charge, tmp_path):
    """BrainCog's model-zoo loop: ``n_reset`` in forward, ``x[t]`` each step, ``sum(outputs) /
    len(outputs)`` after the loop (a sum the rewrite moves into the loop; T read per run)."""
    conversion = _check(getattr(R, factory)(), (R.SAMPLE,), 8, tmp_path)
    assert conversion.layout.kind == "sequence" and conversion.layout.dynamic_time
    for site in conversion.sites:
        spec = site.spec
        assert (spec.charge, spec.compare, spec.reset, spec.reset_timing) == (charge, "gt", "zero", "same_step")


def test_conv_net(tmp_path):
    _check(R.make_conv(), R.SAMPLE_SHAPES["make_conv"], 6, tmp_path, other_steps=(9,))


def test_model_zoo_direct_encoder(tmp_path):
    """The image repeated over the steps by ``einops.repeat`` and read as ``inputs[t]``: each step
    reads the image itself (the select of a repeat), so the loop re-rolls over a static input."""
    conversion = _check(R.make_zoo_static(), R.SAMPLE_SHAPES["make_zoo_static"], 8, tmp_path)
    assert (conversion.layout.kind, conversion.layout.time_steps) == ("static", 8)


def test_layer_by_layer_nodes_take_time_folded_into_the_batch(tmp_path):
    conversion = _check(R.make_layer_by_layer(), (R.SAMPLE,), 8, tmp_path)
    assert conversion.layout.kind == "static" and conversion.layout.time_steps == 8  # the model's own step
    assert conversion.captured.notes[-1].endswith("repeated over time): layers.0")  # the first Linear runs once
    first = next(n for n in onnx.load(tmp_path / "m.onnx").graph.node if n.domain == "psu")
    assert first.op_type.endswith(STATIC_DRIVE)  # and its neuron reads that one step, not T copies


def test_the_reset_is_read_from_the_module(monkeypatch, tmp_path):
    """The BrainCog fork published with the PSU paper resets softly (NEURON_SEMANTICS.md 1.4):
    with that calc_spike, the spec subtracts the threshold; a reset that is neither is refused."""
    def soft(self):
        self.spike = self.act_fun(self.mem - self.threshold)
        self.mem = self.mem - self.spike.detach() * self.threshold

    monkeypatch.setattr(node.LIFNode, "calc_spike", soft)
    conversion = _check(R.make_mlp_lif(), (R.SAMPLE,), 8, tmp_path)
    assert {site.spec.reset for site in conversion.sites} == {"subtract"}
    slow = node.LIFNode(threshold=0.5, tau=500.0)  # hardly charges on unit inputs: the copy is fed larger ones
    assert REGISTRY["braincog"].to_spec(slow).reset == "subtract"

    def halved(self):
        self.spike = self.act_fun(self.mem - self.threshold)
        self.mem = self.mem * (1 - 0.5 * self.spike.detach())

    monkeypatch.setattr(node.LIFNode, "calc_spike", halved)
    with pytest.raises(NotConvertibleError, match="match neither"):
        prepare(R.make_mlp_lif(), input_shape=(R.SAMPLE,), time_steps=4)


def test_initial_membrane_is_v_reset(tmp_path):
    model = R.make_mlp_lif()
    for module in model.modules():
        if isinstance(module, node.LIFNode):
            module.v_reset = 0.25
    conversion = _check(model, (R.SAMPLE,), 8, tmp_path)
    assert all(float(site.spec.v_init) == 0.25 for site in conversion.sites)


@pytest.mark.parametrize("make, why", [
    (lambda: node.NoiseLIFNode(), "random noise"),
    (lambda: node.BurstLIFNode(), "burst"),
    (lambda: node.IzhNode(), "compartments"),
    (lambda: node.IFNode(dt=0.5), "dt != 1"),
    (lambda: node.LIFNode(n_groups=2), "n_groups"),
    (lambda: node.LIFNode(act_fun=surrogate.ReLUGrad), "not the step"),
])
def test_unsupported_nodes_are_refused(make, why):
    model = R.StepLoopNet(torch.nn.Sequential(torch.nn.Linear(4, 4), make()))
    with pytest.raises(NotConvertibleError, match=why):
        prepare(model, input_shape=(4,), time_steps=4)
