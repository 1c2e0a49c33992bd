"""Tests for psu_export.deploy (issue 6): Triton repositories and the local KServe v2 server.

The server runs in a subprocess on free loopback ports and is queried with tritonclient,
the client Triton users have. mlserver is never imported in this process: its KServe
protobufs clash with tritonclient.grpc's in one process (duplicate 'inference.*' symbols).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from psu_export import deploy
from psu_export.errors import UsageError

ort = pytest.importorskip("onnxruntime")

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 60
HAS_SERVER = importlib.util.find_spec("mlserver") is not None and importlib.util.find_spec("tritonclient") is not None
needs_server = pytest.mark.skipif(not HAS_SERVER, reason="needs the 'serve' extra (mlserver, tritonclient[http,grpc])")


class TinySNN(torch.nn.Module):
    """One spiking layer in the converter's I/O convention: [T, B, 8] -> spikes [T, B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) > 0.25).to(torch.float32)  # exported as Greater + Cast


@dataclass(frozen=True)
class Models:
    torch_model: TinySNN
    snn: Path
    """torch-exported, time-first, dims named T / batch, no layout metadata."""
    psu: Path
    """onnx.helper-built, calls a model-local function of domain 'psu', layout metadata."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    torch_model = TinySNN().eval()
    dims = {0: torch.export.Dim("T", min=1, max=4096), 1: torch.export.Dim("batch", min=1, max=4096)}
    program = torch.onnx.export(
        torch_model,
        (torch.randn(5, 3, 8),),
        dynamo=True,
        input_names=["spikes_in"],
        output_names=["spikes_out"],
        dynamic_shapes={"x": dims},
        verbose=False,
    )
    program.save(str(folder / "snn.onnx"))
    return Models(torch_model, folder / "snn.onnx", _psu_function_model(folder / "psu_fn.onnx"))


def _psu_function_model(path: Path) -> Path:
    """y = psu.Fire(x, threshold 0.5) with Fire a model-local function (Greater + Cast)."""
    fire = helper.make_function(
        "psu",
        "Fire",
        ["v", "threshold"],
        ["s"],
        [
            helper.make_node("Greater", ["v", "threshold"], ["above"]),
            helper.make_node("Cast", ["above"], ["s"], to=TensorProto.FLOAT),
        ],
        opset_imports=[helper.make_opsetid("", 20)],
    )
    graph = helper.make_graph(
        [helper.make_node("Fire", ["x", "threshold"], ["y"], domain="psu")],
        "psu_fn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "batch", 4])],
        initializer=[helper.make_tensor("threshold", TensorProto.FLOAT, [], [0.5])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("psu", 1)],
        functions=[fire],
        ir_version=10,
    )
    helper.set_model_props(model, {deploy.LAYOUT_KEY: deploy.TIME_FIRST})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _with_metadata(source: Path, target: Path, **props: str) -> Path:
    model = onnx.load(str(source))
    helper.set_model_props(model, props)
    onnx.save(model, str(target))
    return target


def _parse_config(model_dir: Path):  # -> tritonclient.grpc.model_config_pb2.ModelConfig
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _run_onnx(path: Path, **feeds: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


# --------------------------------------------------------------------------- Triton repository


def test_triton_repository_time_first(models: Models, tmp_path: Path) -> None:
    model_dir = deploy.write_triton_repository(models.snn, tmp_path / "repo", name="snn")

    assert model_dir == tmp_path / "repo" / "snn"
    assert (model_dir / "1" / "model.onnx").read_bytes() == models.snn.read_bytes()
    config = _parse_config(model_dir)
    assert config.name == "snn" and config.backend == "onnxruntime" and config.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in config.input] == [("spikes_in", [-1, -1, 8])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("spikes_out", [-1, -1, 4])]
    data_type = config.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    assert data_type.values_by_number[config.input[0].data_type].name == "TYPE_FP32"
    assert not config.HasField("dynamic_batching")
    text = (model_dir / "config.pbtxt").read_text()
    # torch exports opset 20 with IR version 10; IR 10 arrived in onnxruntime 1.18
    assert text.startswith("# Triton model configuration")
    assert "# requires onnxruntime >= 1.18 (default-domain opset 20, IR version 10)" in text
    assert "time-first" in text


def test_triton_repository_batch_first_batches_on_dim0(models: Models, tmp_path: Path) -> None:
    batch_first = _with_metadata(models.snn, tmp_path / "bf.onnx", **{deploy.LAYOUT_KEY: deploy.BATCH_FIRST})

    config = _parse_config(deploy.write_triton_repository(batch_first, tmp_path / "repo", max_batch_size=16))

    assert config.name == "bf" and config.max_batch_size == 16
    assert list(config.input[0].dims) == [-1, 8] and list(config.output[0].dims) == [-1, 4]
    assert config.HasField("dynamic_batching")


def test_time_first_model_refuses_triton_batching(models: Models, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--batch-first"):
        deploy.write_triton_repository(models.snn, tmp_path / "repo", max_batch_size=8)
    # an explicit override is honoured: the caller asserts dim 0 is the batch
    config = _parse_config(
        deploy.write_triton_repository(models.snn, tmp_path / "repo", max_batch_size=8, batch_first=True)
    )
    assert config.max_batch_size == 8


def test_layout_detection(models: Models, tmp_path: Path) -> None:
    assert deploy.read_model_info(models.snn).layout == deploy.TIME_FIRST  # dim 0 named "T"
    assert deploy.read_model_info(models.psu).layout == deploy.TIME_FIRST  # metadata
    odd = _with_metadata(models.snn, tmp_path / "odd.onnx", **{deploy.LAYOUT_KEY: "diagonal"})
    with pytest.raises(UsageError, match="unknown layout"):
        deploy.read_model_info(odd)


def test_external_data_is_copied(models: Models, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    model = onnx.load(str(models.snn))
    onnx.save(
        model,
        str(tmp_path / "src" / "big.onnx"),
        save_as_external_data=True,
        location="big.onnx.data",
        size_threshold=0,
    )

    model_dir = deploy.write_triton_repository(tmp_path / "src" / "big.onnx", tmp_path / "repo")

    assert (model_dir / "1" / "big.onnx.data").read_bytes() == (tmp_path / "src" / "big.onnx.data").read_bytes()
    x = np.random.default_rng(1).standard_normal((4, 2, 8), dtype=np.float32)
    (copied,) = _run_onnx(model_dir / "1" / "model.onnx", spikes_in=x)
    np.testing.assert_array_equal(copied, _run_onnx(models.snn, spikes_in=x)[0])


def test_psu_functions_are_noted(models: Models, tmp_path: Path) -> None:
    model_dir = deploy.write_triton_repository(models.psu, tmp_path / "repo")
    assert (
        "model-local functions in domain(s) psu are expanded by stock onnxruntime"
        in (model_dir / "config.pbtxt").read_text()
    )
    _parse_config(model_dir)


@pytest.mark.parametrize(
    ("opset", "ir_version", "expected"),
    [
        (17, 8, "1.15"),
        (19, 9, "1.16"),
        (20, 9, "1.17"),
        (20, 10, "1.18"),
        (22, 10, "1.21"),
        (23, 11, "1.23"),
        (24, 12, "1.24"),
    ],
)
def test_min_onnxruntime_version(opset: int, ir_version: int, expected: str) -> None:
    assert deploy.min_onnxruntime_version(opset, ir_version) == expected


def test_target_onnxruntime_version_is_checked(models: Models, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"needs onnxruntime >= 1\.18, but the deployment target has 1\.17"):
        deploy.write_triton_repository(models.snn, tmp_path / "repo", onnxruntime_version="1.17.3")
    with pytest.raises(UsageError, match="not a version number"):
        deploy.write_triton_repository(models.snn, tmp_path / "repo", onnxruntime_version="latest")
    deploy.write_triton_repository(models.snn, tmp_path / "repo", onnxruntime_version="1.18")


def test_bad_inputs_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(UsageError, match="no such file"):
        deploy.write_triton_repository(tmp_path / "missing.onnx", tmp_path / "repo")
    with pytest.raises(UsageError, match="is not an ONNX model"):
        deploy.write_triton_repository(tmp_path / "notes.onnx", tmp_path / "repo")
    with pytest.raises(UsageError, match="holds no model"):
        deploy.find_models(tmp_path)


def test_cli_triton(models: Models, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(deploy.deploy, ["triton", str(models.snn), str(tmp_path / "repo"), "--name", "snn"])
    assert result.exit_code == 0, result.output
    assert "Requires onnxruntime >= 1.18" in result.output
    assert (tmp_path / "repo" / "snn" / "1" / "model.onnx").is_file()

    result = runner.invoke(deploy.deploy, ["triton", str(models.snn), str(tmp_path / "repo"), "--max-batch-size", "4"])
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2

    for command, args in (
        (deploy.deploy, ["--help"]),
        (deploy.deploy, ["triton", "--help"]),
        (deploy.serve_command, ["--help"]),
    ):
        result = runner.invoke(command, args)
        assert result.exit_code == 0 and "Example:" in result.output


def test_cli_serve_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(deploy.serve_command, [str(tmp_path / "missing.onnx")])
    assert isinstance(result.exception, UsageError) and "no such file" in str(result.exception)
    (tmp_path / "notes.onnx").write_text("not a model")
    result = runner.invoke(deploy.serve_command, [str(tmp_path / "notes.onnx")])
    assert isinstance(result.exception, UsageError) and "not an ONNX model" in str(result.exception)


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=15)


@pytest.fixture(scope="module")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`psu-export serve REPO` on loopback with two models (snn, psu_fn), stopped at the end."""
    if not HAS_SERVER:
        pytest.skip("needs the 'serve' extra (mlserver, tritonclient[http,grpc])")
    import tritonclient.http as httpclient

    folder = tmp_path_factory.mktemp("serve")
    deploy.write_triton_repository(models.snn, folder / "repo")
    deploy.write_triton_repository(models.psu, folder / "repo")
    http_port, grpc_port = _free_port(), _free_port()
    log = folder / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from psu_export.deploy import serve_command; serve_command()"]
    args = [str(folder / "repo"), "--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command + args, cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT)
    running = Server(process, log, http_port, grpc_port)
    try:
        client = httpclient.InferenceServerClient(running.url, connection_timeout=2, network_timeout=10)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while "ready at" not in running.output() or not client.is_server_ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not become ready (exit code {process.poll()}):\n{running.output()}")
            time.sleep(0.2)
        yield running
    finally:
        _stop(process)


@pytest.fixture
def client(server: Server):  # -> tritonclient.http.InferenceServerClient
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.url, connection_timeout=2, network_timeout=10)


def _infer_http(
    client, model: str, input_name: str, output_name: str, x: np.ndarray, datatype: str = "FP32"
) -> np.ndarray:
    import tritonclient.http as httpclient

    request_input = httpclient.InferInput(input_name, list(x.shape), datatype)
    request_input.set_data_from_numpy(x, binary_data=False)  # MLServer's REST API speaks JSON only
    wanted = httpclient.InferRequestedOutput(output_name, binary_data=False)
    return client.infer(model, [request_input], outputs=[wanted]).as_numpy(output_name)


@needs_server
def test_server_health_and_metadata(server: Server, client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("snn") and client.is_model_ready("psu_fn")
    metadata = client.get_model_metadata("snn")
    assert metadata["platform"] == "onnxruntime"
    assert metadata["inputs"] == [{"name": "spikes_in", "datatype": "FP32", "shape": [-1, -1, 8]}]
    assert metadata["outputs"] == [{"name": "spikes_out", "datatype": "FP32", "shape": [-1, -1, 4]}]
    for name in ("snn", "psu_fn"):
        assert f"ready at http://{server.url}/v2/models/{name}" in server.output()


@needs_server
@pytest.mark.parametrize(("time_steps", "batch"), [(6, 3), (2, 5)])
def test_server_matches_onnxruntime_and_torch(models: Models, client, time_steps: int, batch: int) -> None:
    x = np.random.default_rng(time_steps).standard_normal((time_steps, batch, 8), dtype=np.float32)

    served = _infer_http(client, "snn", "spikes_in", "spikes_out", x)

    (local,) = _run_onnx(models.snn, spikes_in=x)
    with torch.no_grad():
        original = models.torch_model(torch.from_numpy(x)).numpy()
    assert served.dtype == np.float32 and served.shape == (time_steps, batch, 4)
    assert 0 < served.sum() < served.size  # some neurons fire, some do not
    np.testing.assert_array_equal(served, local)
    np.testing.assert_array_equal(served, original)


@needs_server
def test_server_runs_psu_functions(models: Models, client) -> None:
    x = np.random.default_rng(7).standard_normal((3, 2, 4), dtype=np.float32)
    served = _infer_http(client, "psu_fn", "x", "y", x)
    np.testing.assert_array_equal(served, (x > 0.5).astype(np.float32))
    np.testing.assert_array_equal(served, _run_onnx(models.psu, x=x)[0])


@needs_server
def test_server_grpc_matches_onnxruntime(models: Models, server: Server) -> None:
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(3).standard_normal((4, 2, 8), dtype=np.float32)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    request_input = grpcclient.InferInput("spikes_in", list(x.shape), "FP32")
    request_input.set_data_from_numpy(x)
    served = client.infer("snn", [request_input], client_timeout=10).as_numpy("spikes_out")
    np.testing.assert_array_equal(served, _run_onnx(models.snn, spikes_in=x)[0])


@needs_server
@pytest.mark.parametrize(
    ("model", "input_name", "shape", "datatype", "status", "message"),
    [
        ("snn", "spikes_in", (2, 3, 7), "FP32", "400", "the model expects [-1, -1, 8]"),
        ("snn", "spikes_in", (2, 3), "FP32", "400", "the model expects [-1, -1, 8]"),
        ("snn", "spikes_in", (2, 3, 8), "INT64", "400", "must have datatype FP32, got INT64"),
        ("snn", "wrong_name", (2, 3, 8), "FP32", "400", "unknown: ['wrong_name'], missing: ['spikes_in']"),
        ("nosuchmodel", "spikes_in", (2, 3, 8), "FP32", "404", "Model nosuchmodel not found"),
    ],
)
def test_server_rejects_malformed_requests(
    client, model: str, input_name: str, shape: tuple[int, ...], datatype: str, status: str, message: str
) -> None:
    from tritonclient.utils import InferenceServerException

    x = np.ones(shape, dtype=np.int64 if datatype == "INT64" else np.float32)
    with pytest.raises(InferenceServerException) as caught:
        _infer_http(client, model, input_name, "spikes_out", x, datatype)
    assert caught.value.status() == status
    assert message in caught.value.message()


@needs_server
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"inputs": [{"name": "spikes_in", "datatype": "FP32", "shape": [1, 2, 8], "data": [0.0] * 8}]},
            "needs 16 values, got 8",
        ),
        (
            {"inputs": [{"name": "spikes_in", "datatype": "FP32", "shape": [1, 1, 8], "data": ["a"] * 8}]},
            "not a list of FP32 values",
        ),
        ({"inputs": [{"name": "spikes_in", "shape": [1, 1, 8], "data": [0.0] * 8}]}, "datatype"),
        (b"{not json", "JSON"),
    ],
)
def test_server_rejects_malformed_json(server: Server, body: dict | bytes, message: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server.url}/v2/models/snn/infer", data=data, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
    assert 400 <= caught.value.code < 500
    assert message in caught.value.read().decode()


@needs_server
def test_server_refuses_a_busy_port(models: Models, server: Server) -> None:
    with pytest.raises(UsageError, match=f"Cannot listen on 127.0.0.1:{server.http_port}"):
        deploy.serve(models.snn, port=server.http_port)


@needs_server
def test_server_stops_cleanly_on_sigterm(server: Server) -> None:
    """Runs last in this module: it ends the shared server."""
    assert _stop(server.process) == 0
    assert "server stopped" in server.output()
