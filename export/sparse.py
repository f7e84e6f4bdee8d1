"""Store mostly-zero weights as ONNX sparse initializers (``GraphProto.sparse_initializer``).

A ModelProto → ModelProto pass for models whose weights are largely exact zeros, such as the sparse
branch of a low-rank + sparse (LRSD) layer. ONNX has no sparse Conv/Gemm operator: the graph still runs
a dense Conv, and runtimes densify sparse initializers when they load the model, so this pass saves
**file size only**, not memory at run time nor MACs.

Measured on this project's stack (onnx 1.23, onnxruntime 1.31): ONNX Runtime loads a Conv whose weight
is a COO sparse initializer (linearised int64 indices) and gives the same outputs as the dense weight.
``onnx.checker.check_model`` accepts it, but ``full_check=True`` fails: ONNX shape inference types a
sparse initializer as ``sparse_tensor`` and Conv's inference rejects it. So run this pass *after*
:func:`export.passes.optimize` (whose final check is a full check) and check the result with
:func:`export.parity.check_onnx_parity`. COO costs 4 bytes per value plus 8 per index, so a tensor is
converted only when at most ``max_density`` of it is non-zero (below 1/3 it is smaller than dense).
:func:`export.onnx.graph_summary` counts dense initializers only; use :func:`sparse_summary` alongside it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowrank_core.errors import UserInputError

__all__ = ["WEIGHT_OPS", "sparse_summary", "sparsify_initializers"]

#: Ops whose weight inputs may be stored sparsely (the runtime densifies them on load).
WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})
_FLOAT = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def sparsify_initializers(
    model_proto: onnx.ModelProto,
    *,
    max_density: float = 0.25,
    min_elements: int = 1024,
) -> onnx.ModelProto:
    """Move floating weight initializers that are mostly zeros into ``graph.sparse_initializer`` (COO).

    Only initializers consumed exclusively by :data:`WEIGHT_OPS` nodes, with at least ``min_elements``
    elements and a non-zero fraction of at most ``max_density``, are converted. Values and the graph's
    behaviour are unchanged (the runtime rebuilds the same dense tensor).

    Args:
        model_proto: Model to convert (not modified).
        max_density: Largest non-zero fraction converted; must be in (0, 1/3) for COO to save bytes.
        min_elements: Smaller tensors stay dense (the per-tensor overhead is not worth it).

    Returns:
        A new model; it passes ``onnx.checker.check_model`` (not ``full_check``, see the module docstring).

    Raises:
        UserInputError: if ``max_density`` is not in (0, 1/3).
    """
    if not 0.0 < max_density < 1.0 / 3.0:
        raise UserInputError(f"max_density must be in (0, 1/3) for COO storage to be smaller, got {max_density}")
    out = copy.deepcopy(model_proto)
    graph = out.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    graph_inputs = {vi.name for vi in graph.input}
    keep: list[onnx.TensorProto] = []
    sparse: list[onnx.SparseTensorProto] = []
    for init in graph.initializer:
        ops = consumers.get(init.name, set())
        numel = math.prod(init.dims)
        if (
            init.data_type not in _FLOAT
            or not ops
            or not ops <= WEIGHT_OPS
            or init.name in graph_inputs
            or numel < min_elements
        ):
            keep.append(init)
            continue
        dense = numpy_helper.to_array(init)
        flat = dense.reshape(-1)
        nz = np.flatnonzero(flat)
        if len(nz) > max_density * numel:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz], name=init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), name=init.name + "_indices")
        sparse.append(helper.make_sparse_tensor(values, indices, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.sparse_initializer.extend(sparse)
    onnx.checker.check_model(out)
    return out


def sparse_summary(model_proto: onnx.ModelProto) -> dict[str, Any]:
    """Counts of the sparse initializers: tensors, stored values, dense elements they stand for, bytes."""
    nnz = dense = nbytes = 0
    for sp in model_proto.graph.sparse_initializer:
        n = math.prod(sp.values.dims)
        nnz += n
        dense += math.prod(sp.dims)
        nbytes += sp.values.ByteSize() + sp.indices.ByteSize()
    return {
        "n_sparse_initializers": len(model_proto.graph.sparse_initializer),
        "sparse_values": nnz,
        "sparse_dense_elements": dense,
        "sparse_bytes": nbytes,
        "proto_bytes": model_proto.ByteSize(),
    }
