"""GPU facts and timers: NVML device memory/name/driver, ``torch.cuda`` memory, CUDA-event timing.

``pynvml`` (package ``nvidia-ml-py``) and ``torch`` are imported inside the functions. NVML is a
dGPU tool: on Jetson it is absent or partial (use :mod:`runtime.jetson`'s tegrastats sampler there).
"""

from __future__ import annotations

from typing import Any

from lowrank_deploy.errors import RuntimeUnavailableError


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

    This is what engine sidecars record and compare (:mod:`export.tensorrt`).

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


def torch_cuda_memory(device: str = "cuda") -> dict[str, int]:
    """``torch.cuda`` caching-allocator counters and ``cudaMemGetInfo`` for ``device``, in bytes.

    Raises:
        RuntimeUnavailableError: torch sees no CUDA device.
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError("torch.cuda.is_available() is False; no CUDA memory to report")
    free, total = torch.cuda.mem_get_info(device)
    return {
        "cuda_allocated_bytes": int(torch.cuda.memory_allocated(device)),
        "cuda_reserved_bytes": int(torch.cuda.memory_reserved(device)),
        "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "cuda_max_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        "device_free_bytes": int(free),
        "device_total_bytes": int(total),
    }


class CudaEventTimer:
    """GPU time between two CUDA events on a stream (trtexec's "GPU Compute Time").

    ``start()`` and ``stop()`` record events on ``stream`` (default: the current stream when called);
    ``elapsed_s()`` waits for the stop event and returns seconds. Events are created once and reused.

    Args:
        torch_module: the imported ``torch`` (passed in so this module imports nothing heavy).
        device: CUDA device of the events.
    """

    def __init__(self, torch_module: Any, device: str = "cuda") -> None:
        self._torch = torch_module
        self.device = device
        self._start = torch_module.cuda.Event(enable_timing=True)
        self._stop = torch_module.cuda.Event(enable_timing=True)
        self._recorded = False

    def start(self, stream: Any = None) -> None:
        """Record the start event on ``stream``."""
        self._start.record(stream)
        self._recorded = False

    def stop(self, stream: Any = None) -> None:
        """Record the stop event on ``stream``."""
        self._stop.record(stream)
        self._recorded = True

    def elapsed_s(self) -> float:
        """Seconds between the two events (synchronises on the stop event).

        Raises:
            RuntimeError: if ``stop()`` was not called after ``start()``.
        """
        if not self._recorded:
            raise RuntimeError("CudaEventTimer.elapsed_s() needs start() and stop() first")
        self._stop.synchronize()
        return float(self._start.elapsed_time(self._stop)) / 1e3
