"""Export stage: PyTorch → clean ONNX, graph passes, and ONNX Runtime parity checks.

Importing this package loads ``onnx`` and ``onnx_graphsurgeon`` only; ``torch`` and ``onnxruntime``
are imported inside the functions that need them.
"""

from __future__ import annotations

from export.onnx import (
    MIN_EXPORT_OPSET,
    OnnxFromTorch,
    graph_summary,
    load_onnx,
    onnx_from_torch,
    save_onnx,
)
from export.parity import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ParityResult,
    check_onnx_parity,
    compare_outputs,
)
from export.passes import (
    NOOP_RULES,
    castlike_to_cast,
    check_model,
    cleanup,
    dedupe_initializers,
    fold_batchnorm,
    fold_constants,
    optimize,
    reduce_mean_to_global_pool,
    remove_noops,
    reshape_to_flatten,
)

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "MIN_EXPORT_OPSET",
    "NOOP_RULES",
    "OnnxFromTorch",
    "ParityResult",
    "castlike_to_cast",
    "check_model",
    "check_onnx_parity",
    "cleanup",
    "compare_outputs",
    "dedupe_initializers",
    "fold_batchnorm",
    "fold_constants",
    "graph_summary",
    "load_onnx",
    "onnx_from_torch",
    "optimize",
    "reduce_mean_to_global_pool",
    "remove_noops",
    "reshape_to_flatten",
    "save_onnx",
]
