"""The weight layers of an ONNX graph: every Conv / Gemm / MatMul, its geometry, cost and why it stays dense.

Each candidate is seen through a *proxy* ``nn.Conv2d`` / ``nn.Linear`` whose weight is the initializer in
PyTorch's layout (Conv ``(T, S/g, kh, kw)``, Gemm/MatMul ``(out, in)``), so the project's rank rules and
factorizations (:mod:`compress.ranks`, :mod:`compress.factorizations`) run unchanged on ONNX input.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compress.factorizations import LayerGeometry

__all__ = ["WEIGHT_OPS", "OnnxLayer", "find_layers", "layer_path", "node_macs"]

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_FLOAT_NP = (np.float32, np.float16, np.float64)


@dataclass
class OnnxLayer:
    """One Conv/Gemm/MatMul node of the graph.

    Attributes:
        path: The plan's name for it: the node name, or ``output:<first output>`` for an unnamed node.
        index: Position of the node in the (sorted) main graph.
        node: The node.
        weight_name: The initializer holding the weight (``None`` when the weight is not one).
        module: Proxy ``nn.Conv2d`` / ``nn.Linear`` over the weight (``None`` when there is no usable weight).
        geometry: Spatial sizes (conv) or positions (``(pixels, 1)`` for a MatMul over a sequence).
        macs: MACs per image of the node as it is.
        params: Weight (and constant bias) elements.
        attrs: Conv ``strides``/``pads``/``dilations``/``group`` (explicit pads, auto_pad resolved), Gemm
            ``alpha``/``beta``/``transA``/``transB``.
        reason: Why the node is not a candidate (``None`` = it is one).
    """

    path: str
    index: int
    node: onnx.NodeProto
    weight_name: str | None
    module: nn.Module | None
    geometry: LayerGeometry
    macs: int
    params: int
    attrs: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    @property
    def op(self) -> str:
        """``Conv``, ``Gemm`` or ``MatMul``."""
        return self.node.op_type

    @property
    def dtype(self) -> np.dtype[Any]:
        """Numpy dtype of the weight initializer."""
        assert self.module is not None
        return np.dtype(self.attrs["dtype"])


def layer_path(node: onnx.NodeProto) -> str:
    """The plan name of a node: its name, or ``output:<first output>`` when unnamed."""
    return node.name or f"output:{node.output[0]}"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul at batch 1 (0 when its shapes are unknown)."""
    outs = [shapes.get(n) for n in node.output[:1]]
    ins = [shapes.get(n) for n in node.input[:2]]
    if outs[0] is None or any(s is None for s in ins):
        return 0
    out, a, b = outs[0], ins[0], ins[1]
    assert out is not None
    assert a is not None
    assert b is not None
    batch = out[0] if out else 1
    if node.op_type == "Conv":  # every output element: S/g · kh · kw products
        return math.prod(out) // max(batch, 1) * math.prod(b[1:])
    if node.op_type == "ConvTranspose":  # every input element: (T/g) · kh · kw products
        return math.prod(a) // max(batch, 1) * math.prod(b[1:])
    if node.op_type == "Gemm":
        k = a[0] if int(_attrs(node).get("transA", 0)) else a[-1]
        return math.prod(out) * k // max(batch, 1)
    if node.op_type == "MatMul":
        total = math.prod(out) * a[-1]
        return total // max(batch, 1) if len(out) >= 2 else total
    return 0


def _consumers(model: onnx.ModelProto) -> Counter[str]:
    count: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for name in set(node.input):
                count[name] += 1
            for attr in node.attribute:
                for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk(g)

    walk(model.graph)
    return count


def _resolve_pads(
    attrs: dict[str, Any], in_hw: tuple[int, int], out_hw: tuple[int, int], k: tuple[int, int]
) -> list[int] | str:
    """Explicit ``[top, left, bottom, right]`` pads, or the reason they cannot be made explicit."""
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode in ("NOTSET", ""):
        return [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    if mode == "VALID":
        return [0, 0, 0, 0]
    strides, dil = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    begin, end = [], []
    for axis in range(2):
        total = max((out_hw[axis] - 1) * strides[axis] + (k[axis] - 1) * dil[axis] + 1 - in_hw[axis], 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return [begin[0], begin[1], end[0], end[1]]


def _proxy_conv(w: np.ndarray, group: int, bias: np.ndarray | None) -> nn.Conv2d:
    t, s, kh, kw = (int(d) for d in w.shape)
    module = nn.Conv2d(s * group, t, (kh, kw), groups=group, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(torch.from_numpy(np.array(w, copy=True)), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(torch.from_numpy(np.array(bias, copy=True)), requires_grad=False)
    return module


def _proxy_linear(w: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    out_f, in_f = (int(d) for d in w.shape)
    module = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(torch.from_numpy(np.array(w, copy=True)), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(torch.from_numpy(np.array(bias, copy=True)), requires_grad=False)
    return module


def find_layers(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[OnnxLayer]:
    """Every Conv/Gemm/MatMul of the main graph, with a proxy module where its weight is a usable initializer."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    producers = {out: node for node in graph.node for out in node.output}
    uses = _consumers(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    layers: list[OnnxLayer] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        layer = _layer(index, node, inits, graph_inputs, producers, uses, shapes)
        if node.op_type == "Gemm" and opset < 11 and layer.reason is None:
            layer.reason, layer.module = (
                f"opset {opset} < 11: a Gemm without a bias (the first of a chain) needs opset 11",
                None,
            )
        layers.append(layer)
    return layers


def _layer(
    index: int,
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    graph_inputs: set[str],
    producers: dict[str, onnx.NodeProto],
    uses: Counter[str],
    shapes: dict[str, tuple[int, ...]],
) -> OnnxLayer:
    attrs = _attrs(node)
    path = layer_path(node)
    macs = node_macs(node, shapes)
    w_name = node.input[1] if len(node.input) > 1 else ""
    layer = OnnxLayer(path, index, node, None, None, LayerGeometry(), macs, 0, attrs=attrs)

    def keep(reason: str) -> OnnxLayer:
        layer.reason = reason
        return layer

    if len(node.input) > 0 and node.input[0] in inits:
        return keep("the data input is a constant (the weight is the left operand)")
    if w_name not in inits:
        origin = producers.get(w_name)
        if origin is not None:
            return keep(f"weight {w_name!r} is produced by node {origin.name or origin.op_type!r}, not an initializer")
        return keep(f"weight {w_name!r} is a graph input, not a constant initializer")
    if w_name in graph_inputs:
        return keep(f"weight {w_name!r} is also a graph input (overridable at run time)")
    if uses[w_name] > 1:
        return keep(f"weight {w_name!r} is shared by {uses[w_name]} nodes: factorizing one would change the others")
    w = numpy_helper.to_array(inits[w_name])
    layer.weight_name = w_name
    layer.attrs["dtype"] = str(w.dtype)
    bias_name = node.input[2] if len(node.input) > 2 else ""
    bias = numpy_helper.to_array(inits[bias_name]) if bias_name in inits else None
    layer.params = int(w.size) + (int(bias.size) if bias is not None else 0)
    if w.dtype.type not in _FLOAT_NP:
        return keep(f"weight {w_name!r} is {w.dtype} (only float32/float16/float64 weights are factorized)")
    x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
    if x_shape is None or y_shape is None:
        return keep("the shapes around this node are unknown (shape inference and ONNX Runtime found none)")
    if node.op_type == "Conv":
        if w.ndim != 4:
            return keep(f"{w.ndim - 2}-D convolution: only 2-D convs (4-D weights) are factorized")
        group = int(attrs.get("group", 1))
        in_hw, out_hw = (int(x_shape[2]), int(x_shape[3])), (int(y_shape[2]), int(y_shape[3]))
        pads = _resolve_pads(attrs, in_hw, out_hw, (int(w.shape[2]), int(w.shape[3])))
        layer.attrs.update(
            strides=[int(v) for v in attrs.get("strides", [1, 1])],
            dilations=[int(v) for v in attrs.get("dilations", [1, 1])],
            pads=pads,
            group=group,
        )
        layer.geometry = LayerGeometry(in_hw=in_hw, out_hw=out_hw)
        if bias is not None and bias.dtype != w.dtype:
            bias = None
        module = _proxy_conv(w, group, bias)
        module.stride = tuple(layer.attrs["strides"])
        module.dilation = tuple(layer.attrs["dilations"])
        if not isinstance(pads, str):
            module.padding = (pads[0], pads[1])  # begin pads: what a chain built for timing uses
        layer.module = module
        return layer
    if w.ndim != 2:
        return keep(f"{node.op_type} weight of rank {w.ndim}: only 2-D weight matrices are factorized")
    if node.op_type == "Gemm":
        weight = w if int(attrs.get("transB", 0)) else w.T
        gemm_bias = bias if bias is not None and bias.shape == (weight.shape[0],) else None
        layer.attrs.update(
            alpha=float(attrs.get("alpha", 1.0)),
            beta=float(attrs.get("beta", 1.0)),
            transA=int(attrs.get("transA", 0)),
        )
        layer.module = _proxy_linear(weight, gemm_bias if layer.attrs["beta"] == 1.0 else None)
        pixels = 1
    else:
        layer.module = _proxy_linear(w.T, None)
        pixels = math.prod(y_shape[1:-1]) if len(y_shape) > 2 else 1
        layer.params = int(w.size)
    layer.geometry = LayerGeometry(in_hw=None, out_hw=None if pixels == 1 else (pixels, 1))
    return layer
