"""Measured latency for planning: a per-block lookup table, a whole-model predictor, latency targets.

* :mod:`~compress.latency.table` — the JSON lookup table on disk (backend, device, threads, precision, geometry);
* :mod:`~compress.latency.ort_timing` — blocks and models timed on ONNX Runtime CPU (imported lazily);
* :mod:`~compress.latency.int8` — a block's ONNX quantized like ``export quantize`` for int8 timing;
* :mod:`~compress.latency.model` — :class:`LatencyModel`: block times, dense profile, prediction;
* :mod:`~compress.latency.knapsack` — the multiple-choice knapsack ``METHOD=auto`` solves;
* :mod:`~compress.latency.solve` — ``SPEEDUP=`` / ``LATENCY_MS=`` for every method.

The latency model in use is process-wide state only inside :func:`use_latency_model` (the command line
sets it from ``--latency-threads`` and ``--batch``; tests put a fake timer there); elsewhere
:func:`current_latency_model` builds the default one (ONNX Runtime CPU, one thread, the on-disk table).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from compress.latency.knapsack import Solution, solve_mckp
from compress.latency.model import DenseProfile, LatencyModel, Timer, block_key, layer_inputs
from compress.latency.table import LatencyTable, cpu_identity, default_table_path, device_id

__all__ = [
    "DenseProfile",
    "LatencyModel",
    "LatencyTable",
    "Solution",
    "Timer",
    "block_key",
    "cpu_identity",
    "current_latency_model",
    "default_table_path",
    "device_id",
    "layer_inputs",
    "solve_mckp",
    "use_latency_model",
]

_active: list[LatencyModel] = []
_defaults: dict[tuple[int, int], LatencyModel] = {}


@contextmanager
def use_latency_model(model: LatencyModel) -> Iterator[LatencyModel]:
    """Make ``model`` the latency model every planner in this block uses."""
    _active.append(model)
    try:
        yield model
    finally:
        _active.pop()


def current_latency_model(*, threads: int = 1, batch: int = 1) -> LatencyModel:
    """The latency model of the enclosing :func:`use_latency_model`, else the default one for ``threads``/``batch``."""
    if _active:
        return _active[-1]
    key = (threads, batch)
    if key not in _defaults:
        _defaults[key] = LatencyModel(threads=threads, batch=batch)
    return _defaults[key]
