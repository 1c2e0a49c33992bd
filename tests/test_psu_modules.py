"""The PSU family (psu_export.psu): paper / code equations, gradients, any T, exact conversion."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from psu_export.ops.reset import ResetOptions
from psu_export.psu import IPSU, PSU, RPSU


def _lower(steps, fn, strict=False):
    i = torch.arange(steps)
    d = i[:, None] - i[None, :]
    keep = d > 0 if strict else d >= 0
    return torch.where(keep, fn(d.clamp(min=0).float()), torch.zeros(()))


def _paper(steps, tau):
    lam = 1 - 1 / tau
    return _lower(steps, lambda d: (1 / tau) * lam**d), _lower(steps, lambda d: lam**d, strict=True)


def _code(steps, tau):
    """The authors' generate_matrix, written from its equations (NEURON_SEMANTICS.md 1.4)."""
    return _lower(steps, lambda d: (1 / tau) ** (d + 1)), _lower(steps, lambda d: -((1 / tau) ** d), strict=True)


@pytest.mark.parametrize("code_compat", [False, True])
def test_equations(code_compat):
    torch.manual_seed(0)
    steps, tau, theta = 12, 3.0, 0.5
    x = torch.rand(steps, 4, 7) * 2
    flat = x.reshape(steps, -1)

    def check(module, expected):
        spikes, potential = module.dynamics(x)
        with torch.no_grad():
            np.testing.assert_allclose(potential.reshape(steps, -1).detach(), expected.detach(), atol=2e-6)
            away = (expected - theta).abs() > 1e-5
            assert torch.equal(spikes.reshape(steps, -1)[away], (expected > theta).float()[away])

    psu = PSU(tau, theta, code_compat=code_compat)
    if code_compat:
        m1, m2 = _code(steps, tau)
        check(psu, m1 @ flat + theta * m2 @ torch.sigmoid(m1 @ flat))
    else:
        a, b = _paper(steps, tau)
        check(psu, a @ flat - theta * b @ torch.sigmoid(a @ flat))

    ipsu = IPSU(20, tau, theta, code_compat=code_compat)
    with torch.no_grad():
        ipsu.bias.normal_()
    w, bias = torch.tril(ipsu.weight)[:steps, :steps], ipsu.bias[:steps, None]
    u = w @ flat + bias
    if code_compat:  # no probabilistic reset: U = A_I X + b + m2 X
        check(ipsu, u + _code(steps, tau)[1] @ flat)
    else:
        check(ipsu, u - theta * _paper(steps, tau)[1] @ torch.sigmoid(u))

    rpsu = RPSU(20, tau, theta, code_compat=code_compat)
    w, bias = torch.tril(rpsu.weight)[:steps, :steps], rpsu.bias[:steps, None]
    z = torch.sigmoid(w @ flat + bias)
    if code_compat:  # m2 unscaled
        m1, m2 = _code(steps, tau)
        check(rpsu, m1 @ flat + m2 @ z)
    else:
        a, b = _paper(steps, tau)
        check(rpsu, a @ flat - theta * b @ z)


@pytest.mark.parametrize("make", [lambda: PSU(), lambda: IPSU(16), lambda: RPSU(16), lambda: IPSU(16, code_compat=True)])
def test_gradients_flow(make):
    torch.manual_seed(1)
    unit, fc = make(), nn.Linear(6, 6)
    x = torch.rand(16, 3, 6, requires_grad=True)
    spikes = unit(fc(x) * 3)
    assert 0 < float(spikes.mean()) < 1
    spikes.sum().backward()
    assert float(fc.weight.grad.abs().sum()) > 0 and float(x.grad.abs().sum()) > 0
    for p in unit.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_psu_any_steps_and_no_overflow():
    unit = PSU(tau=1.5)
    for steps in (1, 2, 7, 64):
        assert unit(torch.rand(steps, 2, 3)).shape == (steps, 2, 3)
    spikes, potential = unit.dynamics(torch.rand(3000, 2, 3) * 4)  # lambda^-T rescaling would overflow here
    assert torch.isfinite(potential).all() and 0 < float(spikes.mean()) < 1


def test_learned_matrices_bound_steps():
    torch.manual_seed(2)
    unit = IPSU(max_steps=10)
    x = torch.rand(10, 2, 3)
    # causal: a shorter sequence is the prefix of the full-length run
    assert torch.equal(unit.dynamics(x[:6])[1], unit.dynamics(x)[1][:6])
    with pytest.raises(ValueError, match="10 x 10"):
        RPSU(max_steps=10)(torch.rand(11, 2, 3))


class _Net(nn.Module):
    def __init__(self, make):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.n1, self.fc2, self.n2 = nn.Linear(12, 24), make(), nn.Linear(24, 5), make()

    def forward(self, x):
        return self.n2(self.fc2(self.n1(self.fc1(x) * 2)) * 2)


@pytest.mark.parametrize(
    "make,op",
    [
        (lambda: PSU(2.0, 0.5), "PSU_"),
        (lambda: IPSU(16, 2.0, 0.5, init="lif"), "IPSU_"),
        (lambda: RPSU(16, 3.0, 0.5, code_compat=True), "RPSU_"),
    ],
)
def test_models_of_psu_units_convert_exactly(make, op, tmp_path):
    from psu_export.pipeline import prepare

    net = _Net(make).eval()
    conversion = prepare(net, input_shape=(12,), time_steps=16)
    assert [s.algorithm.name for s in conversion.sites] == ["psu_module", "psu_module"]
    path = tmp_path / "psu.onnx"
    conversion.export(path)
    model = onnx.load(str(path))
    psu_nodes = [n for n in model.graph.node if n.domain == "psu"]
    assert len(psu_nodes) == 2 and all(n.op_type.startswith(op) for n in psu_nodes)
    assert {f.name for f in model.functions} >= {n.op_type for n in psu_nodes}
    # tau and threshold are one value each: broadcast as scalars (op type part "sc")
    assert all("_sc" in n.op_type and ResetOptions.from_node(n).scalar_params for n in psu_nodes)
    report = conversion.verify(path, providers=("cpu",)).to_json()
    assert report["passed"], report
    assert report["spike_agreement"] == 1.0 and report["export_spike_agreement"] == 1.0
    assert conversion.layout.dynamic_time == (op == "PSU_")  # learned T x T matrices fix T
