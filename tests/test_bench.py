"""The benchmark harness: one smoke run end to end, outputs, and a clean CUDA skip."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

SMALL = "psu_export.models.ref_mlp:make_small_net"


@pytest.fixture(scope="module")
def smoke():
    from psu_export.bench import run_benchmark

    return run_benchmark(SMALL, (64,), time_steps=(8, 24), batches=(1,), min_runs=1, max_runs=2, cell_budget_s=0.0)


def test_smoke_run_measures_every_variant(smoke):
    assert not smoke.get("skipped")
    assert [(c["time_steps"], c["batch"]) for c in smoke["cells"]] == [(8, 1), (24, 1)]
    for cell in smoke["cells"]:
        assert {"eager", "naive", "psu", "bound"} <= set(cell["times_ms"])
        assert cell["spike_agreement_psu_vs_naive"] == 1.0  # exact mode: identical spikes
        assert cell["speedup_vs_naive"] > 0 and cell["psu_over_bound"] > 0
        t = cell["times_ms"]
        assert cell["ceiling_vs_naive"] == pytest.approx(t["naive"] / t["bound"], rel=1e-2)
    assert all(site["algorithm"] for sites in smoke["algorithms"].values() for site in sites)


def test_reset_mode_variants_are_converted_in_their_mode(smoke):
    """psu-psu / psu-stochastic time the --reset psu / stochastic conversions, not the exact file relabelled."""
    algorithms = {variant: {s["algorithm"] for s in sites} for variant, sites in smoke["algorithms"].items()}
    assert algorithms["psu@T=8"] == {"scan"}
    assert algorithms["psu-psu@T=8"] == {"probabilistic_reset"}
    assert algorithms["psu-stochastic@T=8"] == {"stochastic_reset"}


def test_report_names_each_layers_algorithm_once_per_choice(smoke):
    """Every variant's choice is in the report, one line per choice, with the T values it covers."""
    from psu_export.bench import markdown

    lines = [line for line in markdown([smoke]).splitlines() if line.startswith("- ")]
    assert len(lines) == 3, lines  # exact, psu, stochastic: the same layers at both T
    exact, psu, stochastic = lines
    assert exact.startswith("- psu: `lif1`, `lif2` (T=8, T=24): scan, subtract reset")
    assert psu.startswith("- psu-psu: `lif1`, `lif2` (T=8, T=24): probabilistic_reset, the spikes")
    assert stochastic.startswith("- psu-stochastic: `lif1`, `lif2` (T=8, T=24): stochastic_reset")


def test_a_mode_that_keeps_layers_exact_says_why_once():
    """A zero-reset layer: the approximate modes keep it exact and say why, once; the exact reason is on the exact line."""
    from psu_export.bench import markdown, site_record
    from psu_export.kernels import choose_algorithm
    from psu_export.spec import NeuronSpec

    zero = NeuronSpec(decay=0.9, threshold=1.0, reset="zero")
    exact = choose_algorithm(zero, 16).reason
    kept = choose_algorithm(zero, 16, "psu").mode_reason
    assert kept == choose_algorithm(zero, 16, "stochastic").mode_reason and "kept exact" in kept and exact not in kept
    algorithms = {f"{variant}@T={t}": [site_record(name, choose_algorithm(zero, t, mode)) for name in ("a", "b")]
                  for t in (16, 64) for variant, mode in (("psu", "exact"), ("psu-psu", "psu"), ("psu-stochastic", "stochastic"))}
    for variant in ("psu", "psu-psu", "psu-stochastic"):
        del algorithms[f"{variant}@T=64"][1]  # layer b only at T = 16
    result = {"model": "m", "input_shape": [4], "provider": "cpu", "cells": [], "exports": [], "algorithms": algorithms}
    lines = [line for line in markdown([result]).splitlines() if line.startswith("- ")]
    assert lines == [
        f"- psu: `a` (T=16, T=64), `b` (T=16): scan, {exact}",
        f"- psu-psu, psu-stochastic: `a` (T=16, T=64), `b` (T=16): scan, {kept}",
    ]


def test_a_speed_up_capped_by_the_bound_is_explained():
    """Only cells whose speed-up and ceiling are both below 1.5x get the explanation."""
    from psu_export.bench import markdown

    def cell(t, speedup, ceiling):
        return {"time_steps": t, "batch": 1, "times_ms": {"psu": 1.0}, "speedup_vs_naive": speedup, "speedup_vs_eager": None,
                "psu_over_bound": 1.0, "ceiling_vs_naive": ceiling, "runs": 3}

    result = {"model": "m", "input_shape": [4], "provider": "cpu", "exports": [], "algorithms": {},
              "cells": [cell(4, 1.06, 1.1), cell(64, 1.3, 1.31), cell(256, 1.4, 2.5), cell(512, 2.0, 1.2)]}
    (line,) = [line for line in markdown([result]).splitlines() if "`ceiling` is below" in line]
    assert "T=4 batch 1 (1.10x), T=64 batch 1 (1.31x):" in line and "T=256" not in line and "T=512" not in line
    result["cells"] = result["cells"][2:]
    assert "`ceiling` is below" not in markdown([result])


def test_node_count_of_ours_does_not_grow_with_time(smoke):
    ours = {e["time_steps"]: e["nodes"] for e in smoke["exports"] if e["variant"] == "psu"}
    naive = {e["time_steps"]: e["nodes"] for e in smoke["exports"] if e["variant"] == "naive"}
    assert ours[8] == ours[24]
    assert naive[24] > naive[8]


def test_reports_are_written(smoke, tmp_path):
    from psu_export.bench import write_results

    paths = write_results([smoke], tmp_path, "r")
    assert json.loads(paths["json"].read_text())[0]["model"] == SMALL
    text = paths["markdown"].read_text()
    assert "speed-up vs naive" in text and "ceiling vs naive" in text and "| 24 | 1 |" in text
    assert "plot" not in paths or paths["plot"].stat().st_size > 0


def test_a_baseline_that_does_not_export_is_reported_not_fatal(monkeypatch):
    """The naive export failing or a bound that cannot be built (both forced here) leaves the
    other variants measured and says why."""
    from psu_export import bench

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(bench, "_export_torchscript", fail)
    real_dynamo = bench._export_dynamo

    def dynamo_bound_only(module, example, path, dynamic_shapes):
        if "naive" in str(path):
            fail()
        return real_dynamo(module, example, path, dynamic_shapes)

    monkeypatch.setattr(bench, "_export_dynamo", dynamo_bound_only)
    result = bench.run_benchmark(SMALL, (64,), time_steps=(8,), batches=(1,), min_runs=1, max_runs=2, cell_budget_s=0.0, eager=False)
    assert "RuntimeError: unsupported operator" in result["baselines_unavailable"]["naive at T=8"]
    (cell,) = result["cells"]
    assert "naive" not in cell["times_ms"] and {"psu", "bound"} <= set(cell["times_ms"])
    assert cell["speedup_vs_naive"] is None and cell["spike_agreement_psu_vs_naive"] is None
    assert "no naive at T=8 baseline: torch.onnx.export failed" in bench.markdown([result])

    monkeypatch.setattr(bench, "_export_dynamo", real_dynamo)

    def no_bound(*args, **kwargs):
        raise RuntimeError("reads a neuron state the activation lacks")

    monkeypatch.setattr(bench, "bound_model", no_bound)
    result = bench.run_benchmark(SMALL, (64,), time_steps=(8,), batches=(1,), min_runs=1, max_runs=2, cell_budget_s=0.0, eager=False)
    assert "does not export (RuntimeError: reads a neuron state" in result["baselines_unavailable"]["bound"]
    (cell,) = result["cells"]
    assert "bound" not in cell["times_ms"] and cell["psu_over_bound"] is None and cell["ceiling_vs_naive"] is None
    assert cell["speedup_vs_naive"] > 0


def test_the_bound_calls_each_neuron_as_its_framework_does(tmp_path):
    """The activations keep the neurons' call conventions: a Norse loop reading ``s.v`` from
    the returned state and snnTorch's tutorial 7 net (``init_hidden``, ``output=True``
    returning ``(spk, mem)``) both get a bound."""
    pytest.importorskip("norse")
    pytest.importorskip("snntorch")
    import snn_models as M

    from psu_export import pipeline
    from psu_export.bench import export_bound

    for model, shape in (("psu_export.models.ref_norse:make_cell_loop", (16,)), (M.reset_each_call(), (1, 14, 14))):
        conv = pipeline.prepare(model, input_shape=shape, time_steps=4)
        assert export_bound(conv.loaded.module, conv.neurons, conv.layout, tmp_path / "bound.onnx") > 0


def test_a_static_input_model_is_benchmarked_at_its_own_time_steps():
    """snnTorch tutorial 5 style: one input [B, ...] fed for the model's own num_steps.

    The naive export gets a dynamic batch on axis 0 (batch 1 and 2 both run), the bound
    is reported as not defined, and a T other than the model's is refused with the fix.
    """
    import click
    from snn_models import IN, StaticLoop

    from psu_export.bench import run_benchmark

    model, steps = "snn_models:static_loop", StaticLoop.num_steps
    result = run_benchmark(model, (IN,), time_steps=(steps,), batches=(1, 2), min_runs=1, max_runs=2, cell_budget_s=0.0, eager=False)
    assert [c["batch"] for c in result["cells"]] == [1, 2]
    for cell in result["cells"]:
        assert {"naive", "psu"} <= set(cell["times_ms"]) and cell["spike_agreement_psu_vs_naive"] == 1.0
    assert "its own loop" in result["baselines_unavailable"]["bound"]
    with pytest.raises(click.UsageError, match=f"--time-steps {steps}"):
        run_benchmark(model, (IN,), time_steps=(steps + 1,), batches=(1,), min_runs=1, max_runs=1, cell_budget_s=0.0, eager=False)


def test_bound_model_is_the_network_with_activations():
    import torch

    from psu_export.bench import bound_model
    from psu_export.capture import find_neuron_modules
    from psu_export.models.ref_mlp import make_small_net

    net = make_small_net()
    bound = bound_model(net, find_neuron_modules(net), "sequence")
    x = torch.rand(5, 3, 64)
    spikes, mem = bound(x)
    with torch.no_grad():
        cur = net.fc2((net.fc1(x) > 1.0).float())
    assert torch.equal(mem, cur) and torch.equal(spikes, (cur > 1.0).float())


def test_bound_of_a_batch_first_model_keeps_its_layout(tmp_path):
    pytest.importorskip("snntorch")
    import torch
    from snn_models import IN, OUT, batch_first_loop

    from psu_export import pipeline
    from psu_export.bench import bound_model, export_bound

    net = batch_first_loop()
    conv = pipeline.prepare(net, input_shape=(IN,), time_steps=6)
    x = torch.rand(3, 5, IN)  # [B, T, ...]
    spikes, mem = bound_model(net, conv.neurons, "sequence", time_axis=1)(x)
    with torch.no_grad():
        cur = net.fc2((net.fc1(x) > 1.0).float())
    assert mem.shape == (3, 5, OUT) and torch.equal(mem, cur) and torch.equal(spikes, (cur > 1.0).float())
    assert export_bound(net, conv.neurons, conv.layout, tmp_path / "bound.onnx") > 0


def test_bound_of_a_model_that_reduces_over_time(tmp_path):
    """Norse's tutorial readout returns the max of its voltages over time: the bound (one
    folded step) has no time axis to unstack there, and keeps every sample's row."""
    pytest.importorskip("norse")
    import torch

    from psu_export import pipeline
    from psu_export.bench import bound_model, export_bound

    conv = pipeline.prepare("psu_export.models.ref_norse:make_li_readout", input_shape=(16,), time_steps=4)
    scores, voltages = bound_model(conv.loaded.module, conv.neurons, conv.layout.kind)(torch.rand(5, 3, 16))
    assert scores.shape == voltages.shape == (5, 3, 10)
    assert export_bound(conv.loaded.module, conv.neurons, conv.layout, tmp_path / "bound.onnx") > 0


def test_bound_of_a_model_returning_nested_states(tmp_path):
    """Norse's SequentialState returns (output, [state or None per module]): the bound
    unfolds the tensors among them and exports."""
    pytest.importorskip("norse")
    import torch

    from psu_export import pipeline
    from psu_export.bench import bound_model, export_bound

    conv = pipeline.prepare("psu_export.models.ref_norse:make_lif_sequence", input_shape=(16,), time_steps=4)
    out = bound_model(conv.loaded.module, conv.neurons, conv.layout.kind)(torch.rand(5, 3, 16))
    assert out[0].shape == (5, 3, 10)
    assert export_bound(conv.loaded.module, conv.neurons, conv.layout, tmp_path / "bound.onnx") > 0


def test_no_bound_for_hand_written_neurons_with_the_reason(tmp_path):
    from pathlib import Path

    from psu_export.bench import BaselineExportError, export_bound
    from psu_export.pipeline import prepare

    models = Path(__file__).resolve().parent / "handwritten_models.py"
    conv = prepare(f"{models}:make_mlp", input_shape=(8,), time_steps=6)
    with pytest.raises(BaselineExportError, match="hand-written loops"):
        export_bound(conv.loaded.module, conv.neurons, conv.layout, tmp_path / "bound.onnx")
    assert not (tmp_path / "bound.onnx").exists()


def test_cuda_is_skipped_cleanly_when_unavailable():
    from psu_export.bench import provider_available, run_benchmark

    if provider_available("cuda"):
        pytest.skip("a CUDA provider is available here")
    result = run_benchmark(SMALL, (64,), provider="cuda")
    assert "not available" in result["skipped"]


def test_cli_bench_help_and_cuda_skip():
    from psu_export.bench import provider_available
    from psu_export.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["bench", "--help"])
    assert out.exit_code == 0 and "Example" in out.output
    if not provider_available("cuda"):
        out = runner.invoke(cli, ["bench", SMALL, "--input-shape", "64", "--provider", "cuda", "--quick"])
        assert out.exit_code == 0, out.output
        assert "skipped" in out.output


def test_a_multi_step_model_repeating_its_input_has_a_bound():
    """SpikingJelly's tutorial CSNN repeats one image over its own T: its layers run over
    all steps at once already, so the bound is the model with activations, fed the image."""
    pytest.importorskip("spikingjelly.activation_based.neuron")
    from psu_export.bench import run_benchmark

    model = "psu_export.models.ref_spikingjelly:make_repeating_csnn"
    result = run_benchmark(model, (1, 28, 28), time_steps=(4,), batches=(1, 2), min_runs=1, max_runs=2, cell_budget_s=0.0, eager=False)
    assert "bound" not in result.get("baselines_unavailable", {})
    for cell in result["cells"]:
        assert {"naive", "psu", "bound"} <= set(cell["times_ms"]) and cell["spike_agreement_psu_vs_naive"] == 1.0


def test_cli_bench_reuses_a_cached_naive_export(tmp_path):
    """``--cache``: the second run reads the naive export the first wrote.

    Run in subprocesses: the CLI gives the process one onnxruntime thread pool, after which
    every session of that process must use it (a session with its own pool fails).
    """
    import subprocess
    import sys

    args = [sys.executable, "-m", "psu_export.cli", "bench", SMALL, "--input-shape", "64", "--time-steps", "8", "--batch", "1",
            "--quick", "--no-eager", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]

    def naive_export():
        run = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        (naive,) = [e for e in json.loads((tmp_path / "out" / "bench.json").read_text())[0]["exports"] if e["variant"] == "naive"]
        return naive, run.stderr

    first, _ = naive_export()
    (cached,) = (tmp_path / "cache").glob("naive_ref_mlp_make_small_net_T8_*.onnx")
    second, progress = naive_export()
    assert first["cached"] is False and second["cached"] is True
    assert f"naive export from the cache {cached}" in progress
    assert second["export_s"] == first["export_s"]  # the time measured when it was exported


def test_the_cache_key_follows_a_model_files_contents(tmp_path):
    from psu_export.bench import naive_cache_path

    model = tmp_path / "net.pt"
    model.write_bytes(b"one")
    first = naive_cache_path(tmp_path / "cache", str(model), None, (4,), 16)
    assert first.name.startswith("naive_net_T16_")
    model.write_bytes(b"two, longer")
    assert naive_cache_path(tmp_path / "cache", str(model), None, (4,), 16) != first
    assert naive_cache_path(tmp_path / "cache", str(model), None, (4,), 32) != naive_cache_path(tmp_path / "cache", str(model), None, (4,), 16)


def test_the_cuda_algorithms_experiment_dry_runs_on_cpu(tmp_path):
    """``benchmarks/cuda_algorithms.py`` runs only on lent GPU machines; its CPU dry run keeps
    it working here: every variant is timed, and the files that must compute the same floats
    as the ``Scan`` build (without row blocks, unrolled layer by layer) do."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_algorithms.py"
    common = ["--time-steps", "4", "--models", "mlp"]
    subprocess.run([sys.executable, script, "prepare", tmp_path / "models", *common, "--cache", ""], check=True, capture_output=True)
    subprocess.run([sys.executable, script, "run", tmp_path / "models", *common, "--batch", "2", "--rounds", "2", "--provider", "cpu",
                    "--out", tmp_path / "out"], check=True, capture_output=True)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "cpu_algorithms.json").read_text())["rows"]}
    has_blocks = {name: any(n.op_type == "If" for n in onnx.load(tmp_path / "models" / f"mlp_{name}_T4.onnx").graph.node)
                  for name in ("scan", "scan-one-product")}
    assert has_blocks == {"scan": True, "scan-one-product": False}  # the 784 x 1000 product's row blocks, and without them
    assert set(rows) == {"naive", "scan", "scan-one-product", "psu", "unrolled", "unrolled-layers"}
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows["scan-one-product"]["bit_identical_to_scan"] and rows["unrolled-layers"]["bit_identical_to_scan"]
    bad = subprocess.run([sys.executable, script, "run", tmp_path / "models", "--models", "mlp,vgg"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model(s) vgg" in bad.stderr
