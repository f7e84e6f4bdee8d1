"""Graph passes on onnx-graphsurgeon graphs, and the :func:`optimize` pipeline that chains them.

Every pass takes a :class:`onnx_graphsurgeon.Graph`, edits it in place and returns the same graph, so
passes chain like graphsurgeon's own ``graph.cleanup().toposort()``. Each docstring states the
invariant the pass keeps. Passes only see the top-level graph (CNN exports have no subgraphs).

Rewrites that replace one node by a cheaper equivalent are kept as data: :data:`NOOP_RULES` maps an op
type to the predicate under which that node is an identity.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from export._util import first_line
from lowrank_core.errors import ExportError

__all__ = [
    "NOOP_RULES",
    "castlike_to_cast",
    "check_model",
    "cleanup",
    "dedupe_initializers",
    "fold_batchnorm",
    "fold_constants",
    "optimize",
    "reduce_mean_to_global_pool",
    "remove_noops",
    "reshape_to_flatten",
]


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


def optimize(model_proto: onnx.ModelProto, *, fold_bn: bool = True, opset: int | None = None) -> onnx.ModelProto:
    """Clean an exported model: fold constants and BatchNorm, merge duplicate weights, drop no-ops.

    The chain is: import → :func:`castlike_to_cast` → :func:`fold_constants` (only when some node
    is foldable) → :func:`dedupe_initializers` → :func:`fold_batchnorm` → :func:`remove_noops` →
    :func:`reduce_mean_to_global_pool` → :func:`reshape_to_flatten` → :func:`dedupe_initializers` →
    :func:`cleanup` → export → optional opset conversion → :func:`check_model` (full ONNX check).
    De-duplicating *before* BN folding makes weights the exporter duplicated visible as shared, so
    folding cannot turn one shared factor into several different tensors.

    Args:
        model_proto: Model to optimize (not modified).
        fold_bn: Fold BatchNormalization into the preceding Conv/ConvTranspose.
        opset: Convert the result to this ONNX opset (e.g. 17, below the exporter's 18). ``None``
            keeps the model's opset.

    Returns:
        A new, checked model whose outputs equal the input model's up to float32 rounding.

    Raises:
        ExportError: if the opset conversion or the ONNX checker fails.
    """
    graph = gs.import_onnx(model_proto)
    _annotate_shapes(graph, model_proto)
    graph.toposort()
    castlike_to_cast(graph)
    fold_constants(graph)
    dedupe_initializers(graph)
    if fold_bn:
        fold_batchnorm(graph)
    remove_noops(graph)
    reduce_mean_to_global_pool(graph)
    reshape_to_flatten(graph)
    dedupe_initializers(graph)
    cleanup(graph)
    out = gs.export_onnx(graph)
    # gs exports graph and opsets only; keep the exporter's model-level metadata.
    out.producer_name = model_proto.producer_name
    out.producer_version = model_proto.producer_version
    out.doc_string = model_proto.doc_string
    if model_proto.ir_version > 0:  # keep the producer's IR version (gs would stamp the newest one)
        out.ir_version = model_proto.ir_version
    current = _default_opset(out)
    if opset is not None and opset != current:
        try:
            out = onnx.version_converter.convert_version(out, opset)
        except Exception as exc:  # the C++ converter raises RuntimeError/ValidationError/IndexError
            raise ExportError(
                f"cannot convert the optimized graph from opset {current} to {opset} ({first_line(exc)}); "
                f"use --opset {current}"
            ) from exc
    check_model(out)
    return out


def check_model(model_proto: onnx.ModelProto) -> None:
    """Run ``onnx.checker.check_model(..., full_check=True)`` without serialising the weights.

    The checker round-trips the whole proto through C++, which costs seconds for a 500 MB model. The
    structure, types and (strict) shape inference are checked on a weightless twin in which every
    initializer of more than :data:`_LIGHT_NUMEL` elements is declared as a graph input of the same
    type and shape; those initializers' payloads are then checked here (one value field, of the
    size their dims say, stored inline).

    Raises:
        ExportError: if the checker or the payload check fails.
    """
    try:
        onnx.checker.check_model(_weightless_twin(model_proto), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"optimized ONNX graph fails the ONNX checker: {first_line(exc)}") from exc
    for init in model_proto.graph.initializer:
        if _is_light(init):
            continue
        numel = math.prod(init.dims)
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"initializer {init.name!r} uses external data; export writes single files only")
        if init.raw_data:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            ok = len(init.raw_data) == numel * itemsize
        else:
            field = onnx.helper.tensor_dtype_to_field(init.data_type)
            ok = len(getattr(init, field)) in (numel, 2 * numel)  # complex types store pairs
        if not ok:
            raise ExportError(f"initializer {init.name!r} holds the wrong amount of data for dims {list(init.dims)}")


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------


def cleanup(graph: gs.Graph) -> gs.Graph:
    """Remove nodes and tensors that do not contribute to the graph outputs, then sort topologically.

    Invariant: graph inputs and outputs are unchanged; nodes come out in a valid topological order.
    """
    return graph.cleanup().toposort()


def castlike_to_cast(graph: gs.Graph) -> gs.Graph:
    """Replace ``CastLike(x, like)`` by ``Cast(x, to=dtype(like))`` when the dtype of ``like`` is known.

    The exporter builds constants such as zero biases with ``CastLike(c, input)``; the graph input
    makes them look variable. As a plain Cast they become foldable by :func:`fold_constants`.

    Invariant: graph outputs are unchanged bit for bit (same target type).
    """
    for node in [n for n in graph.nodes if n.op == "CastLike"]:
        like = node.inputs[1] if len(node.inputs) > 1 else None
        if like is None or like.dtype is None:
            continue
        try:
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(like.dtype))
        except (KeyError, TypeError, ValueError):
            continue
        node.op = "Cast"
        node.attrs = {
            "to": int(to),
            **({"saturate": node.attrs["saturate"]} if "saturate" in node.attrs else {}),
        }
        node.inputs = [node.inputs[0]]
    return graph


def fold_constants(graph: gs.Graph) -> gs.Graph:
    """Evaluate every subgraph whose inputs are all constants (or static shapes) with ONNX Runtime.

    Skipped when no node is foldable, so clean exports do not pay for a round trip through ONNX
    Runtime. Folding errors leave the affected partition unfolded (graphsurgeon's ``error_ok``);
    the final checker and parity check still guard the result.

    Invariant: graph outputs are unchanged; nodes computing only from constants become constants.
    """
    if not any(_is_foldable(node) for node in graph.nodes):
        return graph
    graph.toposort()
    graph.fold_constants(fold_shapes=True, partitioning="basic")
    return graph.cleanup()


def dedupe_initializers(graph: gs.Graph) -> gs.Graph:
    """Make constants with identical dtype, shape and bytes one tensor consumed by all their users.

    This keeps a shared low-rank factor a single initializer even when the exporter duplicated it
    (pytorch/pytorch#108342). Candidates are grouped by (dtype, shape) and only those groups are
    hashed (SHA-256 of the bytes, confirmed byte-for-byte); the first tensor in graph order is kept.

    Invariant: graph outputs are unchanged (values are identical); after the pass no two constants
    consumed by nodes have the same dtype, shape and bytes. Constants that are graph outputs are
    left alone.
    """
    groups: dict[tuple[str, tuple[int, ...], str], list[gs.Constant]] = defaultdict(list)
    outputs = {id(t) for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and id(tensor) not in outputs:
            groups[(str(tensor.dtype), tuple(tensor.shape), str(tensor.export_dtype))].append(tensor)
    for members in groups.values():
        if len(members) < 2:
            continue
        kept: dict[bytes, list[gs.Constant]] = {}
        for tensor in members:
            data = np.ascontiguousarray(tensor.values).tobytes()
            digest = hashlib.sha256(data).digest()
            canonical = next(
                (c for c in kept.get(digest, []) if np.ascontiguousarray(c.values).tobytes() == data), None
            )
            if canonical is None:
                kept.setdefault(digest, []).append(tensor)
                continue
            for node in list(tensor.outputs):
                for i, inp in enumerate(node.inputs):
                    if inp is tensor:
                        node.inputs[i] = canonical
    return graph


def fold_batchnorm(graph: gs.Graph) -> gs.Graph:
    """Fold inference-mode BatchNormalization into the Conv or ConvTranspose that feeds it.

    A BN is folded only when: its producer is a Conv/ConvTranspose whose output feeds nothing but
    that BN (and is not a graph output); the conv weight, conv bias (if any) and the four BN inputs
    are constants; and the conv weight is consumed by that conv alone. A conv without bias gets one.
    ``W' = W·γ/√(σ²+ε)`` per output channel and ``b' = (b−μ)·γ/√(σ²+ε) + β``, computed in float64.

    Invariant: graph outputs are unchanged up to float rounding; a constant consumed by more than
    one node (a shared low-rank factor) is never rewritten or duplicated, so its BN stays in place.
    """
    names = set(graph.tensors())
    for bn in [node for node in graph.nodes if node.op == "BatchNormalization"]:
        if _fold_one_batchnorm(graph, bn, names):
            graph.nodes.remove(bn)
    return graph


def remove_noops(graph: gs.Graph) -> gs.Graph:
    """Bypass nodes that are identities under :data:`NOOP_RULES` (Identity, inference Dropout, ...).

    Consumers are rewired to the node's input. If the node's output is a graph output, the producer
    of its input is renamed instead (when that input is used nowhere else), so output names stay.

    Invariant: graph input/output names and values are unchanged.
    """
    for node in list(graph.nodes):
        rule = NOOP_RULES.get(node.op)
        if rule is None or not rule(node) or not node.inputs or not node.outputs:
            continue
        if _bypass(graph, node):
            graph.nodes.remove(node)
    return graph


def reduce_mean_to_global_pool(graph: gs.Graph) -> gs.Graph:
    """Replace ReduceMean over the spatial axes of a 4-D tensor by GlobalAveragePool (+ Flatten).

    ``ReduceMean(x, axes=[2, 3], keepdims=1)`` is ``GlobalAveragePool(x)``; with ``keepdims=0`` it is
    ``Flatten(GlobalAveragePool(x), axis=1)``. Handles axes given as an input (opset ≥ 18) or an
    attribute. Needs the input rank (from shape inference); other ReduceMeans are left alone.

    Invariant: graph outputs are unchanged up to float rounding (same mean, maybe another sum order).
    """
    for node in [n for n in graph.nodes if n.op == "ReduceMean"]:
        x = node.inputs[0]
        if x.shape is None or len(x.shape) != 4 or len(node.outputs) != 1:
            continue
        axes = node.attrs.get("axes")
        if len(node.inputs) > 1 and not _is_empty(node.inputs[1]):
            if not isinstance(node.inputs[1], gs.Constant):
                continue
            axes = node.inputs[1].values.tolist()
        if axes is None or sorted(int(a) % 4 for a in np.atleast_1d(axes)) != [2, 3]:
            continue
        y = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)
        if int(node.attrs.get("keepdims", 1)):
            graph.nodes.append(gs.Node("GlobalAveragePool", name=node.name, inputs=[x], outputs=[y]))
        else:
            pooled = gs.Variable(
                _unique_name(set(graph.tensors()), f"{y.name}_pooled"),
                dtype=y.dtype,
                shape=[*x.shape[:2], 1, 1],
            )
            graph.nodes.append(gs.Node("GlobalAveragePool", name=node.name, inputs=[x], outputs=[pooled]))
            graph.nodes.append(
                gs.Node("Flatten", name=f"{node.name}_flatten", attrs={"axis": 1}, inputs=[pooled], outputs=[y])
            )
    return graph.toposort()


def reshape_to_flatten(graph: gs.Graph) -> gs.Graph:
    """Replace a Reshape to ``[N, prod(rest)]`` by ``Flatten(axis=1)``.

    Applies when the target shape is a constant ``[a, b]`` with ``b`` equal to the product of the
    input's static dimensions 1..r-1 and ``a`` either -1, 0 (copy, ``allowzero=0``) or the input's
    static batch size; this is exactly what Flatten(axis=1) computes, also for a symbolic batch.

    Invariant: graph outputs are unchanged bit for bit (both ops only reinterpret the shape).
    """
    for node in [n for n in graph.nodes if n.op == "Reshape"]:
        x, target = node.inputs[0], node.inputs[1]
        if not isinstance(target, gs.Constant) or x.shape is None or len(x.shape) < 2:
            continue
        rest = x.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            continue
        values = [int(v) for v in np.asarray(target.values).reshape(-1)]
        if len(values) != 2 or values[1] != math.prod(rest):
            continue
        batch_ok = values[0] == -1 or (values[0] == 0 and not int(node.attrs.get("allowzero", 0)))
        batch_ok = batch_ok or (isinstance(x.shape[0], int) and values[0] == x.shape[0])
        if not batch_ok:
            continue
        y = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)
        graph.nodes.append(gs.Node("Flatten", name=node.name, attrs={"axis": 1}, inputs=[x], outputs=[y]))
    return graph.toposort()


# --------------------------------------------------------------------------------------------------
# No-op rules (data, not code paths): op type -> "this node is an identity"
# --------------------------------------------------------------------------------------------------


def _single_used_output(node: gs.Node) -> bool:
    return all(not out.outputs for out in node.outputs[1:])


def _is_inference_dropout(node: gs.Node) -> bool:
    if not _single_used_output(node):
        return False
    if len(node.inputs) > 2 and not _is_empty(node.inputs[2]):
        mode = node.inputs[2]
        return isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values).any())
    return True


def _is_unit_pool(node: gs.Node) -> bool:
    attrs = node.attrs
    kernel = list(attrs.get("kernel_shape", []))
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return (
        bool(kernel)
        and all(k == 1 for k in kernel)
        and all(s == 1 for s in strides)
        and all(p == 0 for p in pads)
        and auto_pad in ("NOTSET", "VALID")
        and _single_used_output(node)
    )


def _is_same_type_cast(node: gs.Node) -> bool:
    x = node.inputs[0]
    if x.dtype is None or "to" not in node.attrs:
        return False
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])) == np.dtype(x.dtype)
    except (KeyError, TypeError, ValueError):
        return False


#: Op type -> predicate telling whether that node is an identity and can be bypassed.
NOOP_RULES: dict[str, Callable[[gs.Node], bool]] = {
    "Identity": lambda node: True,
    "Dropout": _is_inference_dropout,
    "AveragePool": _is_unit_pool,
    "MaxPool": _is_unit_pool,
    "Cast": _is_same_type_cast,
}


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _fold_one_batchnorm(graph: gs.Graph, bn: gs.Node, names: set[str]) -> bool:
    """Fold ``bn`` into its producing conv if the conditions of :func:`fold_batchnorm` hold."""
    if int(bn.attrs.get("training_mode", 0)) or len(bn.inputs) != 5 or not _single_used_output(bn):
        return False
    x = bn.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in ("Conv", "ConvTranspose"):
        return False
    conv = x.inputs[0]
    if len(x.outputs) != 1 or any(t is x for t in graph.outputs) or conv.outputs[0] is not x:
        return False
    params = bn.inputs[1:]
    weight = conv.inputs[1]
    bias = conv.inputs[2] if len(conv.inputs) > 2 and not _is_empty(conv.inputs[2]) else None
    constants = [weight, *params] + ([bias] if bias is not None else [])
    if not all(isinstance(t, gs.Constant) for t in constants):
        return False
    if len({id(n) for n in weight.outputs}) != 1 or any(t is weight for t in graph.outputs):
        return False  # a shared factor: folding would duplicate it
    w = np.asarray(weight.values)
    if not np.issubdtype(w.dtype, np.floating) or w.ndim < 3:
        return False

    gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64).reshape(-1) for p in params)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    group = int(conv.attrs.get("group", 1))
    kernel_ones = [1] * (w.ndim - 2)
    if conv.op == "Conv":
        c_out = w.shape[0]
        if scale.size != c_out:
            return False
        w_new = w.astype(np.float64) * scale.reshape(c_out, 1, *kernel_ones)
    else:  # ConvTranspose weight: [C_in, C_out / group, k...]
        c_in, c_out_g = w.shape[0], w.shape[1]
        if c_in % group or scale.size != c_out_g * group:
            return False
        grouped = w.astype(np.float64).reshape(group, c_in // group, c_out_g, *w.shape[2:])
        w_new = (grouped * scale.reshape(group, 1, c_out_g, *kernel_ones)).reshape(w.shape)
    b_old = np.zeros(scale.size) if bias is None else np.asarray(bias.values, dtype=np.float64).reshape(-1)
    if b_old.size != scale.size:
        return False
    b_new = (b_old - mean) * scale + beta

    weight.values = w_new.astype(w.dtype)
    if bias is not None and len({id(n) for n in bias.outputs}) == 1:
        bias.values = b_new.astype(np.asarray(bias.values).dtype)
    else:
        name = _unique_name(names, f"{weight.name}_bias" if bias is None else f"{bias.name}_bn")
        new_bias = gs.Constant(name, b_new.astype(w.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = new_bias
        else:
            conv.inputs.append(new_bias)

    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    conv.outputs[0] = y
    return True


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove single-input identity ``node`` from the dataflow; return whether it was possible."""
    x, y = node.inputs[0], node.outputs[0]
    if not any(t is y for t in graph.outputs):
        for consumer in list(y.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is y:
                    consumer.inputs[i] = x
        node.inputs.clear()
        node.outputs.clear()
        return True
    # y is a graph output: let x's producer write y directly, if x is used by this node only.
    if len(x.inputs) != 1 or len(x.outputs) != 1 or any(t is x for t in [*graph.outputs, *graph.inputs]):
        return False
    producer = x.inputs[0]
    index = next(i for i, t in enumerate(producer.outputs) if t is x)
    node.inputs.clear()
    node.outputs.clear()
    producer.outputs[index] = y
    return True


#: Initializers with at most this many elements keep their data in the weightless twin (shape
#: constants, axes, ... which shape inference and the version converter read).
_LIGHT_NUMEL = 1024


def _is_light(init: onnx.TensorProto) -> bool:
    return math.prod(init.dims) <= _LIGHT_NUMEL


def _weightless_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy ``model`` with every large initializer turned into a typed graph input (no data copied)."""
    twin = onnx.ModelProto()
    twin.ir_version = model.ir_version
    twin.producer_name = model.producer_name
    twin.producer_version = model.producer_version
    twin.opset_import.extend(model.opset_import)
    twin.functions.extend(model.functions)
    src, dst = model.graph, twin.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    for init in src.initializer:
        if _is_light(init):
            dst.initializer.append(init)
        else:
            dst.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return twin


def _annotate_shapes(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Fill missing dtypes/shapes of graph variables by ONNX shape inference on the weightless twin.

    Raises:
        ExportError: if shape inference fails (the final full check would fail as well).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless_twin(model))
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"ONNX shape inference failed on the exported graph: {first_line(exc)}") from exc
    tensors = graph.tensors()
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = tensors.get(info.name)
        ttype = info.type.tensor_type
        if not isinstance(tensor, gs.Variable) or not ttype.HasField("shape"):
            continue
        if tensor.shape is None:
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
        if tensor.dtype is None and ttype.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)


def _is_foldable(node: gs.Node) -> bool:
    if node.op in ("Constant", "Shape", "ConstantOfShape"):
        return True
    real = [t for t in node.inputs if not _is_empty(t)]
    return bool(real) and all(isinstance(t, gs.Constant) for t in real)


def _is_empty(tensor: gs.Tensor) -> bool:
    return not tensor.name and isinstance(tensor, gs.Variable)


def _unique_name(names: set[str], base: str) -> str:
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
