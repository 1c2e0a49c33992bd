"""Shared helpers: convert a model through the real pipeline and run the ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
import torch


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
