"""`verify --raster` draws the original's spikes against onnxruntime's, one panel per layer."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("snntorch")

from psu_export.pipeline import prepare  # noqa: E402

WEIGHTS = str(Path(__file__).resolve().parents[1] / "models" / "digits_snn.pt")


def test_raster_png_is_written(tmp_path):
    conversion = prepare("psu_export.models.digits:make_net", weights=WEIGHTS, input_shape=(64,), time_steps=8)
    onnx_path = tmp_path / "d.onnx"
    conversion.export(onnx_path)
    png = tmp_path / "raster.png"
    report = conversion.verify(onnx_path, extra_time_steps=False, providers=("cpu",), raster=png)
    assert report.passed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
