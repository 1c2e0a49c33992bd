"""Deploy converted models to onnxruntime-based inference servers (issue 6).

Two roads, both speaking the Open Inference Protocol (KServe v2):

* :func:`write_triton_repository` packages an ONNX file as a Triton Inference Server
  model repository (``NAME/config.pbtxt`` plus ``NAME/1/model.onnx``) for Triton's
  onnxruntime backend.
* :func:`serve` starts a local KServe-v2 server (MLServer with a small onnxruntime
  runtime, :class:`OnnxRuntimeModel`) for an ONNX file or for such a repository.

Converted models are time-first, ``[T, B, ...]``, unless the model loops over a
batch-first ``x[B, T, ...]`` or a single-step module was converted with
``--batch-first``; the converter records which in the ONNX metadata key
``psu_export.layout``. Triton's batching assumes dim 0 is the batch, so only
batch-first models may use ``max_batch_size > 0``.

The server needs the optional ``serve`` extra (``mlserver``); everything else only
needs ``onnx``. The click commands :data:`deploy` (group with ``triton``) and
:data:`serve_command` are registered into the main CLI by ``psu_export.cli``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import onnx
from onnx import TensorProto
from packaging.version import InvalidVersion, Version

from psu_export.errors import CaptureError, UsageError

logger = logging.getLogger(__name__)

LAYOUT_KEY = "psu_export.layout"
"""ONNX ``metadata_props`` key the converter writes: ``time_first`` or ``batch_first``."""
TIME_FIRST = "time_first"
BATCH_FIRST = "batch_first"

_TIME_DIM_NAMES = frozenset({"t", "time", "times", "steps", "time_steps", "timesteps", "num_steps", "seq", "seq_len"})
_BATCH_DIM_NAMES = frozenset({"b", "n", "bs", "batch", "batch_size"})

# Default-domain opset / IR version -> first onnxruntime release that loads it. Checked
# here by loading an Identity model stamped with each (opset, IR) pair in onnxruntime
# 1.15 ... 1.27; 1.15 is the oldest release with a Python 3.11 wheel, so it is the floor.
_ORT_FOR_OPSET = ((24, "1.24"), (23, "1.23"), (22, "1.21"), (21, "1.18"), (20, "1.17"), (19, "1.16"))
_ORT_FOR_IR = ((12, "1.24"), (11, "1.23"), (10, "1.18"))
_ORT_FLOOR = "1.15"
_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

# ONNX element type -> Triton config data type.
_TRITON_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.STRING: "TYPE_STRING",
}
# ONNX element type -> KServe v2 datatype, for the types the local server handles.
_V2_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.DOUBLE: "FP64",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TRITON_MODEL_FILE = "model.onnx"


# --------------------------------------------------------------------------- model info


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, ONNX element type and dims (-1 = dynamic)."""

    name: str
    elem_type: int
    dims: tuple[int, ...]
    dim_names: tuple[str, ...]

    @property
    def v2_datatype(self) -> str | None:
        """KServe v2 datatype name, or None when the local server cannot carry it."""
        return _V2_TYPES.get(self.elem_type)


@dataclass(frozen=True)
class ModelInfo:
    """What deployment needs to know about an ONNX file (read without its weights)."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    ir_version: int
    layout: str | None
    """``time_first``, ``batch_first`` or None when it cannot be told."""
    function_domains: tuple[str, ...]
    """Non-standard domains of model-local functions (e.g. ``psu``)."""
    external_data: tuple[str, ...]
    """Relative locations of external-data files, as stored in the model."""

    @property
    def min_onnxruntime(self) -> str:
        """Oldest onnxruntime release that loads this model's opset and IR version."""
        return min_onnxruntime_version(self.opset, self.ir_version)


def min_onnxruntime_version(opset: int, ir_version: int) -> str:
    """Oldest onnxruntime release that implements ``opset`` (default domain) and ``ir_version``.

    onnxruntime refuses models stamped with a newer opset or IR version than it knows,
    even when no new operator is used, so this is a hard requirement.
    """
    if opset > _ORT_FOR_OPSET[0][0] or ir_version > _ORT_FOR_IR[0][0]:
        raise UsageError(
            f"The model uses opset {opset} / IR version {ir_version}, newer than this version of "
            f"psu-export knows (opset {_ORT_FOR_OPSET[0][0]}, IR {_ORT_FOR_IR[0][0]}); "
            "re-export it with an older torch/onnx or upgrade psu-export."
        )
    candidates = [_ORT_FLOOR]
    candidates += [ort for level, ort in _ORT_FOR_OPSET if opset >= level][:1]
    candidates += [ort for level, ort in _ORT_FOR_IR if ir_version >= level][:1]
    return max(candidates, key=Version)


def check_onnxruntime_version(required: str, target: str) -> None:
    """Raise :class:`UsageError` if the deployment target's onnxruntime ``target`` is older than ``required``."""
    try:
        target_version = Version(target)
    except InvalidVersion as exc:
        raise UsageError(f"--onnxruntime-version {target!r} is not a version number such as 1.20 or 1.20.1.") from exc
    if Version(target_version.base_version) < Version(required):
        raise UsageError(
            f"The model needs onnxruntime >= {required}, but the deployment target has {target}. "
            "Use a newer server image (for Triton: a release whose onnxruntime backend is at least "
            f"{required}) or export the model with an older opset."
        )


def read_model_info(onnx_path: str | Path) -> ModelInfo:
    """Read the I/O signature, versions and layout of an ONNX file (weights are not loaded)."""
    path = Path(onnx_path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for non-ONNX bytes
        raise UsageError(f"{path} is not an ONNX model ({exc}).") from exc
    graph = model.graph
    if not graph.node and not graph.output:
        raise UsageError(f"{path} is not an ONNX model (empty graph).")
    initializers = {init.name for init in graph.initializer}
    inputs = tuple(_tensor_spec(vi, path) for vi in graph.input if vi.name not in initializers)
    outputs = tuple(_tensor_spec(vi, path) for vi in graph.output)
    if not inputs or not outputs:
        raise UsageError(f"{path}: the model has no inputs or no outputs; there is nothing to serve.")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    return ModelInfo(
        path=path,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        ir_version=model.ir_version,
        layout=_layout(metadata.get(LAYOUT_KEY), inputs[0], path),
        function_domains=tuple(sorted({f.domain for f in model.functions} - _STANDARD_DOMAINS)),
        external_data=tuple(sorted(_external_locations(model))),
    )


def _tensor_spec(value_info: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    tensor_type = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        raise UsageError(
            f"{path}: graph input/output {value_info.name!r} has no tensor shape; "
            "serving needs a known rank (run onnx shape inference or re-export)."
        )
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    names = tuple(d.dim_param for d in tensor_type.shape.dim)
    return TensorSpec(value_info.name, tensor_type.elem_type, dims, names)


def _layout(recorded: str | None, first_input: TensorSpec, path: Path) -> str | None:
    """The layout from the metadata, else guessed from the first input's dim names."""
    if recorded is not None:
        if recorded not in (TIME_FIRST, BATCH_FIRST):
            raise UsageError(
                f"{path}: unknown layout {LAYOUT_KEY}={recorded!r} in the model metadata "
                f"(expected {TIME_FIRST!r} or {BATCH_FIRST!r})."
            )
        return recorded
    names = [name.lower() for name in first_input.dim_names]
    if names and names[0] in _TIME_DIM_NAMES:
        return TIME_FIRST
    if names and (names[0] in _BATCH_DIM_NAMES or (len(names) > 1 and names[1] in _TIME_DIM_NAMES)):
        return BATCH_FIRST
    return None


def _external_locations(model: onnx.ModelProto) -> set[str]:
    """Locations of all external-data files referenced by tensors in the model."""
    locations = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(entries["location"])
    return locations


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers and tensor attributes, subgraphs included."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


# --------------------------------------------------------------------------- Triton


def write_triton_repository(
    onnx_path: str | Path,
    repo_dir: str | Path,
    name: str | None = None,
    max_batch_size: int = 0,
    batch_first: bool | None = None,
    onnxruntime_version: str | None = None,
) -> Path:
    """Write a Triton model repository entry for ``onnx_path`` and return its directory.

    Creates ``repo_dir/NAME/config.pbtxt`` (backend ``onnxruntime``, inputs and outputs
    with dims from the ONNX graph, ``-1`` for dynamic dims) and copies the model to
    ``repo_dir/NAME/1/model.onnx`` together with its external-data files, keeping
    their relative locations. ``NAME`` defaults to the file's stem.

    ``max_batch_size > 0`` lets Triton batch along dim 0, which requires a batch-first
    model; the layout comes from the model metadata unless ``batch_first`` overrides it.
    ``onnxruntime_version``, the deployment target's onnxruntime, is checked against the
    model's requirement (:attr:`ModelInfo.min_onnxruntime`, also written at the top of
    config.pbtxt).
    """
    info = read_model_info(onnx_path)
    name = _model_name(name, info.path)
    if onnxruntime_version is not None:
        check_onnxruntime_version(info.min_onnxruntime, onnxruntime_version)
    layout = info.layout if batch_first is None else (BATCH_FIRST if batch_first else TIME_FIRST)
    if max_batch_size < 0:
        raise UsageError(f"--max-batch-size must be >= 0, got {max_batch_size}.")
    if max_batch_size > 0:
        _check_batchable(info, layout)

    model_dir = Path(repo_dir) / name
    version_dir = model_dir / "1"
    if model_dir.exists() and not model_dir.is_dir():
        raise UsageError(f"{model_dir} exists and is not a directory.")
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(info.path, version_dir / _TRITON_MODEL_FILE)
    for location in info.external_data:
        source = (info.path.parent / location).resolve()
        relative = Path(location)
        if relative.is_absolute() or ".." in relative.parts or not source.is_file():
            raise UsageError(
                f"{info.path}: external data {location!r} must be a file next to the model "
                "(a relative path inside its folder)."
            )
        (version_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, version_dir / relative)
    (model_dir / "config.pbtxt").write_text(_triton_config(info, name, max_batch_size, layout))
    logger.info("wrote Triton model %s (requires onnxruntime >= %s)", model_dir, info.min_onnxruntime)
    return model_dir


def _model_name(name: str | None, path: Path) -> str:
    name = path.stem if name is None else name
    if not _MODEL_NAME.match(name):
        raise UsageError(
            f"Model name {name!r} is not usable as a server model name; pass --name with "
            "letters, digits, '_', '-' or '.' only."
        )
    return name


def _check_batchable(info: ModelInfo, layout: str | None) -> None:
    """Triton batches along dim 0: the model must be batch-first with a dynamic dim 0."""
    if layout == TIME_FIRST:
        raise UsageError(
            f"{info.path} is time-first ([T, B, ...]): Triton would batch along the time axis. "
            "Use --max-batch-size 0 (the default; clients send the batch inside the tensor), "
            "or, for a single-step module, convert it with `psu-export convert ... --batch-first`."
        )
    if layout is None:
        raise UsageError(
            f"{info.path}: cannot tell whether dim 0 is the batch (no {LAYOUT_KEY} metadata, "
            "dim names say nothing). Pass --batch-first if it is, or use --max-batch-size 0."
        )
    for spec in info.inputs + info.outputs:
        if not spec.dims or spec.dims[0] != -1:
            raise UsageError(
                f"{info.path}: {spec.name!r} has a fixed dim 0 ({list(spec.dims)}); Triton batching "
                "needs a dynamic batch dim. Re-export with a dynamic batch or use --max-batch-size 0."
            )


def _triton_config(info: ModelInfo, name: str, max_batch_size: int, layout: str | None) -> str:
    """The text of config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    layout_text = {TIME_FIRST: "time-first [T, B, ...]", BATCH_FIRST: "batch-first [B, T, ...]"}
    lines = [
        f"# Triton model configuration written by psu-export from {info.path.name}",
        f"# requires onnxruntime >= {info.min_onnxruntime} "
        f"(default-domain opset {info.opset}, IR version {info.ir_version})",
        f"# layout: {layout_text.get(layout or '', 'unknown')}",
    ]
    if info.function_domains:
        domains = ", ".join(info.function_domains)
        lines.append(
            f"# model-local functions in domain(s) {domains} are expanded by stock onnxruntime; "
            "no custom-op library is needed"
        )
    lines += [f"name: {_quote(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}"]
    for section, specs in (("input", info.inputs), ("output", info.outputs)):
        entries = [_triton_tensor(spec, info.path, drop_batch=max_batch_size > 0) for spec in specs]
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _triton_tensor(spec: TensorSpec, path: Path, drop_batch: bool) -> str:
    if spec.elem_type not in _TRITON_TYPES:
        type_name = TensorProto.DataType.Name(spec.elem_type)
        raise UsageError(f"{path}: {spec.name!r} has element type {type_name}, which Triton does not support.")
    dims = spec.dims[1:] if drop_batch else spec.dims
    dims_text = ", ".join(str(d) for d in dims)
    return (
        "  {\n"
        f"    name: {_quote(spec.name)}\n"
        f"    data_type: {_TRITON_TYPES[spec.elem_type]}\n"
        f"    dims: [ {dims_text} ]\n"
        "  }"
    )


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServedModel:
    """One model the server loads: its name, ONNX file and (for repositories) version."""

    name: str
    path: Path
    version: str | None = None


def find_models(model_path_or_repo: str | Path, name: str | None = None) -> list[ServedModel]:
    """The models to serve from an ONNX file or a Triton repository written by this module.

    For a file, ``name`` defaults to its stem. For a repository, every ``NAME/`` folder
    with a ``config.pbtxt`` is served at its highest numeric version that holds a
    ``model.onnx`` (Triton's default policy); ``name`` then selects one of them.
    """
    path = Path(model_path_or_repo)
    if path.is_file():
        return [ServedModel(_model_name(name, path), path)]
    if not path.is_dir():
        raise UsageError(f"{path}: no such file or directory (expected an .onnx file or a Triton repository).")
    models = []
    for config in sorted(path.glob("*/config.pbtxt")):
        model_dir = config.parent
        versions = sorted(
            (int(v.name) for v in model_dir.iterdir() if v.name.isdigit() and (v / _TRITON_MODEL_FILE).is_file()),
        )
        if not versions:
            raise UsageError(f"{model_dir}: no version folder with {_TRITON_MODEL_FILE} (expected {model_dir}/1/).")
        version = str(versions[-1])
        models.append(
            ServedModel(_model_name(model_dir.name, model_dir), model_dir / version / _TRITON_MODEL_FILE, version)
        )
    if not models:
        raise UsageError(f"{path} holds no model (no NAME/config.pbtxt); write one with `psu-export deploy triton`.")
    if name is not None:
        models = [m for m in models if m.name == name]
        if not models:
            raise UsageError(f"{path} has no model named {name!r}.")
    return models


def serve(
    model_path_or_repo: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    grpc_port: int | None = None,
) -> None:
    """Serve an ONNX file or a Triton repository over KServe v2 REST (and gRPC) until stopped.

    Runs MLServer with :class:`OnnxRuntimeModel` (onnxruntime, CPUExecutionProvider):
    ``GET /v2/health/ready``, ``GET /v2/models/NAME``, ``POST /v2/models/NAME/infer`` on
    ``http://host:port``, and the v2 gRPC service on ``grpc_port`` (default ``port + 1``).
    Returns after SIGINT / SIGTERM, once the servers have shut down.
    """
    models = find_models(model_path_or_repo, name)
    infos = {m.name: read_model_info(m.path) for m in models}
    for model in models:
        unsupported = [s.name for s in infos[model.name].inputs + infos[model.name].outputs if s.v2_datatype is None]
        if unsupported:
            raise UsageError(f"{model.path}: tensors {unsupported} have element types the server cannot carry.")
    grpc_port = port + 1 if grpc_port is None else grpc_port
    if grpc_port == port:
        raise UsageError(f"--grpc-port must differ from --port ({port}).")
    for listen_port in (port, grpc_port):
        _check_port_free(host, listen_port)
    try:
        import mlserver  # noqa: F401  (checks the optional extra is installed)
    except ImportError as exc:
        raise UsageError(
            f"`psu-export serve` needs the optional serving packages ({exc}); "
            "install them with: pip install 'psu-export[serve]'"
        ) from exc
    asyncio.run(_run_server(models, infos, host, port, grpc_port))


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port/--grpc-port."
            ) from exc


async def _run_server(
    models: Sequence[ServedModel], infos: dict[str, ModelInfo], host: str, port: int, grpc_port: int
) -> None:
    import onnxruntime
    from mlserver import MLServer
    from mlserver.rest.server import _NoSignalServer
    from mlserver.settings import ModelParameters, ModelSettings, Settings
    from mlserver.types import MetadataTensor

    settings = Settings(
        host=host,
        http_port=port,
        grpc_port=grpc_port,
        debug=False,
        parallel_workers=0,  # run models in the server process: no worker pool to spawn
        metrics_endpoint=None,
        load_models_at_startup=False,
    )

    def metadata(specs: Sequence[TensorSpec]) -> list[MetadataTensor]:
        return [MetadataTensor(name=s.name, datatype=s.v2_datatype, shape=list(s.dims)) for s in specs]

    model_settings = [
        ModelSettings(
            name=model.name,
            implementation=_runtime_class(),
            platform="onnxruntime",
            versions=[f"onnxruntime/{onnxruntime.__version__}"],
            inputs=metadata(infos[model.name].inputs),
            outputs=metadata(infos[model.name].outputs),
            parameters=ModelParameters(uri=str(model.path.resolve()), version=model.version),
        )
        for model in models
    ]
    for model in models:
        logger.info("loading %s from %s", model.name, model.path)
    # MLServer stops all its servers from asyncio signal handlers, but uvicorn >= 0.29
    # grabs SIGINT/SIGTERM for itself while serving (MLServer only disables the older
    # hook), so the REST server would stop alone and gRPC would linger. Keep uvicorn's
    # hands off the signals.
    _NoSignalServer.capture_signals = lambda self: contextlib.nullcontext()
    server = MLServer(settings)  # installs SIGINT/SIGTERM handlers that stop it cleanly
    logging.getLogger("mlserver").propagate = False  # MLServer prints its own log lines
    serving = asyncio.ensure_future(server.start(model_settings))
    base = f"http://{_url_host(host)}:{port}"
    for model in models:
        if not await _wait_ready(f"{base}/v2/models/{model.name}/ready", serving):
            await serving
            raise CaptureError(f"The server stopped before {model.name} was ready; see the log above.")
        logger.info("ready at %s/v2/models/%s", base, model.name)
    logger.info("KServe v2 gRPC on %s:%d; stop with Ctrl-C", host, grpc_port)
    await serving
    logger.info("server stopped")


def _url_host(host: str) -> str:
    """Host part of a URL that reaches a server listening on ``host``."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


async def _wait_ready(url: str, serving: asyncio.Future[None]) -> bool:
    """Poll ``url`` until it answers 200; False if ``serving`` ends first."""

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy

    def probe() -> bool:
        try:
            with direct.open(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    while not serving.done():
        if await asyncio.to_thread(probe):
            return True
        await asyncio.sleep(0.1)
    return False


_RUNTIME_CLASS: type | None = None


def _runtime_class() -> type:
    """Build :class:`OnnxRuntimeModel` (a subclass of mlserver's ``MLModel``) on first use.

    MLServer is an optional dependency, so the class cannot be defined at import time;
    the module-level ``__getattr__`` makes it importable as
    ``psu_export.deploy.OnnxRuntimeModel``, which is how MLServer loads it.
    """
    global _RUNTIME_CLASS
    if _RUNTIME_CLASS is not None:
        return _RUNTIME_CLASS

    import numpy as np
    import onnxruntime
    from mlserver import MLModel
    from mlserver.errors import InferenceError, MLServerError
    from mlserver.types import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput

    class OnnxRuntimeModel(MLModel):
        """MLServer runtime: one onnxruntime CPU session; validates requests against the graph."""

        async def load(self) -> bool:
            uri = self.settings.parameters.uri
            self._info = read_model_info(uri)
            self._session = onnxruntime.InferenceSession(uri, providers=["CPUExecutionProvider"])
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            expected = {spec.name: spec for spec in self._info.inputs}
            received = {request_input.name: request_input for request_input in payload.inputs}
            unknown = sorted(received.keys() - expected.keys())
            missing = sorted(expected.keys() - received.keys())
            if unknown or missing:
                raise InferenceError(
                    f"model {self.name!r} takes inputs {sorted(expected)}; unknown: {unknown}, missing: {missing}"
                )
            feeds = {name: self._decode(received[name], spec) for name, spec in expected.items()}
            outputs = {spec.name: spec for spec in self._info.outputs}
            wanted = [o.name for o in payload.outputs] if payload.outputs else list(outputs)
            unknown = sorted(set(wanted) - outputs.keys())
            if unknown:
                raise InferenceError(f"model {self.name!r} has outputs {sorted(outputs)}; unknown: {unknown}")
            try:
                results = await asyncio.to_thread(self._session.run, wanted, feeds)
            except onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
                raise InferenceError(f"onnxruntime rejected the inputs: {exc}") from exc
            except Exception as exc:
                raise MLServerError(f"onnxruntime failed: {exc}", status_code=500) from exc
            return InferenceResponse(
                model_name=self.name,
                model_version=self.version,
                id=payload.id,
                outputs=[
                    ResponseOutput(
                        name=output,
                        datatype=outputs[output].v2_datatype,
                        shape=list(result.shape),
                        data=result.reshape(-1).tolist(),
                    )
                    for output, result in zip(wanted, results, strict=True)
                ],
            )

        def _decode(self, request_input: RequestInput, spec: TensorSpec) -> Any:
            """The input as a numpy array, after checking datatype, shape and element count."""
            name, shape = spec.name, list(request_input.shape)
            if request_input.datatype != spec.v2_datatype:
                raise InferenceError(
                    f"input {name!r} must have datatype {spec.v2_datatype}, got {request_input.datatype}"
                )
            fits = len(shape) == len(spec.dims) and all(
                d == -1 or d == s for d, s in zip(spec.dims, shape, strict=True)
            )
            if not fits or any(s < 0 for s in shape):
                raise InferenceError(
                    f"input {name!r} has shape {shape}; the model expects {list(spec.dims)} (-1: any size)"
                )
            data = getattr(request_input.data, "root", request_input.data)
            try:
                array = np.asarray(data, dtype=onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type))
            except (TypeError, ValueError) as exc:
                raise InferenceError(
                    f"input {name!r}: data is not a list of {spec.v2_datatype} values ({exc})"
                ) from exc
            if array.size != math.prod(shape):
                raise InferenceError(f"input {name!r}: shape {shape} needs {math.prod(shape)} values, got {array.size}")
            return array.reshape(shape)

    OnnxRuntimeModel.__module__ = __name__
    OnnxRuntimeModel.__qualname__ = "OnnxRuntimeModel"
    _RUNTIME_CLASS = OnnxRuntimeModel
    return OnnxRuntimeModel


def __getattr__(name: str) -> Any:
    """Lazy module attribute ``OnnxRuntimeModel`` (needs mlserver; see :func:`_runtime_class`)."""
    if name == "OnnxRuntimeModel":
        return _runtime_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- CLI


@click.group("deploy")
def deploy() -> None:
    """Package a converted model for an inference server.

    \b
    Example:
      psu-export deploy triton out.onnx model_repository --name snn
    """


@deploy.command("triton")
@click.argument("onnx_path", metavar="OUT.onnx", type=click.Path(path_type=Path))
@click.argument("repo_dir", metavar="REPO_DIR", type=click.Path(path_type=Path))
@click.option("--name", help="Model name in the repository (default: the file's stem).")
@click.option(
    "--max-batch-size",
    type=int,
    default=0,
    show_default=True,
    help="Triton batching along dim 0; needs a batch-first model (convert with --batch-first).",
)
@click.option(
    "--batch-first/--time-first",
    "batch_first",
    default=None,
    help="Override the layout recorded in the model (psu_export.layout metadata).",
)
@click.option(
    "--onnxruntime-version",
    metavar="V",
    help="onnxruntime version of the deployment target; fail if the model needs a newer one.",
)
def triton_command(
    onnx_path: Path,
    repo_dir: Path,
    name: str | None,
    max_batch_size: int,
    batch_first: bool | None,
    onnxruntime_version: str | None,
) -> None:
    """Write a Triton Inference Server model repository for OUT.onnx.

    Creates REPO_DIR/NAME/config.pbtxt (onnxruntime backend, dims from the ONNX graph)
    and REPO_DIR/NAME/1/model.onnx (plus external-data files). Time-first models
    ([T, B, ...], the default) get max_batch_size 0.

    \b
    Example:
      psu-export deploy triton out.onnx model_repository --name snn --onnxruntime-version 1.20
      tritonserver --model-repository=model_repository
    """
    model_dir = write_triton_repository(onnx_path, repo_dir, name, max_batch_size, batch_first, onnxruntime_version)
    info = read_model_info(model_dir / "1" / _TRITON_MODEL_FILE)
    click.echo(f"Wrote {model_dir / 'config.pbtxt'} and {model_dir / '1' / _TRITON_MODEL_FILE}")
    click.echo(f"Requires onnxruntime >= {info.min_onnxruntime} (opset {info.opset}, IR version {info.ir_version}).")


@click.command("serve")
@click.argument("model", metavar="OUT.onnx|REPO_DIR", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP (REST) port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), help="gRPC port (default: --port + 1).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--name", help="Model name (default: the file's stem; for a repository: serve only this model).")
def serve_command(model: Path, port: int, grpc_port: int | None, host: str, name: str | None) -> None:
    """Serve OUT.onnx or a Triton repository with onnxruntime over KServe v2.

    Speaks the Open Inference Protocol (KServe v2, as Triton does): REST on --port,
    gRPC on --grpc-port. Stop with Ctrl-C or SIGTERM. Needs the `serve` extra.

    \b
    Example:
      psu-export serve out.onnx --port 8000
      curl localhost:8000/v2/models/out
    """
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [psu-export] %(levelname)s - %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    serve(model, host=host, port=port, name=name, grpc_port=grpc_port)
