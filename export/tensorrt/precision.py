"""TensorRT import, the 10.x / 11.x API generations, and how each gets a precision.

* **TensorRT 10.x** (JetPack 6 ships 10.3): weak typing with builder flags. FP16 sets ``BuilderFlag.FP16``;
  INT8 sets ``BuilderFlag.INT8`` and either calibrates (:mod:`export.tensorrt.calibration`) or uses the
  Q/DQ nodes of an explicitly quantized ONNX.
* **TensorRT 11.x**: always strongly typed; FP16 comes from :func:`convert_onnx_to_fp16` (float32 I/O
  kept), INT8 only from an ONNX that already carries QuantizeLinear/DequantizeLinear nodes.

:func:`plan_precision` is the pure decision (unit-tested with fakes); :func:`layer_precisions` and
:func:`check_precision` verify the result on the built engine (rf-detr#1453). ``tensorrt`` and ``onnx``
are imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lowrank_core.errors import ExportError, UserInputError

if TYPE_CHECKING:
    import onnx

PRECISIONS = ("fp32", "fp16", "int8")
MODELOPT_HINT = (
    "python -m modelopt.onnx.quantization --onnx_path model.onnx --quantize_mode int8 --calibration_data calib.npy"
)
_FP16_MAX = float(np.finfo(np.float16).max)


# ONNX helpers: Q/DQ detection and the FP16 pass --------------------------------------------------------


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is explicitly quantized (has QuantizeLinear and DequantizeLinear nodes)."""
    ops = {node.op_type for node in model.graph.node}
    return "QuantizeLinear" in ops and "DequantizeLinear" in ops


# Inputs that ONNX requires to stay float32 whatever the compute type: op type → input indices.
_KEEP_FP32_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}


def convert_onnx_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` computing in float16 with float32 inputs and outputs.

    The pass (our own; Polygraphy/ModelOpt AutoCast are not dependencies): every float32 initializer
    and ``Constant`` becomes float16 (values beyond ±65504 are clipped), ``Cast(to=FLOAT)`` nodes cast
    to FLOAT16, each float32 graph input gets a ``Cast`` to float16 in front of its consumers and each
    float32 graph output a ``Cast`` back to float32, so callers keep feeding and reading float32.
    ``value_info`` is dropped (it would describe float32 intermediates) and re-inferred.

    Raises:
        ExportError: for graphs with subgraphs (If/Loop/Scan), which this pass does not handle.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for node in graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise ExportError(f"FP16 conversion does not handle subgraphs (node {node.name!r}, {node.op_type})")

    keep_fp32 = {
        node.input[i]
        for node in graph.node
        for i in _KEEP_FP32_INPUTS.get(node.op_type, ())
        if i < len(node.input) and node.input[i]
    }
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in keep_fp32:
            array = numpy_helper.to_array(init)
            half = np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(half, init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                if node.op_type == "Constant" and any(out in keep_fp32 for out in node.output):
                    continue
                array = numpy_helper.to_array(attr.t)
                half = np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)
                attr.t.CopyFrom(numpy_helper.from_array(half, attr.t.name))

    new_nodes = []
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        cast_name = f"{graph_input.name}__fp16"
        for node in graph.node:
            for j, name in enumerate(node.input):
                if name == graph_input.name:
                    node.input[j] = cast_name
        new_nodes.append(
            helper.make_node("Cast", [graph_input.name], [cast_name], to=TensorProto.FLOAT16, name=f"{cast_name}_cast")
        )
    tail_nodes = []
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half_name = f"{graph_output.name}__fp16"
        for node in graph.node:
            for j, name in enumerate(node.output):
                if name == graph_output.name:
                    node.output[j] = half_name
            for j, name in enumerate(node.input):
                if name == graph_output.name:
                    node.input[j] = half_name
        tail_nodes.append(
            helper.make_node("Cast", [half_name], [graph_output.name], to=TensorProto.FLOAT, name=f"{half_name}_cast")
        )
    nodes = [*new_nodes, *graph.node, *tail_nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"FP16 conversion produced an invalid graph: {first}") from None
    return model


# What each generation does for a precision ---------------------------------------------------------


@dataclass
class BuildPlan:
    """What the version dispatch decided: ONNX bytes to parse, flags to set, notes for the sidecar."""

    generation: int
    onnx_bytes: bytes | None
    flags: list[str] = field(default_factory=list)
    use_calibrator: bool = False
    notes: list[str] = field(default_factory=list)


def plan_precision(generation: int, model: onnx.ModelProto, precision: str, calibrator: object | None) -> BuildPlan:
    """Decide how to get ``precision`` out of this TensorRT generation (pure; unit-tested with fakes)."""
    qdq = has_qdq(model)
    if precision == "fp32":
        if calibrator is not None:
            raise UserInputError("a calibrator only applies to precision='int8'")
        return BuildPlan(generation, None, notes=["fp32 as exported"])
    if precision == "fp16":
        if calibrator is not None:
            raise UserInputError("a calibrator only applies to precision='int8'")
        if generation == 10:
            return BuildPlan(generation, None, flags=["FP16"], notes=["BuilderFlag.FP16 (weakly typed)"])
        half = convert_onnx_to_fp16(model)
        return BuildPlan(
            generation, half.SerializeToString(), notes=["ONNX converted to FP16 (strongly typed, float32 I/O)"]
        )
    # int8
    if generation == 10:
        if qdq:
            return BuildPlan(generation, None, flags=["INT8"], notes=["explicit Q/DQ quantization"])
        if calibrator is None:
            raise UserInputError(
                f"INT8 on TensorRT 10 needs a calibrator (make_calibrator(...)) or a Q/DQ ONNX from `{MODELOPT_HINT}`"
            )
        return BuildPlan(generation, None, flags=["INT8"], use_calibrator=True, notes=["implicit INT8 calibration"])
    if calibrator is not None:
        raise UserInputError(
            "INT8 calibrators were removed in TensorRT 11; quantize the ONNX explicitly with "
            f"`{MODELOPT_HINT}` and build that file"
        )
    if not qdq:
        raise UserInputError(
            "TensorRT 11 builds INT8 only from an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear "
            f"nodes), and this one has none; create it with `{MODELOPT_HINT}`"
        )
    return BuildPlan(generation, None, notes=["explicit Q/DQ quantization (strongly typed)"])


# Checking the built engine ----------------------------------------------------------------------------


_PRECISION_WORDS = (("int8", ("int8",)), ("fp16", ("fp16", "half")), ("fp32", ("fp32", "float")))


def layer_precisions(layer_info_json: str) -> dict[str, int]:
    """Count layer outputs per data type in the engine inspector's JSON (``DETAILED`` verbosity).

    Each layer's ``Outputs[*]["Format/Datatype"]`` (e.g. ``"Row major linear FP32"``,
    ``"Channel major FP16 format where channel % 8 == 0"``, ``"Half"``, ``"Int8"``) is classified as
    ``int8``, ``fp16``, ``fp32`` or ``other``. Layers given as bare names (``layer_names_only``) count
    nothing.
    """
    data = json.loads(layer_info_json)
    counts = {"fp32": 0, "fp16": 0, "int8": 0, "other": 0}
    for layer in data.get("Layers", []) if isinstance(data, dict) else []:
        if not isinstance(layer, dict):
            continue
        for output in layer.get("Outputs", []):
            text = str(output.get("Format/Datatype", "")).lower() if isinstance(output, dict) else ""
            kind = next((k for k, words in _PRECISION_WORDS if any(w in text for w in words)), "other")
            counts[kind] += 1
    return counts


def check_precision(counts: Mapping[str, int], precision: str) -> bool | None:
    """Whether layer counts show the requested precision; ``None`` when there is nothing to judge.

    fp32 passes always; fp16 needs at least one FP16 layer output; int8 at least one INT8 one.
    """
    if sum(counts.values()) == 0:
        return None
    if precision == "fp16":
        return counts.get("fp16", 0) > 0
    if precision == "int8":
        return counts.get("int8", 0) > 0
    return True
