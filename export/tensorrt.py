"""TensorRT engines from our ONNX files, for both API generations (10.x and 11.x).

``tensorrt`` is imported only inside the functions that need it; importing this module is cheap and
works where TensorRT is absent. What differs between the generations (see
``docs/deployment.md`` §5 and §10):

* **TensorRT 10.x** (JetPack 6 ships 10.3): weak typing with builder flags. FP16 sets
  ``BuilderFlag.FP16``; INT8 sets ``BuilderFlag.INT8`` and either calibrates
  (``config.int8_calibrator`` + ``config.set_calibration_profile``) or uses the Q/DQ nodes of an
  explicitly quantized ONNX.
* **TensorRT 11.x**: networks are always strongly typed and the precision flags, calibrators and
  ``set_calibration_profile`` are gone. FP16 comes from converting the ONNX to FP16 first
  (:func:`convert_onnx_to_fp16`, our own small pass: float32 initializers → float16, Cast nodes at
  the graph inputs/outputs so the engine's I/O stays float32); INT8 only from an ONNX that already
  carries QuantizeLinear/DequantizeLinear nodes.

After a build the requested precision is checked on the engine's layer information (rf-detr#1453:
TensorRT 11 silently built FP32 when asked for FP16), and :func:`save_engine` writes ``model.plan``
with a JSON sidecar that :func:`load_engine` checks against the running TensorRT and GPU.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_deploy.errors import ExportError, RuntimeUnavailableError, UserInputError
from lowrank_deploy.io import atomic_write_bytes, atomic_write_json, read_json

if TYPE_CHECKING:
    import onnx

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_ALGORITHMS = ("entropy", "minmax")
SIDECAR_SUFFIX = ".json"
"""The sidecar of ``model.plan`` is ``model.plan.json``."""
MODELOPT_HINT = (
    "python -m modelopt.onnx.quantization --onnx_path model.onnx --quantize_mode int8 --calibration_data calib.npy"
)
_INSTALL_HINT = (
    "use the NVIDIA TensorRT container (docker/Dockerfile.x86) or JetPack on a Jetson (docker/Dockerfile.jetson)"
)
_FP16_MAX = float(np.finfo(np.float16).max)

OnnxSource = str | os.PathLike[str] | Callable[[], "str | os.PathLike[str]"]
"""A path to an ONNX file, or a callable returning one (loaders compose lazily)."""


# TensorRT import and version dispatch -----------------------------------------------------------------


def require_tensorrt() -> str:
    """Import ``tensorrt`` and return its version string.

    Raises:
        RuntimeUnavailableError: if TensorRT is not installed, or older than 10.0.
    """
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailableError(f"TensorRT is not installed: {_INSTALL_HINT}") from None
    version = getattr(tensorrt, "__version__", None)
    if version is None:  # e.g. only tensorrt-stubs' .pyi files: a namespace package without the library
        raise RuntimeUnavailableError(
            f"the importable 'tensorrt' is not the TensorRT library (no __version__; only type stubs?): {_INSTALL_HINT}"
        )
    api_generation(str(version))
    return str(version)


def api_generation(version: str) -> int:
    """API generation of a TensorRT version string: ``10`` for 10.x, ``11`` for 11.x and newer.

    Raises:
        RuntimeUnavailableError: for a version older than 10 or an unparsable one.
    """
    match = re.match(r"^(\d+)\.", version)
    if match is None:
        raise RuntimeUnavailableError(f"cannot parse the TensorRT version {version!r}")
    major = int(match.group(1))
    if major < 10:
        raise RuntimeUnavailableError(f"TensorRT {version} is too old; this project needs TensorRT 10.x or 11.x")
    return 10 if major == 10 else 11


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


# Build settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of one optimization profile: ``min <= opt <= max``; set ``opt`` to the real batch.

    Raises:
        UserInputError: for sizes < 1 or out of order.
    """

    min: int = 1
    opt: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        """Validate the sizes."""
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserInputError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )

    @classmethod
    def of(cls, value: BatchProfile | Sequence[int] | int) -> BatchProfile:
        """Coerce an int (fixed batch), a ``(min, opt, max)`` triple or a profile."""
        if isinstance(value, BatchProfile):
            return value
        if isinstance(value, int):
            return cls(value, value, value)
        items = tuple(int(v) for v in value)
        if len(items) != 3:
            raise UserInputError(f"batch profile needs (min, opt, max), got {items}")
        return cls(*items)


@dataclass
class BuiltEngine:
    """A serialized engine and what went into it.

    Attributes:
        plan: the serialized engine (``model.plan`` bytes).
        metadata: the sidecar fields (see :func:`save_engine`), ``engine_bytes`` included.
        layer_info: the engine inspector's JSON text, or ``None`` when unavailable.
    """

    plan: bytes
    metadata: dict[str, Any]
    layer_info: str | None = None


@dataclass
class _BuildPlan:
    """What the version dispatch decided: ONNX bytes to parse, flags to set, notes for the sidecar."""

    generation: int
    onnx_bytes: bytes | None
    flags: list[str] = field(default_factory=list)
    use_calibrator: bool = False
    notes: list[str] = field(default_factory=list)


def _plan_precision(generation: int, model: onnx.ModelProto, precision: str, calibrator: object | None) -> _BuildPlan:
    """Decide how to get ``precision`` out of this TensorRT generation (pure; unit-tested with fakes)."""
    qdq = has_qdq(model)
    if precision == "fp32":
        if calibrator is not None:
            raise UserInputError("a calibrator only applies to precision='int8'")
        return _BuildPlan(generation, None, notes=["fp32 as exported"])
    if precision == "fp16":
        if calibrator is not None:
            raise UserInputError("a calibrator only applies to precision='int8'")
        if generation == 10:
            return _BuildPlan(generation, None, flags=["FP16"], notes=["BuilderFlag.FP16 (weakly typed)"])
        half = convert_onnx_to_fp16(model)
        return _BuildPlan(
            generation, half.SerializeToString(), notes=["ONNX converted to FP16 (strongly typed, float32 I/O)"]
        )
    # int8
    if generation == 10:
        if qdq:
            return _BuildPlan(generation, None, flags=["INT8"], notes=["explicit Q/DQ quantization"])
        if calibrator is None:
            raise UserInputError(
                f"INT8 on TensorRT 10 needs a calibrator (make_calibrator(...)) or a Q/DQ ONNX from `{MODELOPT_HINT}`"
            )
        return _BuildPlan(generation, None, flags=["INT8"], use_calibrator=True, notes=["implicit INT8 calibration"])
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
    return _BuildPlan(generation, None, notes=["explicit Q/DQ quantization (strongly typed)"])


# The loader and its twin ---------------------------------------------------------------------------


class EngineFromOnnx:
    """Loader: build a serialized TensorRT engine from an ONNX file when called.

    Follows Polygraphy's ``EngineBytesFromNetwork``: constructing is free, calling builds. Use
    :func:`engine_from_onnx` for the immediate version.

    Args:
        onnx_path: ONNX file, or a callable returning its path.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (see the module docstring per generation).
        batch: fixed batch or ``(min, opt, max)``; a dynamic batch axis needs an ONNX exported with
            ``--dynamic-batch``.
        workspace_mib: workspace memory-pool limit in MiB; ``None`` keeps TensorRT's default.
        opt_level: ``builder_optimization_level`` 0–5 (TensorRT's default is 3).
        timing_cache: file to load the timing cache from (when it exists) and save it to after the build.
        calibrator: an INT8 calibrator from :func:`make_calibrator` (TensorRT 10 only).
        verify_precision: check the built engine's layer precisions against ``precision``.

    Raises:
        UserInputError: for an unknown precision or an out-of-range option.
    """

    def __init__(
        self,
        onnx_path: OnnxSource,
        *,
        precision: str = "fp32",
        batch: BatchProfile | Sequence[int] | int = (1, 1, 1),
        workspace_mib: int | None = None,
        opt_level: int = 3,
        timing_cache: str | os.PathLike[str] | None = None,
        calibrator: object | None = None,
        verify_precision: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise UserInputError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
        if not 0 <= opt_level <= 5:
            raise UserInputError(f"builder optimization level must be in 0..5, got {opt_level}")
        if workspace_mib is not None and workspace_mib < 1:
            raise UserInputError(f"workspace must be >= 1 MiB, got {workspace_mib}")
        self.onnx_path = onnx_path
        self.precision = precision
        self.batch = BatchProfile.of(batch)
        self.workspace_mib = workspace_mib
        self.opt_level = opt_level
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.calibrator = calibrator
        self.verify_precision = verify_precision

    def __call__(self) -> BuiltEngine:
        """Build the engine.

        Raises:
            RuntimeUnavailableError: TensorRT is missing, or no GPU can be identified.
            UserInputError: the ONNX is missing, or the precision cannot be had from it.
            ExportError: parsing or building failed, or the engine lacks the requested precision.
        """
        import onnx

        version = require_tensorrt()
        import tensorrt as trt

        generation = api_generation(version)
        path = Path(self.onnx_path() if callable(self.onnx_path) else self.onnx_path)
        if not path.is_file():
            raise UserInputError(f"ONNX file {str(path)!r} does not exist; run `python -m export onnx` first")
        model = onnx.load(str(path), load_external_data=False)
        build = _plan_precision(generation, model, self.precision, self.calibrator)

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is implicit since 10.0; 11 is strongly typed
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse(build.onnx_bytes) if build.onnx_bytes is not None else parser.parse_from_file(str(path))
        if not ok:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            first = errors[0].strip().splitlines()[0] if errors and errors[0].strip() else "no error recorded"
            raise ExportError(f"TensorRT could not parse {path.name} ({len(errors)} error(s)); first: {first}")

        config = builder.create_builder_config()
        if self.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        config.builder_optimization_level = self.opt_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for flag in build.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))

        profile_shapes = _input_profile_shapes(network, self.batch)
        if any(dynamic for _, _, dynamic in profile_shapes):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi), _ in profile_shapes:
                profile.set_shape(name, lo, opt, hi)  # type: ignore[arg-type]  # pybind converts tuples to Dims
            config.add_optimization_profile(profile)
        if build.use_calibrator:
            calib_batch = int(getattr(self.calibrator, "get_batch_size", lambda: self.batch.opt)())
            calib_profile = builder.create_optimization_profile()
            for name, (lo, _, _), _ in profile_shapes:
                shape = (calib_batch, *lo[1:])
                calib_profile.set_shape(name, shape, shape, shape)  # type: ignore[arg-type]  # pybind converts tuples to Dims
            config.int8_calibrator = self.calibrator  # type: ignore[assignment]
            config.set_calibration_profile(calib_profile)

        cache_bytes = (
            self.timing_cache.read_bytes() if self.timing_cache is not None and self.timing_cache.is_file() else b""
        )
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(
                f"TensorRT failed to build an engine from {path.name} (precision {self.precision}); see the "
                "TensorRT log above"
            )
        plan = bytes(serialized)  # IHostMemory exposes the buffer protocol
        core = getattr(self.calibrator, "core", None)
        if build.use_calibrator and isinstance(core, CalibratorCore):
            if core.errors:
                raise ExportError(f"INT8 calibration failed: {core.errors[0]}")
            if core.batcher.batches_served == 0 and not core.cache_read:
                raise ExportError(
                    f"INT8 calibration got no full batch of {core.batcher.batch_size} samples; give more data or a smaller batch"
                )
        if self.timing_cache is not None:
            atomic_write_bytes(self.timing_cache, bytes(config.get_timing_cache().serialize()))

        layer_info, check = _inspect_engine(trt, logger, plan, self.precision)
        if self.verify_precision and check.get("ok") is False:
            raise ExportError(
                f"asked for {self.precision} but the engine built from {path.name} has "
                f"{check['layer_precisions']} (rf-detr#1453: TensorRT 11 silently builds FP32); not saving it"
            )
        from runtime.gpu import device_identity

        gpu = device_identity()
        metadata: dict[str, Any] = {
            "tensorrt_version": version,
            "api_generation": generation,
            "gpu_name": gpu["name"],
            "compute_capability": gpu["compute_capability"],
            "precision": self.precision,
            "profile": {
                name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi), _ in profile_shapes
            },
            "build_flags": list(build.flags),
            "build_notes": list(build.notes),
            "workspace_mib": self.workspace_mib,
            "opt_level": self.opt_level,
            "onnx_path": str(path),
            "onnx_sha256": _sha256_file(path),
            "engine_bytes": len(plan),
            "engine_sha256": hashlib.sha256(plan).hexdigest(),
            "timing_cache": str(self.timing_cache) if self.timing_cache is not None else None,
            "precision_check": check,
            "built_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return BuiltEngine(plan=plan, metadata=metadata, layer_info=layer_info)


def engine_from_onnx(
    onnx_path: OnnxSource,
    *,
    precision: str = "fp32",
    batch: BatchProfile | Sequence[int] | int = (1, 1, 1),
    workspace_mib: int | None = None,
    opt_level: int = 3,
    timing_cache: str | os.PathLike[str] | None = None,
    calibrator: object | None = None,
    verify_precision: bool = True,
) -> BuiltEngine:
    """Build a TensorRT engine from an ONNX file now; see :class:`EngineFromOnnx` for the arguments."""
    return EngineFromOnnx(
        onnx_path,
        precision=precision,
        batch=batch,
        workspace_mib=workspace_mib,
        opt_level=opt_level,
        timing_cache=timing_cache,
        calibrator=calibrator,
        verify_precision=verify_precision,
    )()


def _input_profile_shapes(
    network: Any, batch: BatchProfile
) -> list[tuple[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], bool]]:
    """(name, (min, opt, max) shapes, has-dynamic-batch) for each network input.

    Raises:
        UserInputError: for a dynamic non-batch axis, or a fixed batch that differs from the profile.
    """
    out = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise UserInputError(
                f"input {tensor.name!r} has dynamic non-batch dimensions {list(shape)}; export with a fixed image size"
            )
        if shape and shape[0] < 0:
            rest = shape[1:]
            out.append((tensor.name, ((batch.min, *rest), (batch.opt, *rest), (batch.max, *rest)), True))
        else:
            if shape and (batch.min, batch.opt, batch.max) != (shape[0],) * 3 and batch != BatchProfile():
                raise UserInputError(
                    f"input {tensor.name!r} has a fixed batch of {shape[0]} but the profile asks for "
                    f"{batch.min}/{batch.opt}/{batch.max}; re-export with `python -m export onnx --dynamic-batch`"
                )
            out.append((tensor.name, (shape, shape, shape), False))
    return out


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


def _inspect_engine(trt: Any, logger: Any, plan: bytes, precision: str) -> tuple[str | None, dict[str, Any]]:
    """Deserialize ``plan`` and read its layer information to check the precision."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return None, {"ok": None, "reason": "the built plan could not be deserialized for inspection"}
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        counts = layer_precisions(info)
    except json.JSONDecodeError:
        return info, {"ok": None, "reason": "layer information is not JSON"}
    io_dtypes = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io_dtypes[name] = str(engine.get_tensor_dtype(name))
    ok = check_precision(counts, precision)
    return info, {"ok": ok, "layer_precisions": counts, "io_dtypes": io_dtypes}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Saving and loading with the sidecar ------------------------------------------------------------------


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` → ``model.plan.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_engine(
    plan: bytes | BuiltEngine, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``path`` (the plan) and ``path.json`` (the sidecar) atomically; return ``path``.

    Sidecar keys: ``tensorrt_version``, ``api_generation``, ``gpu_name``, ``compute_capability``,
    ``precision``, ``profile``, ``build_flags``, ``workspace_mib``, ``opt_level``, ``onnx_sha256``,
    ``engine_bytes``, ``built_utc`` (plus ``engine_sha256``, ``precision_check`` and notes when built
    by :class:`EngineFromOnnx`). ``engine_bytes`` and ``engine_sha256`` are recomputed from the plan.

    Args:
        plan: the serialized engine or a :class:`BuiltEngine` (whose metadata is used).
        path: destination, conventionally ``DIR/model.plan``.
        metadata: sidecar fields when ``plan`` is raw bytes (merged over the built engine's otherwise).

    Raises:
        UserInputError: if no metadata is available.
    """
    if isinstance(plan, BuiltEngine):
        meta = {**plan.metadata, **(metadata or {})}
        data = plan.plan
    else:
        if metadata is None:
            raise UserInputError("save_engine needs the sidecar metadata for raw plan bytes")
        meta, data = dict(metadata), bytes(plan)
    meta["engine_bytes"] = len(data)
    meta["engine_sha256"] = hashlib.sha256(data).hexdigest()
    dest = Path(path)
    atomic_write_bytes(dest, data)
    atomic_write_json(sidecar_path(dest), meta)
    return dest


def check_sidecar(
    meta: Mapping[str, Any],
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    engine_path: str | os.PathLike[str] = "model.plan",
) -> None:
    """Refuse an engine built for another TensorRT or GPU.

    Raises:
        RuntimeUnavailableError: one line naming the mismatch and telling to rebuild on the target.
    """
    name = Path(engine_path).name
    rebuild = f"rebuild it on the target with `python -m export engine --run-dir {Path(engine_path).parent}`"
    built_trt = meta.get("tensorrt_version")
    if built_trt != tensorrt_version:
        raise RuntimeUnavailableError(
            f"{name} was built with TensorRT {built_trt} but TensorRT {tensorrt_version} is installed; "
            f"engines are not portable across versions: {rebuild}"
        )
    built_cc = str(meta.get("compute_capability"))
    built_gpu = meta.get("gpu_name")
    if built_cc != str(compute_capability) or built_gpu != gpu_name:
        raise RuntimeUnavailableError(
            f"{name} was built on {built_gpu} (compute capability {built_cc}) but this GPU is {gpu_name} "
            f"(compute capability {compute_capability}); {rebuild}"
        )


def load_engine(path: str | os.PathLike[str], *, check: bool = True) -> bytes:
    """Read a plan after checking its sidecar against the running TensorRT and GPU.

    Args:
        path: the ``.plan`` file.
        check: compare the sidecar with this machine (``False`` skips it — at your own risk).

    Raises:
        UserInputError: the plan or its sidecar is missing, or the sidecar describes another file.
        RuntimeUnavailableError: TensorRT is missing, or the engine was built for another TensorRT/GPU.
    """
    plan_path = Path(path)
    if not plan_path.is_file():
        raise UserInputError(f"engine {str(plan_path)!r} does not exist; build it with `python -m export engine`")
    data = plan_path.read_bytes()
    if not check:
        return data
    side = sidecar_path(plan_path)
    if not side.is_file():
        raise UserInputError(
            f"{side.name} is missing, so {plan_path.name} cannot be checked against this TensorRT and GPU; "
            "rebuild it with `python -m export engine` (or pass check=False)"
        )
    meta = read_json(side, what="engine sidecar")
    if meta.get("engine_bytes") != len(data):
        raise UserInputError(
            f"{side.name} describes a {meta.get('engine_bytes')}-byte engine but {plan_path.name} has {len(data)} "
            "bytes; rebuild it with `python -m export engine`"
        )
    version = require_tensorrt()
    from runtime.gpu import device_identity

    gpu = device_identity()
    check_sidecar(
        meta,
        tensorrt_version=version,
        gpu_name=gpu["name"],
        compute_capability=gpu["compute_capability"],
        engine_path=plan_path,
    )
    return data


# INT8 calibration (TensorRT 10 only) ------------------------------------------------------------------


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
