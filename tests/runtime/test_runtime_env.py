"""capture_environment: keys, values that can be checked here, and robustness to missing packages."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from importlib import metadata

import numpy as np
import pytest

from runtime import env as env_mod
from runtime.env import capture_environment

TOP_KEYS = {
    "timestamp_utc",
    "cpu",
    "memory_total_bytes",
    "os",
    "python",
    "packages",
    "onnxruntime_dist",
    "onnxruntime_providers",
    "threads",
    "gpu",
    "jetson",
    "extra",
}


def test_environment_keys_and_values():
    env = capture_environment({"ort_intra_op_threads": 2, "note": "x"})
    assert set(env) == TOP_KEYS
    json.dumps(env)  # JSON-ready
    stamp = dt.datetime.fromisoformat(env["timestamp_utc"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 300
    cpu = env["cpu"]
    assert set(cpu) == {"model", "arch", "logical_cores", "physical_cores", "affinity_cores", "governor"}
    assert cpu["logical_cores"] == os.cpu_count()
    assert cpu["model"]
    assert cpu["arch"] == platform.machine()
    assert env["memory_total_bytes"] > 0
    assert env["os"]["release"] == platform.release()
    assert env["python"]["version"] == platform.python_version()
    assert set(env["packages"]) == {"torch", "torchvision", "onnx", "onnxruntime", "numpy", "tensorrt"}
    assert env["packages"]["numpy"] == np.__version__
    assert env["threads"]["ort_intra_op"] == 2
    assert env["extra"] == {"ort_intra_op_threads": 2, "note": "x"}


def test_environment_reports_installed_runtimes():
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    env = capture_environment()
    assert env["packages"]["onnxruntime"] == ort.__version__
    assert env["onnxruntime_dist"] in {"onnxruntime", "onnxruntime-gpu"}
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["threads"]["torch"] == torch.get_num_threads()
    if torch.cuda.is_available():
        assert env["gpu"]["name"] == torch.cuda.get_device_name(0)
        assert env["gpu"]["cuda_runtime"] == torch.version.cuda
    else:
        assert env["gpu"] is None


def test_environment_without_optional_packages(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(env_mod.metadata, "version", missing)
    for name in ("torch", "onnxruntime", "psutil"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    env = capture_environment({"torch_threads": 3})
    assert set(env) == TOP_KEYS
    assert all(v is None for v in env["packages"].values())
    assert env["onnxruntime_dist"] is None
    assert env["onnxruntime_providers"] is None
    assert env["gpu"] is None
    assert env["memory_total_bytes"] is None
    assert env["cpu"]["logical_cores"] == os.cpu_count()
    assert env["cpu"]["physical_cores"] is None
    assert env["threads"] == {"torch": 3, "ort_intra_op": None}


def test_cpu_model_falls_back_without_proc(monkeypatch):
    real_path = env_mod.Path
    monkeypatch.setattr(env_mod, "Path", lambda *_: real_path("/nonexistent/definitely/not/here"))
    monkeypatch.setattr(env_mod.platform, "processor", lambda: "FakeCPU 9000")
    cpu = env_mod._cpu_info()
    assert cpu["model"] == "FakeCPU 9000"
    assert cpu["governor"] is None
