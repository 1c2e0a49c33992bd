"""snnTorch: every neuron option converts exactly, checked against snnTorch's own run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("snntorch")

import snn_models as M  # noqa: E402
from conftest import reference_outputs, run_onnx  # noqa: E402

from psu_export.errors import NotConvertibleError  # noqa: E402
from psu_export.pipeline import prepare  # noqa: E402


def _check(model, shape, time_steps, tmp_path, other_steps=(5, 23), batch=3, **options):
    conversion = prepare(model, input_shape=shape, time_steps=time_steps, **options)
    path = tmp_path / "m.onnx"
    conversion.export(path)
    kind = conversion.layout.kind
    fired = []
    for steps in (time_steps, *other_steps) if conversion.layout.dynamic_time else (time_steps,):
        gen = torch.Generator().manual_seed(steps)
        x = conversion.layout.example(batch, steps, generator=gen) * 1.5
        ref = reference_outputs(model, x, kind, conversion.layout.time_axis or 0)
        got = run_onnx(path, x)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            r = r.numpy()
            assert g.shape == r.shape
            if np.isin(r, [0.0, 1.0]).all() or np.isin(r, np.unique(r)[:2]).all() and len(np.unique(r)) <= 2:
                np.testing.assert_array_equal(g, r)  # spikes: bit for bit
                fired.append(r.mean())
            else:
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)  # membranes: float precision
    # the check is meaningful only if the network actually spiked (and not always)
    assert any(0.0 < f < 1.0 for f in fired), fired
    return conversion, path


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reset_mechanism": "zero"},
        {"reset_mechanism": "none"},
        {"reset_delay": False},
        {"reset_delay": False, "reset_mechanism": "zero"},
        {"threshold": 0.4},
        {"graded_spikes_factor": 2.5},
        {"beta": 1.4},  # clamped to 1 by snnTorch
        {"learn_beta": True, "learn_threshold": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_leaky_options_loop(options, tmp_path):
    _check(M.leaky_loop(**options), (M.IN,), 12, tmp_path)


@pytest.mark.parametrize("options", [{}, {"reset_mechanism": "zero"}, {"reset_delay": False}, {"reset_mechanism": "none"}], ids=str)
def test_synaptic_options_loop(options, tmp_path):
    _check(M.synaptic_loop(**options), (M.IN,), 10, tmp_path)


def test_neurons_called_without_their_state(tmp_path):
    """``spk, mem = self.lif1(cur)`` with no state passed: snnTorch carries it in the module."""
    _check(M.held_state_loop(), (M.IN,), 9, tmp_path)


def test_per_channel_beta_and_threshold(tmp_path):
    _check(M.per_channel_beta(), (M.IN,), 10, tmp_path)


def test_static_input_loop(tmp_path):
    import onnx

    conversion, path = _check(M.static_loop(), (M.IN,), M.StaticLoop.num_steps, tmp_path)
    assert conversion.layout.kind == "static" and not conversion.layout.dynamic_time
    graph = onnx.load(path).graph  # the first layer reads its one-step drive: nothing expands it over time
    assert graph.node[[n.domain for n in graph.node].index("psu")].op_type.endswith("_static")
    assert "Expand" not in [n.op_type for n in graph.node]


def test_static_image_into_a_conv_net_is_read_once(tmp_path):
    """snnTorch tutorial 6's loop: conv1(x) of one image drives lif1 at every step; the
    exported neuron reads that one [B, 12, 12, 12] drive (no T copies), and parity holds."""
    import onnx

    from psu_export.models.ref_convnet import make_static_net

    conversion = prepare(make_static_net(), input_shape=(1, 28, 28))
    assert (conversion.layout.kind, conversion.layout.time_steps) == ("static", 50)
    conversion.export(tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert [n.op_type for n in graph.node if n.domain == "psu"][0].endswith("_static")
    assert "Expand" not in [n.op_type for n in graph.node]
    report = conversion.verify(tmp_path / "m.onnx", providers=("cpu",))
    assert report.passed and report.to_json()["spike_agreement"] == 1.0


def test_tutorial_5_at_256_steps_verifies_with_its_float_ties(tmp_path):
    """snnTorch tutorial 5 (static input, 784-1000-10) at T = 256.

    onnxruntime's GEMM rounds fc1(x) differently from torch's in the last bit, and the
    static input repeats that difference every step: a few membranes land on the other
    side of the threshold.  verify must call those float ties (and the same neuron's later
    differences "after" them) and pass, not fail on them, in the export comparison too.
    """
    from psu_export.models.ref_mlp import make_static_net_long

    conversion = prepare(make_static_net_long(), input_shape=(784,))
    conversion.export(tmp_path / "m.onnx")
    report = conversion.verify(tmp_path / "m.onnx", providers=("cpu",))
    cpu = report.providers[0]
    assert report.passed, report.to_json()
    for c in cpu.layers + cpu.export_layers:
        assert c.mismatches == c.float_ties + c.after_tie


@pytest.mark.parametrize("options", [{}, {"reset_mechanism": "zero"}], ids=str)
def test_init_hidden_sequential_conv(options, tmp_path):
    conversion, _ = _check(M.conv_sequential(**options), (1, 14, 14), 8, tmp_path)
    assert conversion.layout.kind == "step"


def test_batch_first_loop_is_found_and_keeps_its_layout(tmp_path):
    """A loop over ``x[:, t]`` of ``x[B, T, ...]``: probed as batch-first (a time-first probe
    would loop over the batch), and the ONNX file takes and returns ``[B, T, ...]`` at any T."""
    conversion, path = _check(M.batch_first_loop(), (M.IN,), 12, tmp_path)
    assert conversion.layout.batch_first and conversion.layout.dynamic_time
    model = onnx.load(str(path))
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["batch", "T", M.IN] and dims(model.graph.output[0]) == ["batch", "T", M.OUT]
    assert {p.key: p.value for p in model.metadata_props}["psu_export.layout"] == "batch_first"
    assert conversion.verify(path, providers=("cpu",)).passed


@pytest.mark.parametrize("make, batch_first", [(M.leaky_loop, False), (M.batch_first_loop, True)], ids=["time_first", "batch_first"])
def test_a_long_sequence_runs_once_at_full_length_while_probing(make, batch_first, tmp_path):
    """Probing a loop over 300 steps runs it at 8 and 9 steps, then once at 300 to confirm
    that it loops over every step (not twice at 300 and 301: minutes at T = 100,000)."""
    model = make()
    axis = 1 if batch_first else 0
    lengths = []
    hook = model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[axis]))
    conversion = prepare(model, input_shape=(M.IN,), time_steps=300)
    hook.remove()
    assert conversion.layout.dynamic_time and conversion.layout.batch_first is batch_first
    assert lengths.count(300) == 1 and 301 not in lengths, lengths
    conversion.export(tmp_path / "m.onnx")
    assert conversion.verify(tmp_path / "m.onnx", providers=("cpu",)).passed


@pytest.mark.parametrize("data", [False, True], ids=["synthetic", "data"])
def test_the_probes_run_at_full_length_is_the_checks_reference_run(data, tmp_path):
    """Given the inputs of the parity check that will follow (``convert`` and ``verify`` pass
    them), the probe confirms a long loop on those inputs and verify reuses that run: one run
    of the original's loop at T fewer, the same report."""
    from psu_export.pipeline import CheckInputs

    path = None
    if data:
        path = str(tmp_path / "data.npz")
        np.savez(path, input=torch.rand(300, 2, M.IN, generator=torch.Generator().manual_seed(5)).numpy() * 2)
    reports, full_length_runs = [], []
    for check in (None, CheckInputs(path, seed=3)):
        model = M.leaky_loop()
        lengths = []
        hook = model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[0]))
        conversion = prepare(model, input_shape=(M.IN,), time_steps=300, check=check)
        assert (conversion.check_run is not None) is (check is not None)
        conversion.export(tmp_path / "m.onnx")
        reports.append(conversion.verify(tmp_path / "m.onnx", data=path, providers=("cpu",), seed=3, extra_time_steps=False).to_json())
        hook.remove()
        assert conversion.check_run is None  # taken by the check, its records freed after it
        full_length_runs.append(lengths.count(300))
    assert full_length_runs[1] == full_length_runs[0] - 1 and full_length_runs[1] >= 1, full_length_runs
    assert reports[0] == reports[1] and reports[0]["passed"]


def test_a_probe_does_not_keep_a_run_on_data_of_another_length(tmp_path):
    """``--data`` shorter than ``--time-steps``: the probe confirms the loop on a sample of its
    own and keeps nothing (verify then runs on the data at its own length)."""
    from psu_export.pipeline import CheckInputs

    path = str(tmp_path / "data.npz")
    np.savez(path, input=np.random.default_rng(0).random((200, 2, M.IN), dtype=np.float32))
    model, lengths = M.leaky_loop(), []
    model.register_forward_pre_hook(lambda module, args: lengths.append(tuple(args[0].shape[:2])))
    conversion = prepare(model, input_shape=(M.IN,), time_steps=300, check=CheckInputs(path))
    assert conversion.layout.dynamic_time and conversion.check_run is None
    assert [s for s in lengths if s[0] >= 200] == [(300, 1)], lengths


def test_a_loop_of_fixed_length_over_a_sequence_keeps_its_length(tmp_path):
    """A loop over a fixed 30 of the input's steps fails on the short probe and is found by
    the runs at full length: a sequence of fixed T."""
    conversion, _ = _check(M.fixed_length_loop(), (M.IN,), 30, tmp_path)
    assert (conversion.layout.kind, conversion.layout.dynamic_time, conversion.layout.time_steps) == ("sequence", False, 30)


def test_step_module_driven_batch_first(tmp_path):
    """--batch-first on a single-step module: psu-export's own time loop runs over dim 1."""
    conversion, path = _check(M.synaptic_sequential(), (M.IN,), 8, tmp_path, batch_first=True)
    assert conversion.layout.kind == "step" and conversion.layout.batch_axis == 0
    x = conversion.layout.example(3, 6)
    assert x.shape == (3, 6, M.IN) and run_onnx(path, x)[0].shape == (3, 6, M.OUT)


def test_utils_reset_in_forward_converts_again_in_the_same_process(tmp_path):
    """``utils.reset`` walks snnTorch's class-wide list of every neuron ever built: traced, it
    left fake tensors on the previous models' neurons, and the third conversion in one process
    (``psu-export bench``: one per reset mode) failed. The trace now sees only its own model."""
    import snntorch as snn

    for mode in ("exact", "psu", "stochastic"):
        conversion = prepare(M.reset_each_call(), input_shape=(1, 14, 14), time_steps=6, mode=mode)
        conversion.export(tmp_path / f"{mode}.onnx")
    assert all(not isinstance(n.mem, torch._subclasses.FakeTensor) for n in snn.SpikingNeuron.instances if hasattr(n, "mem"))
    conversion.verify(tmp_path / "stochastic.onnx", providers=("cpu",), extra_time_steps=False)


@pytest.mark.parametrize("style", ["scalar", "zeros", "inplace", "after"])
def test_running_sums_over_the_steps(style, tmp_path):
    """``count = count + spk`` in the loop (or ``sum(spikes)`` of the recorded steps after it):
    a cumulative sum over the steps (ONNX ``CumSum``, float, in the loop's order); counts bit
    for bit, membrane sums to float precision."""
    conversion, path = _check(M.counting(style), (M.IN,), 12, tmp_path)
    assert len(conversion.loop.accumulators) == 2
    x = torch.rand(300, 3, M.IN) * 1.5  # a long sequence: the counts stay exact
    ref = reference_outputs(M.counting(style), x, "sequence")
    got = run_onnx(path, x)
    np.testing.assert_array_equal(got[0], ref[0].numpy())
    assert ref[0].max() > 30
    np.testing.assert_allclose(got[1], ref[1].numpy(), rtol=1e-5)  # the membranes themselves agree to float precision


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
def test_loop_over_the_input_tensor_and_its_firing_rate(batch_first, tmp_path):
    """``for x_t in x`` reads time step t as ``x[t]`` does; ``count / x.shape[0]`` after the loop
    divides by each run's T, not by the T of the capture (checked at T = 12, 5 and 23)."""
    conversion, path = _check(M.iterated_loop(batch_first), (M.IN,), 12, tmp_path, batch_first=batch_first)
    assert conversion.layout.batch_first is batch_first
    assert len(conversion.loop.time_length_args) == 1
    x = conversion.layout.example(3, 40, torch.Generator().manual_seed(0)) * 1.5
    rate = run_onnx(path, x)[0]
    ref = reference_outputs(M.iterated_loop(batch_first), x, "sequence", conversion.layout.time_axis)[0].numpy()
    np.testing.assert_array_equal(rate, ref)
    assert 0 < rate.max() <= 1


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
def test_records_written_into_a_buffer_or_grown_and_a_mean_summed_in_the_loop(batch_first, tmp_path):
    """``out[t] = spk`` into ``torch.zeros(T, ...)`` and ``rec = torch.cat((rec, mem.unsqueeze(0)))``
    are the stacked steps, and ``mem / x.shape[0]`` inside the loop divides by each run's T
    (checked at T = 12, 5 and 23)."""
    conversion, _ = _check(M.preallocated_loop(batch_first), (M.IN,), 12, tmp_path, batch_first=batch_first)
    assert len(conversion.loop.time_length_args) == 1


def test_input_reshaped_before_the_loop(tmp_path):
    """``x = x.view(x.size(0), x.size(1), -1)``: the view keeps the time axis, and its size
    argument (the capture's T) is each run's T (checked at T = 12, 5 and 23)."""
    conversion, _ = _check(M.reshaped_input(), (3, 4), 12, tmp_path)
    assert [(1, 0)] in conversion.loop.time_length_args.values()  # view(x, [T, B, -1]): T is args[1][0]


def test_init_hidden_synaptic(tmp_path):
    _check(M.synaptic_sequential(), (M.IN,), 8, tmp_path)


def test_node_count_does_not_grow_with_time(tmp_path):
    """One file runs at any T; its graph is the same size whatever T it was converted at."""
    counts = []
    for steps in (8, 32):
        conversion = prepare(M.leaky_loop(), input_shape=(M.IN,), time_steps=steps)
        path = tmp_path / f"t{steps}.onnx"
        conversion.export(path)
        model = onnx.load(str(path))
        counts.append(len(model.graph.node))
        psu = [n for n in model.graph.node if n.domain == "psu"]
        assert len(psu) == 2, "one psu node per neuron layer"
        assert {f.name for f in model.functions} >= {n.op_type for n in psu}, "each psu node has a function body"
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["psu_export.mode"] == "exact" and "lif1" in meta["psu_export.neuron_sites"]
    assert counts[0] == counts[1]


def test_report_passes_and_names_each_layer(tmp_path):
    conversion, path = _check(M.leaky_loop(), (M.IN,), 10, tmp_path)
    report = conversion.verify(path).to_json()
    assert report["passed"] and report["spike_agreement"] == 1.0 and report["export_spike_agreement"] == 1.0
    assert [s["name"] for s in report["neuron_sites"]] == ["lif1", "lif2"]
    assert all(s["spike_agreement"] == 1.0 for s in report["neuron_sites"])
    assert report["providers"]["cpu"]["passed"]


@pytest.mark.parametrize(
    "factory, expected",
    [
        (M.with_inhibition, "inhibition"),
        (M.with_state_quant, "state_quant"),
        (M.with_rleaky, "recurrent"),
        (lambda: M.counting("feedback"), "carried between time steps"),
        (M.step_list, "return torch.stack"),
        (M.poisson_input, "draws random numbers"),
    ],
)
def test_unconvertible_options_are_refused_with_a_reason(factory, expected):
    with pytest.raises(NotConvertibleError) as err:
        prepare(factory(), input_shape=(M.IN,), time_steps=6)
    assert err.value.exit_code == 3
    assert expected in str(err.value)


def test_returns_only_the_last_step(tmp_path):
    _check(M.last_step(), (M.IN,), 12, tmp_path, batch=16)
