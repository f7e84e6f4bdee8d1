"""Replace each factorized node of an ONNX graph by its Conv/Gemm/MatMul chain; leave the rest untouched.

The factor weights come from the registered factorizations (:mod:`compress.factorizations`, in PyTorch's
layout); this module only writes them as nodes with the original node's attributes: the k×k conv of a
chain keeps the original strides, explicit pads (``auto_pad`` resolved) and dilations; Tai and CP split
them between their vertical and horizontal convs; the last node of a chain writes the original output
tensor, under the original node name, and carries the original bias. Graph inputs, outputs, opsets,
metadata, dynamic axes and every other node are copied as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from compress.factorizations import FACTORIZATIONS, factorization
from compress.onnx_in.data import WHITENED, whitened_svd
from compress.onnx_in.layers import OnnxLayer
from compress.plan import Plan
from lowrank_core.errors import CompressionError, ExportError

__all__ = ["check_rewritten", "rewrite_graph"]


class _Names:
    """Fresh tensor and node names that collide with nothing in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.taken = {n.name for n in g.node} | {o for n in g.node for o in (*n.input, *n.output)}
        self.taken |= {t.name for t in (*g.input, *g.output, *g.value_info, *g.initializer)}

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def _chain_specs(action: str, layer: OnnxLayer, n_weights: int) -> list[dict[str, Any]]:
    """Attributes of each Conv of a factorized conv chain, in order."""
    a = layer.attrs
    (sh, sw), (dh, dw) = a["strides"], a["dilations"]
    top, left, bottom, right = a["pads"]
    full = {"strides": [sh, sw], "pads": [top, left, bottom, right], "dilations": [dh, dw]}
    unit: dict[str, Any] = {}
    vertical = {"strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]}
    horizontal = {"strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]}
    specs = {
        "svd": [full, unit],
        "pointwise-svd": [full, unit],
        "tucker2": [unit, full, unit],
        "tai": [vertical, horizontal],
        "cp": [unit, vertical, horizontal, unit],
    }.get(action)
    if specs is None or len(specs) != n_weights:
        raise CompressionError(f"factorization {action!r} cannot be written as an ONNX Conv chain")
    return specs


def _as_array(weight: torch.Tensor, dtype: np.dtype[Any]) -> np.ndarray:
    return weight.detach().cpu().numpy().astype(dtype)


def _chain(
    layer: OnnxLayer, action: str, weights: Sequence[torch.Tensor], names: _Names
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    node = layer.node
    x, y = node.input[0], node.output[0]
    extra = list(node.input[2:3]) if len(node.input) > 2 and node.input[2] else []
    base = layer.path.replace("output:", "")
    dtype = layer.dtype
    inits, nodes = [], []
    current = x
    last = len(weights) - 1
    for i, w in enumerate(weights):
        array = _as_array(w, dtype)
        if layer.op == "MatMul":
            array = np.ascontiguousarray(array.T)
        w_name = names(f"{base}.lowrank{i}.weight")
        inits.append(numpy_helper.from_array(array, w_name))
        out = y if i == last else names(f"{base}.lowrank{i}.out")
        node_name = (node.name or names(f"{base}.lowrank{i}")) if i == last else names(f"{base}.lowrank{i}")
        inputs = [current, w_name] + (extra if i == last else [])
        if layer.op == "Conv":
            attrs = dict(_chain_specs(action, layer, len(weights))[i])
            attrs["kernel_shape"] = [int(array.shape[2]), int(array.shape[3])]
            groups = int(array.shape[0]) if action == "cp" and i in (1, 2) else 1
            if groups != 1:
                attrs["group"] = groups
            nodes.append(helper.make_node("Conv", inputs, [out], name=node_name, **attrs))
        elif layer.op == "Gemm":
            a = layer.attrs
            attrs = {"transB": 1}
            if i == 0:
                attrs.update(alpha=a["alpha"], transA=a["transA"])
            if i == last and extra:
                attrs["beta"] = a["beta"]
            nodes.append(helper.make_node("Gemm", inputs, [out], name=node_name, **attrs))
        else:
            nodes.append(helper.make_node("MatMul", inputs[:2], [out], name=node_name))
        current = out
    return nodes, inits


def rewrite_graph(
    model: onnx.ModelProto,
    layers: Sequence[OnnxLayer],
    plan: Plan,
    *,
    hooi_iters: int = 0,
    grams: dict[str, torch.Tensor] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with every factorized plan entry replaced by its chain (rel. errors recorded in ``plan``).

    With ``grams`` (layer path → input second moment, :func:`compress.onnx_in.data.input_grams`), the
    channel-SVD family is factored by :func:`compress.onnx_in.data.whitened_svd` (least output error).

    Raises:
        CompressionError: the plan does not match the graph (unknown node, other weight shape, bad ranks).
    """
    by_path = {layer.path: layer for layer in layers}
    names = _Names(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    dropped: set[str] = set()
    for entry in plan.factorized_layers:
        layer = by_path.get(entry.path)
        if layer is None or layer.module is None or layer.reason is not None:
            why = "no such Conv/Gemm/MatMul" if layer is None else (layer.reason or "no usable weight")
            raise CompressionError(f"plan does not match the ONNX graph: {entry.path!r}: {why}")
        if list(layer.module.weight.shape) != list(entry.shape):
            raise CompressionError(
                f"plan does not match the ONNX graph: {entry.path} has weight {list(layer.module.weight.shape)}, "
                f"the plan says {entry.shape}"
            )
        if entry.action not in FACTORIZATIONS:
            raise CompressionError(f"plan names unknown factorization {entry.action!r} for {entry.path}")
        fact = factorization(entry.action, hooi_iters=hooi_iters)
        ranks = tuple(int(r) for r in entry.ranks or ())
        fact.check_ranks(layer.module, ranks)
        reason = fact.unsupported_reason(layer.module)
        if reason is not None:
            raise CompressionError(f"{entry.path}: {reason}")
        if grams is not None and entry.path in grams and entry.action in WHITENED:
            weights, rel_error, output_error = _whitened(layer.module.weight, ranks[0], grams[entry.path])
            entry.info.update(factors="whitened (least output error on DATA)", output_rel_error=output_error)
        else:
            weights, rel_error = fact.factor_weights(layer.module, ranks)
        entry.rel_error = float(rel_error)
        nodes, inits = _chain(layer, entry.action, weights, names)
        replaced[layer.index] = nodes
        new_inits.extend(inits)
        assert layer.weight_name is not None
        dropped.add(layer.weight_name)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = list(_spliced(g.node, replaced))
    del g.node[:]
    g.node.extend(nodes)
    kept = [init for init in g.initializer if init.name not in dropped]
    del g.initializer[:]
    g.initializer.extend([*kept, *new_inits])
    kept_vi = [vi for vi in g.value_info if vi.name not in dropped]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    return out


def _whitened(weight: torch.Tensor, rank: int, gram: torch.Tensor) -> tuple[list[torch.Tensor], float, float]:
    """Whitened channel-SVD factors in the layer layout, the weight-space and the output relative error."""
    first, second, output_error = whitened_svd(weight, rank, gram)
    w = weight.detach().to(torch.float64)
    approx = (second @ first).reshape(w.shape)
    norm = float(torch.linalg.vector_norm(w))
    rel = float(torch.linalg.vector_norm(w - approx)) / norm if norm > 0 else 0.0
    if w.dim() == 4:
        return [first.reshape(rank, *w.shape[1:]), second.reshape(w.shape[0], rank, 1, 1)], rel, output_error
    return [first, second], rel, output_error


def _spliced(nodes: Sequence[onnx.NodeProto], replaced: dict[int, list[onnx.NodeProto]]) -> Iterator[onnx.NodeProto]:
    for index, node in enumerate(nodes):
        yield from replaced.get(index, [node])


def check_rewritten(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """``onnx.checker`` and strict shape inference on the rewritten graph (strict only if the original passes).

    Raises:
        ExportError: the rewritten graph fails a check the original passes (a bug: please report it).
    """
    try:
        onnx.checker.check_model(rewritten)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ExportError(f"the rewritten ONNX graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    try:
        onnx.shape_inference.infer_shapes(original, strict_mode=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return  # the original does not pass strict inference either (custom ops, ...)
    try:
        onnx.shape_inference.infer_shapes(rewritten, strict_mode=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise ExportError(f"the rewritten ONNX graph fails shape inference: {str(exc).splitlines()[0]}") from None
