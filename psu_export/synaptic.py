"""Graph passes over the synaptic layers of an exported model (the ops between neurons).

:func:`chunk_wide_matmuls`: a time-folded ``MatMul`` ``Y[M, N] = A[M, K] @ W[K, N]`` with a
large weight (:data:`CHUNK_MIN_WEIGHT_BYTES`), over many rows ``M = T * B`` (at least
:data:`CHUNK_MIN_ROWS` at run time), runs as :data:`CHUNKS` products over consecutive row
blocks, ``Y = concat_i(A_i @ W + b)``, each followed by its bias addition (when the product
has one) while the block is still in cache; below that many rows an ``If`` keeps the one
product.  Every output element is the same dot product over the same ``K`` terms, then the
same bias addition, so the floats are those of the unchunked file, bit for bit (tested).

Why: folding time into the batch turns T small products into one tall one, and onnxruntime's
CPU product streams all the rows past each block of the weight, from memory once they no
longer fit the caches.  On the project's 2-core AVX2 CPU (session 15, interleaved medians)
eight blocks ran a 784 x 1000 product over 4,096-16,384 rows 1.15-1.17x faster than one
product, the copies of the split and the concatenation included, a 2048 x 2048 weight
1.10x over 4,096 rows and no faster over 2,048; products with weights under about 2 MB
(128 or 256 columns, a 1000 x 10 read-out) lost 10-45% to the copies, hence both limits.  The reference
MLP at T = 256, batch 32 took 0.88-0.92x its previous time (103.6-105.3 against
114.9-118.7 ms).  On the CUDA provider (an H200) the blocks give the same floats as the
single product and cost 3-4% at 8,192 rows.  The static CUDA-graph build does not take
this pass (its products run on the GPU, and it may hold no control flow).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .ops.builders import OnnxBuilder
from .ops.linear import node_reads

#: row blocks a chunked product is split into
CHUNKS = 8
#: the product is chunked at run time from this many rows of ``A`` (all axes but the last)
CHUNK_MIN_ROWS = 4096
#: only products whose weight initializer has at least this many bytes are considered
CHUNK_MIN_WEIGHT_BYTES = 2 << 20


def chunk_wide_matmuls(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``model``'s top-level wide ``MatMul`` nodes (module docstring) in place;
    returns the names of the rewritten products."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_reads(node):  # also what its subgraphs read from the outer scope
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    nodes, folded_adds, chunked = [], set(), []
    for index, node in enumerate(graph.node):
        if id(node) in folded_adds:
            continue
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if (weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2
                or 4 * weight.dims[0] * weight.dims[1] < CHUNK_MIN_WEIGHT_BYTES):
            nodes.append(node)
            continue
        bias_add = _bias_add(node, consumers, weights, graph_outputs)
        if bias_add is not None:
            folded_adds.add(id(bias_add))
        nodes.extend(_chunked(node, bias_add, int(weight.dims[0]), int(weight.dims[1]), f"chunk{index}_"))
        chunked.append(node.name or node.output[0])
    del graph.node[:]
    graph.node.extend(nodes)
    return chunked


def _bias_add(matmul, consumers, weights, graph_outputs) -> onnx.NodeProto | None:
    """The ``Add`` of a one-dimensional initializer that is the product's only reader, if any."""
    product = matmul.output[0]
    readers = consumers.get(product, [])
    if product in graph_outputs or len(readers) != 1 or readers[0].op_type != "Add":
        return None
    other = [name for name in readers[0].input if name != product]
    if len(other) != 1 or other[0] not in weights or len(weights[other[0]].dims) != 1:
        return None
    return readers[0]


def _chunked(matmul, bias_add, k: int, n: int, prefix: str) -> list[onnx.NodeProto]:
    """``A`` flattened to rows, an ``If`` on the row count between the chunked and the single
    product (each followed by the bias, added in the original ``Add``'s operand order), the
    result reshaped back to ``A``'s leading axes."""
    a, w = matmul.input
    out = (bias_add or matmul).output[0]
    b = OnnxBuilder(prefix)
    rows = b.node("Reshape", [a, b.const_array(np.array([-1, k], np.int64))])
    many = b.node("GreaterOrEqual", [b.node("Shape", [rows], start=0, end=1), b.const_array(np.array([CHUNK_MIN_ROWS], np.int64))])

    def product(branch: OnnxBuilder, block: str) -> str:
        y = branch.node("MatMul", [block, w])
        if bias_add is None:
            return y
        # Sum, not Add: onnxruntime fuses a 2-D MatMul + Add into one Gemm that starts from
        # the bias, which rounds differently from the product + Add of the unchunked file
        # (and further from PyTorch's own run: a hidden spike flipped in tests)
        return branch.node("Sum", [y if name == matmul.output[0] else name for name in bias_add.input])

    blocks = OnnxBuilder(prefix + "then_")
    parts = [product(blocks, block) for block in blocks.node("Split", [rows], n_out=CHUNKS, axis=0, num_outputs=CHUNKS)]
    stacked = blocks.node("Concat", parts, axis=0)
    single = OnnxBuilder(prefix + "else_")
    whole = product(single, rows)
    flat = b.node("If", [many], then_branch=_graph(blocks, stacked, prefix + "then"), else_branch=_graph(single, whole, prefix + "else"))
    lead = b.node("Shape", [a], start=0, end=-1)
    b.nodes.append(helper.make_node("Reshape", [flat, b.node("Concat", [lead, b.const_array(np.array([n], np.int64))], axis=0)], [out]))
    return b.nodes


def _graph(builder: OnnxBuilder, output: str, name: str) -> onnx.GraphProto:
    return helper.make_graph(builder.nodes, name, [], [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)])
