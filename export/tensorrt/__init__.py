"""TensorRT engines from our ONNX files, for both API generations (10.x and 11.x).

``tensorrt`` is imported only inside the functions that need it; importing this package is cheap and
works where TensorRT is absent. The pipeline, one module per step (see ``docs/deployment.md`` §5, §10):

* :mod:`~export.tensorrt.precision` — import/version dispatch, how each generation gets fp16/int8
  (builder flags on 10.x, an FP16-converted or Q/DQ ONNX on 11.x), and the layer-precision check;
* :mod:`~export.tensorrt.build` — :class:`BatchProfile`, the :class:`EngineFromOnnx` loader and
  :func:`engine_from_onnx`;
* :mod:`~export.tensorrt.calibration` — INT8 calibrators (TensorRT 10 only);
* :mod:`runtime.trt_engine` — :func:`save_engine` / :func:`load_engine` with the
  ``model.plan.json`` sidecar checked against the running TensorRT and GPU;
* :mod:`~export.tensorrt.sparsity` — 2:4 weights → ``SPARSE_WEIGHTS``, and which layers ran sparse;
* :mod:`~export.tensorrt.parity` — engine vs ONNX Runtime on seeded inputs, into the sidecar;
* :mod:`~export.tensorrt.surface` — the 11.x path's API names checked against a TensorRT 11 bindings wheel.

After a build the requested precision is checked on the engine's layer information (rf-detr#1453:
TensorRT 11 silently built FP32 when asked for FP16).
"""

from __future__ import annotations

from export.tensorrt.build import BatchProfile, EngineFromOnnx, OnnxSource, engine_from_onnx
from export.tensorrt.calibration import (
    CALIBRATION_ALGORITHMS,
    CalibrationBatcher,
    CalibratorCore,
    DeviceCopy,
    TorchDeviceCopy,
    make_calibrator,
)
from export.tensorrt.parity import ENGINE_TOLERANCES, engine_parity, record_parity
from export.tensorrt.precision import (
    MODELOPT_HINT,
    PRECISIONS,
    BuildPlan,
    check_precision,
    convert_onnx_to_fp16,
    has_qdq,
    layer_precisions,
    plan_precision,
)
from export.tensorrt.sparsity import is_2to4, parse_sparsity_log, sparse_tactic_layers, sparse_weight_tensors
from runtime.trt_engine import (
    SIDECAR_SUFFIX,
    BuiltEngine,
    api_generation,
    check_sidecar,
    load_engine,
    require_tensorrt,
    save_engine,
    sidecar_path,
)

__all__ = [
    "CALIBRATION_ALGORITHMS",
    "ENGINE_TOLERANCES",
    "MODELOPT_HINT",
    "PRECISIONS",
    "SIDECAR_SUFFIX",
    "BatchProfile",
    "BuildPlan",
    "BuiltEngine",
    "CalibrationBatcher",
    "CalibratorCore",
    "DeviceCopy",
    "EngineFromOnnx",
    "OnnxSource",
    "TorchDeviceCopy",
    "api_generation",
    "check_precision",
    "check_sidecar",
    "convert_onnx_to_fp16",
    "engine_from_onnx",
    "engine_parity",
    "has_qdq",
    "is_2to4",
    "layer_precisions",
    "load_engine",
    "make_calibrator",
    "parse_sparsity_log",
    "plan_precision",
    "record_parity",
    "require_tensorrt",
    "save_engine",
    "sidecar_path",
    "sparse_tactic_layers",
    "sparse_weight_tensors",
]
