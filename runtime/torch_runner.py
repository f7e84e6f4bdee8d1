"""Eager PyTorch runner (``"torch"``): the reference every exported backend is compared with.

``torch`` is imported inside the methods, so importing this module (and ``runtime``) stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from lowrank_core.rundir import MODELS, RunDir, model_key
from runtime.base import Dim, Feed, Runner, TensorMeta, register_runner

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_AUTOCAST: dict[str, str] = {"fp16": "float16", "bf16": "bfloat16"}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeUnavailableError("the torch backend needs PyTorch; install it with `pip install torch`") from None
    return torch


RUN_LOADER_GROUP = "lowrank_deploy.run_loaders"
"""Entry-point group of the functions that rebuild a run directory's models (``compress`` registers
:func:`compress.artifacts.load_run` in ``pyproject.toml``): the runtime names the extension point and needs
nothing of the stage that fills it."""


def _load_run(run_dir: str | os.PathLike[str], threads: int | None) -> Any:
    """Rebuild a run's models with the registered run loader (a device with only the runtime has none)."""
    from importlib import metadata

    loaders = sorted(metadata.entry_points(group=RUN_LOADER_GROUP), key=lambda ep: ep.name)
    try:
        if not loaders:
            raise ImportError(f"no {RUN_LOADER_GROUP!r} entry point is installed")
        load_run = loaders[0].load()
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"the torch backend rebuilds a run with the compress stage, which is not importable here ({exc}); "
            "use --backend ort"
        ) from None
    run = load_run(run_dir)
    if threads is not None:
        _import_torch().set_num_threads(threads)
    return run


@register_runner("torch")
class TorchRunner(Runner):
    """Run an ``nn.Module`` under ``torch.inference_mode()`` on CPU or CUDA.

    Activation puts the module in eval mode and moves it to ``device``; deactivation restores its
    training flag and moves it back to the device it came from. On CUDA, :meth:`infer` copies the
    inputs to the device, runs, synchronises and copies the outputs back, so a host timer around it
    measures host latency (transfers included), like trtexec's "Latency".

    Args:
        model: the module to run; it is called with the inputs in the order of ``input_shapes``.
        input_shapes: input name → shape (``None`` or a string for dynamic axes). Default: one input
            ``"input"`` of any shape.
        dtype: numpy dtype of every input.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        output_names: names for a tuple/list of outputs; default ``output`` for a single tensor and
            ``output_0``, ``output_1``, ... for sequences. Dict outputs keep their keys.
        name: instance name; default the module's class name.
        cuda_graph: capture the forward pass in a CUDA graph after a warm-up on static input/output
            buffers and replay it (re-captured when input shapes change). CUDA only.
        channels_last: convert the module and 4-D inputs to ``torch.channels_last``.
        autocast: ``"fp16"`` or ``"bf16"`` to run under ``torch.autocast``; outputs come back as
            float32 (numpy has no bfloat16). CUDA only.
        gpu_timing: on CUDA, record CUDA-event GPU time of every forward (or graph replay) in
            ``gpu_times_s`` (warm-up included; callers take the tail matching their timed samples).

    Raises:
        UserInputError: for a malformed device string or an unknown autocast type.
        RuntimeUnavailableError: for CUDA-only options (``cuda_graph``, ``autocast``) on the CPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        input_shapes: Mapping[str, Sequence[Dim] | None] | None = None,
        dtype: str | np.dtype = "float32",
        device: str = "cpu",
        output_names: Sequence[str] | None = None,
        name: str | None = None,
        cuda_graph: bool = False,
        channels_last: bool = False,
        autocast: str | None = None,
        gpu_timing: bool = True,
    ) -> None:
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise UserInputError(f"torch runner device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if autocast is not None and autocast not in _AUTOCAST:
            raise UserInputError(f"autocast must be one of {', '.join(_AUTOCAST)} or None, got {autocast!r}")
        cuda_only = [opt for opt, on in (("cuda_graph", cuda_graph), (f"autocast={autocast}", autocast)) if on]
        if cuda_only and not device.startswith("cuda"):
            raise RuntimeUnavailableError(
                f"{', '.join(cuda_only)} need(s) a CUDA device but the torch runner is on {device!r}; use device='cuda'"
            )
        super().__init__(name=name if name is not None else type(model).__name__, device=device)
        self.model = model
        shapes = input_shapes if input_shapes is not None else {"input": None}
        self._meta = {
            input_name: TensorMeta(np.dtype(dtype), None if shape is None else tuple(shape))
            for input_name, shape in shapes.items()
        }
        self.output_names = tuple(output_names) if output_names is not None else None
        self._torch: Any = None
        self._orig_device: Any = None
        self._was_training = False
        self._cuda_weights_bytes: int | None = None
        self.cuda_graph = cuda_graph
        self.channels_last = channels_last
        self.autocast = autocast
        self.gpu_timing = gpu_timing
        self.gpu_times_s: list[float] = []
        self.graph_captures = 0
        self._graph: Any = None
        self._graph_key: tuple[tuple[int, ...], ...] | None = None
        self._static_in: list[Any] = []
        self._static_out: Any = None
        self._timer: Any = None

    # Construction from a run directory -------------------------------------------------------------

    @classmethod
    def run_dir_file(cls, run_dir: RunDir, which: str) -> Path:
        """``dense.safetensors`` or ``model.safetensors`` (the architecture comes from ``plan.json``)."""
        return run_dir.weights(which)

    @classmethod
    def from_run_dir(
        cls, run_dir: str | os.PathLike[str], which: str = "model", *, threads: int | None = None, **options: Any
    ) -> TorchRunner:
        """Rebuild the run's dense or compressed module (the registered run loader) and wrap it.

        Args:
            run_dir: the run directory.
            which: ``"dense"`` or ``"model"`` (compressed).
            threads: ``torch.set_num_threads`` (process-wide) when given.
            **options: constructor options (``device``, ``cuda_graph``, ...).

        Raises:
            RuntimeUnavailableError: the compress stage (and torch) is not installed.
            UserInputError: the run directory is missing or corrupt.
        """
        run = _load_run(run_dir, threads)
        return cls._from_run(run, model_key(which), **options)

    @classmethod
    def bench_runners(
        cls, run_dir: str | os.PathLike[str], *, threads: int | None = None, **options: Any
    ) -> dict[str, Runner]:
        """Both models of the run, rebuilt by one call of the registered run loader."""
        run = _load_run(run_dir, threads)
        return {key: cls._from_run(run, key, **options) for key in MODELS}

    @classmethod
    def _from_run(cls, run: Any, key: str, **options: Any) -> TorchRunner:
        shape = tuple(run.input_shape)
        module = run.dense if key == "dense" else run.compressed
        return cls(module, **{"input_shapes": {"input": (None, *shape[1:])}, "name": key, **options})

    @classmethod
    def cli_options(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """``--device`` (cpu, cuda, cuda:N), ``--threads``, ``--cuda-graph``, ``--channels-last``, ``--autocast``.

        Raises:
            UserInputError: an unknown device, or a CUDA-only flag without a CUDA device.
        """
        device = str(args.get("device") or "cpu")
        gpu_flags = [f for f, key in (("--cuda-graph", "cuda_graph"), ("--autocast", "autocast")) if args.get(key)]
        if gpu_flags and not device.startswith("cuda"):
            raise UserInputError(f"{' and '.join(gpu_flags)} need --device cuda")
        if not _DEVICE_RE.match(device):
            raise UserInputError(f"unknown --device {device!r} for torch; use cpu, cuda or cuda:N")
        return {
            "device": device,
            "threads": args.get("threads"),
            "cuda_graph": bool(args.get("cuda_graph", False)),
            "channels_last": bool(args.get("channels_last", False)),
            "autocast": args.get("autocast"),
        }

    @classmethod
    def cli_env(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """Thread count and the GPU options."""
        return {
            "torch_threads": args.get("threads"),
            "cuda_graph": bool(args.get("cuda_graph", False)),
            "channels_last": bool(args.get("channels_last", False)),
            "autocast": args.get("autocast"),
        }

    @property
    def is_cuda(self) -> bool:
        """Whether this runner runs on a CUDA device."""
        return self.device.startswith("cuda")

    def activate_impl(self) -> None:
        """Check the device, move the module there and switch it to eval mode."""
        torch = _import_torch()
        if self.is_cuda and not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA"
            raise RuntimeUnavailableError(
                f"device {self.device!r} requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with {built}); use device 'cpu' or a CUDA machine"
            )
        if self.is_cuda:
            index = torch.device(self.device).index or 0
            if index >= torch.cuda.device_count():
                raise RuntimeUnavailableError(
                    f"device {self.device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
                )
        self._torch = torch
        first = next(self.model.parameters(), None)
        self._orig_device = first.device if first is not None else None
        self._was_training = self.model.training
        allocated_before = self._cuda_allocated()
        self.model.to(self.device).eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self._cuda_weights_bytes = self._cuda_allocated() - allocated_before
            if self.gpu_timing:
                from runtime.gpu import CudaEventTimer

                self._timer = CudaEventTimer(torch, self.device)
        self.gpu_times_s = []
        self._graph, self._graph_key, self._static_in, self._static_out = None, None, [], None

    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        """Describe the inputs given at construction."""
        return self._meta

    def infer_impl(self, feed: Feed) -> dict[str, np.ndarray]:
        """Convert the feed, run the module in inference mode, synchronise and return numpy arrays."""
        torch = self._torch
        with torch.inference_mode():
            args = [self._prepare(torch.from_numpy(np.ascontiguousarray(feed[n]))) for n in self._meta]
            if self.cuda_graph:
                out = self._replay(args)
            else:
                if self._timer is not None:
                    self._timer.start()
                with self._autocast_ctx():
                    out = self.model(*args)
                if self._timer is not None:
                    self._timer.stop()
            if self.is_cuda:
                torch.cuda.synchronize(self.device)
                if self._timer is not None:
                    self.gpu_times_s.append(self._timer.elapsed_s())
            return self._outputs_to_numpy(out)

    def deactivate_impl(self) -> None:
        """Restore the module's training flag and device and release cached CUDA memory."""
        self._graph, self._graph_key, self._static_in, self._static_out = None, None, [], None
        self.model.train(self._was_training)
        if self.channels_last:
            self.model.to(memory_format=self._torch.contiguous_format)
        if self._orig_device is not None:
            self.model.to(self._orig_device)
        if self.is_cuda:
            self._torch.cuda.synchronize(self.device)
            self._torch.cuda.empty_cache()

    def memory(self) -> dict[str, Any]:
        """RSS, and on CUDA the caching allocator's peak/current counters for this device.

        ``cuda_max_*`` are device-wide peaks since the process started (or the last
        ``torch.cuda.reset_peak_memory_stats``), shared by every runner on that device;
        ``cuda_weights_bytes`` is what moving this runner's module to the device allocated.
        """
        mem = super().memory()
        if self.is_cuda and self._torch is not None:
            cuda = self._torch.cuda
            mem.update(
                cuda_allocated_bytes=int(cuda.memory_allocated(self.device)),
                cuda_reserved_bytes=int(cuda.memory_reserved(self.device)),
                cuda_max_allocated_bytes=int(cuda.max_memory_allocated(self.device)),
                cuda_max_reserved_bytes=int(cuda.max_memory_reserved(self.device)),
                cuda_weights_bytes=self._cuda_weights_bytes,
            )
        return mem

    def info(self) -> dict[str, Any]:
        """Backend, device, module class and input specification."""
        out = super().info()
        out["module"] = type(self.model).__name__
        out["inputs"] = {n: m.describe() for n, m in self._meta.items()}
        out.update(
            cuda_graph=self.cuda_graph,
            channels_last=self.channels_last,
            autocast=self.autocast,
            graph_captures=self.graph_captures,
        )
        if self._torch is not None:
            out["torch_threads"] = self._torch.get_num_threads()
            if self.is_cuda:
                out["gpu"] = self._torch.cuda.get_device_name(self.device)
        return out

    # Internals --------------------------------------------------------------------------------------

    def _prepare(self, host: Any) -> Any:
        tensor = host.to(self.device, non_blocking=False)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=self._torch.channels_last)
        return tensor

    def _autocast_ctx(self, *, cache_enabled: bool = True) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        # The autocast weight cache must be off while capturing a CUDA graph (PyTorch CUDA graphs docs).
        return self._torch.autocast(
            "cuda", dtype=getattr(self._torch, _AUTOCAST[self.autocast]), cache_enabled=cache_enabled
        )

    def _replay(self, args: list[Any]) -> Any:
        """Copy ``args`` into the static inputs and replay the graph, capturing it first if needed."""
        torch = self._torch
        key = tuple(tuple(a.shape) for a in args)
        if self._graph is None or key != self._graph_key:
            self._capture(args, key)
        for static, arg in zip(self._static_in, args, strict=True):
            static.copy_(arg)
        if self._timer is not None:
            self._timer.start()
        self._graph.replay()
        if self._timer is not None:
            self._timer.stop()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self._static_out)

    def _capture(self, args: list[Any], key: tuple[tuple[int, ...], ...]) -> None:
        """Warm up on a side stream, then capture one forward on static buffers (PyTorch's recipe)."""
        torch = self._torch
        self._graph = None
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                with self._autocast_ctx(cache_enabled=False):
                    self.model(*static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast_ctx(cache_enabled=False):
            static_out = self.model(*static_in)
        self._graph, self._graph_key = graph, key
        self._static_in, self._static_out = static_in, static_out
        self.graph_captures += 1

    def _cuda_allocated(self) -> int:
        if not self.is_cuda:
            return 0
        return int(self._torch.cuda.memory_allocated(self.device))

    def _outputs_to_numpy(self, out: Any) -> dict[str, np.ndarray]:
        torch = self._torch
        if isinstance(out, torch.Tensor):
            names = self.output_names or ("output",)
            return {names[0]: self._to_numpy(names[0], out)}
        if isinstance(out, Mapping):
            return {str(k): self._to_numpy(str(k), v) for k, v in out.items()}
        if isinstance(out, (tuple, list)):
            names = self.output_names or tuple(f"output_{i}" for i in range(len(out)))
            if len(names) != len(out):
                raise UserInputError(
                    f"runner {self.name!r}: model returned {len(out)} outputs but {len(names)} output_names were given"
                )
            return {n: self._to_numpy(n, v) for n, v in zip(names, out, strict=True)}
        raise UserInputError(
            f"runner {self.name!r}: model returned {type(out).__name__}; expected a tensor, a tuple/list "
            "of tensors or a dict of tensors"
        )

    def _to_numpy(self, output_name: str, value: Any) -> np.ndarray:
        if not isinstance(value, self._torch.Tensor):
            raise UserInputError(
                f"runner {self.name!r}: output {output_name!r} is a {type(value).__name__}, not a tensor; "
                "nested outputs are not supported"
            )
        value = value.detach()
        if self.autocast is not None and value.dtype in (self._torch.float16, self._torch.bfloat16):
            value = value.float()
        return value.to("cpu").numpy()
