"""``METHOD=auto`` and ``SPEEDUP=`` / ``LATENCY_MS=`` on ONNX input, through the PyTorch path's own machinery.

:class:`ProxyNet` holds the graph's weight layers as the proxy ``nn.Conv2d`` / ``nn.Linear`` modules of
:mod:`compress.onnx_in.layers` (stride, padding, dilation and groups set), each called on zeros of its
input shape — all that :func:`compress.methods.auto.plan_auto`, :func:`compress.methods.lowrank.plan_lowrank`
and the latency model (:mod:`compress.latency`: block timing, lookup table, knapsack, measure-and-correct
solve) look at. Blocks are timed exactly as for a PyTorch model (same table keys); only the end-to-end
measurements differ: :class:`GraphTimer` times the *real* graphs — the original ONNX for the dense model,
the rewritten ONNX of a candidate plan for a compressed one — so the rest of the network (activations,
pooling, anything the proxies do not see) is in every measured and corrected number.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.latency.model import LatencyModel
from compress.onnx_in.graph import seeded_feeds
from compress.onnx_in.layers import OnnxLayer
from compress.onnx_in.planner import layer_entry
from compress.onnx_in.rewrite import rewrite_graph
from compress.plan import KEEP, LayerPlan, Plan
from compress.planning import plan_totals
from compress.targets import Target

__all__ = ["GraphTimer", "ProxyNet", "plan_onnx_latency"]

if TYPE_CHECKING:
    from compress.onnx_in.core import OnnxGraph


class ProxyNet(nn.Module):
    """The weight layers of an ONNX graph as modules ``layers.n<node index>``, each run on zeros of its input shape.

    Parameters the proxies do not hold (BatchNorm, biases of kept nodes, …) sit in one ``rest`` tensor, so
    the proxy's parameter count is the graph's.
    """

    def __init__(self, graph: OnnxGraph) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.onnx: dict[str, OnnxLayer] = {}
        for layer in graph.layers:
            if layer.module is None:
                continue
            key = f"n{layer.index}"
            self.layers[key] = layer.module
            self.inputs[key] = _input_shape(layer)
            self.onnx[f"layers.{key}"] = layer
        held = sum(p.numel() for p in self.layers.parameters())
        self.rest = nn.Parameter(torch.zeros(max(graph.total_params - held, 0)), requires_grad=False)
        ops = "|".join(n.op_type for n in graph.model.graph.node)
        self._digest = hashlib.sha1(f"{graph.name}|{ops}".encode()).hexdigest()[:12]

    def extra_repr(self) -> str:
        """The graph's digest: part of the latency table's whole-model key."""
        return f"graph={self._digest}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every layer on zeros of its input shape (what the planners' hooks see); return ``x``."""
        for key, module in self.layers.items():
            module(torch.zeros(self.inputs[key], dtype=x.dtype))
        return x

    def keys_for(self, patterns: Sequence[str]) -> tuple[str, ...]:
        """Module paths whose ONNX path matches ``patterns`` (``--exclude``), plus every layer kept by a graph rule."""
        out = []
        for path, layer in self.onnx.items():
            if layer.reason is not None or any(fnmatch.fnmatchcase(layer.path, p) for p in patterns):
                out.append(path)
        return tuple(out)

    def onnx_plan(self, plan: Plan, graph: OnnxGraph) -> Plan:
        """``plan`` (made on this proxy) with ONNX paths, the graph's other weight nodes kept, the graph's totals."""
        entries: dict[int, LayerPlan] = {}
        for entry in plan.layers:
            layer = self.onnx.get(entry.path)
            if layer is None:
                continue
            info = {**entry.info, "onnx_op": layer.op, "node_index": layer.index, "weight": layer.weight_name}
            if layer.reason is not None and not entry.factorized:
                entry.reason = layer.reason
            entries[layer.index] = dataclasses.replace(entry, path=layer.path, type=layer.op, info=info)
        for layer in graph.layers:
            if layer.index not in entries:
                entries[layer.index] = layer_entry(layer, KEEP, None, layer.reason or "no usable weight")
        ordered = [entries[i] for i in sorted(entries)]
        plan.layers = ordered
        plan.model = graph.name
        plan.config = {**plan.config, "source": "onnx"}
        totals = plan_totals(ordered, graph.total_params, graph.total_macs)
        plan.totals = totals
        plan.target["achieved_ratio"] = graph.total_params / max(totals["params_after"], 1)
        plan.target["achieved_flops_reduction"] = 1.0 - totals["macs_after"] / max(graph.total_macs, 1)
        return plan


def _input_shape(layer: OnnxLayer) -> tuple[int, ...]:
    module = layer.module
    assert module is not None
    if isinstance(module, nn.Conv2d):
        assert layer.geometry.in_hw is not None
        return (1, module.in_channels, *layer.geometry.in_hw)
    pixels = layer.geometry.out_pixels
    return (1, module.in_features) if pixels == 1 else (1, pixels, module.in_features)


def _chain_plan(net: ProxyNet, graph: OnnxGraph) -> Plan:
    """The factorizations a (compressed) proxy holds, read back from its chains, as a plan for :func:`rewrite_graph`."""
    layers = []
    for key, module in net.layers.items():
        if not isinstance(module, nn.Sequential):
            continue
        layer = net.onnx[f"layers.{key}"]
        assert layer.module is not None
        convs = [m for m in module if isinstance(m, nn.Conv2d)]
        linears = [m for m in module if isinstance(m, nn.Linear)]
        if linears:
            action, ranks = "linear-svd", [linears[0].out_features]
        elif len(convs) == 3:
            action, ranks = "tucker2", [convs[1].out_channels, convs[0].out_channels]
        elif len(convs) == 4:
            action, ranks = "cp", [convs[0].out_channels]
        elif tuple(convs[0].kernel_size) == tuple(layer.module.kernel_size):
            one = tuple(layer.module.kernel_size) == (1, 1)
            action, ranks = ("pointwise-svd" if one else "svd"), [convs[0].out_channels]
        else:
            action, ranks = "tai", [convs[0].out_channels]
        layers.append(layer_entry(layer, action, ranks, None))
    return Plan(model=graph.name, method="timing", config={}, input_shape=graph.input_shape, layers=layers)


class GraphTimer:
    """Blocks timed by the PyTorch path's timer; whole models timed as the real ONNX graphs they stand for."""

    def __init__(self, inner: Any, graph: OnnxGraph) -> None:
        self.inner, self.graph = inner, graph
        self.backend, self.threads = inner.backend, inner.threads
        self.precision = getattr(inner, "precision", "fp32")
        self.precision_tag = getattr(inner, "precision_tag", self.precision)
        self.warmup = getattr(inner, "warmup", 3)

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median ms of a block (the inner timer's)."""
        return float(self.inner.time_module(module, input_shape))

    def graph_of(self, model: nn.Module) -> Any:
        """The ONNX graph a proxy stands for: the original, or rewritten by the chains it holds."""
        if not isinstance(model, ProxyNet):
            raise TypeError(f"GraphTimer times ProxyNet models, got {type(model).__name__}")
        plan = _chain_plan(model, self.graph)
        if not plan.layers:
            return self.graph.model
        return rewrite_graph(self.graph.model, self.graph.layers, plan)

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        """Median ms of each model's real graph, timed interleaved (``repeats`` rounds)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = [
            ort.InferenceSession(self.graph_of(m).SerializeToString(), options, providers=["CPUExecutionProvider"])
            for m in models
        ]
        feed = seeded_feeds(self.graph.specs, 2, batch=int(input_shape[0]))
        for session in sessions:
            for _ in range(self.warmup):
                session.run(None, feed)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(repeats):
            for i, session in enumerate(sessions):
                t0 = time.perf_counter()
                session.run(None, feed)
                times[i].append(time.perf_counter() - t0)
        return [1e3 * statistics.median(t) for t in times]


def plan_onnx_latency(
    graph: OnnxGraph,
    config: Any,
    target: Target | None,
    *,
    batch: int = 1,
    threads: int = 1,
    latency: LatencyModel | None = None,
) -> Plan:
    """``METHOD=auto`` (any target) or any ONNX method with ``SPEEDUP=`` / ``LATENCY_MS=``: the plan, with ONNX paths.

    Args:
        graph: The analysed graph.
        config: The method's config (``auto``: :class:`~compress.methods.auto.AutoConfig`).
        target: A latency target (measured against the real graphs), or ``None`` for the config's own target.
        batch: Batch of block timing and end-to-end measurements.
        threads: ONNX Runtime intra-op threads of the timing.
        latency: The latency model (default: ONNX Runtime block timing, this CPU's lookup table, :class:`GraphTimer`).

    Raises:
        UserInputError: an unreachable target (the message states the best speedup found).
    """
    from compress.latency.ort_timing import OrtTimer
    from compress.latency.solve import compress_to_latency_
    from compress.methods import get_method

    method = get_method(config.method)
    net = ProxyNet(graph).eval()
    config = dataclasses.replace(config, exclude=net.keys_for(getattr(config, "exclude", ())))
    example = torch.zeros(1, *graph.input_shape[1:])
    if target is not None and target.is_latency:
        latency = latency or LatencyModel(timer=GraphTimer(OrtTimer(threads), graph), batch=batch)
        plan = compress_to_latency_(
            method, net, copy.deepcopy(net), config, target, example, model_name=graph.name, latency=latency
        )
    else:
        plan = method.plan(net, config, example, model_name=graph.name)
    return net.onnx_plan(plan, graph)
