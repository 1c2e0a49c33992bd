"""``convert --cuda-graph``: a static build that onnxruntime's CUDA graphs take, with the
floats of the default build.  Every reference model is also built this way in
``test_meta.py``; here: the T that need the Concat tree, the closed form's ``If``, the
probabilistic reset's idle ``Loop``, the CLI, and (with a GPU) the CUDA-graph replay."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import assert_static_build_matches, run_onnx

pytest.importorskip("snntorch")

from psu_export.cuda_graph import fold_spike_arithmetic, unroll_scans  # noqa: E402
from psu_export.errors import UsageError  # noqa: E402
from psu_export.ops.builders import CHUNKED_SCAN_MIN_ELEMENTS, LOOP_FREE_STEPS  # noqa: E402
from psu_export.runtime import GraphRunner, make_session, provider_available  # noqa: E402
from test_cli_errors import run  # noqa: E402

SMALL = "psu_export.models.ref_mlp:make_small_net"
RESET_FREE = "psu_export.models.ref_mlp:make_small_reset_free_net"


def _x(steps: int, batch: int) -> torch.Tensor:
    return (torch.rand(steps, batch, 64, generator=torch.Generator().manual_seed(steps)) < 0.4).float()


@pytest.mark.parametrize("spec, steps, algorithm", [(SMALL, 70, "scan"), (RESET_FREE, 40, "closed_form")])
def test_static_build_matches_the_default_build(convert, tmp_path, spec, steps, algorithm):
    """70 steps: 70 per-step outputs stacked by a Concat tree (at most 32 inputs each);
    the reset-free layers' run-time choice of closed form (If on T) folds to one branch.
    The build folds the closed form's T x T kernel (powers of the decay) to a constant,
    computed by numpy, not onnxruntime: membranes may differ in the last bit."""
    conversion, path = convert(spec, (64,), steps)
    assert {s.algorithm.name for s in conversion.sites} == {algorithm}
    static = tmp_path / "static.onnx"
    conversion.export(static, batch=3, cuda_graph=True)
    x = _x(steps, 3)
    assert_static_build_matches(path, static, x, same_floats=algorithm == "scan")
    assert run_onnx(static, x)[0].sum() > 0, "the test input should make the network fire"
    if algorithm == "scan":
        ops = [n.op_type for n in onnx.load(str(static)).graph.node]
        # the two layers' steps run in waves of 10 (psu_export.wavefront): T + 10 steps, not 2 T
        assert ops.count("Greater") == steps + 10
        # snnTorch's subtract reset: a Sum a step (fold_spike_arithmetic), but where a
        # layer starts and where the waves' states are concatenated or split; no per-step Cast
        assert ops.count("Sum") == ops.count("Greater") - 3 and ops.count("Cast") < steps // 4


class _LeakyChain(torch.nn.Module):
    """A 64-48-32-16-10 snnTorch net (as many layers as ``resets``) whose layers decay and
    fire at different values (or at ``thresholds``), with the given reset mechanisms."""

    def __init__(self, steps: int, resets: tuple[str, ...], thresholds=(0.5, 0.75, 0.25, 1.5)):
        import snntorch as snn

        super().__init__()
        torch.manual_seed(0)
        self.steps = steps
        widths = [64, 48, 32, 16, 10][:len(resets) + 1]
        widths[-1] = 10
        self.fc = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.lif = torch.nn.ModuleList(snn.Leaky(beta=b, threshold=t, reset_mechanism=r)
                                       for b, t, r in zip([0.9, 0.8, 0.95, 0.85], thresholds, resets))
        for fc in self.fc:  # strong enough for every layer to fire
            torch.nn.init.uniform_(fc.weight, -2 / fc.in_features**0.5, 2 / fc.in_features**0.5)
            torch.nn.init.uniform_(fc.bias, 0.0, 0.2)

    def forward(self, x):
        mems = [lif.init_leaky() for lif in self.lif]
        out = []
        for t in range(self.steps):
            h = x[t]
            for k, (fc, lif) in enumerate(zip(self.fc, self.lif)):
                h, mems[k] = lif(fc(h), mems[k])
            out.append(h)
        return torch.stack(out)


_TWO_WAVES = "2 chained layers ({}, {} neurons) in waves of 8 steps: 56 steps instead of 96"


@pytest.mark.parametrize("resets, thresholds, waves, steps_run", [
    (("subtract",) * 3, (0.5, 0.75, 0.25), ["3 chained layers (48, 32, 10 neurons) in waves of 6 steps: 60 steps instead of 144"], 48 + 2 * 6),
    (("subtract", "subtract", "zero"), (0.5, 0.75, 0.25), [_TWO_WAVES.format(48, 32)], 56 + 48),
    (("subtract", "subtract", "zero", "zero"), (0.5, 0.75, 1.5, 1.5), [_TWO_WAVES.format(48, 32), _TWO_WAVES.format(16, 10)], 56 + 56),
    (("subtract", "subtract", "zero", "zero"), (0.5, 0.75, 0.25, 1.5), [_TWO_WAVES.format(48, 32)], 56 + 2 * 48),
])
def test_chained_layers_run_in_waves_with_the_same_bits(tmp_path, resets, thresholds, waves, steps_run):
    """Chained layers with their own decays and thresholds (one value per neuron in the
    merged step) take ``T + (D - 1) C`` steps in the static build, not ``D T``, with the
    default build's floats; layers with another step (a zero reset) run on their own or
    in a run of their own.  A zero reset tests its one threshold as a constant
    (``ThresholdedRelu``'s attribute), so zero-reset layers share a run only when their
    thresholds are equal."""
    from psu_export.pipeline import prepare

    steps = 48
    conversion = prepare(_LeakyChain(steps, resets, thresholds), input_shape=(64,), time_steps=steps)
    path, static = tmp_path / "model.onnx", tmp_path / "static.onnx"
    conversion.export(path)
    assert conversion.export(static, batch=2, cuda_graph=True).waves == waves
    x = _x(steps, 2)
    assert_static_build_matches(path, static, x)
    rate = float(run_onnx(static, x)[0].mean())
    assert 0 < rate < 1, f"the output layer should fire, not always (rate {rate})"
    ops = [n.op_type for n in onnx.load(str(static)).graph.node]
    assert ops.count("Greater") == steps_run


def test_convolution_layers_run_in_waves_with_the_same_bits(convert, tmp_path):
    """The reference conv net's three layers (convolutions and pooling between them over
    ``[T*B, ...]``, each ``Reshape``'s time entry rewritten per chunk; steps of different
    shapes flattened to ``[B, neurons]``) in one run: the same floats as its layers one
    after the other."""
    from psu_export.cuda_graph import static_build

    steps, batch = 16, 2
    conversion, path = convert("psu_export.models.ref_convnet:make_net", (1, 28, 28), steps)
    model = onnx.load(str(path))
    shape = (steps, batch, 1, 28, 28)
    waves, layers = static_build(model, shape, {}), static_build(model, shape, {}, waves=False)
    schedule = json.loads(next(e.value for e in waves.metadata_props if e.key == "psu_export.waves"))
    assert schedule == ["3 chained layers (1728, 1024, 10 neurons) in waves of 4 steps: 24 steps instead of 48"]
    assert [n.op_type for n in waves.graph.node].count("Greater") == 24
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    paths = [tmp_path / "waves.onnx", tmp_path / "layers.onnx"]
    for m, p in zip((waves, layers), paths):
        onnx.save(m, str(p))
    got, want = (run_onnx(p, x) for p in paths)
    assert got[0].sum() > 0, "the test input should make the network fire"
    for g, w in zip(got, want):
        assert np.array_equal(g, w), f"{int((g != w).sum())} of {g.size} values differ"


def _reset_scan(reset: str, threshold: np.ndarray, steps: int, shape: tuple) -> onnx.ModelProto:
    """One neuron layer as the exact ``Scan`` runs it, spikes and membranes stacked.

    ``subtract``: snnTorch's step, ``v = (decay * v + x) - r`` with ``r = Cast(v > threshold)
    [* threshold]`` carried to the next step.  ``zero``: SpikingJelly's IF hard reset,
    ``h = v + x``, ``s = Cast(h >= threshold)``, ``v = (1 - s) * h``.
    """
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    identity = bool(np.all(threshold == 1.0))

    def times_threshold(fired, out):
        return helper.make_node("Identity", [fired], [out]) if identity else helper.make_node("Mul", [fired, "th"], [out])

    if reset == "subtract":
        body = [helper.make_node("Mul", ["decay", "v"], ["m"]), helper.make_node("Add", ["m", "x"], ["a"]),
                helper.make_node("Sub", ["a", "r"], ["v_next"]), helper.make_node("Greater", ["v_next", "th"], ["test"]),
                helper.make_node("Cast", ["test"], ["fired"], to=f), times_threshold("fired", "r_next")]
        outer = [helper.make_node("Greater", ["v0", "th"], ["test0"]), helper.make_node("Cast", ["test0"], ["fired0"], to=f),
                 times_threshold("fired0", "r0")]
    else:
        body = [helper.make_node("Add", ["v", "x"], ["h"]), helper.make_node("GreaterOrEqual", ["h", "th"], ["test"]),
                helper.make_node("Cast", ["test"], ["fired"], to=f), helper.make_node("Sub", ["one", "fired"], ["kept"]),
                helper.make_node("Mul", ["kept", "h"], ["v_next"]), helper.make_node("Identity", ["fired"], ["r_next"])]
        outer = [helper.make_node("Identity", ["v0"], ["r0"])]  # the carried r is unused by this step
    body += [helper.make_node("Identity", ["fired"], ["spike"]), helper.make_node("Identity", ["v_next"], ["v_out"])]
    value = lambda name: helper.make_tensor_value_info(name, f, None)  # noqa: E731
    step = helper.make_graph(body, "step", [value("v"), value("r"), value("x")], [value(n) for n in ("v_next", "r_next", "spike", "v_out")])
    outer.append(helper.make_node("Scan", ["v0", "r0", "X"], ["v_last", "r_last", "spikes", "membrane"], num_scan_inputs=1, body=step))
    constants = [numpy_helper.from_array(np.array(0.95, np.float32), "decay"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                 numpy_helper.from_array(threshold.astype(np.float32), "th"),
                 numpy_helper.from_array(np.array([[1.5, -0.0, 0.5, np.nan]] * shape[0], np.float32)[:, : shape[1]], "v0")]
    graph = helper.make_graph(outer, "layer", [helper.make_tensor_value_info("X", f, [steps, *shape])],
                              [value("spikes"), value("membrane")], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("threshold", [np.array(1.0), np.array(0.75), np.array(-0.5), np.array([1.0, -0.0, 0.25, np.inf])],
                         ids=["one", "0.75", "negative", "per-neuron"])
def test_spike_arithmetic_folds_with_the_same_bits(reset, threshold):
    """The static build's :func:`fold_spike_arithmetic` gives the scan's bits: snnTorch's
    ``(m + x) - r`` as ``Sum(m, x, Where(test, -threshold, -(0 * threshold)))``, the hard
    reset's ``(1 - spike) * h`` as ``Where(test, +0, 1) * h``; -0 and +0 membranes (a
    negative threshold makes ``0 * threshold`` -0), infinities (``0 * inf``), NaN and huge
    values included; the spikes are cast once after stacking, none a step."""
    steps, shape = 40, (3, 4)
    scan = _reset_scan(reset, threshold, steps, shape)
    folded = unroll_scans(onnx.ModelProto.FromString(scan.SerializeToString()))
    assert fold_spike_arithmetic(folded) >= steps  # every step's reset
    ops = [n.op_type for n in folded.graph.node]
    assert "Sub" not in ops and ops.count("Cast") <= 2  # the initial test's and the stacked spikes'
    x = np.random.default_rng(0).normal(0.3, 0.8, (steps, *shape)).astype(np.float32)
    x[:2, :, 1] = -0.0  # with v0's -0: zero membranes
    x[3] = -0.0
    x[5, 0] = [np.inf, -np.inf, np.nan, 1e38]
    x[6, 1] = [-1e38, 1e-40, -1e-40, 0.0]
    x[9:12, 2] = -0.0
    want = make_session(scan.SerializeToString(), "cpu").run(None, {"X": x})
    got = make_session(folded.SerializeToString(), "cpu").run(None, {"X": x})
    for w, g in zip(want, got):  # bit for bit (signed zeros included); NaN payloads may differ
        same_bits = np.array_equal(w.view(np.uint32), g.view(np.uint32))
        assert same_bits or (np.array_equal(w, g, equal_nan=True) and np.array_equal(np.signbit(w), np.signbit(g)))
    assert want[0].sum() > 0 and (bool((want[1] == 0).any()) or bool((threshold < 0).any()))


def test_probabilistic_reset_builds_without_loops(convert, tmp_path):
    """--reset psu: the doubling levels past 256 steps (past 2,048 where a layer's run has
    CHUNKED_SCAN_MIN_ELEMENTS elements, so its recurrences run in chunks) are a Loop, idle
    below (dropped), refused beyond, without leaving a file."""
    assert LOOP_FREE_STEPS == 2048 and CHUNKED_SCAN_MIN_ELEMENTS == 16_384
    # 16 x 2 x 128 and x 10 elements: both layers scan by doubling; 300 x 64 x 10 and more:
    # in chunks (38 chunk ends)
    for steps, batch in ((16, 2), (300, 64)):
        conversion, path = convert(SMALL, (64,), steps, mode="psu")
        static = tmp_path / f"static{steps}.onnx"
        conversion.export(static, batch=batch, cuda_graph=True)
        assert_static_build_matches(path, static, _x(steps, batch))
    for steps, batch in ((300, 1), (LOOP_FREE_STEPS + 1, 64)):  # the read-out's 300 x 10 elements: doubling
        long_run, _ = convert(SMALL, (64,), steps, mode="psu")
        with pytest.raises(UsageError, match="past 256 steps in a Loop"):
            long_run.export(tmp_path / "long.onnx", batch=batch, cuda_graph=True)
        assert not (tmp_path / "long.onnx").exists()


def test_a_model_captured_at_a_fixed_batch_builds_at_that_batch_only(convert, tmp_path):
    conversion, _ = convert(SMALL, (64,), 8)
    conversion.captured.dynamic_batch = False  # as when torch.export could not keep the batch symbolic
    with pytest.raises(UsageError, match="--batch 2"):
        conversion.export(tmp_path / "static.onnx", batch=1, cuda_graph=True)
    assert not (tmp_path / "static.onnx").exists()


def test_graph_runner_binding_returns_what_session_run_returns(convert, tmp_path):
    """The IOBinding path of GraphRunner (on CPU buffers here; CUDA graphs need a GPU)."""
    conversion, _ = convert(SMALL, (64,), 12)
    static = tmp_path / "static.onnx"
    conversion.export(static, batch=2, cuda_graph=True)
    session = make_session(str(static), "cpu")
    first, second = _x(12, 2).numpy(), (_x(13, 2)[:12] * 2).numpy()
    runner = GraphRunner(session, first, device="cpu")
    runner.clear_outputs()
    assert np.isnan(runner.outputs[1].numpy()).all()
    for x in (first, second):
        want = session.run(None, {session.get_inputs()[0].name: x})
        got = runner.run(x)
        assert all(np.array_equal(w, g) for w, g in zip(want, got))


def test_cli_convert_and_verify_a_static_build(tmp_path):
    out = tmp_path / "net.onnx"
    code, text = run("convert", SMALL, out, "--input-shape", "64", "--time-steps", "10", "--cuda-graph", "--batch", "3")
    assert code == 0, text
    assert "static build for CUDA graphs, input [10, 3, 64]" in text and "static --cuda-graph build" in text
    assert "2 chained layers (128, 10 neurons) in waves of 5 steps: 15 steps instead of 20" in " ".join(text.split())
    # verify reads batch and T from the file; other values are usage errors (exit 2)
    assert run("verify", SMALL, out, "--input-shape", "64", "--time-steps", "10", "--provider", "cpu")[0] == 0
    code, text = run("verify", SMALL, out, "--input-shape", "64", "--time-steps", "10", "--batch", "5")
    assert code == 2 and "batch 3" in text
    code, text = run("verify", SMALL, out, "--input-shape", "64", "--time-steps", "12")
    assert code == 2 and "--time-steps 10" in text


def test_cli_batch_without_cuda_graph_is_a_usage_error(tmp_path):
    out = tmp_path / "net.onnx"
    code, text = run("convert", SMALL, out, "--input-shape", "64", "--time-steps", "10", "--batch", "3")
    assert code == 2 and "--cuda-graph" in text
    assert not out.exists()


@pytest.mark.skipif(not provider_available("cuda"), reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_graph_replay_has_parity(tmp_path):
    out = tmp_path / "net.onnx"
    code, text = run("convert", SMALL, out, "--input-shape", "64", "--time-steps", "64", "--cuda-graph", "--no-verify")
    assert code == 0, text
    code, text = run("verify", SMALL, out, "--input-shape", "64", "--time-steps", "64", "--provider", "cuda")
    assert code == 0, text
