"""Emit: export the time-parallel model to ONNX.

``torch.onnx.export`` (dynamo) with the ``psu`` ops translated to bare custom-domain
nodes, the model-local functions attached afterwards (:mod:`psu_export.ops`), dynamic
time and batch axes, and ``metadata_props`` recording where the model came from.  The
file is written to a temporary name and renamed on success, so a failed export never
leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from . import __version__
from .errors import CaptureError, UsageError, one_line
from .cuda_graph import STATIC_KEY, WAVES_KEY, static_build
from .ops import DOMAIN, attach_functions, layer_spike_outputs, translation_table
from .rewrite import ParallelModel
from .synaptic import chunk_wide_matmuls

#: the ONNX opset of the standard domain (onnxruntime >= 1.17)
OPSET = 20
#: model inputs larger than this (bytes) store their weights in ``<file>.data``
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class EmittedModel:
    path: Path
    node_count: int
    psu_nodes: list[str]
    input_names: list[str]
    output_names: list[str]
    waves: list[str] = field(default_factory=list)  # a static build's wave schedule (psu_export.wavefront)


def metadata(model: ParallelModel, source: str, mode: str) -> dict[str, str]:
    layout = model.layout
    return {
        "psu_export.version": __version__,
        "psu_export.source": source,
        "psu_export.mode": mode,
        "psu_export.input_kind": layout.kind,
        "psu_export.layout": layout.order,
        "psu_export.time_steps": str(layout.time_steps),
        "psu_export.dynamic_time": str(layout.dynamic_time).lower(),
        "psu_export.sample_shape": json.dumps(list(layout.sample_shape)),
        "psu_export.neuron_sites": json.dumps([site.to_json() for site in model.sites]),
    }


def export_onnx(model: ParallelModel, example: torch.Tensor, out_path: str | os.PathLike, metadata_props: dict[str, str], dynamic_batch: bool = True,
                static: bool = False, row_blocks: bool = True) -> EmittedModel:
    """Export ``model`` to ``out_path`` (atomically).

    ``static``: a build for onnxruntime's CUDA graphs, fixed to ``example``'s shape
    (:func:`psu_export.cuda_graph.static_build`).  ``row_blocks``: run tall products with
    large weights in row blocks (:func:`psu_export.synaptic.chunk_wide_matmuls`, the same
    floats; a static build never does).
    """
    out_path = Path(out_path)
    if not out_path.parent.exists():
        raise UsageError(f"The output directory {out_path.parent} does not exist; create it or choose another output path.")
    layout = model.layout
    axes = {}
    if layout.time_axis is not None and layout.dynamic_time:
        axes[layout.time_axis] = torch.export.Dim("T")
    if dynamic_batch:
        axes[layout.batch_axis] = torch.export.Dim("batch")
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=(axes,),
                custom_translation_table=translation_table(),
                input_names=["input"],
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise CaptureError(f"ONNX export failed: {one_line(exc, 500)}") from exc
    proto = program.model_proto
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    pinned = [str(axes[a]) for a in axes if a < len(dims) and not dims[a].dim_param]
    if pinned:
        raise CaptureError(
            f"ONNX export fixed the {' and '.join(pinned)} axis to the example's size; the model would only run "
            "at that size. This is a psu-export limitation for one of the model's operators; please report it."
        )
    attach_functions(proto)
    if static:
        proto = static_build(proto, tuple(example.shape), layer_spike_outputs(proto))
        metadata_props = dict(metadata_props, **{STATIC_KEY: "true", "psu_export.dynamic_time": "false"})
    elif row_blocks:
        chunk_wide_matmuls(proto)
    for key, value in metadata_props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        large = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD
        if large:
            data_name = out_path.name + ".data"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name + ".tmp")
            os.replace(out_path.parent / (data_name + ".tmp"), out_path.parent / data_name)
            # the model refers to the temporary data name: rewrite the reference
            saved = onnx.load(tmp, load_external_data=False)
            for tensor in saved.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(saved, tmp)
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    psu_nodes = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]  # none in a static build: inlined
    return EmittedModel(
        out_path,
        len(proto.graph.node),
        psu_nodes,
        [i.name for i in proto.graph.input],
        [o.name for o in proto.graph.output],
        json.loads(next((e.value for e in proto.metadata_props if e.key == WAVES_KEY), "[]")),
    )
