"""Row-chunked synaptic products (psu_export.synaptic): the same floats as the single product,
on either side of the row limit, in a hand-made graph and in a converted model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import reference_outputs, run_onnx
from psu_export import synaptic

FLOAT = TensorProto.FLOAT


def _product_model(k: int, n: int, bias: str = "initializer") -> onnx.ModelProto:
    """``Y = X[T, B, k] @ W[k, n] (+ bias)``; bias "initializer", "input" (a second graph input) or "none"."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.random((k, n), dtype=np.float32) - 0.5) / k**0.5, "W")]
    inputs = [helper.make_tensor_value_info("X", FLOAT, ["T", "B", k])]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["P" if bias != "none" else "Y"], name="product")]
    if bias == "initializer":
        inits.append(numpy_helper.from_array(rng.random(n, dtype=np.float32), "b"))
    elif bias == "input":
        inputs.append(helper.make_tensor_value_info("b", FLOAT, [n]))
    if bias != "none":
        nodes.append(helper.make_node("Add", ["b", "P"], ["Y"]))  # bias first, as torch.onnx.export writes it
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", FLOAT, ["T", "B", n])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _weight(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W"))


def _bias(model: onnx.ModelProto):
    return next((numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "b"), 0.0)


def _chunked(model: onnx.ModelProto, monkeypatch=None, min_rows=None) -> tuple[bytes, list[str]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if min_rows is not None:
        monkeypatch.setattr(synaptic, "CHUNK_MIN_ROWS", min_rows)
    names = synaptic.chunk_wide_matmuls(copy)
    onnx.checker.check_model(copy, full_check=True)
    return copy.SerializeToString(), names


def _run(model: bytes, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("bias", ["initializer", "input", "none"])
def test_chunked_product_matches_the_single_product_bit_for_bit(monkeypatch, bias):
    model = _product_model(784, 1000, bias)
    chunked, names = _chunked(model)
    assert names == ["product"]
    top = [n.op_type for n in onnx.load_from_string(chunked).graph.node]
    assert "If" in top and "MatMul" not in top and ("Add" in top) == (bias == "input")  # a graph input's bias stays outside
    single, _ = _chunked(model, monkeypatch, min_rows=1 << 40)  # the If's other branch at every size
    rng = np.random.default_rng(1)
    for steps, batch in [(129, 33), (4096, 1), (16, 1)]:  # 4,257 and 4,096 rows (chunked, uneven blocks), 16 (not)
        feeds = {"X": (rng.random((steps, batch, 784)) > 0.7).astype(np.float32)}
        if bias == "input":
            feeds["b"] = rng.random(1000, dtype=np.float32)
        got, want = _run(chunked, feeds)[0], _run(single, feeds)[0]
        assert got.shape == (steps, batch, 1000)
        assert np.array_equal(got, want), f"T={steps} B={batch}: {int((got != want).sum())} elements differ"
        unchunked = _run(model.SerializeToString(), feeds)[0]  # the file before the pass: the same floats too
        assert np.array_equal(got, unchunked), f"T={steps} B={batch}: {int((got != unchunked).sum())} elements differ"
        np.testing.assert_allclose(got, feeds["X"] @ _weight(model) + feeds.get("b", _bias(model)), rtol=1e-5, atol=1e-5)


def test_a_product_also_read_inside_a_subgraph_keeps_its_bias_add():
    """The bias ``Add`` is folded into the blocks only when it is the product's one reader,
    counting reads from an ``If`` branch (outer scope) too."""
    model = _product_model(784, 1000)
    branch = helper.make_graph([helper.make_node("Identity", ["P"], ["P_seen"])], "branch", [],
                               [helper.make_tensor_value_info("P_seen", FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
    model.graph.node.append(helper.make_node("If", ["always"], ["P_out"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("P_out", FLOAT, ["T", "B", 1000]))
    chunked, names = _chunked(model)
    assert names == ["product"] and "Add" in [n.op_type for n in onnx.load_from_string(chunked).graph.node]
    feeds = {"X": np.random.default_rng(2).random((129, 33, 784), dtype=np.float32)}
    for got, expected in zip(_run(chunked, feeds), _run(model.SerializeToString(), feeds), strict=True):
        assert np.array_equal(got, expected)


def test_small_weights_and_other_ops_are_left_alone():
    for k, n in [(784, 128), (1000, 10)]:  # under CHUNK_MIN_WEIGHT_BYTES: the copies would cost more than they save
        model = _product_model(k, n)
        chunked, names = _chunked(model)
        assert names == [] and [x.op_type for x in onnx.load_from_string(chunked).graph.node] == ["MatMul", "Add"]


def test_converted_mlp_runs_chunked_with_exact_spikes(convert):
    """The reference MLP's 784 x 1000 product, at 4,096 rows (T = 128, batch 32), against snnTorch's own loop."""
    conversion, path = convert("psu_export.models.ref_mlp:make_net", (784,), 128)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("If") == 1  # fc1 only: fc2's 1000 x 10 weight is small
    x = torch.rand(128, 32, 784, generator=torch.Generator().manual_seed(5))
    got = run_onnx(path, x)
    ref = reference_outputs(conversion.loaded.module, x, "sequence")
    assert ref[0].sum() > 0 and (ref[0] == 0).any()
    assert np.array_equal(got[0], ref[0].numpy()), f"{int((got[0] != ref[0].numpy()).sum())} spikes differ"
    np.testing.assert_allclose(got[1], ref[1].numpy(), rtol=1e-5, atol=1e-4)
