"""INT8 calibration for TensorRT 10 (calibrators were removed in 11.0).

:class:`CalibrationBatcher` re-batches data, :class:`CalibratorCore` is the TensorRT-independent half
(device copies, cache file), :func:`make_calibrator` wraps it in a ``trt.IInt8*Calibrator`` subclass.
``tensorrt`` and ``torch`` are imported inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.tensorrt.precision import MODELOPT_HINT
from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from lowrank_core.io import atomic_write_bytes
from runtime.trt_engine import api_generation, require_tensorrt

CALIBRATION_ALGORITHMS = ("entropy", "minmax")


class CalibrationBatcher:
    """Re-batch an iterable of float32 arrays into fixed-size calibration batches.

    Each item from ``data`` is an array whose first axis counts samples (``(n, C, H, W)``; a single
    sample ``(C, H, W)`` is accepted when ``sample_ndim`` says so). Samples are concatenated across
    items and cut into batches of exactly ``batch_size``. **The last partial batch is dropped**, not
    padded: TensorRT's calibrator has one fixed batch size, and padding with zeros or repeats would
    skew the entropy histograms and min/max ranges (NVIDIA/TensorRT#1411: the entropy calibrator is
    batch-size sensitive). ``samples_dropped`` says how many were left out.

    Args:
        data: any iterable of arrays (converted to contiguous float32).
        batch_size: samples per batch, >= 1.
        sample_ndim: rank of one sample (3 for images); items of this rank are treated as one sample.

    Raises:
        UserInputError: for ``batch_size`` < 1; while iterating, for items whose sample shape differs.
    """

    def __init__(self, data: Iterable[np.ndarray], batch_size: int, *, sample_ndim: int = 3) -> None:
        if batch_size < 1:
            raise UserInputError(f"calibration batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.sample_ndim = sample_ndim
        self._items: Iterator[np.ndarray] = iter(data)
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._sample_shape: tuple[int, ...] | None = None
        self.batches_served = 0
        self.samples_served = 0
        self.samples_dropped = 0
        self.exhausted = False

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample, known after the first item."""
        return self._sample_shape

    def next_batch(self) -> np.ndarray | None:
        """The next ``(batch_size, *sample_shape)`` float32 batch, or ``None`` once the data runs out."""
        if self.exhausted:
            return None
        while self._pending_n < self.batch_size:
            item = next(self._items, None)
            if item is None:
                self.exhausted = True
                self.samples_dropped = self._pending_n
                self._pending, self._pending_n = [], 0
                return None
            array = np.ascontiguousarray(np.asarray(item, dtype=np.float32))
            if array.ndim == self.sample_ndim:
                array = array[None]
            if self._sample_shape is None:
                self._sample_shape = tuple(array.shape[1:])
            elif tuple(array.shape[1:]) != self._sample_shape:
                raise UserInputError(
                    f"calibration item has sample shape {list(array.shape[1:])}, expected {list(self._sample_shape)}"
                )
            if array.shape[0]:
                self._pending.append(array)
                self._pending_n += array.shape[0]
        joined = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
        batch, rest = joined[: self.batch_size], joined[self.batch_size :]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_n = int(rest.shape[0])
        self.batches_served += 1
        self.samples_served += self.batch_size
        return np.ascontiguousarray(batch)


DeviceCopy = Callable[[np.ndarray], int]
"""Copies a host batch to a device buffer and returns its device pointer (an int)."""


class TorchDeviceCopy:
    """A reusable CUDA buffer from ``torch``: copy a batch in, return ``data_ptr()``.

    Raises:
        RuntimeUnavailableError: when torch or a CUDA device is missing (on first use).
    """

    def __init__(self, device: str = "cuda") -> None:
        self.device = device
        self._buffer: Any = None

    def __call__(self, batch: np.ndarray) -> int:
        """Copy ``batch`` to the device (synchronously) and return the buffer's address."""
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("INT8 calibration needs a CUDA device; torch.cuda.is_available() is False")
        host = torch.from_numpy(batch)
        if self._buffer is None or tuple(self._buffer.shape) != tuple(host.shape):
            self._buffer = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self._buffer.copy_(host)
        torch.cuda.synchronize(self.device)
        return int(self._buffer.data_ptr())


class CalibratorCore:
    """The TensorRT-independent half of a calibrator: batching, device copies and the cache file.

    Args:
        batcher: where batches come from.
        device_copy: host batch → device pointer (default :class:`TorchDeviceCopy`).
        cache_file: calibration cache to read (when it exists) and write; ``None`` for no cache.
    """

    def __init__(
        self,
        batcher: CalibrationBatcher,
        *,
        device_copy: DeviceCopy | None = None,
        cache_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.batcher = batcher
        self.device_copy = device_copy if device_copy is not None else TorchDeviceCopy()
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self.cache_read = False
        self.errors: list[str] = []

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """Device pointers for the next batch (one per input name), or ``None`` when done."""
        if len(names) != 1:
            self.errors.append(f"calibration supports one input, the network has {list(names)}")
            return None
        batch = self.batcher.next_batch()
        if batch is None:
            return None
        return [int(self.device_copy(batch))]

    def read_cache(self) -> bytes | None:
        """The cache file's bytes, or ``None`` (TensorRT then calibrates)."""
        if self.cache_file is not None and self.cache_file.is_file():
            self.cache_read = True
            return self.cache_file.read_bytes()
        return None

    def write_cache(self, cache: Any) -> None:
        """Write the cache TensorRT produced (bytes or ``IHostMemory``) atomically."""
        if self.cache_file is not None:
            atomic_write_bytes(self.cache_file, bytes(cache))


def make_calibrator(
    data: Iterable[np.ndarray],
    *,
    batch_size: int,
    algorithm: str = "entropy",
    cache_file: str | os.PathLike[str] | None = None,
    device_copy: DeviceCopy | None = None,
    sample_ndim: int = 3,
) -> Any:
    """Create a TensorRT 10 INT8 calibrator fed from ``data`` (see :class:`CalibrationBatcher`).

    The class derives from ``trt.IInt8EntropyCalibrator2`` (``"entropy"``) or
    ``trt.IInt8MinMaxCalibrator`` (``"minmax"``, often better on detection heads,
    NVIDIA/TensorRT#3922) and is created here because its base exists only once tensorrt is imported.
    Its ``core`` attribute (:class:`CalibratorCore`) tells how many batches were served.

    Raises:
        RuntimeUnavailableError: TensorRT is missing.
        UserInputError: unknown algorithm, or TensorRT 11 (calibrators were removed).
    """
    if algorithm not in CALIBRATION_ALGORITHMS:
        raise UserInputError(
            f"unknown calibration algorithm {algorithm!r}; use one of: {', '.join(CALIBRATION_ALGORITHMS)}"
        )
    version = require_tensorrt()
    if api_generation(version) >= 11:
        raise UserInputError(
            f"TensorRT {version} has no INT8 calibrators (removed in 11.0); quantize with `{MODELOPT_HINT}`"
        )
    import tensorrt as trt

    base: Any = trt.IInt8EntropyCalibrator2 if algorithm == "entropy" else trt.IInt8MinMaxCalibrator
    core = CalibratorCore(
        CalibrationBatcher(data, batch_size, sample_ndim=sample_ndim), device_copy=device_copy, cache_file=cache_file
    )

    class _Calibrator(base):
        """INT8 calibrator delegating to a :class:`CalibratorCore`."""

        def __init__(self) -> None:
            base.__init__(self)  # TensorRT's pybind classes need the base constructor called explicitly
            self.core = core
            self.algorithm = algorithm

        def get_batch_size(self) -> int:
            return core.batcher.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            return core.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return core.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            core.write_cache(cache)

    return _Calibrator()
