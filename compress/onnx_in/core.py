"""Compress a model given only as ONNX: analyse the graph, plan, rewrite — the Python entry points.

``compress_onnx("resnet18.onnx", "tucker2", ratio=4)`` returns the rewritten ``ModelProto``, the validated
original and the plan; :func:`plan_onnx` and :func:`apply_onnx_plan` are its two halves (a plan can be
edited between them, as with ``python -m compress apply --plan``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.methods.lowrank import LowRankConfig
from compress.onnx_in.graph import (
    InputSpec,
    float_params,
    input_specs,
    load_input_model,
    ort_run,
    seeded_feeds,
    tensor_shapes,
)
from compress.onnx_in.layers import OnnxLayer, find_layers, node_macs
from compress.onnx_in.planner import LayerFilter, check_onnx_method, plan_onnx_layers
from compress.onnx_in.rewrite import check_rewritten, rewrite_graph
from compress.plan import Plan
from compress.planning import one_thread
from lowrank_core.errors import UserInputError

__all__ = [
    "OnnxCompression",
    "OnnxGraph",
    "analyze_onnx",
    "apply_onnx_plan",
    "compress_onnx",
    "onnx_agreement",
    "onnx_config",
    "plan_onnx",
]

Source = str | os.PathLike[str] | onnx.ModelProto


@dataclass
class OnnxGraph:
    """An input ONNX model, validated, with the concrete shapes and weight layers the planner needs.

    Attributes:
        model: The validated model (external data loaded, nodes sorted): what ``dense.onnx`` holds.
        specs: Graph inputs with concrete dims (batch 1 for planning).
        layers: Every Conv/Gemm/MatMul with its geometry, cost and proxy module.
        total_params: Elements of the floating-point initializers.
        total_macs: MACs at batch 1 of every Conv/ConvTranspose/Gemm/MatMul.
        name: Model name recorded in the plan (the file stem).
    """

    model: onnx.ModelProto
    specs: list[InputSpec]
    layers: list[OnnxLayer]
    total_params: int
    total_macs: int
    name: str

    @property
    def input_shape(self) -> list[int]:
        """Shape of the first graph input (batch 1)."""
        return list(self.specs[0].shape)


@dataclass
class OnnxCompression:
    """What :func:`compress_onnx` returns: the rewritten model, the validated original and the plan."""

    model: onnx.ModelProto
    dense: onnx.ModelProto
    plan: Plan
    graph: OnnxGraph


def analyze_onnx(source: Source, *, input_size: int | None = None, name: str | None = None) -> OnnxGraph:
    """Load and validate ``source``, fix its input dims (batch 1) and find its weight layers.

    Raises:
        UserInputError: an unreadable or hostile model (see :func:`compress.onnx_in.graph.load_input_model`).
    """
    model = load_input_model(source)
    specs = input_specs(model, batch=1, input_size=input_size)
    weight_nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    needed = [name for n in weight_nodes for name in (n.input[0], n.output[0])]
    shapes = tensor_shapes(model, specs, needed)
    layers = find_layers(model, shapes)
    macs = sum(node_macs(n, shapes) for n in weight_nodes)
    if name is None:
        name = Path(source).stem if not isinstance(source, onnx.ModelProto) else (model.graph.name or "model")
    return OnnxGraph(model, specs, layers, float_params(model), macs, name)


def onnx_config(method: str | Any, **options: Any) -> LowRankConfig:
    """A method config for ONNX input: a config object as is, or built by name (``ratio=``, ``flops=``, options).

    Raises:
        UserInputError: a method that cannot run on ONNX (one line naming why), or bad options.
    """
    if not isinstance(method, str):
        check_onnx_method(getattr(method, "method", ""))
        if not isinstance(method, LowRankConfig):
            raise UserInputError(f"{type(method).__name__} is not a config of tucker2/svd/tai/cp")
        return method
    check_onnx_method(method)
    if method == "auto":
        raise UserInputError("METHOD=auto on ONNX input is planned by compress_onnx or compress.onnx_in.latency")
    from compress.methods import method_config

    return method_config(method, **options)


def plan_onnx(
    graph: OnnxGraph | Source, config: LowRankConfig | str, *, filter_fn: LayerFilter | None = None, **options: Any
) -> Plan:
    """Decide what each Conv/Gemm/MatMul of the graph becomes (the graph is not changed)."""
    if not isinstance(graph, OnnxGraph):
        graph = analyze_onnx(graph)
    cfg = onnx_config(config, **options)
    with one_thread():
        return plan_onnx_layers(
            graph.layers,
            cfg,
            model_name=graph.name,
            input_shape=graph.input_shape,
            total_params=graph.total_params,
            total_macs=graph.total_macs,
            filter_fn=filter_fn,
        )


def apply_onnx_plan(graph: OnnxGraph | Source, plan: Plan, *, data: Any = None) -> onnx.ModelProto:
    """The graph with every factorized plan entry replaced by its chain; records each layer's weight error.

    ``data`` (calibration inputs: an array for the first graph input, a list of them, or a list of feed
    dicts) makes the channel-SVD family data-aware (:mod:`compress.onnx_in.data`).

    Raises:
        CompressionError: the plan does not match the graph.
        ExportError: the rewritten graph fails ``onnx.checker`` or shape inference.
    """
    if not isinstance(graph, OnnxGraph):
        graph = analyze_onnx(graph)
    grams = None
    if data is not None:
        from compress.onnx_in.data import input_grams

        paths = {e.path for e in plan.factorized_layers}
        grams = input_grams(graph.model, [x for x in graph.layers if x.path in paths], _feeds(graph, data))
        plan.config["data_aware"] = "whitened SVD for svd/pointwise-svd/linear-svd layers"
    with one_thread():
        hooi = int(plan.config.get("hooi_iters") or 0)
        rewritten = rewrite_graph(graph.model, graph.layers, plan, hooi_iters=hooi, grams=grams)
    check_rewritten(graph.model, rewritten)
    params_after = float_params(rewritten)
    plan.totals["params_after_measured"] = params_after
    specs = input_specs(rewritten, batch=1, input_size=_size(graph.specs))
    weight_nodes = [n for n in rewritten.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    shapes = tensor_shapes(rewritten, specs, [x for n in weight_nodes for x in (n.input[0], n.output[0])])
    plan.totals["macs_after_measured"] = sum(node_macs(n, shapes) for n in weight_nodes)
    return rewritten


def _feeds(graph: OnnxGraph, data: Any) -> list[dict[str, np.ndarray]]:
    """Calibration feeds from an array, a list of arrays (the first input) or a list of feed dicts."""
    items = [data] if isinstance(data, (np.ndarray, dict)) else list(data)
    spec = graph.specs[0]
    feeds = []
    for item in items:
        if isinstance(item, dict):
            feeds.append(item)
        elif len(graph.specs) > 1:
            raise UserInputError("a model with several inputs takes calibration data as feed dicts {input name: array}")
        else:
            feeds.append({spec.name: np.asarray(item, dtype=spec.dtype)})
    if not feeds:
        raise UserInputError("the calibration data holds no input")
    return feeds


def _size(specs: Sequence[InputSpec]) -> int | None:
    shape = specs[0].shape
    return int(shape[-1]) if len(shape) == 4 else None


def compress_onnx(
    source: Source,
    config: Any,
    *,
    input_size: int | None = None,
    filter_fn: LayerFilter | None = None,
    data: Any = None,
    **options: Any,
) -> OnnxCompression:
    """Plan and rewrite an ONNX model in one call.

    Args:
        source: A path to an ``.onnx`` file (external data beside it is read) or a ``ModelProto``.
        config: A :class:`~compress.methods.lowrank.LowRankConfig`, an ``AutoConfig``, or a method name
            (``tucker2``, ``svd``, ``tai``, ``cp``, ``auto``; ``auto`` also takes ``speedup=``/``latency_ms=``, timed
            on the real graphs with ONNX Runtime); with a name, ``options`` are its config fields (``ratio=4``, ``flops=0.5``,
            ``rank_rule="evbmf"``, ``round_to=8``, …).
        input_size: Height and width for an input with symbolic spatial dims.
        filter_fn: ``filter_fn(layer) -> bool``; layers where it returns False stay dense.
        data: Calibration inputs (see :func:`apply_onnx_plan`): data-aware (whitened) channel-SVD factors.
        **options: Config fields when ``config`` is a method name.

    Returns:
        The rewritten model, the validated original and the plan (per-layer weight errors filled).

    Raises:
        UserInputError: an unreadable/hostile model, or a method that needs the PyTorch model.
        CompressionError: nothing to compress or an unreachable target.
    """
    graph = analyze_onnx(source, input_size=input_size)
    if config == "auto" or getattr(config, "method", None) == "auto":  # the knapsack over candidate blocks
        from compress.methods import method_config
        from compress.onnx_in.latency import plan_onnx_latency

        if filter_fn is not None:
            raise UserInputError("METHOD=auto on ONNX input takes exclude= patterns, not filter_fn")
        auto = method_config("auto", **options) if config == "auto" else config
        plan = plan_onnx_latency(graph, auto, auto.target if auto.target.is_latency else None)
    else:
        plan = plan_onnx(graph, config, filter_fn=filter_fn, **options)
    model = apply_onnx_plan(graph, plan, data=data)
    return OnnxCompression(model=model, dense=graph.model, plan=plan, graph=graph)


def onnx_agreement(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    specs: Sequence[InputSpec],
    *,
    seed: int = 1,
    batch: int = 8,
    threads: int = 1,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Agreement of ``candidate`` with ``reference`` on ``batch`` seeded inputs (run one at a time if the batch is fixed).

    Returns:
        ``({"rel_l2", "cosine", "max_abs", "top1_agreement", "batch"}, reference outputs, candidate outputs)``
        with every output flattened per sample and concatenated.
    """
    dynamic = _batch_is_dynamic(reference)
    feeds = (
        [seeded_feeds(specs, seed, batch=batch)] if dynamic else [seeded_feeds(specs, seed + i) for i in range(batch)]
    )
    ref = np.concatenate([_flat(ort_run(reference, f, threads=threads)) for f in feeds])
    act = np.concatenate([_flat(ort_run(candidate, f, threads=threads)) for f in feeds])
    diff = ref - act
    norm = float(np.linalg.norm(ref))
    denom = norm * float(np.linalg.norm(act))
    record = {
        "rel_l2": float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff)),
        "cosine": float((ref * act).sum() / denom) if denom > 0 else 1.0,
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "top1_agreement": float((ref.argmax(1) == act.argmax(1)).mean()) if ref.size else 1.0,
        "batch": int(ref.shape[0]),
    }
    return record, ref, act


def _batch_is_dynamic(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    dims = [vi.type.tensor_type.shape.dim for vi in model.graph.input if vi.name not in inits]
    return all(len(d) > 0 and not d[0].HasField("dim_value") for d in dims)


def _flat(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Outputs as ``(batch, features)`` float64, side by side."""
    arrays = [np.asarray(v, dtype=np.float64) for v in outputs.values() if np.asarray(v).dtype.kind in "fiub"]
    rows = {a.shape[0] if a.ndim else 1 for a in arrays}
    n = rows.pop() if len(rows) == 1 else 1  # outputs without a common batch axis: one row per run
    return np.concatenate([a.reshape(n, -1) for a in arrays], axis=1)
