"""Long sequences: an exported MLP runs 10,000 (default) and 100,000 (slow) steps in O(T)
memory (no T x T matrix; peak RSS of the onnxruntime process < 2 GB) with exact spikes, and
``psu-export convert`` at T = 100,000 (slow) stays under 2 GB, its parity check included,
for the 64-128-10 MLP (the suite's 784-1000-10 one: ``test_wide_mlp_100k.py``); verify's
memory at long T (bool records, the rewrite run in chunks of steps, near-threshold
positions)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from torch.utils._pytree import tree_leaves

from conftest import convert_within_2gb, reference_outputs

RUNNER = r"""
import resource, sys
import numpy as np, onnxruntime as ort
path, xpath, opath = sys.argv[1:4]
x = np.load(xpath)
so = ort.SessionOptions()
so.intra_op_num_threads = 2
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
out = s.run(None, {s.get_inputs()[0].name: x})
np.savez(opath, *out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux
"""

MODELS = {
    "subtract-reset": ("psu_export.models.ref_mlp:make_small_net", "scan"),
    "reset-free": ("psu_export.models.ref_mlp:make_small_reset_free_net", "closed_form"),
}


def _run_onnx(path, x: torch.Tensor, tmp_path):
    """``x`` through the file in an onnxruntime process of its own: its outputs, after
    checking its peak RSS (< 2 GB) and that the output layer fires sometimes."""
    np.save(tmp_path / "x.npy", x.numpy())
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(path), str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = int(proc.stdout.strip().splitlines()[-1]) / 1024
    print(f"{path.name} T={x.shape[0]}: onnxruntime peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"
    got = np.load(tmp_path / "out.npz")
    assert got["arr_0"].shape == (x.shape[0], 1, 10)
    assert got["arr_0"].sum() > 0 and (got["arr_0"] == 0).any(), "test input should make the output layer fire sometimes"
    return got


def _long_input(steps: int) -> torch.Tensor:
    return torch.rand(steps, 1, 64, generator=torch.Generator().manual_seed(steps)) * 1.5


@pytest.mark.parametrize("model_key", list(MODELS))
def test_10k_steps_exact_and_linear_memory(convert, tmp_path, model_key):
    spec, algorithm = MODELS[model_key]
    conversion, path = convert(spec, (64,), 16)
    assert [s.algorithm.name for s in conversion.sites] == [algorithm] * 2
    x = _long_input(10_000)
    got = _run_onnx(path, x, tmp_path)
    ref = reference_outputs(conversion.loaded.module, x, "sequence")
    assert np.array_equal(got["arr_0"], ref[0].numpy()), f"{int((got['arr_0'] != ref[0].numpy()).sum())} spikes differ"
    # the synaptic layers run batched over time (different GEMM blocking): membranes agree to float rounding
    np.testing.assert_allclose(got["arr_1"], ref[1].numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model_key", list(MODELS))
def test_100k_steps_convert_and_verify(tmp_path, model_key):
    """``psu-export convert`` at T = 100,000, verifying on a 100,000-step input, in under 2
    GB (the original's loop, the rewrite and onnxruntime each keep every layer's spikes).
    Over 100k steps the batched Linear's rounding puts a few membranes within float rounding
    of the threshold (measured: 5 ties in 1M neuron-steps, 44 later differences in the same
    neurons, 183 downstream): verify must attribute every difference to such a tie, and
    onnxruntime must match the rewrite exactly."""
    spec, _ = MODELS[model_key]
    x = _long_input(100_000)
    np.savez(tmp_path / "data.npz", input=x.numpy())
    out = tmp_path / "model.onnx"
    report = convert_within_2gb(tmp_path, spec, out, "--input-shape", "64", "--data", str(tmp_path / "data.npz"))
    assert [s["algorithm"] for s in report["neuron_sites"]] == ["scan"] * 2  # past the closed form's 64 steps
    assert report["passed"], report
    assert report["export_spike_agreement"] == 1.0
    cpu = report["providers"]["cpu"]
    assert all(c["mismatches"] == c["float_ties"] + c["after_tie"] for c in cpu["layers"])
    _run_onnx(out, x, tmp_path)


def test_torch_closed_form_switches_to_scan_for_long_sequences():
    """The rewritten model's closed-form kernel never builds a T x T matrix past the limit."""
    from psu_export.kernels import CLOSED_FORM_MAX_STEPS
    from psu_export.ops.neuron import StepOptions, closed_form_neuron, exact_neuron
    from psu_export.spec import NeuronSpec

    spec = NeuronSpec(decay=0.9, threshold=1.0, reset="none", reset_timing="previous_step")
    o = StepOptions.of(spec)
    params = [getattr(spec, n) for n in o.param_names]
    x = torch.rand(CLOSED_FORM_MAX_STEPS * 40, 3, 5)
    got = closed_form_neuron(x, params, o.key(), "l")
    want = exact_neuron(x, params, o.key(), "l")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_verify_bounds_its_synthetic_inputs_at_long_sequences():
    """verify's synthetic inputs keep at most 100,000 sample-steps (batch 4 down to 1), and its
    shorter extra check at most 1,000 steps: every check runs the original's loop again."""
    from psu_export.pipeline import other_time_steps, synthetic_batch

    assert [synthetic_batch(t) for t in (16, 25_000, 25_001, 50_000, 100_000, 300_000)] == [4, 4, 3, 2, 1, 1]
    assert other_time_steps(16) == [8, 33] and other_time_steps(100_000) == [1_000, 100_064]


def test_verify_keeps_spike_records_as_bools(tmp_path, monkeypatch):
    """verify holds every layer's output over all steps for the original, the rewrite and
    onnxruntime: 0 / 1 spikes are kept as bools (a quarter of float32: 100 MB, not 400, for a
    1,000-neuron layer at 100,000 steps), other values as they are, also where only some
    steps are 0 / 1 (a record's steps stack to float).  The original's steps are stacked in
    chunks (here of 5 steps over 12: two chunks and a rest)."""
    from psu_export import verify
    from psu_export.pipeline import prepare
    from psu_export.verify import onnx_with_layer_outputs, run_onnx, run_parallel, spike_record

    monkeypatch.setattr(verify, "CHUNK_STEPS", 5)

    spikes = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert spike_record(spikes).dtype == torch.bool and torch.equal(spike_record(spikes).float(), spikes)
    graded = torch.tensor([[0.0, 2.5]])
    assert torch.equal(spike_record(graded), graded) and spike_record(graded) is not graded  # a copy
    steps = torch.stack([spike_record(torch.zeros(1, 2)), spike_record(graded)])  # a quiet step, then a graded one
    assert steps.dtype == torch.float32 and torch.equal(steps, torch.stack([torch.zeros(1, 2), graded]))

    conversion = prepare("psu_export.models.ref_mlp:make_small_net", input_shape=(64,), time_steps=12)
    inputs = conversion.inputs(batch=2)
    path = conversion.export(tmp_path / "m.onnx").path
    records = {
        "original": inputs.reference[1],
        "rewrite": run_parallel(conversion.parallel, inputs.x)[1],
        "onnxruntime": run_onnx(*onnx_with_layer_outputs(path), inputs.x.numpy(), "cpu")[1],
    }
    for run, layers in records.items():
        assert len(layers) == 2 and all(r.dtype == torch.bool and r.shape[:2] == (12, 2) for r in layers.values()), (run, layers)
        assert all(r.any() for r in layers.values()), f"{run}: the inputs should make every layer fire"
    assert all(torch.equal(records["original"][name], records[run][name]) for run in records for name in records["original"])


def test_spike_comparisons_count_the_same_on_bool_and_float_records():
    """compare_tensors on bool records (spike_record) reports what it reports on the same spikes
    as floats: mismatches, float ties, differences after a tie, agreement, error, pass; the
    ties and later differences it counts from near-threshold positions are the ones of the
    dense masks."""
    from psu_export.verify import NearThreshold, compare_tensors

    gen = torch.Generator().manual_seed(0)
    seen = []
    for case in range(20):
        ref = (torch.rand(50, 3, 7, generator=gen) < 0.3).float()
        flips = torch.rand(ref.shape, generator=gen) < 0.02 * (case % 4)
        got = torch.where(flips, 1 - ref, ref)
        mask = torch.rand(ref.shape, generator=gen) < (0.5 if case % 2 else 0.0)
        as_floats = compare_tensors("layer", ref, got, True, NearThreshold.of_mask(mask))
        as_bools = compare_tensors("layer", ref.bool(), got.bool(), True, NearThreshold.of_mask(mask))
        assert as_floats == as_bools, case
        # the counts on dense masks: ties, and each neuron's differences after its first tie
        differ = ref != got
        ties = differ & mask
        first_tie = torch.where(ties.any(0), ties.to(torch.uint8).argmax(0), ref.shape[0])
        after = (torch.arange(ref.shape[0]).view(-1, 1, 1) > first_tie) & differ & ~ties
        assert (as_bools.float_ties, as_bools.after_tie) == (int(ties.sum()), int(after.sum())), case
        seen.append(as_bools)
    # the cases reach every count and both verdicts
    assert {c.passed for c in seen} == {True, False} and any(c.float_ties and c.after_tie for c in seen)


def test_the_near_threshold_positions_are_the_same_in_chunks(monkeypatch):
    """verify's near-threshold positions, computed a chunk of steps at a time, are the formula's on
    the whole sequence (chunks of 3 steps over 10: a short last chunk); per-neuron thresholds."""
    from psu_export import verify

    gen = torch.Generator().manual_seed(1)
    threshold = torch.tensor([0.5, 1.0, 2.0])
    v = threshold + (torch.rand(10, 4, 3, generator=gen) - 0.5) * 4e-4
    whole = (v - threshold).abs() <= verify.TIE_RTOL * torch.clamp(threshold.abs(), min=1.0)
    monkeypatch.setattr(verify, "CHUNK_STEPS", 3)
    assert whole.any() and not whole.all()
    near = verify.near_threshold(v, threshold)
    assert near.shape == (10, 4, 3) and torch.equal(near.positions, whole.flatten().nonzero().squeeze(1))


#: (model, input shape, batch-first, whether the rewrite can run it in chunks of steps)
CHUNK_CASES = {
    "snntorch-leaky": ("snn_models:leaky_loop", (12,), False, True),
    "snntorch-synaptic": ("snn_models:synaptic_loop", (12,), False, True),  # two states carried
    "snntorch-per-channel": ("snn_models:per_channel_beta", (12,), False, True),
    "snntorch-batch-first": ("snn_models:batch_first_loop", (12,), True, True),
    "reset-free-closed-form": ("psu_export.models.ref_mlp:make_small_reset_free_net", (64,), False, True),
    "norse-cells": ("psu_export.models.ref_norse:make_cell_loop", (16,), False, True),
    "spikingjelly-single-step": ("psu_export.models.ref_spikingjelly:make_single_step_loop", (16,), False, True),
    "running-sum": ("snn_models:counting", (12,), False, False),  # ``count = count + spk``: an accumulator
    "reshaped-before-loop": ("snn_models:reshaped_input", (3, 4), False, False),
    "firing-rate-over-T": ("snn_models:iterated_loop", (12,), False, False),  # count / x.shape[0] after the loop
}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_the_rewrite_run_in_chunks_of_steps_is_the_whole_run(case):
    """ParallelModel.run_in_chunks carries each layer's state from chunk to chunk: the outputs
    are the whole run's bit for bit, at chunk sizes that do and do not divide T (and the whole
    run where the model is not chunkable); the site observer sees every chunk in order."""
    from psu_export.pipeline import prepare

    spec, shape, batch_first, chunkable = CHUNK_CASES[case]
    module, _, factory = spec.partition(":")
    if module.startswith("psu_export.models.ref_norse"):
        pytest.importorskip("norse.torch")
    if module.startswith("psu_export.models.ref_spikingjelly"):
        pytest.importorskip("spikingjelly")
    if module == "snn_models":
        import snn_models

        model = getattr(snn_models, factory)(*(["zeros"] if factory == "counting" else []))
        conversion = prepare(model, input_shape=shape, time_steps=12, batch_first=batch_first)
    else:
        conversion = prepare(spec, input_shape=shape, time_steps=12)
    parallel = conversion.parallel
    assert parallel.chunkable == chunkable
    steps = 150
    x = conversion.inputs(batch=2, time_steps=steps).x
    calls = []
    parallel.site_observer = lambda index, cur, params, outputs: calls.append((index, cur.shape[0]))
    with torch.no_grad():
        whole = parallel(x)
        for chunk in (7, 64, 149):
            calls.clear()
            got = parallel.run_in_chunks(x, chunk)
            assert all(torch.equal(a, b) for a, b in zip(tree_leaves(whole), tree_leaves(got))), (case, chunk)
            per_site = [[n for i, n in calls if i == site] for site in range(len(parallel.sites))]
            expected = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else []) if chunkable else [steps]
            assert per_site == [expected] * len(parallel.sites), (case, chunk, per_site)
    parallel.site_observer = None


def test_verify_counts_the_same_in_chunks_of_steps(monkeypatch, tmp_path):
    """verify runs the rewrite in chunks of CHUNK_STEPS: its report and the near-threshold
    positions its comparisons get (joined from the chunks') are the whole run's.  A wide tie
    tolerance here makes those positions many."""
    from psu_export import pipeline, verify

    conversion = pipeline.prepare("psu_export.models.ref_mlp:make_small_net", input_shape=(64,), time_steps=12)
    path = conversion.export(tmp_path / "m.onnx").path
    inputs = conversion.inputs(batch=3, time_steps=400)
    monkeypatch.setattr(verify, "TIE_RTOL", 0.05)
    compared = pipeline.compare_tensors
    runs = []

    def recording(name, ref, got, time_first, near=None):
        runs[-1]["near"].append(None if near is None else (name, near.shape, near.positions))
        return compared(name, ref, got, time_first, near)

    monkeypatch.setattr(pipeline, "compare_tensors", recording)
    for chunk in (10_000, 33):
        monkeypatch.setattr(verify, "CHUNK_STEPS", chunk)
        runs.append({"near": []})
        runs[-1]["rewrite"], (runs[-1]["onnxruntime"],) = conversion._compare(path, inputs, ("cpu",))
    whole, chunked = runs
    assert chunked["rewrite"].layers == whole["rewrite"].layers and chunked["rewrite"].outputs == whole["rewrite"].outputs
    assert chunked["onnxruntime"].layers == whole["onnxruntime"].layers
    assert chunked["onnxruntime"].export_layers == whole["onnxruntime"].export_layers
    assert whole["rewrite"].passed and whole["onnxruntime"].passed
    near = [n for n in whole["near"] if n is not None]
    assert len(near) == 6 and all(n[1][0] == 400 and n[2].numel() > 100 for n in near)  # two layers, three comparisons each
    assert all(a is b is None or (a[:2] == b[:2] and torch.equal(a[2], b[2])) for a, b in zip(whole["near"], chunked["near"], strict=True))


def test_a_long_sequence_runs_once_on_one_sample_and_exports_from_a_short_example(monkeypatch, tmp_path):
    """Past 16 steps ``prepare`` runs the model at full length once, on one sample (the
    probe's confirming run, whose input set ``convert --no-verify``'s peak memory: 1.39 GB at
    batch 3 for the suite's MLP at T = 100,000, 0.73 GB at batch 1), and the export traces
    a 16-step example; the file is the one a full-length example gives."""
    from psu_export import capture, pipeline
    from psu_export.emit import export_onnx

    shapes = []
    example = capture.InputLayout.example

    def recorded(self, batch, time_steps=None, generator=None):
        x = example(self, batch, time_steps, generator)
        shapes.append(tuple(x.shape))
        return x

    monkeypatch.setattr(capture.InputLayout, "example", recorded)
    conversion = pipeline.prepare("psu_export.models.ref_mlp:make_small_net", input_shape=(64,), time_steps=200)
    assert [s for s in shapes if s[0] >= 200] == [(200, 1, 64)], shapes
    conversion.export(tmp_path / "short.onnx")
    assert shapes[-1] == (pipeline.EXPORT_EXAMPLE_STEPS, 2, 64)
    export_onnx(conversion.parallel, torch.rand(200, 2, 64), tmp_path / "full.onnx", {}, conversion.captured.dynamic_batch)
    short, full = (onnx.load(str(tmp_path / name)) for name in ("short.onnx", "full.onnx"))
    assert short.graph.SerializeToString() == full.graph.SerializeToString()
    assert [f.SerializeToString() for f in short.functions] == [f.SerializeToString() for f in full.functions]
