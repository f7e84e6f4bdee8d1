"""Compress a model you only have as ONNX: ``compress_onnx("model.onnx", "tucker2", ratio=4)``.

Every ``Conv`` / ``Gemm`` / ``MatMul`` whose weight is a constant initializer is a candidate layer; the
project's rank rules and factorizations plan and factor it through a proxy ``nn.Conv2d`` / ``nn.Linear``
(:mod:`compress.onnx_in.layers`, :mod:`compress.onnx_in.planner`), and :mod:`compress.onnx_in.rewrite`
replaces the node by its chain, leaving the rest of the graph as it was. :mod:`compress.onnx_in.latency`
runs ``METHOD=auto`` and the ``SPEEDUP``/``LATENCY_MS`` targets on the graph, :mod:`compress.onnx_in.data`
the data-aware (whitened) SVD, and :mod:`compress.onnx_in.run` is the ``MODEL=path/to/model.onnx`` route
of ``make export``.
"""

from __future__ import annotations

from compress.onnx_in.core import (
    OnnxCompression,
    OnnxGraph,
    analyze_onnx,
    apply_onnx_plan,
    compress_onnx,
    onnx_agreement,
    onnx_config,
    plan_onnx,
)
from compress.onnx_in.planner import ONNX_METHODS, check_onnx_method

__all__ = [
    "ONNX_METHODS",
    "OnnxCompression",
    "OnnxGraph",
    "analyze_onnx",
    "apply_onnx_plan",
    "check_onnx_method",
    "compress_onnx",
    "is_onnx_spec",
    "onnx_agreement",
    "onnx_config",
    "plan_onnx",
]


def is_onnx_spec(spec: str) -> bool:
    """Whether a ``MODEL=`` value names an ONNX file (``path/to/model.onnx``)."""
    return spec.lower().endswith(".onnx")
