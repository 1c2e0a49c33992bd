"""Hostile and broken inputs through the CLI: a documented exit code, one readable
message, no traceback, no output file left behind, and no code run from a pickle."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("snntorch")

from psu_export.cli import cli  # noqa: E402

DIGITS = "psu_export.models.digits:make_net"
WEIGHTS = str(Path(__file__).resolve().parents[1] / "models" / "digits_snn.pt")


def run(*args, cwd=None):
    runner = CliRunner()
    if cwd:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        result = runner.invoke(cli, list(map(str, args)), catch_exceptions=True)
    finally:
        if cwd:
            os.chdir(old)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    # an unexpected exception is a bug: CliRunner stores it instead of a SystemExit
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in output
    return result.exit_code, output


def convert_args(out, *extra):
    return ["convert", DIGITS, "--weights", WEIGHTS, out, "--time-steps", "6", "--input-shape", "64", *extra]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out.onnx"


def _no_output(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(out.name + "*"))


def test_missing_weights_file(out):
    code, text = run(*["convert", DIGITS, "--weights", "nope.pt", out, "--input-shape", "64"])
    assert code == 2 and "does not exist" in text
    _no_output(out)


def test_corrupt_checkpoint(tmp_path, out):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    code, text = run("convert", DIGITS, "--weights", bad, out, "--input-shape", "64")
    assert code == 2 and "bad.pt" in text
    _no_output(out)


def test_state_dict_that_does_not_fit(tmp_path, out):
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc1.weight": torch.zeros(3, 3)}, wrong)
    code, text = run("convert", DIGITS, "--weights", wrong, out, "--input-shape", "64")
    assert code == 2 and "do not fit" in text
    _no_output(out)


def test_factory_that_raises(tmp_path, out):
    (tmp_path / "badfactory.py").write_text("def make():\n    raise ValueError('broken factory')\n")
    code, text = run("convert", tmp_path / "badfactory.py:make", out, "--input-shape", "64")
    assert code == 2 and "broken factory" in text
    _no_output(out)


def test_unknown_factory_module(out):
    code, text = run("convert", "no_such_module_xyz:make", out, "--input-shape", "64")
    assert code == 2 and "no_such_module_xyz" in text


def test_wrong_input_shape(out):
    code, text = run(*convert_args(out)[:-2], "--input-shape", "3,5")
    assert code == 2 and "--input-shape" in text
    _no_output(out)


@pytest.mark.parametrize("shape", ["0", "a,b", "-3", ""])
def test_malformed_input_shape(out, shape):
    code, text = run(*convert_args(out)[:-2], "--input-shape", shape)
    assert code == 2 and "input-shape" in text
    _no_output(out)


@pytest.mark.parametrize("steps", ["0", "-4"])
def test_non_positive_time_steps(out, steps):
    code, text = run("convert", DIGITS, "--weights", WEIGHTS, out, "--time-steps", steps, "--input-shape", "64")
    assert code == 2 and "time-steps" in text
    _no_output(out)


def test_unknown_reset_mode(out):
    code, text = run(*convert_args(out, "--reset", "bogus"))
    assert code == 2 and "bogus" in text
    _no_output(out)


def test_output_in_missing_directory(tmp_path):
    out = tmp_path / "missing" / "out.onnx"
    code, text = run(*convert_args(out))
    assert code == 2 and "does not exist" in text
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"input": np.zeros((6, 2, 7), np.float32)}, "shape"),
        ({"input": np.array([["a"]])}, "dtype"),
        ({"input": np.full((6, 2, 64), np.nan, np.float32)}, "NaN"),
        ({"input": np.full((6, 2, 64), np.inf, np.float32)}, "Inf"),
        ({"wrong_name": np.zeros((6, 2, 64), np.float32)}, "'input'"),
    ],
)
def test_bad_data(tmp_path, out, arrays, expected):
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    code, text = run(*convert_args(out, "--data", data))
    assert code == 2 and expected in text
    _no_output(out)


def test_data_file_that_is_not_npz(tmp_path, out):
    data = tmp_path / "data.npz"
    data.write_text("garbage")
    code, text = run(*convert_args(out, "--data", data))
    assert code == 2 and "data" in text
    _no_output(out)


def test_verify_refuses_an_onnx_file_from_another_model(tmp_path):
    from snn_models import IN

    other = tmp_path / "other.onnx"
    (tmp_path / "othermodel.py").write_text(
        "import sys; sys.path.insert(0, %r)\nimport snn_models\ndef make():\n    return snn_models.leaky_loop()\n" % str(Path(__file__).parent)
    )
    code, _ = run("convert", tmp_path / "othermodel.py:make", other, "--time-steps", "6", "--input-shape", IN, "--no-verify")
    assert code == 0 and other.exists()
    code, text = run("verify", DIGITS, "--weights", WEIGHTS, other, "--time-steps", "6", "--input-shape", "64")
    assert code == 2 and "not converted from this model" in text


def test_verify_refuses_a_file_of_the_other_input_layout(tmp_path):
    """A single-step module converted time-first, verified with --batch-first: exit 2, not a
    parity run on transposed inputs."""
    from snn_models import IN

    path = tmp_path / "step.onnx"
    (tmp_path / "stepmodel.py").write_text(
        "import sys; sys.path.insert(0, %r)\nimport snn_models\ndef make():\n    return snn_models.synaptic_sequential()\n" % str(Path(__file__).parent)
    )
    model = tmp_path / "stepmodel.py:make"
    code, _ = run("convert", model, path, "--time-steps", "6", "--input-shape", IN, "--no-verify")
    assert code == 0
    code, text = run("verify", model, path, "--time-steps", "6", "--input-shape", IN, "--batch-first")
    assert code == 2 and "time-first" in text and "--batch-first" in text


def test_batch_first_with_multi_step_neurons_is_a_usage_error(out):
    pytest.importorskip("spikingjelly")
    code, text = run("convert", "psu_export.models.ref_spikingjelly:make_mlp_if_hard", out, "--input-shape", "16", "--batch-first")
    assert code == 2 and "multi-step" in text
    _no_output(out)


def test_verify_refuses_a_file_that_is_not_onnx(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    code, text = run("verify", DIGITS, "--weights", WEIGHTS, junk, "--time-steps", "6", "--input-shape", "64")
    assert code == 2 and "junk.onnx" in text


def test_cuda_requested_without_cuda_is_a_failure_not_a_fallback(tmp_path, out):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    code, _ = run(*convert_args(out, "--no-verify"))
    assert code == 0
    code, text = run("verify", DIGITS, "--weights", WEIGHTS, out, "--time-steps", "6", "--provider", "cuda")
    assert code == 4 and "CUDAExecutionProvider" in text and "not available" in text


# ---------------------------------------------------------------------------- pickles


class _RunsACommand:
    """Unpickling this runs a shell command (the classic malicious pickle)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run_without_trust(tmp_path, out):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump(_RunsACommand(marker), handle)
    code, text = run("convert", evil, out, "--input-shape", "64")
    assert code == 2
    assert not marker.exists(), "the pickle ran a command"
    assert "system" in text and "--trust-model" in text and "state dict" in text
    _no_output(out)


def test_malicious_pickle_in_torch_zip_does_not_run(tmp_path, out):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_zip.pt"
    torch.save({"model": _RunsACommand(marker)}, evil)
    assert not marker.exists()
    code, text = run("convert", evil, out, "--input-shape", "64")
    assert code == 2 and not marker.exists()
    assert "--trust-model" in text


def test_whole_module_pickle_of_allowed_classes_loads_without_trust(tmp_path, out):
    """torch.nn classes are on the allowlist: the pickle loads (and is then found to have no neurons)."""
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.ReLU()), path)
    code, text = run("convert", path, out, "--time-steps", "5", "--input-shape", "64")
    assert code == 3 and "no neuron module" in text


def test_snntorch_pickle_needing_getattr_is_refused_then_trusted(tmp_path, out):
    """snnTorch pickles its spike function as a bound method (builtins.getattr): refused by
    name unless --trust-model is given, which converts it."""
    import snntorch as snn

    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 10), snn.Leaky(beta=0.9, init_hidden=True, surrogate_disable=True)), path)
    code, text = run("convert", path, out, "--time-steps", "5", "--input-shape", "64")
    assert code == 2 and "getattr" in text and "--trust-model" in text
    _no_output(out)
    code, text = run("convert", path, out, "--time-steps", "5", "--input-shape", "64", "--trust-model")
    assert code == 0 and out.exists(), text


def test_the_cli_exits_cleanly_in_a_real_process(tmp_path):
    """Same contract in a real process: exit code and no traceback on stderr."""
    out = tmp_path / "x.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "psu_export.cli", "convert", DIGITS, "--weights", "missing.pt", str(out), "--input-shape", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    assert not out.exists()


def test_help_shows_an_example():
    for command in ("convert", "verify", "inspect", "list-converters"):
        code, text = run(command, "--help")
        assert code == 0 and "Example" in text, command


def test_onnxruntime_failure_mid_verify_is_reported_with_exit_4(out, monkeypatch):
    import onnxruntime as ort

    code, _ = run(*convert_args(out, "--no-verify"))
    assert code == 0

    def broken_run(self, *args, **kwargs):
        raise RuntimeError("simulated provider crash")

    monkeypatch.setattr(ort.InferenceSession, "run", broken_run)
    code, text = run("verify", DIGITS, "--weights", WEIGHTS, out, "--time-steps", "6", "--provider", "cpu")
    assert code == 4
    assert "onnxruntime cpu failed" in text and "simulated provider crash" in text


def test_outputs_of_different_shapes_never_pass():
    """A layer or output whose shapes differ between the runs compared fails (it once passed,
    with 0% agreement shown, because the failure flag was filled into another field)."""
    from psu_export.verify import compare_tensors

    ref, got = torch.ones(4, 2, 3), torch.ones(8, 3)
    for values in ((ref, got), (ref * 0.5, got * 0.5)):  # spikes and non-binary outputs
        c = compare_tensors("layer", *values, time_first=True)
        assert not c.passed and c.mismatches == ref.numel() and c.after_tie == 0
