"""Timing on ONNX Runtime CPU: a module exported in memory, warm-up, repeats, median.

Blocks and whole models go through the TorchScript-based exporter (``dynamo=False``: milliseconds per
small block, BatchNorm folded into the preceding conv in eval mode) and one ``InferenceSession`` with a
fixed number of intra-op threads and spinning off (as :class:`runtime.ort_runner.OrtRunner` does, so
interleaved timings do not steal cores from each other). ``onnxruntime`` is imported lazily.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compress.latency.int8 import BLOCK_RULES, INT8_FORMAT, PRECISIONS, quantize_onnx_bytes
from lowrank_core.errors import UserInputError

__all__ = ["OrtTimer", "export_bytes", "ort_version"]


def ort_version() -> str:
    """The installed ONNX Runtime version (``"none"`` without it)."""
    try:
        import onnxruntime
    except ImportError:
        return "none"
    return str(onnxruntime.__version__)


def export_bytes(module: nn.Module, input_shape: Sequence[int], *, fill: bool = True) -> bytes:
    """``module`` (a copy, in eval mode, float32 on the CPU) exported to ONNX in memory at ``input_shape``.

    Args:
        module: A block or a whole model with one tensor input and one tensor output.
        input_shape: Its input shape, batch first.
        fill: Give the copy's parameters small seeded random values first (uninitialised factors may hold
            denormals or NaNs, which time differently on a CPU).
    """
    block = copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()
    if fill:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            block,
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            do_constant_folding=True,
        )
    return buf.getvalue()


class OrtTimer:
    """Median latency of modules on ONNX Runtime CPU.

    Args:
        threads: Intra-op threads.
        warmup: Untimed runs first.
        repeats: Timed runs at least (more while under ``min_seconds``, at most ``max_repeats``).
        min_seconds: Keep timing a fast block until this much time is spent.
        max_repeats: Upper bound of timed runs.
        precision: ``fp32``, or ``int8``: every block and model is quantized before it is timed
            (:mod:`compress.latency.int8`: the export's static per-channel settings, synthetic calibration).
        int8_format: The int8 format of ``precision="int8"`` (part of :attr:`precision_tag`).
    """

    backend = "ort-cpu"

    def __init__(
        self,
        threads: int = 1,
        *,
        warmup: int = 3,
        repeats: int = 10,
        min_seconds: float = 0.1,
        max_repeats: int = 200,
        precision: str = "fp32",
        int8_format: str = INT8_FORMAT,
    ) -> None:
        if threads < 1:
            raise UserInputError(f"threads must be ≥ 1, got {threads}")
        if precision not in PRECISIONS:
            raise UserInputError(
                f"latency precision must be one of {', '.join(PRECISIONS)}, got {precision!r} "
                "(ONNX Runtime's CPU timing of FP16 is not meaningful)"
            )
        self.precision, self.int8_format = precision, int8_format
        self.threads, self.warmup, self.repeats = threads, warmup, repeats
        self.min_seconds, self.max_repeats = min_seconds, max_repeats
        self.calls = 0

    def _session(self, model_bytes: bytes) -> Any:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserInputError("latency targets need ONNX Runtime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    @property
    def precision_tag(self) -> str:
        """The precision part of the lookup table's context: ``fp32`` or ``int8-<format>``."""
        return self.precision if self.precision == "fp32" else f"{self.precision}-{self.int8_format}"

    def model_bytes(self, module: nn.Module, input_shape: Sequence[int], *, block: bool) -> bytes:
        """``module`` exported (and quantized at ``int8``: a block with the per-layer rules, a model with all)."""
        data = export_bytes(module, input_shape)
        if self.precision == "int8":
            data = quantize_onnx_bytes(data, input_shape, fmt=self.int8_format, rules=BLOCK_RULES if block else None)
        return data

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median ms of one forward of ``module`` at ``input_shape`` (exported, quantized at int8, then timed)."""
        self.calls += 1
        session = self._session(self.model_bytes(module, input_shape, block=True))
        feed = {"input": torch.randn(*input_shape).numpy()}
        for _ in range(self.warmup):
            session.run(None, feed)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.repeats or (
            time.perf_counter() - start < self.min_seconds and len(times) < self.max_repeats
        ):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        """Median ms of each whole model, timed interleaved (one run of each in turn, ``repeats`` rounds)."""
        sessions = [self._session(self.model_bytes(m, input_shape, block=False)) for m in models]
        feed = {"input": torch.randn(*input_shape, generator=torch.Generator().manual_seed(2)).numpy()}
        for s in sessions:
            for _ in range(self.warmup):
                s.run(None, feed)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(repeats):
            for i, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[i].append(time.perf_counter() - t0)
        return [1e3 * statistics.median(t) for t in times]
