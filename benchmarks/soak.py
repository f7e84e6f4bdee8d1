"""Soak: process RSS over many ONNX Runtime inferences of one small compressed model (does memory creep?).

The parent builds the model (seeded CIFAR ResNet-20 from the zoo, Tucker-2 at ``--ratio``), exports it with
the same passes as ``make export`` into a temporary folder, and starts a child process that imports only
``runtime`` and ``onnxruntime`` (not torch, as a deployed application would). The child activates an
:class:`~runtime.OrtRunner`, feeds one fixed input ``--iters`` times and samples its own RSS (psutil) after
activation and every ``--every`` inferences. Reported: the samples, min / max, the drift from the first
sample after the first ``--every`` inferences (allocator arenas are grown by then) to the last, the
least-squares slope over the same samples, and the drift over the second half of the run alone.

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.soak --iters 20000 --every 1000 --threads 1 \
        --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_core.io import atomic_write_json

MIB = 2**20


def _child(onnx_path: str, iters: int, every: int, threads: int) -> dict[str, Any]:
    """Run inside the measured process: activate, infer ``iters`` times, sample RSS every ``every``."""
    from runtime import OrtRunner
    from runtime.base import process_rss_bytes

    runner = OrtRunner(onnx_path, intra_op_threads=threads)
    runner.activate()
    (name, meta), *_ = runner.get_input_metadata().items()
    shape = tuple(1 if not isinstance(d, int) else d for d in (meta.shape or ()))
    feed = {name: np.random.default_rng(0).standard_normal(shape).astype(meta.dtype)}
    samples = [{"iteration": 0, "rss_bytes": process_rss_bytes(), "elapsed_s": 0.0}]
    t0 = time.perf_counter()
    for i in range(1, iters + 1):
        runner.infer(feed)
        if i % every == 0:
            samples.append({"iteration": i, "rss_bytes": process_rss_bytes(), "elapsed_s": time.perf_counter() - t0})
    runner.deactivate()
    return {
        "samples": samples,
        "torch_imported": "torch" in sys.modules,
        "input_shape": list(shape),
    }


def _export(path: Path, ratio: float) -> dict[str, Any]:
    """Build, compress and export the soaked model to ``path``; return what was built."""
    import torch

    from compress import compress_, method_config
    from compress.zoo import create_model
    from export.onnx import onnx_from_torch, save_onnx
    from export.passes import optimize

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.zeros(1, 3, 32, 32)
    plan = compress_(model, method_config("tucker2", ratio=ratio, round_to=1), x, model_name="cifar_resnet20")
    save_onnx(optimize(onnx_from_torch(model, x)), path)
    return {
        "name": "cifar_resnet20",
        "method": "tucker2",
        "ratio": plan.target["achieved_ratio"],
        "input_shape": list(x.shape),
        "onnx_bytes": path.stat().st_size,
    }


def summarize(samples: list[dict[str, Any]], every: int) -> dict[str, Any]:
    """Min / max / drift / slope of the RSS samples (drift and slope from iteration ``every`` on)."""
    rss = np.array([s["rss_bytes"] for s in samples], dtype=np.float64)
    its = np.array([s["iteration"] for s in samples], dtype=np.float64)
    settled = its >= every
    slope = np.polyfit(its[settled], rss[settled], 1)[0] if settled.sum() >= 2 else float("nan")
    return {
        "rss_min_mib": float(rss.min() / MIB),
        "rss_max_mib": float(rss.max() / MIB),
        "rss_after_activation_mib": float(rss[0] / MIB),
        "drift_mib": float((rss[settled][-1] - rss[settled][0]) / MIB),
        "drift_from": f"iteration {int(its[settled][0])} to {int(its[settled][-1])}",
        "slope_kib_per_1k_iters": float(slope * 1000 / 1024),
        "drift_second_half_mib": float((rss[-1] - rss[its >= its[-1] / 2][0]) / MIB),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20_000)
    p.add_argument("--every", type=int, default=1_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.iters >= args.every >= 1 and args.threads >= 1):
        p.error("need --iters >= --every >= 1 and --threads >= 1")
    if args.child is not None:
        print(json.dumps(_child(args.child, args.iters, args.every, args.threads)))
        return 0

    from runtime import capture_environment

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        model = _export(onnx_path, args.ratio)
        cmd = [sys.executable, "-m", "benchmarks.soak", "--child", str(onnx_path)]
        cmd += ["--iters", str(args.iters), "--every", str(args.every), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
        wall = time.perf_counter() - t0
    child = json.loads(proc.stdout)
    result = {
        "what": "RSS of a process running only ONNX Runtime, sampled every --every inferences of one model",
        "command": "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model,
        "iters": args.iters,
        "every": args.every,
        "ort_intra_op_threads": args.threads,
        "child_wall_s": wall,
        "summary": {
            **summarize(child["samples"], args.every),
            "torch_imported": child["torch_imported"],
        },
        "samples": child["samples"],
        "env": capture_environment({"ort_intra_op_threads": args.threads}),
    }
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
