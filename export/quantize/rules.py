"""Constants, the float-layer rule, the agreement numbers and the gate of :mod:`export.quantize`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_core.errors import ExportError, UserInputError

if TYPE_CHECKING:
    import onnx

PRECISIONS = ("int8", "fp16")
TARGETS = ("ort", "tensorrt")
#: ``--format`` → (QuantFormat name, activation type, weight type, symmetric activations and weights).
FORMATS: dict[str, tuple[str, str, str, bool]] = {
    "qdq-u8s8": ("QDQ", "QUInt8", "QInt8", False),
    "qdq-s8s8": ("QDQ", "QInt8", "QInt8", False),
    "qoperator-u8s8": ("QOperator", "QUInt8", "QInt8", False),
    "qdq-s8s8-symmetric": ("QDQ", "QInt8", "QInt8", True),
    "qdq-u8u8": ("QDQ", "QUInt8", "QUInt8", False),  # no VPMADDUBSW saturation: an auto candidate on x86 without VNNI
}
AUTO_CANDIDATES = ("qdq-u8s8", "qdq-s8s8", "qoperator-u8s8")
TRT_FORMAT = "qdq-s8s8-symmetric"
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
RULES = ("stem", "classifier", "narrow", "depthwise")
MIN_FLOAT_RANK = 16
SYNTHETIC_CALIBRATION = 16
DATA_CALIBRATION = 256
AGREEMENT_INPUTS = 32
SYNTHETIC_WARNING = (
    "INT8 calibrated on {n} seeded synthetic (standard-normal) inputs, not data: activation ranges of real "
    "images differ, so accuracy after quantization is unknown; quantize with --data (make ... DATA=...)"
)
FP16_TIMING_NOTE = (
    "not timed: ONNX Runtime's CPU timing of FP16 is not meaningful (run it on a GPU runtime); its agreement is "
    "measured on ONNX Runtime CPU, which runs most FP16 ops in float32 on FP16-rounded weights: it catches weight "
    "rounding, clipping and NaN, not FP16 activation overflow"
)
_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


class QuantizationError(ExportError):
    """A quantized model failed the gate (NaN/inf, cosine or top-1 collapse) or could not be quantized."""


@dataclass(frozen=True)
class Gate:
    """Gross-breakage gate of a quantized model against its FP32 ONNX (see the module docstring)."""

    min_cosine: float = 0.9
    min_top1: float = 0.5
    min_top1_inputs: int = 16

    def failures(self, agree: Mapping[str, Any]) -> list[str]:
        """Why ``agree`` (from :func:`agreement`) fails the gate; empty when it passes."""
        out = []
        if not agree["finite"]:
            out.append("NaN/inf in the quantized output")
        if agree["cosine"] is None or not agree["cosine"] >= self.min_cosine:
            out.append(f"cosine {agree['cosine']} < {self.min_cosine}")
        top1 = agree.get("top1")
        if top1 is not None and agree["n"] >= self.min_top1_inputs and top1 < self.min_top1:
            out.append(f"top-1 agreement {top1:.3f} < {self.min_top1} on {agree['n']} inputs")
        return out


GATE = Gate()


@dataclass(frozen=True)
class FloatLayer:
    """A node left in float32 and the rule that kept it there."""

    node: str
    op: str
    reason: str


# Graph rules --------------------------------------------------------------------------------------------


def float_layers(
    model: onnx.ModelProto, *, min_rank: int = MIN_FLOAT_RANK, rules: Sequence[str] = RULES
) -> list[FloatLayer]:
    """The nodes :data:`RULES` leave in float (module docstring), first matching rule named; nodes need names."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise UserInputError(f"unknown float-layer rule(s) {sorted(unknown)}; use {', '.join(RULES)} or none")
    graph = model.graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def reaches_output(tensor: str, seen: set[str]) -> bool:  # through no weighted op
        if tensor in outputs:
            return True
        for node in consumers.get(tensor, []):
            if node.op_type not in _WEIGHTED_OPS and node.name not in seen:
                seen.add(node.name)
                if any(reaches_output(o, seen) for o in node.output):
                    return True
        return False

    inputs = {i.name for i in graph.input} - set(shapes)
    out = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        w = shapes[node.input[1]]
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv":
            group = attrs["group"].i if "group" in attrs else 1
            c_in, c_out = w[1] * group, w[0]
        else:
            c_in, c_out = (w[1], w[0]) if node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i else w[:2]
            group = 1
        reason = None
        if "stem" in rules and node.op_type == "Conv" and node.input[0] in inputs:
            reason = "stem"
        elif "classifier" in rules and reaches_output(node.output[0], set()):
            reason = "classifier"
        elif "narrow" in rules and min(c_in, c_out) < min_rank:
            reason = f"narrow ({c_in}→{c_out} channels < {min_rank})"
        elif "depthwise" in rules and node.op_type == "Conv" and group > 1 and group == c_in:
            reason = "depthwise"
        if reason is not None:
            out.append(FloatLayer(node.name, node.op_type, reason))
    return out


# Agreement ----------------------------------------------------------------------------------------------


def agreement(reference: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    """``{"rel_l2", "cosine", "top1", "max_abs", "n", "finite"}`` of ``actual`` against ``reference`` (FP32)."""
    from export.parity import compare_outputs

    act = np.asarray(actual, dtype=np.float64)
    finite = bool(np.isfinite(act).all())
    result = compare_outputs(reference, act, atol=0.0, rtol=0.0)
    cosine = result.cosine if np.isfinite(result.cosine) else None
    return {
        "rel_l2": result.rel_l2 if np.isfinite(result.rel_l2) else None,
        "cosine": cosine,
        "top1": result.top1_agreement,
        "max_abs": result.max_abs if np.isfinite(result.max_abs) else None,
        "n": int(np.asarray(reference).shape[0]),
        "finite": finite,
    }
