"""Run exported models and measure them: runners behind one interface, a benchmark harness, reports.

Importing this package is cheap and side-effect free: torch, onnxruntime, tensorrt and matplotlib are
imported only inside the functions and methods that use them.

Typical use::

    from runtime import BenchmarkConfig, OrtRunner, benchmark

    runners = {"dense": OrtRunner("run/dense.onnx"), "compressed": OrtRunner("run/model.onnx")}
    result = benchmark(runners, {"input": x}, BenchmarkConfig(duration_s=10))
    print(result.stats["compressed"].p50, result.speedup("dense", "compressed").ci95)

Pick a backend by name with :func:`runner_class` (``"torch"``, ``"ort"``; ``"trt"`` once its module exists).
"""

from __future__ import annotations

from runtime.base import (
    Runner,
    TensorMeta,
    available_backends,
    register_runner,
    runner_class,
)
from runtime.env import capture_environment
from runtime.harness import (
    BenchmarkConfig,
    BenchmarkResult,
    LatencyStats,
    SpeedupEstimate,
    benchmark,
    speedup,
)
from runtime.latency_record import write_latency
from runtime.ort_runner import OrtRunner
from runtime.report import write_report
from runtime.torch_runner import TorchRunner

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "LatencyStats",
    "OrtRunner",
    "Runner",
    "SpeedupEstimate",
    "TensorMeta",
    "TorchRunner",
    "available_backends",
    "benchmark",
    "capture_environment",
    "register_runner",
    "runner_class",
    "speedup",
    "write_latency",
    "write_report",
]
