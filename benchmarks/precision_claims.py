"""INT8 on top of low-rank: dense / Tucker-2 × FP32 / INT8 on ONNX Runtime CPU, timed in one interleaved run.

ResNet-34 (random weights unless ``--weights``), 224², batch 1. Tucker-2 at ``--ratio`` (ranks rounded to
this CPU's ORT conv block, as ``make export`` does). Both models are exported like ``python -m export onnx``
and quantized with :func:`export.quantize.quantize_run` (``--format auto``: the three int8 formats are timed
on the compressed model, the fastest that passes the gate wins; 16 seeded synthetic calibration inputs,
MinMax, per-channel weights; stem, classifier and factors narrower than 16 channels left in float). With
``--all-int8`` the same format is also applied with no float layers (``--float-rules none``), to show
what the float-layer rule costs. Then every model is timed by :func:`runtime.harness.benchmark`, all
interleaved in one run, with one ORT intra-op thread (``OMP_NUM_THREADS=1``).

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.precision_claims --out benchmarks/results/precision_resnet34.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.methods import get_method
from compress.metrics import count_macs, count_params
from compress.models import load_model
from compress.planning import cpu_rank_multiple
from compress.targets import Target
from export import onnx_from_torch, optimize, save_onnx
from export.quantize import agreement, cpu_int8_support, quantize_int8, quantize_run
from lowrank_core.io import atomic_write_json, atomic_write_text
from runtime import capture_environment
from runtime.harness import BenchmarkConfig, benchmark, random_feed
from runtime.ort_runner import OrtRunner


def _export(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    return save_onnx(optimize(onnx_from_torch(model, torch.zeros(shape))), path)


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    with OrtRunner(path) as runner:
        name = next(iter(runner.get_input_metadata()))
        out = runner.output_names[0]
        return np.concatenate([runner.infer({name: images[i : i + 1]})[out] for i in range(len(images))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet34")
    p.add_argument("--weights", default="random")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--duration", type=float, default=60.0, help="budget of the final interleaved timing (s)")
    p.add_argument("--auto-seconds", type=float, default=10.0, help="budget of the format choice (s)")
    p.add_argument("--all-int8", action="store_true", help="also time the models with every layer in int8")
    p.add_argument("--out", required=True, help="JSON path; a Markdown table is written beside it (.md)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    loaded = load_model(args.model, args.weights, input_size=args.input_size, seed=0)
    dense = loaded.model.eval()
    shape = (1, *loaded.input_shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    tucker = get_method("tucker2")
    compressed = tucker.make_config(Target("ratio", args.ratio), round_to=cpu_rank_multiple())
    model = copy.deepcopy(dense)
    tucker.compress_(model, compressed, x, model_name=loaded.name)
    model.eval()

    record: dict[str, Any] = {
        "model": args.model,
        "weights": args.weights,
        "input_shape": list(shape),
        "method": "tucker2",
        "ratio_target": args.ratio,
        "round_to": cpu_rank_multiple(),
        "params": {"dense": count_params(dense), "compressed": count_params(model)},
        "macs": {"dense": count_macs(dense, x), "compressed": count_macs(model, x)},
        "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        run = Path(tmp)
        _export(dense, shape, run / "dense.onnx")
        _export(model, shape, run / "model.onnx")
        t0 = time.perf_counter()
        quant = quantize_run(run, fmt="auto", threads=args.threads, auto_seconds=args.auto_seconds)
        record["quantize_wall_s"] = round(time.perf_counter() - t0, 1)
        files = {
            "dense_fp32": run / "dense.onnx",
            "compressed_fp32": run / "model.onnx",
            "dense_int8": run / "dense.int8.onnx",
            "compressed_int8": run / "model.int8.onnx",
        }
        record["quantized"] = {
            k: quant.to_dict()[k] for k in ("format", "calibration", "float_layers", "candidates", "warnings", "gate")
        }
        record["agreement"] = {"dense_int8": quant.dense["agreement"], "compressed_int8": quant.compressed["agreement"]}
        if args.all_int8:  # each model in its chosen format, no float layers, the same calibration inputs
            rng = np.random.default_rng(quant.calibration["seed"])
            calib = rng.standard_normal((quant.calibration["n"], *shape[1:]), dtype=np.float32)
            agree_x = np.random.default_rng(quant.calibration["seed"] + 1).standard_normal(
                (32, *shape[1:]), dtype=np.float32
            )
            for key, name in (("dense", "dense.onnx"), ("compressed", "model.onnx")):
                path = run / f"{key}.int8_all.onnx"
                fmt = getattr(quant, key)["format"]
                quantize_int8(
                    run / name, path, [{"input": calib[i : i + 1]} for i in range(len(calib))], fmt=fmt, rules=[]
                )
                files[f"{key}_int8_all"] = path
                record["agreement"][f"{key}_int8_all"] = agreement(_run(run / name, agree_x), _run(path, agree_x))
        record["onnx_bytes"] = {k: v.stat().st_size for k, v in files.items()}

        runners = {k: OrtRunner(v, intra_op_threads=args.threads, name=k) for k, v in files.items()}
        config = BenchmarkConfig(warmup_iters=10, warmup_s=2.0, duration_s=args.duration, min_iters=30)
        result = benchmark(runners, lambda key, r: random_feed(r.get_input_metadata(), batch=1), config)
    stats = {k: s.to_dict() for k, s in result.stats.items()}
    base = stats["dense_fp32"]["p50"]
    record["latency_ms"] = {k: {q: s[q] for q in ("p50", "p90", "p99", "mean", "std", "n")} for k, s in stats.items()}
    record["speedup_vs_dense_fp32"] = {
        k: {"p50_ratio": base / s["p50"], "ci95": result.speedup("dense_fp32", k).to_dict()["ci95"]}
        for k, s in stats.items()
        if k != "dense_fp32"
    }
    record["goal"] = {"compressed_int8_vs_dense_fp32": 9.0, "met": base / stats["compressed_int8"]["p50"] >= 9.0}
    record["benchmark"] = {"config": config.to_dict(), "order_head": result.order[:24], "wall_s": result.wall_s}
    record["cpu"] = {**cpu_int8_support(), "machine": platform.machine()}
    record["env"] = capture_environment(
        {"command": "benchmarks.precision_claims", "ort_intra_op_threads": args.threads}
    )
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    atomic_write_json(out, record)
    atomic_write_text(out.with_suffix(".md"), markdown(record))
    print(markdown(record))
    return 0


def markdown(record: dict[str, Any]) -> str:
    """The README table of a result record."""
    q = record["quantized"]
    lines = [
        f"{record['model']} {record['input_shape'][-1]}² batch 1, {record['weights']} weights, ONNX Runtime CPU "
        f"{record['threads']} thread ({record['cpu']['model']}; int8 dot: {', '.join(record['cpu']['int8_dot'] or []) or 'none'}); "
        f"Tucker-2 RATIO={record['ratio_target']:g}; int8 format (auto, per model): {q['format']}; "
        f"{q['calibration']['n']} {q['calibration']['source']} calibration inputs, {len(q['float_layers'])} float layers.",
        "",
        "| model | p50 ms | p90 ms | × dense FP32 (p50, 95% CI) | ONNX MB | rel L2 vs FP32 | top-1 agr. |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, lat in record["latency_ms"].items():
        speed = record["speedup_vs_dense_fp32"].get(key)
        speed_text = (
            "1.00×" if speed is None else f"{speed['p50_ratio']:.2f}× ({speed['ci95'][0]:.2f}–{speed['ci95'][1]:.2f})"
        )
        agree = record["agreement"].get(key) or {}
        rel = "–" if not agree else f"{100 * agree['rel_l2']:.1f}%"
        top1 = "–" if not agree or agree.get("top1") is None else f"{agree['top1']:.2f}"
        lines.append(
            f"| {key} | {lat['p50']:.2f} | {lat['p90']:.2f} | {speed_text} | "
            f"{record['onnx_bytes'][key] / 1e6:.1f} | {rel} | {top1} |"
        )
    lines.append("")
    for key in ("dense", "compressed"):
        cands = {k: v for k, v in q["candidates"][key].items() if v.get("p50_ms") is not None}
        lines.append(
            f"Format choice, {key} (short interleaved timing): "
            + ", ".join(f"{k} {v['p50_ms']:.2f} ms{' (chosen)' if v.get('chosen') else ''}" for k, v in cands.items())
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
