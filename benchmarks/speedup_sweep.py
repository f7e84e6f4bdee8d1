"""Dense vs compressed ONNX Runtime CPU latency for several compression settings, in one interleaved run.

Every variant is compressed in-process, exported through the project's export pipeline (BN folded,
graph cleaned, parity checked) and timed side by side with the dense model by the runtime harness, so
the speedups are ratios measured in one run on one machine. The JSON result goes to
``benchmarks/results/``; the README quotes it.

Usage:
    python -m benchmarks.speedup_sweep --model resnet34 --ratio 4 --variants round8 round16 \
        --duration 60 --out benchmarks/results/resnet34_tucker2_sweep.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compress.api import compress_, method_config
from compress.metrics import count_macs, count_params
from compress.models import load_model
from export import check_onnx_parity, graph_summary, onnx_from_torch, optimize, save_onnx
from lowrank_core.io import atomic_write_json
from runtime import BenchmarkConfig, OrtRunner, benchmark, capture_environment

# name -> (method, options for method_config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "round8": ("tucker2", {"round_to": 8}),
    "round16": ("tucker2", {"round_to": 16}),
    "round32": ("tucker2", {"round_to": 32}),
    "round16-all": ("tucker2", {"round_to": 16, "min_share": 0.0}),
    "round8-all": ("tucker2", {"round_to": 8, "min_share": 0.0}),
    "round16-hooi": ("tucker2", {"round_to": 16, "hooi_iters": 5}),
    "svd16": ("svd", {"round_to": 16}),
    "tai16": ("tai", {"round_to": 16}),
    "cp16": ("cp", {"round_to": 16}),
}


def _export(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    proto = optimize(onnx_from_torch(model, torch.zeros(shape)))
    save_onnx(proto, path)
    parity = check_onnx_parity(model, path, input_shape=shape)
    return {"graph": graph_summary(proto), "parity": parity.to_dict(), "onnx_bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet34")
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--variants", nargs="+", default=["round8", "round16"], choices=sorted(VARIANTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of timed inference for all models together")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    loaded = load_model(args.model, "random", input_size=args.input_size)
    dense = loaded.model.eval()
    shape = (args.batch, *loaded.input_shape)
    example = torch.zeros(1, *loaded.input_shape)
    dense_params, dense_macs = count_params(dense), count_macs(dense, example)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx"}
        rows["dense"] = {"params": dense_params, "macs": dense_macs, **_export(dense, shape, paths["dense"])}
        for name in args.variants:
            method, options = VARIANTS[name]
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            plan = compress_(model, method_config(method, ratio=args.ratio, **options), example, model_name=args.model)
            wall = time.perf_counter() - t0
            paths[name] = Path(tmp) / f"{name}.onnx"
            params, macs = count_params(model), count_macs(model, example)
            rows[name] = {
                "method": method,
                "options": options,
                "compress_s": wall,
                "params": params,
                "macs": macs,
                "param_ratio": dense_params / params,
                "mac_ratio": dense_macs / macs,
                "ranks": {e.path: e.ranks for e in plan.factorized_layers},
                **_export(model, shape, paths[name]),
            }
            print(f"{name}: ×{dense_params / params:.2f} params, ×{dense_macs / macs:.2f} MACs", file=sys.stderr)
        runners = {k: OrtRunner(v, intra_op_threads=args.threads) for k, v in paths.items()}
        config = BenchmarkConfig(duration_s=args.duration, warmup_s=2.0, batch=args.batch)
        gen = torch.Generator().manual_seed(0)
        feed = {"input": torch.randn(shape, generator=gen).numpy()}
        result = benchmark(runners, feed, config)
    for name, row in rows.items():
        stats = result.stats[name]
        row["latency_ms"] = {"p50": stats.p50, "p90": stats.p90, "p99": stats.p99, "mean": stats.mean, "n": stats.n}
        if name != "dense":
            est = result.speedup("dense", name)
            row["speedup_p50"] = est.ratio
            row["speedup_ci95"] = list(est.ci95)
            row["efficiency"] = est.ratio / row["mac_ratio"]
    record = {
        "model": args.model,
        "ratio": args.ratio,
        "batch": args.batch,
        "input_shape": list(shape),
        "backend": "onnxruntime-cpu",
        "duration_s": args.duration,
        "weights": "random (timing does not depend on weight values)",
        "rows": rows,
        "env": capture_environment(),
    }
    atomic_write_json(args.out, record)
    print(f"{'variant':<14} {'params×':>8} {'MACs×':>7} {'p50 ms':>8} {'speedup':>8} {'CI95':>13} {'eff.':>5}")
    for name, row in rows.items():
        if name == "dense":
            print(f"{name:<14} {'1.00':>8} {'1.00':>7} {row['latency_ms']['p50']:>8.2f}")
            continue
        lo, hi = row["speedup_ci95"]
        print(
            f"{name:<14} {row['param_ratio']:>8.2f} {row['mac_ratio']:>7.2f} {row['latency_ms']['p50']:>8.2f} "
            f"{row['speedup_p50']:>8.2f} {lo:>6.2f}–{hi:<6.2f} {row['efficiency']:>5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
