"""Merge two parallel conv pairs summed by an Add (Bi-JSVD) into one conv pair of rank ``r1 + r2``.

Bi-JSVD (``compress.methods.jsvd``) builds each layer as ``V_r (U_r^n x) + V_l^n (U_l x)``: two chains
``F1×1 conv → 1×F2 conv`` on the same input, summed. That is exactly one chain whose first conv stacks
``[U_r^n; U_l]`` along its output channels and whose second conv stacks ``[V_r, V_l^n]`` along its input
channels — half the nodes, no Add, and the BatchNorm after the sum can fold into the second conv.

``U_l`` and ``V_r`` are shared by every layer of a group (one initializer each). Two ways to merge:

* ``shared=True`` (default): the stacked weights are ``Concat`` nodes over the original initializers, so the
  file still stores each shared factor once; ONNX Runtime folds the Concats (and then the BatchNorm) when
  it loads the session, so what runs is the merged pair.
* ``shared=False``: the stacked weights are materialised as new initializers (and the BatchNorm folded in
  the file): every layer stores its own copy of the shared factors — a bigger file, the same graph at run
  time.

Both are exact up to float32 rounding. :func:`merge_parallel_conv_pairs` is a ``Graph -> Graph`` pass
(onnx-graphsurgeon), :func:`merge_model` the ``ModelProto`` wrapper the export stage calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["merge_model", "merge_parallel_conv_pairs"]

_GEOMETRY = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def _only_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _conv_from(tensor: gs.Tensor) -> gs.Node | None:
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op != "Conv" or int(node.attrs.get("group", 1)) != 1:
        return None
    if not isinstance(node.inputs[1], gs.Constant):
        return None
    return node


def _geometry(node: gs.Node) -> tuple[Any, ...]:
    return tuple(tuple(v) if isinstance(v := node.attrs.get(k), list) else v for k in _GEOMETRY)


def _bias(node: gs.Node, channels: int) -> np.ndarray:
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return np.asarray(node.inputs[2].values, dtype=np.float32)
    return np.zeros(channels, dtype=np.float32)


def _has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name != ""


def _private_name(parts: list[gs.Constant], index: int) -> str:
    """``<module of the part used by one conv only>.merged.<index>.weight`` (the first part's module if none)."""
    private = [t for t in parts if len(t.outputs) == 1] or parts
    name = private[0].name.removesuffix(".weight")
    module = name.rsplit(".", 2)[0] if name.count(".") >= 2 else name  # drop the branch's "right.0"
    return f"{module}.merged.{index}.weight"


def _match(add: gs.Node, outputs: set[str]) -> tuple[gs.Node, gs.Node, gs.Node, gs.Node] | None:
    """``(a, b, c, d)`` for ``Add(b(a(x)), d(c(x)))`` with every intermediate used once, else ``None``."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    seconds = [_conv_from(t) for t in add.inputs]
    if any(s is None or _only_consumer(s.outputs[0], outputs) is not add for s in seconds):
        return None
    b, d = seconds
    firsts = [_conv_from(s.inputs[0]) for s in (b, d)]
    if any(f is None for f in firsts):
        return None
    a, c = firsts
    if any(_only_consumer(f.outputs[0], outputs) is not s for f, s in ((a, b), (c, d))):
        return None
    if a.inputs[0] is not c.inputs[0] or _geometry(a) != _geometry(c) or _geometry(b) != _geometry(d):
        return None
    if _has_bias(a) or _has_bias(c):  # the factor chains are bias-free in their first conv
        return None
    wa, wb, wc, wd = (n.inputs[1].values for n in (a, b, c, d))
    if wa.shape[1:] != wc.shape[1:] or wb.shape[0] != wd.shape[0] or wb.shape[2:] != wd.shape[2:]:
        return None
    return a, b, c, d


def merge_parallel_conv_pairs(graph: gs.Graph, *, shared: bool = True) -> gs.Graph:
    """Replace every ``Add(conv∘conv(x), conv∘conv(x))`` by one conv pair of the summed rank (in place).

    Args:
        graph: The graph (cleaned up on return).
        shared: Stack the weights with ``Concat`` nodes over the original initializers (each shared factor
            stays stored once) instead of materialising stacked initializers.

    Returns:
        ``graph``; ``graph.merged_branches`` holds the number of pairs merged.
    """
    outputs = {t.name for t in graph.outputs}
    merged = 0
    for add in list(graph.nodes):
        found = _match(add, outputs)
        if found is None:
            continue
        a, b, c, d = found
        tag = f"{add.name or 'add'}_merged"
        w1_parts, w2_parts = [a.inputs[1], c.inputs[1]], [b.inputs[1], d.inputs[1]]
        # Named after the layer's own (unshared) factor, so the source layer stays readable from the weight
        # name (runtime.profile maps nodes to layers that way): layer2.0.conv2.right.0.weight → ….merged.0.weight
        w1_name, w2_name = (_private_name(parts, i) for i, parts in enumerate((w1_parts, w2_parts)))
        if shared:
            w1 = gs.Variable(w1_name, dtype=np.float32)
            w2 = gs.Variable(w2_name, dtype=np.float32)
            graph.nodes.append(gs.Node("Concat", f"{tag}_concat_w1", {"axis": 0}, inputs=w1_parts, outputs=[w1]))
            graph.nodes.append(gs.Node("Concat", f"{tag}_concat_w2", {"axis": 1}, inputs=w2_parts, outputs=[w2]))
        else:
            w1 = gs.Constant(w1_name, np.concatenate([t.values for t in w1_parts], axis=0))
            w2 = gs.Constant(w2_name, np.concatenate([t.values for t in w2_parts], axis=1))
        out_channels = int(b.inputs[1].values.shape[0])
        inputs2 = [None, w2]
        if _has_bias(b) or _has_bias(d):
            inputs2.append(gs.Constant(f"{tag}_b2", _bias(b, out_channels) + _bias(d, out_channels)))
        mid = gs.Variable(f"{tag}_mid", dtype=np.float32)
        first = gs.Node("Conv", f"{tag}_conv1", dict(a.attrs), inputs=[a.inputs[0], w1], outputs=[mid])
        inputs2[0] = mid
        second = gs.Node("Conv", f"{tag}_conv2", dict(b.attrs), inputs=inputs2, outputs=list(add.outputs))
        for node in (a, b, c, d, add):
            node.outputs.clear()
            node.inputs.clear()
        graph.nodes += [first, second]
        merged += 1
    graph.cleanup().toposort()
    graph.merged_branches = merged
    return graph


def merge_model(model: onnx.ModelProto, *, shared: bool = True) -> tuple[onnx.ModelProto, int]:
    """:func:`merge_parallel_conv_pairs` on a model; with ``shared=False`` the BatchNorms are folded after.

    Returns:
        The new model (the input is not modified) and the number of pairs merged.
    """
    from export.passes import check_model, cleanup, dedupe_initializers, fold_batchnorm

    graph = gs.import_onnx(model)
    merge_parallel_conv_pairs(graph, shared=shared)
    merged = graph.merged_branches
    if merged and not shared:
        fold_batchnorm(graph)
        dedupe_initializers(graph)
    cleanup(graph)
    out = gs.export_onnx(graph)
    out.producer_name, out.producer_version, out.doc_string = (
        model.producer_name,
        model.producer_version,
        model.doc_string,
    )
    if model.ir_version > 0:
        out.ir_version = model.ir_version
    check_model(out)
    return out, merged
