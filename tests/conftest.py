"""Shared helpers: convert a model through the real pipeline and run the ONNX file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch


#: runs a command and prints the peak RSS of its process tree's largest process (kB)
PEAK_RSS = r"""
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def convert_within_2gb(tmp_path, spec: str, out, *options: str) -> dict:
    """``psu-export convert spec out --time-steps 100000 *options``, its parity check included:
    the parity report, after checking that it succeeded with a peak RSS under 2 GB."""
    report_path = tmp_path / "parity.json"
    command = [sys.executable, "-m", "psu_export.cli", "convert", spec, str(out), "--time-steps", "100000", *options, "--report", str(report_path)]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = int(proc.stdout.strip().splitlines()[-1]) / 1024
    print(f"{spec}: psu-export convert at T=100000 peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 2048, f"psu-export convert peak RSS {peak_mb:.0f} MB"
    return json.loads(report_path.read_text())


def run_onnx(path, x: torch.Tensor, provider: str = "CPUExecutionProvider", disabled_optimizers=None) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[provider], disabled_optimizers=disabled_optimizers)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def reference_outputs(model: torch.nn.Module, x: torch.Tensor, kind: str, time_axis: int = 0) -> tuple[torch.Tensor, ...]:
    """The framework's own sequential run (fresh state), outputs as a tuple (``time_axis`` 1: batch-first)."""
    from psu_export.capture import StepDriver, find_neuron_modules, reset_neurons

    neurons = find_neuron_modules(model)
    reset_neurons(neurons)
    with torch.no_grad():
        out = StepDriver(model, time_axis)(x) if kind == "step" else model(x)
    reset_neurons(neurons)
    return out if isinstance(out, tuple) else (out,)


@pytest.fixture
def convert(tmp_path):
    """convert(factory_spec, shape, T) -> (Conversion, onnx path)."""

    def _convert(model_spec: str, input_shape, time_steps: int, **kwargs):
        from psu_export.pipeline import prepare

        conversion = prepare(model_spec, input_shape=tuple(input_shape), time_steps=time_steps, **kwargs)
        path = tmp_path / "model.onnx"
        conversion.export(path)
        return conversion, path

    return _convert


def assert_static_build_matches(path, static_path, x: torch.Tensor, same_floats: bool = True) -> None:
    """A ``--cuda-graph`` build computes the same floats as the dynamic file (onnxruntime CPU),
    and is what CUDA graphs take: no control flow, static shapes, no Concat over 32 inputs.

    Both run without onnxruntime's ``MatMulAddFusion``: it fuses a product and its bias
    into one ``Gemm`` only where shapes are static (the static build), which rounds the
    bias in differently; compared are the graphs' operations, not that choice.

    ``same_floats`` False (a closed-form layer, whose T x T kernel the build folds to a
    constant): the spikes (first output) are the same, other outputs within float rounding.
    """
    import onnx

    from psu_export.cuda_graph import CONTROL_FLOW
    from psu_export.wavefront import CONCAT_MAX_INPUTS

    model = onnx.load(str(static_path))
    ops = [n.op_type for n in model.graph.node]
    assert not set(ops) & set(CONTROL_FLOW), sorted(set(ops) & set(CONTROL_FLOW))
    assert max((len(n.input) for n in model.graph.node if n.op_type == "Concat"), default=0) <= CONCAT_MAX_INPUTS
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims and all(d.HasField("dim_value") for d in dims), f"{value.name} is not static: {dims}"
    unfused = ["MatMulAddFusion"]
    want, got = run_onnx(path, x, disabled_optimizers=unfused), run_onnx(static_path, x, disabled_optimizers=unfused)
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.shape == g.shape
        if same_floats or i == 0:
            assert np.array_equal(w, g), f"output {i}: {int((w != g).sum())} of {w.size} values differ"
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def pytest_collection_modifyitems(config, items):
    """The order in which pytest-xdist hands out whole files (``scripts/test.sh``: ``--dist
    loadfile --no-loadscope-reorder``; by default it orders them by their number of tests,
    which put ``test_wide_mlp_100k.py``, one test of 4-7 minutes, among the last): the files
    with slow tests first, then the others, each group by its number of tests, largest
    first; each file's tests together and in order.  A worker takes its next file when
    fewer than three of its tests are left, so a one-test file draws the next one onto its
    worker at once: the one-test slow file goes after the slow files with many tests,
    rather than first with ``test_long_sequences.py`` queued behind it."""
    counts = Counter(item.path for item in items)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow_files, -counts[item.path]))
