"""2:4 structured sparsity for TensorRT: find 2:4 weights in an ONNX graph and read what TensorRT did with them.

TensorRT runs a Conv/Gemm on sparse tensor cores only when the builder flag ``SPARSE_WEIGHTS`` is set
and the layer's weights hold at most two non-zeros in every group of four consecutive *input channels*
(Conv weight ``(K, C, R, S)``: groups along ``C``; Gemm/MatMul: along the reduction axis). LRSD with
``--structured 2:4`` writes its sparse branch in exactly that pattern (``compress/methods/lrsd/solver.py``).

What TensorRT picked is read two ways, both recorded in the engine sidecar's ``sparsity``:

* the build log at INFO severity, whose ``(Sparsity)`` lines list the layers eligible for sparse math
  and those for which the plan picked a sparse implementation (as trtexec prints them);
* the engine inspector's per-layer ``TacticName`` (``DETAILED`` profiling verbosity), where sparse
  kernels carry ``sparse`` in their name.

Either can be missing (another TensorRT version may word the log differently; ``None`` then means
"unknown", not "no"). ``onnx`` and ``tensorrt`` are imported inside the functions.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

SPARSITY_TAG = "(Sparsity)"
_ELIGIBLE = "eligible for sparse math"
_PICKED = "picked sparse implementation"


def is_2to4(weight: np.ndarray, axis: int) -> bool:
    """Whether every group of 4 consecutive entries along ``axis`` has at most 2 non-zeros (and some weight is non-zero).

    ``axis`` must have a length divisible by 4 (TensorRT's requirement for sparse kernels).
    """
    array = np.moveaxis(np.asarray(weight), axis, -1)
    if array.ndim == 0 or array.shape[-1] % 4 or not array.any():
        return False
    groups = array.reshape(*array.shape[:-1], array.shape[-1] // 4, 4)
    return bool(((groups != 0).sum(axis=-1) <= 2).all())


def sparse_weight_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv / Gemm / MatMul weight initializers of ``model`` that follow the 2:4 pattern."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv":
            if "group" in attrs and attrs["group"].i != 1:
                continue
            axis = 1
        elif node.op_type == "Gemm":
            axis = 1 if "transB" in attrs and attrs["transB"].i else 0
        elif node.op_type == "MatMul":
            axis = 0
        else:
            continue
        name = node.input[1]
        weight = numpy_helper.to_array(inits[name])
        if weight.ndim >= 2 and name not in found and is_2to4(weight, axis):
            found.append(name)
    return found


def parse_sparsity_log(lines: list[str]) -> dict[str, list[str] | None]:
    """``{"eligible_layers", "picked_layers"}`` from TensorRT's ``(Sparsity)`` log lines; ``None`` when absent.

    E.g. ``(Sparsity) Layers eligible for sparse math: conv1, conv2`` and
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: conv1``.
    """
    out: dict[str, list[str] | None] = {"eligible_layers": None, "picked_layers": None}
    for line in lines:
        text = line[line.find(SPARSITY_TAG) :] if SPARSITY_TAG in line else line
        head, _, tail = text.partition(":")
        names = [n.strip() for n in tail.split(",") if n.strip()]
        key = "eligible_layers" if _ELIGIBLE in head else "picked_layers" if _PICKED in head else None
        if key is not None:
            out[key] = (out[key] or []) + names
    return out


def sparse_tactic_layers(layer_info_json: str | None) -> list[str] | None:
    """Layers whose ``TacticName`` mentions ``sparse`` in the engine inspector's JSON; ``None`` without tactics."""
    if not layer_info_json:
        return None
    try:
        data = json.loads(layer_info_json)
    except json.JSONDecodeError:
        return None
    layers = [layer for layer in data.get("Layers", []) if isinstance(layer, dict)] if isinstance(data, dict) else []
    with_tactics = [layer for layer in layers if "TacticName" in layer]
    if not with_tactics:
        return None
    return [str(layer.get("Name")) for layer in with_tactics if "sparse" in str(layer["TacticName"]).lower()]


def capturing_logger(trt: Any) -> Any:
    """A TensorRT logger at INFO severity that keeps ``(Sparsity)`` lines in ``.sparsity_lines``.

    Warnings and errors go to stderr as with ``trt.Logger(WARNING)``. Falls back to a plain
    ``trt.Logger(INFO)`` (with an empty ``sparsity_lines``) where ``trt.ILogger`` cannot be subclassed.
    """
    base = getattr(trt, "ILogger", None)
    severity = getattr(base, "Severity", None) if base is not None else None
    if base is None or severity is None:
        logger = trt.Logger(getattr(trt.Logger, "INFO", getattr(trt.Logger, "WARNING", None)))
        logger.sparsity_lines = []
        return logger
    warning = int(severity.WARNING)

    class _SparsityLogger(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.sparsity_lines: list[str] = []

        def log(self, level: Any, msg: str) -> None:
            if SPARSITY_TAG in msg:
                self.sparsity_lines.append(msg)
            if int(level) <= warning:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    logger = _SparsityLogger()
    if hasattr(logger, "min_severity"):
        logger.min_severity = severity.INFO
    return logger


def sparsity_record(
    tensors: list[str], flag: bool, log_lines: list[str], layer_info_json: str | None
) -> dict[str, Any]:
    """The sidecar's ``sparsity`` entry: 2:4 tensors found, whether the flag was set, what TensorRT picked."""
    parsed = parse_sparsity_log(log_lines) if flag else {"eligible_layers": None, "picked_layers": None}
    return {
        "tensors_2to4": list(tensors),
        "sparse_weights_flag": flag,
        "eligible_layers": parsed["eligible_layers"],
        "picked_layers": parsed["picked_layers"],
        "sparse_tactic_layers": sparse_tactic_layers(layer_info_json) if flag else None,
        "how": "build log (Sparsity) lines at INFO severity; engine inspector TacticName containing 'sparse'",
    }
