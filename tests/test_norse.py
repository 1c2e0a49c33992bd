"""Norse 1.1: LIFCell, LIFBoxCell (both resets), LICell, the sequence modules LIF and LI, and SequentialState
models driven step by step, checked against Norse's own sequential run at several T."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("norse.torch")

from conftest import reference_outputs, run_onnx  # noqa: E402

from psu_export.errors import NotConvertibleError  # noqa: E402
from psu_export.models import ref_norse as R  # noqa: E402
from psu_export.pipeline import prepare  # noqa: E402

MODELS = "psu_export.models.ref_norse"


def _spikes(t: torch.Tensor) -> bool:
    return bool(torch.isin(t, torch.tensor([0.0, 1.0])).all())


def _check(factory: str, time_steps, tmp_path, input_kind="auto", other_steps=(3, 13), batch=3, shape=(R.SAMPLE,)):
    conversion = prepare(f"{MODELS}:{factory}", input_shape=shape, time_steps=time_steps, input_kind=input_kind)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    model, kind = conversion.loaded.module, conversion.layout.kind
    rates = []
    for steps in (time_steps, *other_steps):
        x = conversion.layout.example(batch, steps, generator=torch.Generator().manual_seed(steps)) * 2.0
        ref = reference_outputs(model, x, kind)  # Norse's own run (states threaded step by step)
        ref = [r for r in torch.utils._pytree.tree_leaves(ref) if isinstance(r, torch.Tensor)]
        got = run_onnx(path, x)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            assert g.shape == tuple(r.shape)
            if _spikes(r):
                np.testing.assert_array_equal(g, r.numpy())  # spikes: bit for bit
                rates.append(float(r.mean()))
            else:
                np.testing.assert_allclose(g, r.numpy(), rtol=1e-5, atol=1e-5)
    if not rates:  # the outputs are voltages only (an LI readout): its input layers must fire
        from psu_export.verify import run_original

        rates = [float(s.float().mean()) for s in run_original(model, conversion.neurons, conversion.layout, x)[1].values()]
    assert any(0.0 < f < 1.0 for f in rates), rates
    report = conversion.verify(path, providers=("cpu",), extra_time_steps=False)
    assert report.passed, report.to_json()
    assert report.to_json()["spike_agreement"] == 1.0
    return conversion


def test_sequential_state_driven_step_by_step(tmp_path):
    conversion = _check("make_sequential_state", 8, tmp_path, input_kind="step")
    assert conversion.layout.kind == "step"
    specs = {s.source_class: s.spec for s in conversion.sites}
    assert specs["norse.LIFCell"].charge == "norse_lif" and specs["norse.LIFCell"].two_state
    assert specs["norse.LIFBoxCell"].reset_form == "blend" and specs["norse.LIFBoxCell"].compare == "gt"


def test_cells_in_a_forward_loop(tmp_path):
    conversion = _check("make_cell_loop", 7, tmp_path)
    assert conversion.layout.kind == "sequence"


def test_box_reset_subtract(tmp_path):
    _check("make_box_subtract", 6, tmp_path, other_steps=(11,))


def test_sequence_module_lif(tmp_path):
    conversion = _check("make_lif_sequence", 6, tmp_path, other_steps=(2, 10))
    assert {s.source_class for s in conversion.sites} == {"norse.LIF"}


@pytest.mark.parametrize("factory", ["make_li_readout", "make_li_sequence"])
def test_leaky_integrator_readout(factory, tmp_path):
    """LICell / LI: the LIFCell charge without threshold; the membrane is the layer's output."""
    conversion = _check(factory, 8, tmp_path)
    readout = conversion.sites[-1]
    assert readout.source_class in ("norse.LICell", "norse.LI") and readout.spec.reset == "none"
    assert readout.spec.charge == "norse_lif" and readout.spec.two_state


def test_lifted_layers_between_sequence_modules(tmp_path):
    """``Lift(m)`` loops over time in Python; the capture runs ``m`` on all steps at once, so the
    file still takes any T (checked at 6, 3 and 13) and has no per-step copies of ``m``."""
    conversion = _check("make_lifted_conv", 6, tmp_path, shape=(1, 16, 16))
    assert [s.source_class for s in conversion.sites] == ["norse.LIF", "norse.LI"] and conversion.layout.dynamic_time


def test_a_lifted_cell_among_sequence_modules_is_refused_with_the_module_to_use():
    import norse.torch as nt

    model = nt.SequentialState(nt.Lift(torch.nn.Linear(R.SAMPLE, 8)), nt.Lift(nt.LIFCell()), nt.Lift(torch.nn.Linear(8, 4)), nt.LI())
    with pytest.raises(NotConvertibleError, match=r"Norse LIF for Lift\(LIFCell\(\)\)"):
        prepare(model, input_shape=(R.SAMPLE,), time_steps=4)


def test_bare_cell_step_by_step(tmp_path):
    _check("make_single_cell", 5, tmp_path, input_kind="step", other_steps=(9,))


def test_norse_convnet4_from_the_library(tmp_path):
    """Norse's MNIST example network as the library ships it: its ``LILinearCell`` readout
    (the input weights applied before the neuron) and ``voltages[ts, :, :] = v``."""
    conversion = _check("make_convnet4", 6, tmp_path, shape=(1, 16, 16))
    assert [s.source_class for s in conversion.sites] == ["norse.LIFCell"] * 3 + ["norse.LILinearCell"]


def test_params_are_read_from_p_and_dt():
    import norse.torch as nt

    from psu_export.converters.norse import NorseConverter

    cell = nt.LIFCell(nt.LIFParameters(tau_mem_inv=torch.tensor([50.0, 80.0]), v_th=torch.tensor(0.4)), dt=2e-3)
    spec = NorseConverter().to_spec(cell)
    assert torch.equal(spec.mem_gain, 2e-3 * cell.p.tau_mem_inv)
    assert torch.equal(spec.syn_gain, -2e-3 * cell.p.tau_syn_inv)
    assert float(spec.threshold) == pytest.approx(0.4) and spec.reset == "zero"


@pytest.mark.parametrize("factory,name", [("make_recurrent", "LIFRecurrentCell"), ("make_refractory", "LIFRefracCell")])
def test_unsupported_cells_are_refused(factory, name):
    with pytest.raises(NotConvertibleError) as info:
        prepare(f"{MODELS}:{factory}", input_shape=(R.SAMPLE,), time_steps=4)
    assert any(name in why for why in info.value.reasons.values())


@pytest.mark.parametrize("encoder, reason", [("ConstantCurrentLIFEncoder", "its own LIF"), ("PoissonEncoder", "random")])
def test_encoders_inside_the_model_are_refused(encoder, reason):
    """Norse's MNIST tutorial encodes the image inside forward; the refusal says what to do."""
    import norse.torch as nt

    model = nt.SequentialState(getattr(nt, encoder)(seq_length=5), torch.nn.Linear(4, 4), nt.LIFCell())
    with pytest.raises(NotConvertibleError) as info:
        prepare(model, input_shape=(4,), time_steps=5)
    assert any(encoder in why and reason in why and "outside the model" in why for why in info.value.reasons.values())


def test_adjoint_method_is_refused():
    import norse.torch as nt

    model = nt.SequentialState(torch.nn.Linear(4, 4), nt.LIFCell(nt.LIFParameters(method="adjoint")))
    with pytest.raises(NotConvertibleError, match="adjoint"):
        prepare(model, input_shape=(4,), time_steps=4)


def test_cli_convert_step_model(tmp_path):
    out, report = tmp_path / "norse.onnx", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "psu_export.cli", "convert", f"{MODELS}:make_sequential_state", str(out), "--input-shape", str(R.SAMPLE),
         "--time-steps", "6", "--input-kind", "step", "--report", str(report)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["passed"] and data["spike_agreement"] == 1.0
    proc = subprocess.run(
        [sys.executable, "-m", "psu_export.cli", "convert", f"{MODELS}:make_recurrent", str(tmp_path / "r.onnx"), "--input-shape", str(R.SAMPLE)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 3 and "LIFRecurrentCell" in proc.stdout + proc.stderr
