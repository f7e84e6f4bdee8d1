"""What exporting Bi-JSVD's two summed conv pairs as one pair of rank r1 + r2 saves (export.merge_branches).

Compresses a model with ``bijsvd`` (``RATIO``, random weights unless ``--weights``), exports it once
(``export.optimize``, the graph before the merge) and merges that graph two ways — ``shared`` (Concat over
the stored factors, each shared factor kept once in the file; what ``python -m export onnx`` now writes)
and ``materialized`` (stacked weights stored per layer, BatchNorm folded) — then records node counts in the
file and at run time (ONNX Runtime's profiled kernels), file sizes, parity against PyTorch, and the dense
and the three compressed models timed interleaved on ORT CPU.

Usage:
    python -m benchmarks.bijsvd_merge --model cifar_resnet34 --ratio 8 --threads 1 --duration 30 \
        --out benchmarks/results/bijsvd_merge_cifar_resnet34.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compress.methods import get_method
from compress.models import load_model
from compress.targets import Target
from export import check_onnx_parity, onnx_from_torch, optimize
from export.merge_branches import merge_model
from export.onnx import save_onnx
from lowrank_core.io import atomic_write_json
from runtime import capture_environment


def _ops(proto: Any) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and write the JSON record."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet34")
    p.add_argument("--weights", default="random")
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0, help="interleaved timing budget (s), all models")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from runtime.base import runner_class
    from runtime.harness import BenchmarkConfig, benchmark, random_feed
    from runtime.profile import profile_onnx

    loaded = load_model(args.model, args.weights, seed=0)
    dense = loaded.model.eval()
    example = torch.zeros(1, *loaded.input_shape)
    method = get_method("bijsvd")
    t0 = time.perf_counter()
    compressed = copy.deepcopy(dense)
    plan = method.compress_(compressed, method.make_config(Target("ratio", args.ratio)), example, model_name=args.model)
    compressed.eval()
    compress_s = time.perf_counter() - t0
    pairs = sum(1 for e in plan.factorized_layers if e.action == "bijsvd")

    with tempfile.TemporaryDirectory(prefix="bijsvd-merge-") as tmp:
        folder = Path(tmp)
        graphs = {"dense": optimize(onnx_from_torch(dense, example))}
        graphs["unmerged"] = optimize(onnx_from_torch(compressed, example))
        graphs["merged_shared"], merged = merge_model(graphs["unmerged"], shared=True)
        graphs["merged_materialized"], _ = merge_model(graphs["unmerged"], shared=False)
        files = {key: save_onnx(proto, folder / f"{key}.onnx") for key, proto in graphs.items()}
        paths = [e.path for e in plan.layers]
        models: dict[str, Any] = {}
        for key, path in files.items():
            model = dense if key == "dense" else compressed
            parity = check_onnx_parity(model, path, input_shape=tuple(example.shape), raise_on_failure=False)
            prof = profile_onnx(path, paths, threads=args.threads, iters=20, warmup=5)
            models[key] = {
                "file_nodes": len(graphs[key].graph.node),
                "file_ops": _ops(graphs[key]),
                "runtime_kernels": sum(v["nodes"] for v in prof.layers.values()) + len(prof.other),
                "runtime_conv_kernels": sum(v["nodes"] for v in prof.layers.values()),
                "onnx_bytes": path.stat().st_size,
                "parity_max_abs": parity.to_dict().get("max_abs"),
                "parity_passed": parity.passed,
                "profiled_ms": prof.total_ms,
            }
        cls = runner_class("ort")
        runners = {k: cls.from_path(v, name=k, intra_op_threads=args.threads) for k, v in files.items()}
        result = benchmark(
            runners,
            lambda key, r: random_feed(r.get_input_metadata(), batch=1, seed=0, model=key),
            BenchmarkConfig(duration_s=args.duration),
        )
    for key in files:
        models[key]["p50_ms"] = result.stats[key].p50
        if key != "dense":
            models[key]["speedup_vs_dense"] = result.speedup("dense", key).to_dict()
    unmerged = models["unmerged"]["p50_ms"]
    record = {
        "model": args.model,
        "weights": args.weights,
        "input_shape": list(example.shape),
        "ratio": args.ratio,
        "threads": args.threads,
        "duration_s": args.duration,
        "bijsvd_layers": pairs,
        "pairs_merged": merged,
        "compress_wall_s": compress_s,
        "models": models,
        "merged_vs_unmerged": {
            key: {
                "p50_ratio": unmerged / models[key]["p50_ms"],
                "speedup": result.speedup("unmerged", key).to_dict(),
                "file_nodes": [models["unmerged"]["file_nodes"], models[key]["file_nodes"]],
                "onnx_bytes": [models["unmerged"]["onnx_bytes"], models[key]["onnx_bytes"]],
            }
            for key in ("merged_shared", "merged_materialized")
        },
        "environment": capture_environment(),
    }
    atomic_write_json(args.out, record)
    for key, m in models.items():
        print(
            f"{key:20s} p50 {m['p50_ms']:.3f} ms  nodes {m['file_nodes']}  kernels {m['runtime_kernels']}  "
            f"{m['onnx_bytes'] / 1e6:.2f} MB  parity {m['parity_max_abs']:.2g}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
