"""``python -m export quantize``: the subcommand's arguments and its one-line-per-model output."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from export.quantize.rules import (
    AUTO_CANDIDATES,
    CALIBRATION_METHODS,
    DATA_CALIBRATION,
    MIN_FLOAT_RANK,
    PRECISIONS,
    RULES,
    SYNTHETIC_CALIBRATION,
    TARGETS,
)
from export.quantize.run import quantize_run
from lowrank_core.rundir import MODELS, QUANTIZE_JSON, QUANTIZE_TRT_JSON, RunDir

# Command line (wired into `python -m export`) -----------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``quantize`` subcommand to ``python -m export``'s subparsers."""
    q = sub.add_parser("quantize", help="INT8/FP16 copies of a run's ONNX files with agreement checks")
    q.add_argument("--run-dir", required=True, type=Path, help="run directory with dense.onnx and model.onnx")
    q.add_argument("--precision", choices=PRECISIONS, default="int8", help="int8 (default) or fp16")
    q.add_argument(
        "--target",
        choices=TARGETS,
        default="ort",
        help="ort (default): ONNX Runtime CPU, *.int8.onnx; tensorrt: symmetric Q/DQ *.int8.trt.onnx for `export engine`",
    )
    q.add_argument(
        "--format",
        default="auto",
        choices=("auto", *AUTO_CANDIDATES),
        help="int8 format (default auto: fastest of the three that passes the gate)",
    )
    q.add_argument(
        "--calibration",
        type=int,
        default=None,
        help=f"calibration inputs ({DATA_CALIBRATION} with --data, else {SYNTHETIC_CALIBRATION} synthetic)",
    )
    q.add_argument(
        "--calibrate-method", choices=tuple(CALIBRATION_METHODS), default="minmax", help="activation range method"
    )
    q.add_argument(
        "--data",
        default=None,
        help="calibrate on this dataset's training split (fashion-mnist or a folder) and evaluate accuracy",
    )
    q.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="test images for the int8 accuracy (default: compress.json's, else all)",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration and agreement inputs (default 0)")
    q.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads for the --format auto timing"
    )
    q.add_argument("--auto-seconds", type=float, default=3.0, help="timing budget of --format auto (default 3 s)")
    q.add_argument(
        "--float-min-rank",
        type=int,
        default=MIN_FLOAT_RANK,
        help=f"narrow rule: fewer channels stay float (default {MIN_FLOAT_RANK})",
    )
    q.add_argument(
        "--float-rules", default=",".join(RULES), help=f"comma list of {', '.join(RULES)}, or none (default all)"
    )
    q.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI saturate u8s8)")
    return q


def run_cli(args: argparse.Namespace) -> int:
    """``python -m export quantize``: quantize, print one line per model, return 0."""
    rules = [] if args.float_rules.strip() == "none" else [r.strip() for r in args.float_rules.split(",") if r.strip()]
    eval_samples = args.eval_samples
    if args.data and eval_samples is None:
        with contextlib.suppress(Exception):
            eval_samples = (RunDir(args.run_dir).read_compress().accuracy or {}).get("eval_samples")
    record = quantize_run(
        args.run_dir,
        precision=args.precision,
        target=args.target,
        fmt=args.format,
        calibration=args.calibration,
        method=args.calibrate_method,
        data=args.data,
        seed=args.seed,
        threads=args.threads,
        min_rank=args.float_min_rank,
        rules=rules,
        reduce_range=True if args.reduce_range else None,  # default: chosen by CPU (7 bits on x86 without VNNI)
        auto_seconds=args.auto_seconds,
        eval_samples=eval_samples,
    )
    for warning in record.warnings or []:
        print(f"WARNING: {warning}")
    for key in MODELS:
        side = getattr(record, key)
        a = side["agreement"]
        top1 = "n/a" if a["top1"] is None else f"{a['top1']:.3f}"
        print(
            f"{key:<10} {side['file']:<20} {side['onnx_bytes'] / 1e6:8.2f} MB ({side['fp32_onnx_bytes'] / side['onnx_bytes']:.2f}× smaller)  "
            f"{record.format}  vs FP32: rel_l2 {a['rel_l2']:.3g} cosine {a['cosine']:.5f} top1 {top1}  "
            f"float layers {len(side['float_layers'])}"
        )
    for key in MODELS:
        for fmt, entry in ((record.candidates or {}).get(key) or {}).items():
            if entry.get("p50_ms") is not None:
                chosen = "  (chosen)" if entry.get("chosen") else ""
                print(f"  auto, {key}: {fmt:<15} p50 {entry['p50_ms']:.3f} ms{chosen}")
    if record.accuracy:
        print(
            "int8 accuracy (ORT): "
            + ", ".join(f"{k} {100 * v['top1']:.2f}% (n={v['n']})" for k, v in record.accuracy.items())
        )
    print(f"wrote {RunDir(args.run_dir).file(QUANTIZE_TRT_JSON if args.target == 'tensorrt' else QUANTIZE_JSON)}")
    return 0
