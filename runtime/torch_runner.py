"""Eager PyTorch runner (``"torch"``): the reference every exported backend is compared with.

``torch`` is imported inside the methods, so importing this module (and ``runtime``) stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import RuntimeUnavailableError, UserInputError
from runtime.base import Dim, Feed, Runner, TensorMeta, register_runner

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeUnavailableError("the torch backend needs PyTorch; install it with `pip install torch`") from None
    return torch


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

    Raises:
        UserInputError: for a malformed device string.
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
    ) -> None:
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise UserInputError(f"torch runner device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
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
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self._cuda_weights_bytes = self._cuda_allocated() - allocated_before

    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        """Describe the inputs given at construction."""
        return self._meta

    def infer_impl(self, feed: Feed) -> dict[str, np.ndarray]:
        """Convert the feed, run the module in inference mode, synchronise and return numpy arrays."""
        torch = self._torch
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device, non_blocking=False) for n in self._meta
            ]
            out = self.model(*args)
            if self.is_cuda:
                torch.cuda.synchronize(self.device)
            return self._outputs_to_numpy(out)

    def deactivate_impl(self) -> None:
        """Restore the module's training flag and device and release cached CUDA memory."""
        self.model.train(self._was_training)
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
        if self._torch is not None:
            out["torch_threads"] = self._torch.get_num_threads()
            if self.is_cuda:
                out["gpu"] = self._torch.cuda.get_device_name(self.device)
        return out

    # Internals --------------------------------------------------------------------------------------

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
        return value.detach().to("cpu").numpy()
