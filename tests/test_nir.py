"""NIR graphs (psu_export/nir_import.py, converters/nir.py) through the real CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

nir = pytest.importorskip("nir")

from conftest import run_onnx  # noqa: E402
from test_handwritten import psu_export_command  # noqa: E402

DT = 1e-4


def _mlp_graph():
    rng = np.random.default_rng(0)
    n_in, n_h, n_out = 4, 8, 3
    return nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([n_in])}),
            "fc1": nir.Affine(weight=(rng.normal(0, 1, (n_h, n_in)) + 0.5).astype(np.float32), bias=rng.normal(0, 0.1, n_h).astype(np.float32)),
            "lif1": nir.LIF(tau=np.full(n_h, 2e-3), r=np.ones(n_h), v_leak=np.zeros(n_h), v_threshold=np.full(n_h, 0.1)),
            "fc2": nir.Linear(weight=rng.uniform(0, 1, (n_out, n_h)).astype(np.float32)),
            "cuba": nir.CubaLIF(tau_syn=np.full(n_out, 1e-3), tau_mem=np.full(n_out, 2e-3), r=np.ones(n_out), v_leak=np.full(n_out, 0.1),
                                v_threshold=np.full(n_out, 0.02), w_in=np.ones(n_out)),
            "li": nir.LI(tau=np.full(n_out, 5e-3), r=np.ones(n_out), v_leak=np.zeros(n_out)),
            "output": nir.Output(output_type={"output": np.array([n_out])}),
        },
        edges=[("input", "fc1"), ("fc1", "lif1"), ("lif1", "fc2"), ("fc2", "cuba"), ("cuba", "li"), ("li", "output")],
    )


def _conv_graph():
    rng = np.random.default_rng(1)
    c = 2
    return nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([1, 6, 6])}),
            "conv": nir.Conv2d(input_shape=(6, 6), weight=rng.uniform(0, 1, (c, 1, 3, 3)).astype(np.float32), stride=1, padding=1,
                               dilation=1, groups=1, bias=np.zeros(c, dtype=np.float32)),
            "if1": nir.IF(r=np.full((c, 6, 6), 1 / DT), v_threshold=np.ones((c, 6, 6))),
            "pool": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0])),
            "flat": nir.Flatten(input_type={"input": np.array([c, 3, 3])}, start_dim=0),
            "fc": nir.Affine(weight=rng.uniform(-0.2, 0.6, (5, c * 9)).astype(np.float32), bias=np.zeros(5, dtype=np.float32)),
            "lif": nir.LIF(tau=np.full(5, 4e-4), r=np.ones(5), v_leak=np.zeros(5), v_threshold=np.full(5, 4.0), v_reset=np.zeros(5)),
            "output": nir.Output(output_type={"output": np.array([5])}),
        },
        edges=[("input", "conv"), ("conv", "if1"), ("if1", "pool"), ("pool", "flat"), ("flat", "fc"), ("fc", "lif"), ("lif", "output")],
    )


def _cli(*args):
    return subprocess.run([psu_export_command(), *map(str, args)], capture_output=True, text=True, timeout=300)


def _reference(graph, x, reset):
    from psu_export.capture import StepDriver
    from psu_export.nir_import import build

    net = build(graph, DT, reset)
    with torch.no_grad():
        return StepDriver(net)(x)


@pytest.mark.parametrize(
    "make, shape, reset, kinds",
    [
        (_mlp_graph, "4", "zero", {"zero", "none"}),
        (_conv_graph, "1,6,6", "subtract", {"subtract"}),
    ],
)
def test_nir_graph_converts_through_the_cli(tmp_path, make, shape, reset, kinds):
    graph = make()
    path, out, report = tmp_path / "g.nir", tmp_path / "g.onnx", tmp_path / "r.json"
    nir.write(str(path), graph)
    proc = _cli("convert", path, out, "--time-steps", 8, "--input-shape", shape, "--dt", DT, "--nir-reset", reset, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["passed"] and data["spike_agreement"] == 1.0
    assert {s["spec"]["reset"] for s in data["neuron_sites"]} == kinds
    assert any("NIR cannot express a subtract" in n for n in data["notes"])
    sample = tuple(int(d) for d in shape.split(","))
    gen = torch.Generator().manual_seed(0)
    for steps in (8, 13):  # the conversion T and another
        x = torch.rand(steps, 3, *sample, generator=gen) * 2
        ref = _reference(graph, x, reset).numpy()
        got = run_onnx(out, x)[0]
        if np.all((ref == 0) | (ref == 1)):
            assert np.array_equal(got, ref)
            assert 0 < ref.mean() < 1, "the test graph should spike, but not always"
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_reset_choice_changes_the_spec_and_the_spikes():
    from psu_export.nir_import import build

    graph = _conv_graph()
    x = torch.rand(10, 2, 1, 6, 6) * 2
    assert not torch.equal(_reference(graph, x, "zero"), _reference(graph, x, "subtract"))
    from psu_export.converters import find_converter

    net = build(graph, DT, "subtract")
    conv, _ = find_converter(net.layers["if1"].neuron)
    assert conv.to_spec(net.layers["if1"].neuron).reset == "subtract"


def test_matches_snntorch_import_of_the_same_graph():
    """Extra check: snnTorch's own NIR import (dt = 1e-4, zero reset) spikes the same."""
    pytest.importorskip("snntorch")
    try:
        from snntorch.import_nir import import_from_nir
    except Exception as exc:  # pragma: no cover - depends on the snntorch build
        pytest.skip(f"snntorch NIR import unavailable: {exc}")
    rng = np.random.default_rng(2)
    tau = np.full(6, 5e-4)
    graph = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([4])}),
            "fc": nir.Affine(weight=rng.uniform(0, 1, (6, 4)).astype(np.float32), bias=np.zeros(6, dtype=np.float32)),
            "lif": nir.LIF(tau=tau, r=tau / DT, v_leak=np.zeros(6), v_threshold=np.ones(6), v_reset=np.zeros(6)),
            "output": nir.Output(output_type={"output": np.array([6])}),
        },
        edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")],
    )
    x = torch.rand(20, 3, 4)
    ours = _reference(graph, x, "zero")
    theirs_net = import_from_nir(graph)
    outs, state = [], None
    with torch.no_grad():
        for t in range(x.shape[0]):
            o, state = theirs_net(x[t], state) if state is not None else theirs_net(x[t])
            outs.append(o)
    theirs = torch.stack(outs)
    assert 0 < float(ours.mean()) < 1
    assert float((ours == theirs).float().mean()) >= 0.99


def test_recurrent_graph_is_refused(tmp_path):
    graph = _mlp_graph()
    graph.nodes["rec"] = nir.Linear(weight=np.eye(8, dtype=np.float32))
    graph.edges += [("lif1", "rec"), ("rec", "lif1")]  # recurrent feedback
    path = tmp_path / "rec.nir"
    nir.write(str(path), graph)
    proc = _cli("convert", path, tmp_path / "rec.onnx", "--time-steps", 4, "--input-shape", 4)
    assert proc.returncode == 3, proc.stderr
    assert "recurrent" in proc.stderr and "lif1" in proc.stderr


def test_dt_larger_than_tau_is_a_usage_error(tmp_path):
    path = tmp_path / "g.nir"
    nir.write(str(path), _mlp_graph())
    proc = _cli("convert", path, tmp_path / "g.onnx", "--time-steps", 4, "--dt", 1.0)
    assert proc.returncode == 2, proc.stderr
    assert "--dt" in proc.stderr
