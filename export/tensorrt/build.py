"""Build TensorRT engines from ONNX: batch profiles, the :class:`EngineFromOnnx` loader and its twin.

Follows Polygraphy's ``EngineBytesFromNetwork``: constructing a loader is free, calling it builds.
The precision decision is :func:`export.tensorrt.precision.plan_precision`; the result is checked on
the engine's layer information before it is returned. ``tensorrt`` and ``onnx`` are imported inside.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.tensorrt.calibration import CalibratorCore
from export.tensorrt.precision import (
    PRECISIONS,
    check_precision,
    layer_precisions,
    plan_precision,
)
from export.tensorrt.sparsity import capturing_logger, sparse_weight_tensors, sparsity_record
from lowrank_core.errors import ExportError, UserInputError
from lowrank_core.io import atomic_write_bytes
from runtime.trt_engine import BuiltEngine, api_generation, require_tensorrt, sha256_file

OnnxSource = str | os.PathLike[str] | Callable[[], "str | os.PathLike[str]"]
"""A path to an ONNX file, or a callable returning one (loaders compose lazily)."""


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
        sparse_weights: set ``BuilderFlag.SPARSE_WEIGHTS`` (2:4 sparse tensor cores); ``None`` sets it when
            some Conv/Gemm weight of the ONNX follows the 2:4 pattern (LRSD ``--structured 2:4``). The
            sidecar's ``sparsity`` records the 2:4 tensors and which layers TensorRT ran sparse
            (:mod:`export.tensorrt.sparsity`).

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
        sparse_weights: bool | None = None,
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
        self.sparse_weights = sparse_weights

    def _set_profiles(self, builder: Any, config: Any, profile_shapes: list[Any], build: Any) -> None:
        """The optimization profile of dynamic inputs, and the INT8 calibrator with its fixed-batch profile."""
        if any(dynamic for _, _, dynamic in profile_shapes):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi), _ in profile_shapes:
                profile.set_shape(name, lo, opt, hi)  # pybind converts tuples to Dims
            config.add_optimization_profile(profile)
        if build.use_calibrator:
            calib_batch = int(getattr(self.calibrator, "get_batch_size", lambda: self.batch.opt)())
            calib_profile = builder.create_optimization_profile()
            for name, (lo, _, _), _ in profile_shapes:
                shape = (calib_batch, *lo[1:])
                calib_profile.set_shape(name, shape, shape, shape)  # pybind converts tuples to Dims
            config.int8_calibrator = self.calibrator
            config.set_calibration_profile(calib_profile)

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
        build = plan_precision(generation, model, self.precision, self.calibrator)
        sparse_tensors = sparse_weight_tensors(model)
        sparse = bool(sparse_tensors) if self.sparse_weights is None else self.sparse_weights
        if sparse:
            build.flags.append("SPARSE_WEIGHTS")
            build.notes.append(f"SPARSE_WEIGHTS: {len(sparse_tensors)} weight tensor(s) follow the 2:4 pattern")

        logger = capturing_logger(trt) if sparse else trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = _parse_network(trt, builder, logger, build, path)

        config = builder.create_builder_config()
        if self.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        config.builder_optimization_level = self.opt_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for flag in build.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))

        profile_shapes = _input_profile_shapes(network, self.batch)
        self._set_profiles(builder, config, profile_shapes, build)

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
        if build.use_calibrator:
            _check_calibration(self.calibrator)
        if self.timing_cache is not None:
            atomic_write_bytes(self.timing_cache, bytes(config.get_timing_cache().serialize()))

        layer_info, check = _inspect_engine(trt, logger, plan, self.precision)
        if self.verify_precision and check.get("ok") is False:
            raise ExportError(
                f"asked for {self.precision} but the engine built from {path.name} has "
                f"{check['layer_precisions']} (rf-detr#1453: TensorRT 11 silently builds FP32); not saving it"
            )
        from lowrank_core.device import device_identity

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
            "onnx_sha256": sha256_file(path),
            "engine_bytes": len(plan),
            "engine_sha256": hashlib.sha256(plan).hexdigest(),
            "timing_cache": str(self.timing_cache) if self.timing_cache is not None else None,
            "precision_check": check,
            "sparsity": sparsity_record(sparse_tensors, sparse, getattr(logger, "sparsity_lines", []), layer_info),
            "built_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return BuiltEngine(plan=plan, metadata=metadata, layer_info=layer_info)


def _parse_network(trt: Any, builder: Any, logger: Any, build: Any, path: Path) -> Any:
    """The network parsed from the ONNX (the precision plan's converted bytes, or the file).

    Raises:
        ExportError: TensorRT could not parse it (the first parser error named).
    """
    network = builder.create_network(0)  # explicit batch is implicit since 10.0; 11 is strongly typed
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(build.onnx_bytes) if build.onnx_bytes is not None else parser.parse_from_file(str(path))
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].strip().splitlines()[0] if errors and errors[0].strip() else "no error recorded"
        raise ExportError(f"TensorRT could not parse {path.name} ({len(errors)} error(s)); first: {first}")
    return network


def _check_calibration(calibrator: Any) -> None:
    """Refuse an engine whose INT8 calibration failed or never saw a full batch.

    Raises:
        ExportError: naming the calibration error, or the batch size that was never filled.
    """
    core = getattr(calibrator, "core", None)
    if not isinstance(core, CalibratorCore):
        return
    if core.errors:
        raise ExportError(f"INT8 calibration failed: {core.errors[0]}")
    if core.batcher.batches_served == 0 and not core.cache_read:
        raise ExportError(
            f"INT8 calibration got no full batch of {core.batcher.batch_size} samples; give more data or a smaller batch"
        )


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
    sparse_weights: bool | None = None,
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
        sparse_weights=sparse_weights,
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
