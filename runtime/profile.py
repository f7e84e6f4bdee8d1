"""Per-layer profile of a run directory: ``python -m runtime profile --run-dir DIR`` → ``profile.json/.md``.

Where the time goes in the dense and the compressed graph, per source layer, so a slow factorized layer is
visible. Each ONNX model is run with ONNX Runtime's profiler (``SessionOptions.enable_profiling``) on the
session options the benchmark uses (CPU provider, all graph optimisations, no spin-waiting, ``--threads``);
every ``<node>_kernel_time`` event of the timed iterations (warm-up runs dropped) is attributed to a layer:

1. **By name.** The exporter names each Conv/Gemm weight after its module (``layer1.0.conv1.weight``, a
   factorized layer's ``layer1.0.conv1.1.weight``), so a node's layer is the longest ``plan.json`` path
   that prefixes its weight's name (or the weight's module path when there is no plan).
2. **Through ONNX Runtime's rewrites.** The profiled graph is the *optimized* one: ORT fuses Conv with its
   activation / residual Add, and its NCHWc layout pass renames the fused node after its output tensor
   (``relu_3_nchwc``). Such a name is traced back in the exported graph from that tensor through
   Relu/Add/Clip/... to the Conv node(s) it can come from; the weight shape recorded in the event picks
   between candidates, and a Conv is given to one kernel only.
3. **By order**, for Conv kernels left over after 1–2: matched to the graph's unclaimed Conv nodes in order
   when the counts agree.

Kernels that are not convolutions or matrix products (pooling, layout reorders, a standalone Add) are
summed per operator under ``other``. ``coverage`` states how many of the graph's Conv/Gemm nodes were
mapped and how the per-node sum compares with the whole run (``model_run`` events): the profiler's node
times cover the run except the executor's own overhead.

Needs numpy, onnxruntime and onnx (to read node and weight names); no torch.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from lowrank_core.io import atomic_write_json, atomic_write_text, read_json
from lowrank_core.rundir import COMPRESSED, DENSE, PLAN_JSON, RunDir

__all__ = [
    "PROFILE_JSON",
    "PROFILE_MD",
    "ModelProfile",
    "layer_of_weight",
    "profile_markdown",
    "profile_onnx",
    "write_profile",
]

PROFILE_JSON = "profile.json"
PROFILE_MD = "profile.md"
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "QLinearConv"})
# Ops ORT may fuse into a Conv/Gemm: a fused node named after its output is traced back through them.
_PASS_THROUGH = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Add", "Sum", "BatchNormalization", "Mul"}
)
_KERNEL_SUFFIX = "_kernel_time"
_REWRITE_SUFFIXES = ("_nchwc", "_fused")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class ModelProfile:
    """One model's profile: per-layer and per-operator medians over the timed iterations (ms)."""

    file: str
    iters: int
    total_ms: float
    nodes_ms: float
    layers: dict[str, dict[str, Any]]
    other: dict[str, float]
    coverage: dict[str, Any]
    unmapped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "file": self.file,
            "iters": self.iters,
            "total_ms": self.total_ms,
            "nodes_ms": self.nodes_ms,
            "layers": self.layers,
            "other": self.other,
            "coverage": self.coverage,
            "unmapped": self.unmapped,
        }


# Mapping ----------------------------------------------------------------------------------------------


def layer_of_weight(weight: str, plan_paths: Sequence[str]) -> str | None:
    """The source layer of a weight named like ``layer1.0.conv1.1.weight``: the longest plan path prefixing it.

    Without a matching plan path, the weight's own module path (its name less ``.weight``/``.bias``) when
    it looks like one, else ``None`` (an exporter-made name such as ``onnx::Conv_12`` or ``val_3``).
    """
    best = None
    for path in plan_paths:
        if (weight == path or weight.startswith(path + ".")) and (best is None or len(path) > len(best)):
            best = path
    if best is not None:
        return best
    module, dot, leaf = weight.rpartition(".")
    if dot and leaf in ("weight", "bias") and re.fullmatch(r"[A-Za-z_][\w.]*", module):
        return module
    return None


@dataclass
class _Graph:
    """What the exported graph says: each layer node's layer and weight shape, tensor producers, order."""

    layer_nodes: dict[str, str | None]  # node name → layer (None: weight name says nothing)
    weight_shapes: dict[str, list[int]]
    order: list[str]  # layer nodes in graph order
    candidates: dict[str, list[tuple[int, str]]]  # tensor → [(hops, layer node)] it may come from
    op_of: dict[str, str]


def _read_graph(path: Path, plan_paths: Sequence[str]) -> _Graph:
    try:
        import onnx
    except ImportError:
        raise RuntimeUnavailableError("python -m runtime profile needs the onnx package to read node names") from None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    layer_nodes: dict[str, str | None] = {}
    weight_shapes: dict[str, list[int]] = {}
    order: list[str] = []
    candidates: dict[str, list[tuple[int, str]]] = {}
    op_of: dict[str, str] = {}
    uses = collections.Counter(t for node in graph.node for t in node.input)
    weights: dict[str, str] = {}
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = collections.defaultdict(list)
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        op_of[name] = node.op_type
        for t in node.input:
            consumers[t].append(name)
        if node.op_type in LAYER_OPS and len(node.input) > 1:
            weight = node.input[1]
            weights[name] = weight
            layer_nodes[name] = layer_of_weight(weight, plan_paths)
            weight_shapes[name] = shapes.get(weight, [])
            order.append(name)
            for out in node.output:
                candidates[out] = [(0, name)]
                producer[out] = name
        elif node.op_type in _PASS_THROUGH:
            reach = [(hops + 1, n) for t in node.input for hops, n in candidates.get(t, [])]
            if reach:
                for out in node.output:
                    candidates[out] = reach
    # A shared factor (one initializer, several convs: joint SVD) is named after one of its layers: such a
    # conv belongs to the layer of the private conv it is chained with (its input's producer or its consumer).
    by_name = {node.name or f"{node.op_type}_{i}": node for i, node in enumerate(graph.node)}
    for name, weight in weights.items():
        if uses[weight] < 2:
            continue
        node = by_name[name]
        neighbours = [producer.get(node.input[0])] + [
            c for c in consumers.get(node.output[0], []) if len(consumers[node.output[0]]) == 1
        ]
        private = [n for n in neighbours if n in weights and uses[weights[n]] == 1]
        if private:
            layer_nodes[name] = layer_nodes[private[0]]
    return _Graph(layer_nodes, weight_shapes, order, candidates, op_of)


def _kernel_events(events: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], list[dict[str, Any]]]:
    """``model_run`` windows (ts, end) in order, and the node kernel events."""
    runs = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    kernels = [dict(e) for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)]
    return runs, kernels


def _event_weight_shape(event: Mapping[str, Any]) -> list[int] | None:
    shapes = (event.get("args") or {}).get("input_type_shape") or []
    if len(shapes) > 1 and isinstance(shapes[1], Mapping):
        return [int(d) for d in next(iter(shapes[1].values()), [])]
    return None


def _shape_fits(event: Sequence[int], exported: Sequence[int]) -> bool:
    """Whether a kernel's weight shape is the exported one, up to NCHWc channel padding (blocks of 8 or 16)."""
    if not exported:
        return True
    if len(event) != len(exported) or list(event[2:]) != list(exported[2:]):
        return False
    return all(g <= e <= -(-g // 16) * 16 for e, g in zip(event[:2], exported[:2], strict=True))


def _resolve(graph: _Graph, kernels: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Profiled node name → exported layer node name, for every kernel of a convolution / matrix product."""
    first: dict[str, Mapping[str, Any]] = {}
    for event in kernels:
        first.setdefault(str(event["name"])[: -len(_KERNEL_SUFFIX)], event)
    resolved: dict[str, str] = {}
    claimed: set[str] = set()
    pending: list[tuple[str, list[str]]] = []
    for name, event in sorted(first.items(), key=lambda kv: int((kv[1].get("args") or {}).get("node_index", 0))):
        op = str((event.get("args") or {}).get("op_name") or "")
        if name in graph.layer_nodes:
            resolved[name] = name
            claimed.add(name)
            continue
        if op not in LAYER_OPS:
            continue
        tensor = name
        for suffix in _REWRITE_SUFFIXES:
            tensor = tensor.removesuffix(suffix)
        shape = _event_weight_shape(event)
        found = sorted(graph.candidates.get(tensor, []))
        options = [n for _, n in found if shape is None or _shape_fits(shape, graph.weight_shapes.get(n) or [])]
        pending.append((name, list(dict.fromkeys(options))))
    # Exact conv outputs first, then the fused names with the fewest candidates.
    for name, options in sorted(pending, key=lambda item: len(item[1])):
        free = [n for n in options if n not in claimed]
        if free:
            resolved[name] = free[0]
            claimed.add(free[0])
    left_kernels = [name for name, _ in pending if name not in resolved]
    left_nodes = [n for n in graph.order if n not in claimed]
    if left_kernels and len(left_kernels) == len(left_nodes):  # by order
        resolved.update(zip(left_kernels, left_nodes, strict=True))
    return resolved


# Profiling --------------------------------------------------------------------------------------------


def _session_events(path: Path, *, threads: int | None, iters: int, warmup: int, batch: int, seed: int) -> list[Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailableError(
            "python -m runtime profile needs onnxruntime; install the project with the [cpu] extra"
        ) from None
    from runtime.base import TensorMeta
    from runtime.harness import random_feed

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        meta = {}
        for node in session.get_inputs():
            if node.type not in _DTYPES:
                raise UserInputError(f"input {node.name!r} of {path.name} has type {node.type}; profile feeds floats")
            meta[node.name] = TensorMeta(
                np.dtype(_DTYPES[node.type]), None if node.shape is None else tuple(node.shape)
            )
        feed = random_feed(meta, batch=batch, seed=seed, model=path.name)
        for _ in range(warmup + iters):
            session.run(None, feed)
        profile_path = session.end_profiling()
        return json.loads(Path(profile_path).read_text(encoding="utf-8"))


def profile_onnx(
    path: str | os.PathLike[str],
    plan_paths: Sequence[str] = (),
    *,
    threads: int | None = 1,
    iters: int = 20,
    warmup: int = 5,
    batch: int = 1,
    seed: int = 0,
) -> ModelProfile:
    """Profile one ONNX model with ONNX Runtime and attribute its kernels to source layers.

    Args:
        path: The ONNX file.
        plan_paths: ``plan.json`` layer paths (a node's layer is the longest one prefixing its weight name).
        threads: Intra-op threads (``None``: ONNX Runtime's default).
        iters: Timed iterations (medians are taken over them).
        warmup: Untimed iterations first (their events are dropped).
        batch: Batch size of a dynamic batch axis.
        seed: Seed of the random input.

    Returns:
        The profile; ``layers[path]`` is ``{"ms", "mean_ms", "nodes", "ops"}`` (median / mean ms per
        iteration of the layer's kernels, their count and operator types).
    """
    if iters < 1 or warmup < 0:
        raise UserInputError(f"profile needs iters >= 1 and warmup >= 0, got {iters} and {warmup}")
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"ONNX file {str(path)!r} does not exist; run the export stage first")
    graph = _read_graph(path, plan_paths)
    events = _session_events(path, threads=threads, iters=iters, warmup=warmup, batch=batch, seed=seed)
    runs, kernels = _kernel_events(events)
    timed = runs[warmup:]
    resolved = _resolve(graph, kernels)
    per_layer = collections.defaultdict(lambda: np.zeros(len(timed)))
    per_other = collections.defaultdict(lambda: np.zeros(len(timed)))
    node_sum = np.zeros(len(timed))
    layer_kernels: dict[str, set[str]] = collections.defaultdict(set)
    layer_ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    starts = np.array([start for start, _ in timed])
    for event in kernels:
        ts = float(event["ts"])
        i = int(np.searchsorted(starts, ts, side="right")) - 1
        if i < 0 or ts > timed[i][1]:
            continue  # a warm-up run's kernel
        name = str(event["name"])[: -len(_KERNEL_SUFFIX)]
        ms = float(event.get("dur") or 0) / 1e3
        node_sum[i] += ms
        op = str((event.get("args") or {}).get("op_name") or "?")
        source = resolved.get(name)
        layer = graph.layer_nodes.get(source) if source else None
        if layer is None and source is not None:
            layer = source  # a layer node whose weight name says nothing: keyed by its node name
        if layer is None:
            per_other[op][i] += ms
            continue
        per_layer[layer][i] += ms
        if name not in layer_kernels[layer]:
            layer_ops[layer][op] += 1
        layer_kernels[layer].add(name)
    totals = np.array([(end - start) / 1e3 for start, end in timed])
    mapped_nodes = set(resolved.values())
    layers = {
        layer: {
            "ms": float(np.median(v)),
            "mean_ms": float(v.mean()),
            "nodes": len(layer_kernels[layer]),
            "ops": dict(layer_ops[layer]),
        }
        for layer, v in per_layer.items()
    }
    unmapped = [n for n in graph.order if n not in mapped_nodes]
    coverage = {
        "layer_nodes": len(graph.order),
        "mapped": len(graph.order) - len(unmapped),
        "nodes_over_total": float(np.median(node_sum / totals)) if totals.size else None,
        "by_name": sum(1 for k, v in resolved.items() if k == v),
        "traced": sum(1 for k, v in resolved.items() if k != v),
    }
    return ModelProfile(
        file=path.name,
        iters=len(timed),
        total_ms=float(np.median(totals)),
        nodes_ms=float(np.median(node_sum)),
        layers=layers,
        other={op: float(np.median(v)) for op, v in sorted(per_other.items())},
        coverage=coverage,
        unmapped=unmapped,
    )


# Run directory ----------------------------------------------------------------------------------------


def _plan_layers(rd: RunDir) -> list[dict[str, Any]]:
    plan_file = rd.file(PLAN_JSON)
    if not plan_file.is_file():
        return []
    plan = read_json(plan_file, PLAN_JSON)
    return [layer for layer in plan.get("layers", []) if isinstance(layer, Mapping) and layer.get("path")]


def write_profile(
    run_dir: str | os.PathLike[str],
    *,
    threads: int | None = 1,
    iters: int = 20,
    warmup: int = 5,
    batch: int = 1,
    top: int = 5,
) -> dict[str, Any]:
    """Profile ``dense.onnx`` and ``model.onnx`` of a run directory; write ``profile.json`` and ``profile.md``.

    ``profile.json``::

        {"backend": "ort", "provider", "threads", "iters", "warmup", "batch", "onnxruntime",
         "models": {"dense": ModelProfile, "compressed": ModelProfile},
         "layers": [{"path", "action", "ranks", "dense_ms", "compressed_ms", "ratio"}],  # plan order
         "slowest_factorized": [the `top` factorized layers by compressed ms]}

    ``ratio`` is dense ms / compressed ms (above 1: the layer got faster).
    """
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserInputError(f"run directory {str(rd.path)!r} does not exist; run the compress and export stages first")
    plan = _plan_layers(rd)
    paths = [str(layer["path"]) for layer in plan]
    models = {
        side: profile_onnx(rd.require(rd.onnx(side)), paths, threads=threads, iters=iters, warmup=warmup, batch=batch)
        for side in (DENSE, COMPRESSED)
    }
    rows = []
    known = paths + [p for m in models.values() for p in m.layers if p not in paths]
    for path in dict.fromkeys(known):
        entry = next((layer for layer in plan if layer["path"] == path), {})
        d = models[DENSE].layers.get(path, {}).get("ms")
        c = models[COMPRESSED].layers.get(path, {}).get("ms")
        rows.append(
            {
                "path": path,
                "action": entry.get("action"),
                "ranks": entry.get("ranks"),
                "dense_ms": d,
                "compressed_ms": c,
                "ratio": d / c if d and c else None,
            }
        )
    factorized = [r for r in rows if r["action"] not in (None, "keep") and r["compressed_ms"] is not None]
    import onnxruntime as ort

    record = {
        "backend": "ort",
        "provider": "CPUExecutionProvider",
        "threads": threads,
        "iters": iters,
        "warmup": warmup,
        "batch": batch,
        "onnxruntime": ort.__version__,
        "models": {side: m.to_dict() for side, m in models.items()},
        "layers": rows,
        "slowest_factorized": sorted(factorized, key=lambda r: -r["compressed_ms"])[:top],
    }
    atomic_write_json(rd.file(PROFILE_JSON), record)
    atomic_write_text(rd.file(PROFILE_MD), profile_markdown(record))
    return record


def profile_markdown(record: Mapping[str, Any]) -> str:
    """``profile.md``: totals, the slowest factorized layers, every layer, the other operators."""
    models = record["models"]
    d, c = models[DENSE], models[COMPRESSED]
    lines = [
        f"# Per-layer profile (ONNX Runtime {record.get('onnxruntime')} CPU, {record.get('threads') or 'default'} "
        f"thread(s), batch {record.get('batch')}, median of {record.get('iters')} profiled runs)",
        "",
        "Each model profiled on its own (not interleaved), with ONNX Runtime's profiler on: use latency.md for "
        "the speedup, this file for where the time goes.",
        "",
        "| | dense | compressed |",
        "|---|---:|---:|",
        f"| whole run (model_run) ms | {d['total_ms']:.3f} | {c['total_ms']:.3f} |",
        f"| Σ node kernels ms | {d['nodes_ms']:.3f} | {c['nodes_ms']:.3f} |",
        f"| Σ layer kernels ms | {_sum(d['layers']):.3f} | {_sum(c['layers']):.3f} |",
        f"| Conv/Gemm nodes mapped to layers | {_cov(d)} | {_cov(c)} |",
        "",
    ]
    slow = record.get("slowest_factorized") or []
    if slow:
        lines += [
            "## Slowest factorized layers",
            "",
            "| layer | plan | dense ms | compressed ms | dense / compressed |",
        ]
        lines += ["|---|---|---:|---:|---:|"]
        lines += [_row(r) for r in slow]
        lines.append("")
    lines += ["## Every layer", "", "| layer | plan | dense ms | compressed ms | dense / compressed |"]
    lines += ["|---|---|---:|---:|---:|"]
    lines += [_row(r) for r in record.get("layers") or []]
    lines += ["", "## Other operators (ms per run)", "", "| op | dense | compressed |", "|---|---:|---:|"]
    for op in sorted(set(d["other"]) | set(c["other"])):
        lines.append(f"| {op} | {_ms(d['other'].get(op))} | {_ms(c['other'].get(op))} |")
    for side, m in ((DENSE, d), (COMPRESSED, c)):
        if m.get("unmapped"):
            lines += ["", f"Unmapped {side} nodes: {', '.join(m['unmapped'])}"]
    lines.append("")
    return "\n".join(lines)


def _row(r: Mapping[str, Any]) -> str:
    plan = r.get("action") or "?"
    if r.get("ranks"):
        plan += " " + "×".join(str(x) for x in r["ranks"])
    ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}×"
    return f"| {r['path']} | {plan} | {_ms(r.get('dense_ms'))} | {_ms(r.get('compressed_ms'))} | {ratio} |"


def _sum(layers: Mapping[str, Mapping[str, Any]]) -> float:
    return float(sum(v["ms"] for v in layers.values()))


def _cov(m: Mapping[str, Any]) -> str:
    cov = m["coverage"]
    return f"{cov['mapped']}/{cov['layer_nodes']}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
