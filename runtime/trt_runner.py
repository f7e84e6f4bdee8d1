"""TensorRT runner (``"trt"``): run a serialized engine with ``execute_async_v3``.

``tensorrt`` and ``torch`` are imported inside the methods. Device buffers are torch CUDA tensors; the
engine's I/O tensors are bound by name (``set_tensor_address``), inputs with a dynamic batch get
``set_input_shape`` per call, and :meth:`TrtRunner.infer` synchronises the stream before returning, so
a host timer around it measures trtexec's "Latency" (H2D + GPU compute + D2H). CUDA events around
``execute_async_v3`` alone give trtexec's "GPU Compute Time", kept per inference in ``gpu_times_s``.
The same calls exist in TensorRT 10.x and 11.x (``docs/deployment.md`` §10).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from lowrank_core.rundir import COMPRESSED, DENSE, RunDir
from runtime.base import Feed, Runner, TensorMeta, register_runner


def io_tensors(engine: Any, trt: Any) -> list[dict[str, Any]]:
    """Describe an engine's I/O tensors in binding order.

    Returns:
        One ``{"name", "is_input", "dtype" (numpy), "shape" (tuple, -1 for dynamic)}`` per tensor.
    """
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(
            {
                "name": name,
                "is_input": engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                "shape": tuple(int(d) for d in engine.get_tensor_shape(name)),
            }
        )
    return out


def engine_device_memory_bytes(engine: Any) -> int | None:
    """Per-context activation/scratch memory: ``device_memory_size_v2``, else the v1 property (TRT < 10.1)."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        value = getattr(engine, attr, None)
        if value is not None:
            return int(value)
    return None


@register_runner("trt")
class TrtRunner(Runner):
    """Run a TensorRT engine (``model.plan``) on a CUDA device.

    Args:
        engine_path: the plan; its sidecar ``model.plan.json`` is checked against this TensorRT and GPU
            unless ``check_sidecar`` is False (see :func:`export.tensorrt.load_engine`).
        device: ``"cuda"`` or ``"cuda:N"``.
        check_sidecar: refuse engines built for another TensorRT version or GPU.
        gpu_timing: record CUDA-event GPU compute time per inference in ``gpu_times_s``.
        name: instance name; default the file stem.

    Attributes:
        gpu_times_s: GPU compute time of every inference since activation (warm-up included; callers
            take the tail that matches their timed samples).

    Raises:
        UserInputError: for a device that is not CUDA.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike[str],
        *,
        device: str = "cuda",
        check_sidecar: bool = True,
        gpu_timing: bool = True,
        name: str | None = None,
    ) -> None:
        if not str(device).startswith("cuda"):
            raise UserInputError(f"the trt runner runs on CUDA devices only, got device {device!r}")
        self.engine_path = Path(engine_path)
        super().__init__(name=name if name is not None else self.engine_path.stem, device=device)
        self.check_sidecar = check_sidecar
        self.gpu_timing = gpu_timing
        self.gpu_times_s: list[float] = []
        self._trt: Any = None
        self._runtime: Any = None
        self._torch: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._timer: Any = None
        self._io: list[dict[str, Any]] = []
        self._buffers: dict[str, Any] = {}
        self._activate_device_bytes: int | None = None
        self._tensorrt_version: str | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **options: Any) -> TrtRunner:
        """``TrtRunner(path, **options)``."""
        return cls(path, **options)

    @classmethod
    def run_dir_file(cls, run_dir: RunDir, which: str) -> Path:
        """``dense.plan`` or ``model.plan``."""
        return run_dir.engine(which)

    @classmethod
    def bench_runners(
        cls, run_dir: str | os.PathLike[str], *, engine: str | os.PathLike[str] | None = None, **options: Any
    ) -> dict[str, Runner]:
        """``model.plan`` (required) and ``dense.plan`` (when built); or only ``engine`` when given.

        Raises:
            UserInputError: the engine to time is missing.
        """
        if engine is not None:
            if not Path(engine).is_file():
                raise UserInputError(f"engine {str(engine)!r} does not exist; build it with `python -m export engine`")
            return {COMPRESSED: cls.from_path(engine, **{"name": COMPRESSED, **options})}
        runners: dict[str, Runner] = {}
        if cls.run_dir_file(RunDir(run_dir), DENSE).is_file():
            runners[DENSE] = cls.from_run_dir(run_dir, DENSE, **options)
        runners[COMPRESSED] = cls.from_run_dir(run_dir, COMPRESSED, **options)
        return runners

    @classmethod
    def cli_options(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """``--device`` (a CUDA device; ``cpu`` means ``cuda``) and ``--engine``."""
        device = str(args.get("device") or "cuda")
        return {"device": device if device.startswith("cuda") else "cuda", "engine": args.get("engine")}

    @classmethod
    def cli_env(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """The engine given on the command line, if any."""
        engine = args.get("engine")
        return {"engine": str(engine) if engine else None}

    def activate_impl(self) -> None:
        """Check TensorRT, CUDA and the sidecar, deserialize the engine and create a context."""
        from runtime.trt_engine import load_engine, require_tensorrt

        version = require_tensorrt()
        try:
            import torch
        except ImportError:
            raise RuntimeUnavailableError(
                "the trt runner uses torch CUDA tensors as device buffers; install torch"
            ) from None
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("the trt runner needs a CUDA device; torch.cuda.is_available() is False")
        import tensorrt as trt

        plan = load_engine(self.engine_path, check=self.check_sidecar)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeUnavailableError(
                f"TensorRT {version} could not deserialize {self.engine_path.name}; rebuild it on this machine "
                "with `python -m export engine`"
            )
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeUnavailableError(f"TensorRT could not create an execution context for {self.engine_path.name}")
        free_after, _ = torch.cuda.mem_get_info(self.device)
        from runtime.gpu import CudaEventTimer

        self._trt, self._torch, self._engine, self._context = trt, torch, engine, context
        self._tensorrt_version = version
        self._stream = torch.cuda.Stream(device=self.device)
        self._timer = CudaEventTimer(torch, self.device) if self.gpu_timing else None
        self._io = io_tensors(engine, trt)
        self._buffers = {}
        self._activate_device_bytes = int(free_before - free_after)
        self.gpu_times_s = []

    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        """Inputs from the engine: numpy dtype, shape with ``None`` for dynamic axes."""
        return {
            t["name"]: TensorMeta(t["dtype"], tuple(None if d < 0 else d for d in t["shape"]))
            for t in self._io
            if t["is_input"]
        }

    def infer_impl(self, feed: Feed) -> dict[str, np.ndarray]:
        """Copy inputs in, bind addresses, ``execute_async_v3``, copy outputs out, sync the stream."""
        torch, context, stream = self._torch, self._context, self._stream
        with torch.cuda.stream(stream):
            for t in self._io:
                if not t["is_input"]:
                    continue
                host = np.ascontiguousarray(feed[t["name"]])
                if not context.set_input_shape(t["name"], tuple(host.shape)):
                    raise UserInputError(
                        f"engine {self.engine_path.name} rejects input {t['name']!r} of shape {list(host.shape)}; "
                        "it is outside the optimization profile the engine was built with"
                    )
                buf = self._buffer(t["name"], tuple(host.shape), t["dtype"])
                buf.copy_(torch.from_numpy(host), non_blocking=False)
                context.set_tensor_address(t["name"], int(buf.data_ptr()))
            outputs = {}
            for t in self._io:
                if t["is_input"]:
                    continue
                shape = tuple(int(d) for d in context.get_tensor_shape(t["name"]))
                buf = self._buffer(t["name"], shape, t["dtype"])
                context.set_tensor_address(t["name"], int(buf.data_ptr()))
                outputs[t["name"]] = buf
            if self._timer is not None:
                self._timer.start(stream)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.engine_path.name}")
            if self._timer is not None:
                self._timer.stop(stream)
            host_out = {name: buf.to("cpu", non_blocking=False) for name, buf in outputs.items()}
        stream.synchronize()
        if self._timer is not None:
            self.gpu_times_s.append(self._timer.elapsed_s())
        return {name: tensor.numpy() for name, tensor in host_out.items()}

    def deactivate_impl(self) -> None:
        """Drop buffers, context and engine (in that order) and release cached CUDA memory."""
        if self._stream is not None:
            self._stream.synchronize()
        self._buffers = {}
        self._context = None
        self._engine = None
        self._runtime = None
        if self._torch is not None:
            self._torch.cuda.empty_cache()

    def memory(self) -> dict[str, Any]:
        """RSS, engine file size, per-context device memory, device memory taken at activation, NVML."""
        from runtime.gpu import try_nvml_device

        mem = super().memory()
        mem["engine_file_bytes"] = self.engine_path.stat().st_size if self.engine_path.is_file() else None
        if self._engine is not None:
            mem["trt_context_device_memory_bytes"] = engine_device_memory_bytes(self._engine)
        mem["activate_device_bytes"] = self._activate_device_bytes
        index = int(self.device.partition(":")[2] or 0)
        nvml, reason = try_nvml_device(index)
        mem["nvml_memory_used_bytes"] = nvml["memory_used_bytes"] if nvml else None
        if nvml is None:
            mem["nvml_unavailable"] = reason
        return mem

    def info(self) -> dict[str, Any]:
        """Backend, device, engine path, TensorRT version and I/O tensors."""
        out = super().info()
        out.update(
            engine_path=str(self.engine_path),
            tensorrt_version=self._tensorrt_version,
            io={t["name"]: f"{'in' if t['is_input'] else 'out'} {t['dtype']}{list(t['shape'])}" for t in self._io},
        )
        return out

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        torch = self._torch
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            buf = torch.empty(shape, dtype=torch_dtype, device=self.device)
            self._buffers[name] = buf
        return buf
