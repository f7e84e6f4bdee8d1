"""Capture the machine and software a measurement ran on, for every latency record.

Package versions come from ``importlib.metadata`` (no imports). Only three facts need an import:
ONNX Runtime's available providers, torch's thread count and the CUDA device; each is looked up only
when the package is installed, and a missing package gives ``None``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-directml",
        "onnxruntime-openvino",
        "onnxruntime-training",
    ),
    "numpy": ("numpy",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
}
"""Reported name → distribution names to try, first found wins."""


def capture_environment(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe this machine and its software as a JSON-ready dict.

    Keys: ``timestamp_utc``, ``cpu`` (model, arch, logical/physical/affinity cores, governor),
    ``memory_total_bytes``, ``os`` (system, kernel release, platform string), ``python`` (version,
    implementation), ``packages`` (name → version or ``None``; ``onnxruntime_dist`` tells which ORT
    distribution is installed), ``onnxruntime_providers``, ``threads`` (``torch``,
    ``ort_intra_op``), ``gpu`` (or ``None``), ``jetson`` (or ``None``) and ``extra``.

    Args:
        extra: run settings to record with the environment. ``torch_threads`` and
            ``ort_intra_op_threads`` fill ``threads``; everything is also kept under ``extra``.
    """
    extra = dict(extra) if extra is not None else {}
    packages, ort_dist = _package_versions()
    torch = _import_if_installed("torch", packages)
    threads = {
        "torch": extra.get("torch_threads", torch.get_num_threads() if torch is not None else None),
        "ort_intra_op": extra.get("ort_intra_op_threads"),
    }
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_info(),
        "memory_total_bytes": _total_memory(),
        "os": {"system": platform.system(), "release": platform.release(), "platform": platform.platform()},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "packages": packages,
        "onnxruntime_dist": ort_dist,
        "onnxruntime_providers": _ort_providers(packages),
        "threads": threads,
        "gpu": _gpu_info(torch),
        "jetson": _jetson_info(),
        "extra": extra,
    }


def _package_versions() -> tuple[dict[str, str | None], str | None]:
    versions: dict[str, str | None] = {}
    ort_dist = None
    for key, dists in _PACKAGES.items():
        versions[key] = None
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            if key == "onnxruntime":
                ort_dist = dist
            break
    return versions, ort_dist


def _import_if_installed(name: str, packages: Mapping[str, str | None]) -> Any:
    """Import ``name`` if its distribution is installed; ``None`` if it is missing or fails to import."""
    if packages.get(name) is None:
        return None
    try:
        return __import__(name)
    except ImportError:
        return None


def _ort_providers(packages: Mapping[str, str | None]) -> list[str] | None:
    ort = _import_if_installed("onnxruntime", packages)
    if ort is None:
        return None
    return list(ort.get_available_providers())


def _cpu_info() -> dict[str, Any]:
    model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                model = value.strip()
                break
    if not model:
        model = platform.processor() or platform.machine() or None
    logical = physical = None
    try:
        import psutil
    except ImportError:
        logical = os.cpu_count()
    else:
        logical = psutil.cpu_count(logical=True)
        physical = psutil.cpu_count(logical=False)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    governor_file = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    governor = _read_first_line(governor_file)
    return {
        "model": model,
        "arch": platform.machine(),
        "logical_cores": logical,
        "physical_cores": physical,
        "affinity_cores": affinity,
        "governor": governor,
    }


def _total_memory() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def _gpu_info(torch: Any) -> dict[str, Any] | None:
    """CUDA device 0 as torch sees it, or ``None`` when torch is missing or has no usable GPU."""
    if torch is None or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.total_memory),
        "cuda_runtime": torch.version.cuda,
        "cudnn": cudnn,
        "driver": _nvidia_driver_version(),
    }


def _nvidia_driver_version() -> str | None:
    """Driver version from ``/proc/driver/nvidia/version`` or ``nvidia-smi``; ``None`` if neither works."""
    line = _read_first_line(Path("/proc/driver/nvidia/version"))
    if line and "Kernel Module" in line:
        parts = line.split("Kernel Module", 1)[1].split()
        if parts:
            return parts[0]
    return _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])


def _jetson_info() -> dict[str, Any] | None:
    """L4T release and nvpmodel mode on a Jetson; ``None`` elsewhere.

    Whether ``jetson_clocks`` is on needs root (``jetson_clocks --show``), so it is not probed; record it
    through ``extra`` when the benchmark script sets it.
    """
    release = _read_first_line(Path("/etc/nv_tegra_release"))
    if release is None:
        return None
    return {"l4t": release, "nvpmodel": _run_quiet(["nvpmodel", "-q"])}


def _read_first_line(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else None


def _run_quiet(cmd: list[str]) -> str | None:
    """Run a short probe command; its stripped stdout, or ``None`` if missing, failing or slow."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = proc.stdout.strip()
    return " | ".join(out.splitlines()) if proc.returncode == 0 and out else None
