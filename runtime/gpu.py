"""GPU facts and timers: NVML device memory/name/driver, ``torch.cuda`` memory, CUDA-event timing.

``pynvml`` (package ``nvidia-ml-py``) and ``torch`` are imported inside the functions. NVML is a
dGPU tool: on Jetson it is absent or partial (use :mod:`runtime.jetson`'s tegrastats sampler there).
The NVML queries and the device identity live in :mod:`lowrank_deploy.device` (shared with
:mod:`export.tensorrt`) and are re-exported here.
"""

from __future__ import annotations

from typing import Any

from lowrank_deploy.device import device_identity, nvml_device, try_nvml_device
from lowrank_deploy.errors import RuntimeUnavailableError

__all__ = ["CudaEventTimer", "device_identity", "nvml_device", "torch_cuda_memory", "try_nvml_device"]


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
