"""--reset psu / stochastic: the psu.ProbabilisticReset / psu.StochasticReset op, the hash RNG,
and converted models that run on a plain onnxruntime with exact export parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("snntorch")

from psu_export.kernels import choose_algorithm  # noqa: E402
from psu_export.ops.builders import OnnxBuilder, TorchBuilder, exact_sigmoid  # noqa: E402
from psu_export.ops.reset import RESET, ResetOptions, derive_keys, hash_uniform, reset_neuron  # noqa: E402
from psu_export.spec import NeuronSpec  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _vi(name, dtype=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_hash_rng_torch_and_onnxruntime_bit_identical():
    index = torch.arange(7 * 30_011, dtype=torch.int64).reshape(7, -1) + 2**31  # beyond the prime too
    key_mul, key_add = derive_keys(1234, "lif1")
    tb = TorchBuilder()
    expected = hash_uniform(tb, tb.const_int(key_mul), tb.const_int(key_add), index)
    b = OnnxBuilder("h")
    out = hash_uniform(b, b.const_int(key_mul), b.const_int(key_add), "index")
    b.nodes.append(helper.make_node("Identity", [out], ["u"]))
    ops = {n.op_type for n in b.nodes}
    assert not any(op.startswith("Bitwise") or op == "BitShift" for op in ops)  # CUDA provider has none
    graph = helper.make_graph(b.nodes, "hash", [_vi("index", TensorProto.INT64, [7, None])], [_vi("u", shape=[7, None])])
    got = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])).run(None, {"index": index.numpy()})[0]
    np.testing.assert_array_equal(got, expected.numpy())
    u = expected.numpy().ravel()
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    other = hash_uniform(tb, *(tb.const_int(k) for k in derive_keys(1235, "lif1")), index)
    assert (other != expected).float().mean() > 0.99  # another seed, other numbers


def test_exact_sigmoid_is_close_and_bit_identical():
    x = torch.linspace(-60, 60, 100_001)
    ours = exact_sigmoid(TorchBuilder(), x)
    assert float((ours.double() - torch.sigmoid(x.double())).abs().max()) < 1e-6
    b = OnnxBuilder("s")
    b.nodes.append(helper.make_node("Identity", [exact_sigmoid(b, "x")], ["y"]))
    graph = helper.make_graph(b.nodes, "sig", [_vi("x", shape=[None])], [_vi("y", shape=[None])])
    got = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, ours.numpy())


@pytest.mark.parametrize("decay", [torch.tensor(0.9), torch.tensor([0.5, 0.99, 0.999, 1.0, 0.0])], ids=["scalar", "per-neuron"])
def test_chunked_linear_scan_solves_the_recurrence(decay):
    """``v_t = d v_{t-1} + y_t`` in chunks of SCAN_CHUNK steps (and by doubling): within float
    rounding of the recursion in float64, at T below, at and across chunk boundaries; and
    ``linear_scan`` takes the chunked form from CHUNKED_SCAN_MIN_ELEMENTS elements."""
    from psu_export.ops.builders import CHUNKED_SCAN_MIN_ELEMENTS, SCAN_CHUNK, TorchBuilder, chunked_linear_scan

    b = TorchBuilder()
    torch.manual_seed(1)
    for steps in (1, SCAN_CHUNK - 1, SCAN_CHUNK, SCAN_CHUNK + 1, 300):
        y = torch.randn(steps, 5)
        v, want = torch.zeros(5, dtype=torch.float64), []
        for t in range(steps):
            v = decay.double() * v + y[t].double()
            want.append(v)
        for got in (chunked_linear_scan(b, y, decay), b.doubling_scan(y, decay)):
            np.testing.assert_allclose(got.double(), torch.stack(want), rtol=1e-5, atol=1e-5)
    large = torch.randn(CHUNKED_SCAN_MIN_ELEMENTS // 5 + 1, 5)
    assert torch.equal(b.linear_scan(large, decay), chunked_linear_scan(b, large, decay))
    assert not torch.equal(chunked_linear_scan(b, large, decay), b.doubling_scan(large, decay))  # a different summation order


OPTIONS = [
    ResetOptions(),
    ResetOptions(kind="StochasticReset", reset_timing="previous_step", membrane="pre", key_mul=12345, key_add=678),
    ResetOptions(kind="StochasticReset", two_state=True, compare="ge", key_mul=99, key_add=1),
    ResetOptions(kind="RPSU", estimate="learned", membrane="pre"),
    # every per-neuron parameter a scalar: broadcast as is, no Expand over [B, ...]
    ResetOptions(scalar_params=True),
    ResetOptions(kind="StochasticReset", two_state=True, scalar_params=True, key_mul=5, key_add=2),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o.op_type)
def test_reset_op_function_matches_torch(options):
    torch.manual_seed(0)
    max_steps = 40
    values = {
        # slow decays: at T = 2,100, step t - 2,048 still changes the sum (the Loop's first level
        # over chunk ends, builders.LOOP_FREE_STEPS)
        "decay": torch.tensor([0.999, 0.99, 0.9995, 0.995]).reshape(4, 1), "threshold": torch.tensor(1.0), "reset_scale": torch.tensor(1.0),
        "spike_scale": torch.tensor(1.0), "input_scale": torch.tensor(1.0), "v_init": torch.tensor(0.1), "syn_decay": torch.tensor(0.7),
        "i_init": torch.tensor(0.0), "prob_scale": torch.tensor(1.5), "prob_offset": torch.tensor(-1.0),
        "reset_weight": torch.randn(max_steps, max_steps).tril() * 0.3, "reset_bias": torch.randn(max_steps) * 0.1,
    }
    if options.scalar_params:
        values["decay"] = torch.tensor(0.999)
    params = [values[n] for n in options.param_names]
    outs = ["spikes", "membrane", "current"][: options.n_outputs]
    node = helper.make_node(options.op_type, ["x", *options.param_names], outs, domain="psu", layer="L", **options.attributes())
    function = RESET.function(node, 20)
    assert any(n.op_type == "Expand" for n in function.node) != options.scalar_params
    graph = helper.make_graph(
        [node], "g", [_vi("x", shape=["T", "B", 4, 5])], [_vi(o, shape=["T", "B", 4, 5]) for o in outs],
        [onnx.numpy_helper.from_array(p.numpy(), n) for n, p in zip(options.param_names, params)],
    )
    session = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("psu", 1)], functions=[function]))
    long = () if "learned" in (options.integration, options.estimate) else (256, 257, 600, 2049, 2100)  # past the unrolled levels
    for steps in (1, 2, 5, 33, *long):
        x = torch.rand(steps, 3, 4, 5) * 0.8
        expected = reset_neuron(x, params, options.key(), "L")
        got = session.run(None, {"x": x.numpy()})
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g, e.numpy())


def test_zero_reset_and_reset_free_layers_stay_exact():
    zero = NeuronSpec(decay=0.9, threshold=1.0, reset="zero")
    free = NeuronSpec(decay=0.9, threshold=1.0, reset="none")
    sub = NeuronSpec(decay=0.9, threshold=1.0, reset="subtract", reset_timing="previous_step")
    assert choose_algorithm(zero, 16, "psu").name == "scan"
    assert "not linear in the spikes" in choose_algorithm(zero, 16, "psu").reason
    assert choose_algorithm(free, 16, "stochastic").name == "closed_form"
    assert choose_algorithm(sub, 16, "psu").name == "probabilistic_reset"
    assert choose_algorithm(sub, 16, "stochastic").name == "stochastic_reset"
    assert choose_algorithm(sub, 16, "exact").name == "scan"


@pytest.fixture(scope="module", params=["psu", "stochastic"])
def converted(request, tmp_path_factory):
    from psu_export.pipeline import prepare

    conversion = prepare("psu_export.models.digits:make_net", weights=str(MODELS / "digits_snn.pt"), input_shape=(64,), time_steps=16,
                         mode=request.param, seed=7)
    path = tmp_path_factory.mktemp(request.param) / "digits.onnx"
    conversion.export(path)
    return conversion, path


def test_converted_model_has_visible_custom_node_with_function(converted):
    conversion, path = converted
    model = onnx.load(str(path))
    kind = "StochasticReset_" if conversion.mode == "stochastic" else "ProbabilisticReset_"
    nodes = [n for n in model.graph.node if n.domain == "psu"]
    assert len(nodes) == 2 and all(n.op_type.startswith(kind) for n in nodes)
    functions = {(f.domain, f.name): f for f in model.functions}
    for n in nodes:
        assert ("psu", n.op_type) in functions and len(functions[("psu", n.op_type)].node) > 10
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["psu_export.mode"] == conversion.mode and meta["psu_export.reset_seed"] == "7"


def test_plain_onnxruntime_runs_and_repeats_exactly(converted):
    import onnxruntime as ort

    conversion, path = converted
    x = torch.from_numpy(np.load(MODELS / "digits_test.npz")["input"][:, :32])
    outs = []
    for _ in range(2):  # two fresh sessions, same outputs
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x.numpy()}))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        expected = conversion.parallel(x)
    np.testing.assert_array_equal(outs[0][0], expected[0].numpy())  # torch draws the same samples


def test_report_export_parity_exact_and_original_informative(converted):
    conversion, path = converted
    report = conversion.verify(path, data=str(MODELS / "digits_test.npz"), providers=("cpu",)).to_json()
    assert report["mode"] == conversion.mode
    assert report["export_spike_agreement"] == 1.0
    assert report["passed"] and report["original_agreement_informative"]
    assert 0.5 < report["spike_agreement"] < 1.0  # approximate, and reported
    assert set(report["accuracy"]) == {"original", "converted"}
    data = np.load(MODELS / "digits_test.npz")  # the converted accuracy is the rewrite's run on the data
    with torch.no_grad():
        counts = conversion.parallel(torch.from_numpy(data["input"]))[0].sum(0)
    assert report["accuracy"]["converted"] == pytest.approx(float((counts.argmax(-1) == torch.from_numpy(data["target"]).long()).float().mean()))
    assert report["providers"]["cpu"]["original_agreement"].startswith("informative")


def test_stochastic_seed_changes_samples(converted, tmp_path):
    conversion, _ = converted
    if conversion.mode != "stochastic":
        pytest.skip("stochastic only")
    from psu_export.pipeline import prepare

    other = prepare("psu_export.models.digits:make_net", weights=str(MODELS / "digits_snn.pt"), input_shape=(64,), time_steps=16,
                    mode="stochastic", seed=8)
    x = torch.from_numpy(np.load(MODELS / "digits_test.npz")["input"][:, :32])
    with torch.no_grad():
        a, b = conversion.parallel(x)[1], other.parallel(x)[1]
    assert not torch.equal(a, b)
