"""Shared helpers: convert a model through the real pipeline and run the ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def run_onnx(path, x: torch.Tensor, provider: str = "CPUExecutionProvider") -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[provider])
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
