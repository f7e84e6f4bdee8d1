"""GPU facts and timers: NVML device memory/name/driver, ``torch.cuda`` memory, CUDA-event timing.

``pynvml`` (package ``nvidia-ml-py``) and ``torch`` are imported inside the functions. NVML is a
dGPU tool: on Jetson it is absent or partial (use :mod:`runtime.jetson`'s tegrastats sampler there).
The NVML queries and the device identity live in :mod:`lowrank_core.device` (shared with
:mod:`export.tensorrt`) and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lowrank_core.device import device_identity, nvml_device, try_nvml_device
from lowrank_core.errors import RuntimeUnavailableError

__all__ = [
    "CudaEventTimer",
    "device_identity",
    "engine_markdown",
    "engine_records",
    "latency_gpu_lines",
    "nvml_device",
    "torch_cuda_memory",
    "try_nvml_device",
]


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


# Report sections: TensorRT engines, ONNX Runtime node placement, Jetson --------------------------------


def engine_records(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the engine sidecars of a run directory say (``dense.plan.json``, ``model.plan.json``).

    Returns:
        ``{"dense"|"compressed": {"file", "precision", "tensorrt_version", "gpu_name", "engine_bytes",
        "profile", "build_flags", "parity", "sparsity"}}`` for each engine built, or ``None`` when none was.
    """
    from lowrank_core.io import read_json
    from lowrank_core.rundir import ENGINE_SIDECAR_SUFFIX, MODELS, RunDir

    rd = RunDir(run_dir)
    out: dict[str, Any] = {}
    for key in MODELS:
        plan = rd.engine(key)
        side = plan.with_name(plan.name + ENGINE_SIDECAR_SUFFIX)
        if not plan.is_file() or not side.is_file():
            continue
        meta = read_json(side, what="engine sidecar")
        out[key] = {"file": plan.name, **{k: meta.get(k) for k in _ENGINE_KEYS}}
    return out or None


_ENGINE_KEYS = (
    "precision",
    "tensorrt_version",
    "gpu_name",
    "engine_bytes",
    "profile",
    "build_flags",
    "parity",
    "sparsity",
)


def engine_markdown(engines: Mapping[str, Any] | None) -> list[str]:
    """Markdown bullets per engine: precision, TensorRT/GPU, parity against ONNX Runtime, 2:4 sparsity."""
    lines = []
    for eng in (engines or {}).values():
        parity = eng.get("parity") or {}
        if parity.get("skipped"):
            par = f"parity not checked ({parity['skipped']})"
        elif parity:
            verdict = "PASS" if parity.get("passed") else "FAIL"
            par = (
                f"parity vs ONNX Runtime {verdict}: max_abs {parity.get('max_abs', 0):.3g}, rel_l2 "
                f"{parity.get('rel_l2', 0):.3g} (atol {parity.get('atol')}, rtol {parity.get('rtol')}, "
                f"batch {parity.get('batch')}, seed {parity.get('seed')})"
            )
        else:
            par = "parity not recorded"
        sparse = eng.get("sparsity") or {}
        sp = ""
        if sparse.get("sparse_weights_flag"):
            picked = sparse.get("sparse_tactic_layers")
            sp = f"; SPARSE_WEIGHTS set ({len(sparse.get('tensors_2to4') or [])} 2:4 weight tensors), " + (
                "sparse tactics: unknown" if picked is None else f"sparse tactics picked for {len(picked)} layer(s)"
            )
        lines.append(
            f"TensorRT {eng.get('file')}: {eng.get('precision')}, TensorRT {eng.get('tensorrt_version')} on "
            f"{eng.get('gpu_name')}; {par}{sp}"
        )
    return lines


def latency_gpu_lines(record: Mapping[str, Any]) -> list[str]:
    """Extra Markdown for ``latency.md`` / ``report.md``: ORT node placement per runner and Jetson sampling."""
    from runtime.jetson import jetson_markdown
    from runtime.ort_runner import placement_lines

    lines: list[str] = []
    for key, info in (record.get("runners") or {}).items():
        placement = info.get("placement") if isinstance(info, Mapping) else None
        lines += [f"- {key}, ONNX Runtime placement — {line}" for line in placement_lines(placement)]
    lines += [f"- Jetson: {line}" for line in jetson_markdown(record.get("jetson"))]
    lines += [f"- {line}" for line in engine_markdown(record.get("engines"))]
    return [*lines, ""] if lines else []
