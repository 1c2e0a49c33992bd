"""A model of ~25 M parameters converts, exports and verifies."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

snn = pytest.importorskip("snntorch")


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4096, 6144)
        self.lif1 = snn.Leaky(beta=0.9)
        self.fc2 = nn.Linear(6144, 10)
        self.lif2 = snn.Leaky(beta=0.9)

    def forward(self, x):
        m1, m2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        for t in range(x.shape[0]):
            s1, m1 = self.lif1(self.fc1(x[t]), m1)
            s2, m2 = self.lif2(self.fc2(s1), m2)
            out.append(s2)
        return torch.stack(out)


def test_25m_parameter_model_converts_and_verifies(tmp_path):
    torch.manual_seed(0)
    model = Wide()
    assert sum(p.numel() for p in model.parameters()) > 25_000_000
    from psu_export.pipeline import prepare

    conversion = prepare(model, input_shape=(4096,), time_steps=4)
    path = tmp_path / "wide.onnx"
    conversion.export(path)
    assert path.stat().st_size + sum(p.stat().st_size for p in tmp_path.glob("wide.onnx.data")) > 100_000_000
    onnx.checker.check_model(str(path))
    report = conversion.verify(path, batch=2, extra_time_steps=False)
    assert report.passed, report.to_json()


def test_external_data_file_when_the_model_is_large(tmp_path, monkeypatch):
    """Past the protobuf size limit the weights go to ``<file>.data``; the pair verifies."""
    from psu_export import emit
    from psu_export.pipeline import prepare

    monkeypatch.setattr(emit, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as large
    conversion = prepare(Wide(), input_shape=(4096,), time_steps=3)
    path = tmp_path / "wide.onnx"
    conversion.export(path)
    data = tmp_path / "wide.onnx.data"
    assert data.stat().st_size > 100_000_000 and path.stat().st_size < 10_000_000
    assert not list(tmp_path.glob("*.tmp"))
    assert conversion.verify(path, batch=2, extra_time_steps=False, providers=("cpu",)).passed
