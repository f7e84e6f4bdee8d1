"""ResNet-34 224×224 on a CUDA GPU: dense vs compressed with the PyTorch CUDA runner.

Batch 1 and 32, FP32 and FP16 (autocast), eager and CUDA graph; latency (host and CUDA-event GPU time)
and GPU memory (torch + NVML).

    python -m benchmarks.gpu_latency --run-dir artifacts/resnet34/tucker2 [--duration 5] [--out FILE.json]

Writes benchmarks/results/gpu_latency_<gpu>.json with the GPU name and driver. Without CUDA it exits 1
with a one-line message and writes nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("artifacts/resnet34/tucker2"))
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per (batch, precision, mode) pair")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_latency: error: no CUDA device visible to torch; run this on a GPU machine", file=sys.stderr)
        return 1
    from compress.artifacts import load_run
    from runtime.env import capture_environment
    from runtime.gpu import try_nvml_device
    from runtime.harness import BenchmarkConfig, LatencyStats, benchmark, random_feed
    from runtime.torch_runner import TorchRunner

    run = load_run(args.run_dir)
    nvml, nvml_reason = try_nvml_device(0)
    rows: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batches.split(",")):
        for precision in ("fp32", "fp16"):
            for graph in (False, True):
                runners = {
                    key: TorchRunner(
                        module,
                        input_shapes={"input": (None, 3, 224, 224)},
                        device="cuda",
                        name=key,
                        cuda_graph=graph,
                        autocast="fp16" if precision == "fp16" else None,
                    )
                    for key, module in (("dense", run.dense), ("compressed", run.compressed))
                }
                torch.cuda.reset_peak_memory_stats()
                config = BenchmarkConfig(duration_s=args.duration, batch=batch, warmup_s=1.0)
                result = benchmark(
                    runners, lambda key, r, b=batch: random_feed(r.get_input_metadata(), batch=b, model=key), config
                )
                row: dict[str, Any] = {"batch": batch, "precision": precision, "cuda_graph": graph}
                for key, runner in runners.items():
                    n = result.stats[key].n
                    row[key] = {
                        "host_ms": result.stats[key].to_dict(),
                        "gpu_ms": LatencyStats.from_samples(runner.gpu_times_s[-n:], batch).to_dict(),
                        "memory": result.memory["runners"][key]["runner"],
                    }
                row["speedup_p50"] = result.speedup("dense", "compressed").to_dict()
                row["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
                row["nvml_used_bytes"] = (try_nvml_device(0)[0] or {}).get("memory_used_bytes")
                rows.append(row)
                print(
                    f"batch {batch:>2} {precision} {'graph' if graph else 'eager'}: dense p50 "
                    f"{row['dense']['host_ms']['p50']:.3f} ms, compressed {row['compressed']['host_ms']['p50']:.3f} ms "
                    f"({row['speedup_p50']['p50_ratio']:.2f}×)"
                )
    gpu_name = torch.cuda.get_device_name(0)
    record = {
        "gpu": gpu_name,
        "driver": nvml["driver"] if nvml else None,
        "nvml_unavailable": nvml_reason,
        "run_dir": str(args.run_dir),
        "env": capture_environment({"command": "python -m benchmarks.gpu_latency"}),
        "rows": rows,
    }
    from lowrank_deploy.io import atomic_write_json

    out = args.out or RESULTS / f"gpu_latency_{re.sub(r'[^A-Za-z0-9]+', '_', gpu_name).strip('_')}.json"
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
