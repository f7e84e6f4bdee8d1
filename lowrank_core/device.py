"""GPU identity shared by the stages: NVML facts and ``{"name", "compute_capability"}`` of a device.

Engine sidecars record the identity at build time (:mod:`export.tensorrt`) and compare it at load time
(:mod:`runtime.trt_runner`); living here, neither stage imports the other for it. ``pynvml`` (package
``nvidia-ml-py``) and ``torch`` are imported inside the functions.
"""

from __future__ import annotations

from typing import Any

from lowrank_core.errors import RuntimeUnavailableError


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise RuntimeUnavailableError(
            "NVML queries need the nvidia-ml-py package (`pip install 'lowrank-deploy[gpu]'`)"
        ) from None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_device(index: int = 0) -> dict[str, Any]:
    """Name, driver, compute capability and memory (bytes) of GPU ``index`` from NVML.

    Returns:
        ``{"index", "name", "driver", "compute_capability", "memory_total_bytes", "memory_used_bytes",
        "memory_free_bytes"}``. ``memory_used_bytes`` is device-wide (all processes, CUDA contexts
        included), unlike ``torch.cuda`` counters.

    Raises:
        RuntimeUnavailableError: nvidia-ml-py is missing, or NVML cannot initialise / find the device.
    """
    nvml = _import_pynvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise RuntimeUnavailableError(f"NVML could not initialise ({exc}); no NVIDIA driver on this machine?") from None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return {
            "index": index,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "compute_capability": f"{major}.{minor}",
            "memory_total_bytes": int(memory.total),
            "memory_used_bytes": int(memory.used),
            "memory_free_bytes": int(memory.free),
        }
    except nvml.NVMLError as exc:
        raise RuntimeUnavailableError(f"NVML query of GPU {index} failed: {exc}") from None
    finally:
        nvml.nvmlShutdown()


def try_nvml_device(index: int = 0) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`nvml_device`, or ``(None, reason)`` when NVML is unavailable."""
    try:
        return nvml_device(index), None
    except RuntimeUnavailableError as exc:
        return None, str(exc)


def device_identity(index: int = 0) -> dict[str, str]:
    """``{"name", "compute_capability", "source"}`` of GPU ``index``, from torch or else NVML.

    This is what engine sidecars record and compare (:mod:`runtime.trt_engine`).

    Raises:
        RuntimeUnavailableError: neither torch.cuda nor NVML sees a GPU.
    """
    try:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(index)
            return {
                "name": torch.cuda.get_device_name(index),
                "compute_capability": f"{major}.{minor}",
                "source": "torch",
            }
    except ImportError:
        pass  # fall through to NVML
    info, reason = try_nvml_device(index)
    if info is None:
        raise RuntimeUnavailableError(f"no CUDA GPU {index} visible to torch or NVML ({reason})")
    return {"name": info["name"], "compute_capability": info["compute_capability"], "source": "nvml"}
