"""ResNet-34 on one CUDA GPU: dense vs ``tucker2 RATIO=4`` vs ``METHOD=auto RATIO=4``, one script, one JSON.

PyTorch CUDA (eager and CUDA graph; FP32, FP16 and BF16 autocast; batch 1 and 32; host latency, CUDA-event
GPU time, GPU memory) and, when ``onnxruntime-gpu`` is importable with its CUDA provider, ONNX Runtime's
CUDA execution provider with I/O binding (device time and end-to-end host→device→host time). Models are
torchvision ResNet-34 with seeded random weights (latency does not depend on the values), compressed
in-process; ``--budget-s`` stops starting new measurements so the whole run fits a short GPU lease
(defaults: about 4 minutes on an H100).

    python -m benchmarks.gpu_latency [--methods dense,tucker2,auto] [--batches 1,32] [--out FILE.json]

Writes ``benchmarks/results/gpu_latency_<gpu>.json`` (GPU name, driver, environment, one row per
measurement). Without CUDA it exits 1 with a one-line message and writes nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "fp16", "bf16")
MODES = ("eager", "graph")
METHODS = ("dense", "tucker2", "auto")
GOAL_FRACTION = 0.6
"""Goal: at batch 32, FP16, CUDA graph, compressed/dense speedup >= 0.6 × the MAC reduction."""


def build_parser() -> argparse.ArgumentParser:
    """Arguments (CPU-safe: nothing is imported)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34", help="torchvision model (default resnet34)")
    parser.add_argument("--ratio", type=float, default=4.0, help="parameter compression factor (default 4)")
    parser.add_argument("--methods", default=",".join(METHODS), help="dense first, then compress methods")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--modes", default=",".join(MODES), help="eager and/or graph (CUDA graph replay)")
    parser.add_argument("--duration", type=float, default=2.0, help="timed seconds per measurement (all models)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per model")
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime CUDA EP rows")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no measurement after this many s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; lists become tuples (``batches`` of ints).

    Raises:
        SystemExit: (argparse) for an unknown precision, mode or a malformed list.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.batches = tuple(int(b) for b in args.batches.split(",") if b)
    except ValueError:
        parser.error(f"--batches must be integers, got {args.batches!r}")
    args.precisions = tuple(p for p in args.precisions.split(",") if p)
    args.modes = tuple(m for m in args.modes.split(",") if m)
    args.methods = tuple(m for m in args.methods.split(",") if m)
    for name, values, known in (("precisions", args.precisions, PRECISIONS), ("modes", args.modes, MODES)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            parser.error(f"--{name} takes {', '.join(known)}; got {', '.join(values) or 'nothing'}")
    if not args.batches or min(args.batches) < 1:
        parser.error("--batches needs positive integers")
    if args.methods[:1] != ("dense",) or len(args.methods) < 2:
        parser.error("--methods must start with dense and name at least one compress method")
    if not args.ratio > 1:
        parser.error("--ratio must be > 1")
    return args


def torch_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One ``{"batch", "precision", "mode"}`` per PyTorch measurement, in run order."""
    return [{"batch": b, "precision": p, "mode": m} for b in args.batches for p in args.precisions for m in args.modes]


RunnerFactory = Callable[[str, Any, dict[str, Any]], Any]
"""(model key, module, case) → a :class:`runtime.base.Runner`."""


def measure_torch(
    models: dict[str, Any],
    cases: list[dict[str, Any]],
    make_runner: RunnerFactory,
    *,
    duration_s: float,
    warmup_s: float,
    seed: int = 0,
    deadline: float | None = None,
    gpu_memory: Callable[[], dict[str, Any]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """Benchmark every model per case (interleaved) and return one row per case.

    Each row: ``{"backend": "torch", "batch", "precision", "mode", "models": {key: {"host_ms", "gpu_ms",
    "memory"}}, "speedups": {key: p50 ratio over dense with CI}, "gpu_memory"}``; a case started after
    ``deadline`` is recorded as ``{"skipped": "time budget"}``.
    """
    from runtime.harness import BenchmarkConfig, LatencyStats, benchmark, random_feed

    rows: list[dict[str, Any]] = []
    for case in cases:
        row: dict[str, Any] = {"backend": "torch", **case}
        if deadline is not None and clock() > deadline:
            rows.append({**row, "skipped": "time budget"})
            continue
        runners = {key: make_runner(key, module, case) for key, module in models.items()}
        config = BenchmarkConfig(duration_s=duration_s, batch=case["batch"], warmup_s=warmup_s, min_iters=10)
        batch = case["batch"]
        result = benchmark(
            runners, lambda key, r, b=batch: random_feed(r.get_input_metadata(), batch=b, seed=seed, model=key), config
        )
        row["models"] = {}
        for key, runner in runners.items():
            n = result.stats[key].n
            gpu = list(getattr(runner, "gpu_times_s", []) or [])
            row["models"][key] = {
                "host_ms": result.stats[key].to_dict(),
                "gpu_ms": LatencyStats.from_samples(gpu[-n:], batch).to_dict() if len(gpu) >= n else None,
                "memory": result.memory["runners"][key].get("runner"),
            }
        row["speedups"] = {key: result.speedup("dense", key).to_dict() for key in models if key != "dense"}
        row["gpu_memory"] = gpu_memory() if gpu_memory is not None else None
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], macs: dict[str, int]) -> dict[str, Any]:
    """The headline: batch 32 FP16 CUDA-graph speedup vs MAC reduction per method (the issue's goal)."""
    out: dict[str, Any] = {}
    for row in rows:
        if row.get("skipped") or (row["batch"], row["precision"], row["mode"]) != (32, "fp16", "graph"):
            continue
        for key, estimate in row["speedups"].items():
            mac_ratio = macs["dense"] / macs[key]
            speedup = estimate["p50_ratio"]
            out[key] = {
                "speedup_p50": speedup,
                "ci95": estimate["ci95"],
                "macs_ratio": mac_ratio,
                "efficiency": speedup / mac_ratio,
                "goal": f">= {GOAL_FRACTION} x macs_ratio",
                "goal_met": speedup >= GOAL_FRACTION * mac_ratio,
            }
    return out


def build_record(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    model_info: dict[str, Any],
    *,
    gpu: dict[str, Any],
    env: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    """The JSON written: settings, GPU, models (params, MACs, plan summary), rows and the headline."""
    return {
        "benchmark": "gpu_latency",
        "command": "python -m benchmarks.gpu_latency " + " ".join(sys.argv[1:]),
        "gpu": gpu,
        "settings": {
            "model": args.model,
            "ratio": args.ratio,
            "methods": list(args.methods),
            "batches": list(args.batches),
            "precisions": list(args.precisions),
            "modes": list(args.modes),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "seed": args.seed,
            "weights": "random (seeded); latency does not depend on the values",
        },
        "models": model_info,
        "rows": rows,
        "summary": summarize(rows, {k: v["macs"] for k, v in model_info.items() if "macs" in v}),
        "env": env,
        "wall_s": wall_s,
    }


# GPU-only parts ---------------------------------------------------------------------------------------


def _compressed_models(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dense and compressed modules (CPU, eval mode) and their params / MACs / compress wall time."""
    import copy

    import torch

    from compress.methods import get_method, method_names
    from compress.metrics import count_macs, count_params
    from compress.models import load_model
    from compress.targets import Target

    torch.manual_seed(args.seed)
    dense = load_model(args.model, weights="random", seed=args.seed).model.eval()
    example = torch.zeros(1, 3, 224, 224)
    models: dict[str, Any] = {"dense": dense}
    info: dict[str, Any] = {"dense": {"params": count_params(dense), "macs": count_macs(dense, example)}}
    for name in args.methods[1:]:
        if name not in method_names():
            info[name] = {"skipped": f"method {name!r} is not registered"}
            continue
        method = get_method(name)
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        method.compress_(model, method.make_config(Target("ratio", args.ratio)), example, model_name=args.model)
        model.eval()
        models[name] = model
        info[name] = {
            "params": count_params(model),
            "macs": count_macs(model, example),
            "compress_s": round(time.perf_counter() - start, 2),
        }
    return models, info


def _torch_runner(key: str, module: Any, case: dict[str, Any]) -> Any:
    from runtime.torch_runner import TorchRunner

    return TorchRunner(
        module,
        input_shapes={"input": (None, 3, 224, 224)},
        device="cuda",
        name=key,
        cuda_graph=case["mode"] == "graph",
        autocast=None if case["precision"] == "fp32" else case["precision"],
    )


def _gpu_memory() -> dict[str, Any]:
    import torch

    from runtime.gpu import try_nvml_device

    nvml, _ = try_nvml_device(0)
    out = {
        "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        "nvml_used_bytes": nvml["memory_used_bytes"] if nvml else None,
    }
    torch.cuda.reset_peak_memory_stats()
    return out


def _ort_rows(args: argparse.Namespace, models: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    """ONNX Runtime CUDA EP (FP32, I/O binding) per batch, or one row saying why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return [{"backend": "ort-cuda", "skipped": "onnxruntime-gpu is not installed"}]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [{"backend": "ort-cuda", "skipped": f"onnxruntime {ort.__version__} has no CUDA provider"}]
    import torch

    from export.onnx import onnx_from_torch, save_onnx
    from export.passes import optimize
    from runtime.ort_runner import OrtRunner

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-latency-") as tmp:
        paths = {}
        for key, module in models.items():
            proto = optimize(onnx_from_torch(module, torch.zeros(1, 3, 224, 224), dynamic_batch=True))
            paths[key] = save_onnx(proto, Path(tmp) / f"{key}.onnx")

        def make(key: str, module: Any, case: dict[str, Any]) -> Any:
            return OrtRunner(paths[key], providers=("cuda",), name=key)

        cases = [{"batch": b, "precision": "fp32", "mode": "io-binding"} for b in args.batches]
        for row in measure_torch(
            models, cases, make, duration_s=args.duration, warmup_s=args.warmup, seed=args.seed, deadline=deadline
        ):
            row["backend"] = "ort-cuda"
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement and write the JSON; 1 without CUDA."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_latency: error: no CUDA device visible to torch; run this on a GPU machine", file=sys.stderr)
        return 1
    from lowrank_core.io import atomic_write_json
    from runtime.env import capture_environment
    from runtime.gpu import try_nvml_device

    start = time.monotonic()
    deadline = start + args.budget_s
    torch.backends.cudnn.benchmark = True
    models, info = _compressed_models(args)
    print("models: " + ", ".join(f"{k} {v.get('macs', 0) / 1e9:.2f} GMACs" for k, v in info.items()), flush=True)
    rows = measure_torch(
        models,
        torch_cases(args),
        _torch_runner,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
        deadline=deadline,
        gpu_memory=_gpu_memory,
    )
    for row in rows:
        if not row.get("skipped"):
            ratios = ", ".join(f"{k} {v['p50_ratio']:.2f}×" for k, v in row["speedups"].items())
            dense = row["models"]["dense"]["host_ms"]["p50"]
            print(
                f"torch b{row['batch']:>2} {row['precision']} {row['mode']}: dense {dense:.3f} ms; {ratios}", flush=True
            )
    if not args.no_ort:
        rows += _ort_rows(args, models, deadline)
    nvml, nvml_reason = try_nvml_device(0)
    gpu = {
        "name": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "driver": nvml["driver"] if nvml else None,
        "nvml_unavailable": nvml_reason,
    }
    env = capture_environment({"command": "python -m benchmarks.gpu_latency"})
    record = build_record(args, rows, info, gpu=gpu, env=env, wall_s=round(time.monotonic() - start, 1))
    name = re.sub(r"[^A-Za-z0-9]+", "_", gpu["name"]).strip("_")
    out = args.out or RESULTS / f"gpu_latency_{name}.json"
    atomic_write_json(out, record)
    print(f"summary: {record['summary']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
