"""Hand-written LIF loops (psu_export/patterns.py): recognised exactly, or refused with the node."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_onnx

HERE = Path(__file__).resolve().parent
MODELS = HERE / "handwritten_models.py"


def _factory(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_hw_models", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)()


def _check_parity(path, model, x):
    with torch.no_grad():
        ref = model(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = run_onnx(path, x)
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        r = r.numpy()
        if np.all((r == 0) | (r == 1)):
            assert np.array_equal(r, g), "spikes differ"
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "factory, shape, charge, resets",
    [
        ("make_mlp", (8,), "leaky", ["subtract", "zero"]),
        ("make_conv", (1, 8, 8), "leaky", ["subtract", "none"]),  # and acc = acc + u: a cumulative sum
        ("make_tau", (8,), "sj_decay_input", ["zero"]),
        ("make_where", (8,), "leaky", ["zero", "zero", "zero"]),
        ("make_in_place", (8,), "leaky", ["subtract", "zero", "zero", "zero"]),
        ("make_firing_rate", (8,), "leaky", ["subtract", "subtract"]),  # count / x.shape[0]: each run's T
    ],
)
def test_sequence_loops_convert_exactly(convert, factory, shape, charge, resets):
    conversion, path = convert(f"{MODELS}:{factory}", shape, 6)
    assert conversion.layout.kind == "sequence" and conversion.layout.dynamic_time
    assert [s.spec.reset for s in conversion.sites] == resets
    assert conversion.sites[0].spec.charge == charge
    assert conversion.sites[0].spec.reset_timing == "same_step"
    model = _factory(factory).eval()
    gen = torch.Generator().manual_seed(0)
    for steps in (6, 11):  # the conversion T and another
        x = torch.rand(steps, 3, *shape, generator=gen) * 2
        _check_parity(path, model, x)
    report = conversion.verify(path, providers=("cpu",), extra_time_steps=False)
    assert report.passed
    layers = {c.name: c for c in report.providers[0].layers}
    assert layers, "per-layer spikes of the original were recorded"
    assert all(c.spike_agreement == 1.0 for c in layers.values())


@pytest.mark.parametrize("factory, reset", [("make_tutorial_2", "subtract"), ("make_stored_test_float", "subtract"),
                                            ("make_stored_test_zero", "zero"), ("make_leaky_by_hand", "subtract"),
                                            ("make_carried_spike", "subtract"), ("make_stbp", "zero")])
def test_previous_step_resets_written_by_hand(convert, factory, reset):
    """snnTorch tutorial 2's ``spk = mem > thr; mem = beta * mem + x - spk * thr``: snnTorch's
    previous-step reset with the spike taken from the stored membrane (bool spikes as
    published); snnTorch ``Leaky`` written by hand (its output spike tests the new one,
    with the reset test written out, or carried to the next step's reset); STBP's
    ``mem = mem * decay * (1 - spike) + x`` (the carried spike zeroes the stored membrane)."""
    conversion, path = convert(f"{MODELS}:{factory}", (8,), 6)
    specs = [s.spec for s in conversion.sites]
    spike_from = "updated" if factory in ("make_carried_spike", "make_stbp") else "stored"
    assert [(s.reset_timing, s.spike_from, s.reset) for s in specs] == [("previous_step", spike_from, reset)] * 2
    if factory == "make_stbp":
        assert {s.zero_scope for s in specs} == {"membrane"}
    model = _factory(factory).eval()
    gen = torch.Generator().manual_seed(0)
    for steps in (6, 17):
        x = torch.rand(steps, 3, 8, generator=gen) * 2
        _check_parity(path, model, x)
        with torch.no_grad():
            fired = model(x)[0].float().mean()
        assert 0 < fired < 1
    report = conversion.verify(path, providers=("cpu",), extra_time_steps=False)
    assert report.passed


@pytest.mark.parametrize("factory", ["make_multi_step_static", "make_multi_step_sequence"])
def test_neurons_that_loop_over_the_sequence_themselves(convert, factory):
    """TET's ``LIFSpike`` between layers folded over time: each neuron's own loop becomes one
    call on the whole sequence (no time loop around the neurons); a batch-first sequence input
    keeps a variable T (its ``view([B, T, ...])`` reads each run's T; converted at T = 4, the
    capture's own length, so the second capture must really be one step longer)."""
    conversion, path = convert(f"{MODELS}:{factory}", (1, 8, 8), 4)
    static = factory == "make_multi_step_static"
    assert conversion.loop.sequence and len(conversion.sites) == 2
    assert (conversion.layout.kind, conversion.layout.dynamic_time) == (("static", False) if static else ("sequence", True))
    assert conversion.layout.time_steps == (5 if static else 4)
    assert [(s.spec.reset, s.spec.reset_timing) for s in conversion.sites] == [("zero", "same_step")] * 2
    model = _factory(factory).eval()
    gen = torch.Generator().manual_seed(0)
    for steps in ((5,) if static else (4, 11, 2)):
        x = conversion.layout.example(3, steps, generator=gen) * 2
        _check_parity(path, model, x)
        with torch.no_grad():
            assert 0 < float(model(x).mean()) < 1
    report = conversion.verify(path, providers=("cpu",))
    assert report.passed and report.to_json()["spike_agreement"] == 1.0
    assert {c.name for c in report.providers[0].layers} == {s.name for s in conversion.sites}


def test_static_input_with_reset_before_charge(convert):
    conversion, path = convert(f"{MODELS}:make_static", (6,), 25)
    assert conversion.layout.kind == "static" and conversion.layout.time_steps == 7
    lif = conversion.sites[0].spec
    assert (lif.reset, float(lif.threshold), float(lif.decay)) == ("subtract", pytest.approx(0.7), pytest.approx(0.8))
    model = _factory("make_static").eval()
    x = torch.rand(5, 6) * 2
    _check_parity(path, model, x)


def test_batch_first_loop(convert):
    """``x[:, t]`` over ``x[B, T, ...]``: found as batch-first, exact at the conversion T and another."""
    conversion, path = convert(f"{MODELS}:make_batch_first", (8,), 6)
    assert conversion.layout.batch_first and conversion.layout.dynamic_time
    model = _factory("make_batch_first").eval()
    for steps in (6, 11):
        _check_parity(path, model, torch.rand(3, steps, 8) * 2)


def test_surrogate_spikes_are_strict_and_ge_is_kept(convert):
    conversion, _ = convert(f"{MODELS}:make_mlp", (8,), 4)
    assert [s.spec.compare for s in conversion.sites] == ["gt", "ge"]


def psu_export_command() -> str:
    """The installed ``psu-export`` console script of this interpreter."""
    script = Path(sys.executable).parent / "psu-export"
    return str(script) if script.exists() else (shutil.which("psu-export") or "psu-export")


def _cli(*args):
    return subprocess.run([psu_export_command(), *args], capture_output=True, text=True, cwd=HERE.parent, timeout=300)


def test_unrecognised_recurrence_exits_3_naming_the_node(tmp_path):
    out = tmp_path / "r.onnx"
    proc = _cli("convert", f"{MODELS}:make_recurrent", str(out), "--time-steps", "5", "--input-shape", "8")
    assert proc.returncode == 3, proc.stderr
    assert "node add" in proc.stderr and "recurrent spike feedback" in proc.stderr
    assert not out.exists()


def test_pre_reset_membrane_readout_is_refused(convert):
    from psu_export.errors import NotConvertibleError

    with pytest.raises(NotConvertibleError) as info:
        convert(f"{MODELS}:make_pre_reset", (8,), 5)
    assert "membrane before its reset" in str(info.value)
