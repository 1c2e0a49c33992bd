"""psu-export calibrate: fitting the reset estimate raises held-out agreement with the original."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("snntorch")
pytest.importorskip("sklearn")

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(autouse=True)
def one_thread():
    # small elementwise ops: one thread avoids OpenMP hand-off stalls on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from psu_export.models.digits import load_digits_sequences

    return load_digits_sequences()


@pytest.mark.parametrize("mode", ["psu", "stochastic"])
def test_calibration_raises_held_out_agreement(mode, digits):
    from psu_export.calibrate import calibrate_conversion, evaluate
    from psu_export.pipeline import prepare

    x_train, _, x_test, y_test = digits
    conversion = prepare("psu_export.models.digits:make_net", weights=str(MODELS / "digits_snn.pt"), input_shape=(64,), time_steps=16, mode=mode)
    before = evaluate(conversion, x_test, y_test)
    fitted = calibrate_conversion(conversion, x_train[:, :300], steps=40)
    after = evaluate(conversion, x_test, y_test)
    assert set(fitted) == {"lif1", "lif2"}
    for layer in ("lif1", "lif2"):
        assert after["layer_spike_agreement"][layer] > before["layer_spike_agreement"][layer]
    assert after["argmax_agreement"] > before["argmax_agreement"] + 0.3
    assert after["accuracy_converted"] > 0.85
    assert conversion.reset_estimate()["lif1"]["prob_scale"] == pytest.approx(fitted["lif1"]["prob_scale"])


def test_calibrate_command_writes_calibrated_onnx(tmp_path, digits):
    from click.testing import CliRunner

    from psu_export.cli import cli
    from psu_export.pipeline import file_reset_mode

    x_train, y_train, _, _ = digits
    data = tmp_path / "train.npz"
    np.savez(data, input=x_train[:, :400].numpy(), target=y_train[:400].numpy())
    out, report_path = tmp_path / "cal.onnx", tmp_path / "cal.json"
    result = CliRunner().invoke(cli, [
        "calibrate", "psu_export.models.digits:make_net", str(out), "--weights", str(MODELS / "digits_snn.pt"),
        "--time-steps", "16", "--input-shape", "64", "--data", str(data), "--reset", "psu", "--steps", "30",
        "--holdout", "0.4", "--report", str(report_path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["export_spike_agreement"] == 1.0
    before, after = report["calibration"]["before"], report["calibration"]["after"]
    assert after["spike_agreement"] > before["spike_agreement"]
    mode, seed, estimate = file_reset_mode(out)
    assert mode == "psu" and set(estimate) == {"lif1", "lif2"} and estimate["lif1"]["prob_offset"] != 0.0
    # verify reads the calibration back from the file: export parity stays exact
    result = CliRunner().invoke(cli, [
        "verify", "psu_export.models.digits:make_net", str(out), "--weights", str(MODELS / "digits_snn.pt"),
        "--time-steps", "16", "--input-shape", "64", "--provider", "cpu", "--report", str(tmp_path / "v.json"),
    ])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "v.json").read_text())["export_spike_agreement"] == 1.0
