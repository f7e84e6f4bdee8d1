"""The run directory ``OUT/<model>/<method>/``: every file name once, and typed records of its JSON files.

This is the contract between the stages: compress writes the plan, the weights and ``compress.json``;
export writes the ONNX files, ``parity.json`` and (on a GPU) the TensorRT engines with their sidecars;
runtime writes ``latency.*`` and ``report.*``. Import the names from here instead of spelling them.

The three JSON records (:class:`CompressRecord`, :class:`ParityRecord`, :class:`LatencyRecord`) are
dataclasses over the keys the stages write today. ``from_dict(d).to_dict() == d`` holds for every dict,
key order included (unknown keys are kept in ``extra``), so ``read`` then ``write`` leaves a file
byte-identical. Only ``numpy``-free standard-library code lives here: a device with numpy and
onnxruntime alone can read and write a run directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_write_json, read_json

__all__ = [
    "CHECKPOINT",
    "COMPRESSED",
    "COMPRESS_JSON",
    "DENSE",
    "DENSE_ENGINE",
    "DENSE_FP16_ONNX",
    "DENSE_INT8_ONNX",
    "DENSE_INT8_TRT_ONNX",
    "DENSE_ONNX",
    "DENSE_WEIGHTS",
    "ENGINE_SIDECAR_SUFFIX",
    "LATENCY_JSON",
    "LATENCY_MD",
    "LATENCY_PNG",
    "MODELS",
    "MODEL_ENGINE",
    "MODEL_FP16_ONNX",
    "MODEL_INT8_ONNX",
    "MODEL_INT8_TRT_ONNX",
    "MODEL_ONNX",
    "MODEL_WEIGHTS",
    "PARITY_JSON",
    "PLAN_JSON",
    "QUANTIZED_FILES",
    "QUANTIZE_JSON",
    "QUANTIZE_TRT_JSON",
    "RAW_WEIGHTS",
    "REPORT_JSON",
    "REPORT_MD",
    "SPARSE_ONNX",
    "STAGE_HINTS",
    "TRAIN_JSON",
    "TRAIN_LOG_JSON",
    "CompressRecord",
    "JsonRecord",
    "LatencyRecord",
    "ParityRecord",
    "QuantizedRecord",
    "RunDir",
    "model_key",
    "quantized_key",
]

# File names -------------------------------------------------------------------------------------------

PLAN_JSON = "plan.json"
"""compress: the plan (:class:`compress.plan.Plan`), enough to rebuild the architecture."""
COMPRESS_JSON = "compress.json"
"""compress: model, method, weights, params/MACs, agreement, accuracy (:class:`CompressRecord`)."""
DENSE_WEIGHTS = "dense.safetensors"
MODEL_WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model.raw.safetensors"
"""compress finetune: the compressed weights before fine-tuning (``model.safetensors`` is then fine-tuned)."""
TRAIN_JSON = "train.json"
"""compress train (training folders, not run directories): the training summary."""
TRAIN_LOG_JSON = "train_log.json"
CHECKPOINT = "checkpoint.pt"
DENSE_ONNX = "dense.onnx"
MODEL_ONNX = "model.onnx"
SPARSE_ONNX = "model.sparse.onnx"
"""export: the compressed ONNX with mostly-zero weights stored as sparse initializers (LRSD)."""
PARITY_JSON = "parity.json"
"""export: ONNX Runtime vs PyTorch error of both models (:class:`ParityRecord`)."""
DENSE_INT8_ONNX = "dense.int8.onnx"
MODEL_INT8_ONNX = "model.int8.onnx"
"""export quantize --precision int8: the ONNX Runtime (CPU) INT8 models in the chosen format."""
DENSE_FP16_ONNX = "dense.fp16.onnx"
MODEL_FP16_ONNX = "model.fp16.onnx"
"""export quantize --precision fp16: float16 compute, float32 inputs and outputs (GPU runtimes, TensorRT 11)."""
DENSE_INT8_TRT_ONNX = "dense.int8.trt.onnx"
MODEL_INT8_TRT_ONNX = "model.int8.trt.onnx"
"""export quantize --target tensorrt: symmetric int8 Q/DQ (explicit quantization) that `export engine` builds."""
QUANTIZE_JSON = "quantize.json"
"""export quantize: formats, calibration, float layers, agreement with FP32 (:class:`QuantizedRecord`)."""
QUANTIZE_TRT_JSON = "quantize.trt.json"
"""export quantize --target tensorrt: the same record for the TensorRT Q/DQ files."""
DENSE_ENGINE = "dense.plan"
MODEL_ENGINE = "model.plan"
ENGINE_SIDECAR_SUFFIX = ".json"
"""The sidecar of ``model.plan`` is ``model.plan.json``."""
LATENCY_JSON = "latency.json"
"""runtime bench: latency statistics, samples, speedup, memory, environment (:class:`LatencyRecord`)."""
LATENCY_MD = "latency.md"
LATENCY_PNG = "latency.png"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

DENSE = "dense"
"""Key of the dense model in parity.json, latency.json and report.json."""
COMPRESSED = "compressed"
"""Key of the compressed model (files ``model.*``) in parity.json, latency.json and report.json."""
MODELS = (DENSE, COMPRESSED)

STAGE_HINTS: dict[str, str] = {
    PLAN_JSON: "run the compress stage (`python -m compress`) first",
    COMPRESS_JSON: "run the compress stage (`python -m compress`) first",
    DENSE_WEIGHTS: "run the compress stage (`python -m compress`) first",
    MODEL_WEIGHTS: "run the compress stage (`python -m compress`) first",
    DENSE_ONNX: "run the export stage (`python -m export`) first",
    MODEL_ONNX: "run the export stage (`python -m export`) first",
    PARITY_JSON: "run the export stage (`python -m export`) first",
    DENSE_ENGINE: "build it with `python -m export engine --run-dir {run_dir}`",
    MODEL_ENGINE: "build it with `python -m export engine --run-dir {run_dir}`",
    LATENCY_JSON: "run `python -m runtime bench --run-dir {run_dir}` first",
    DENSE_INT8_ONNX: "run `python -m export quantize --run-dir {run_dir} --precision int8` first",
    MODEL_INT8_ONNX: "run `python -m export quantize --run-dir {run_dir} --precision int8` first",
    DENSE_FP16_ONNX: "run `python -m export quantize --run-dir {run_dir} --precision fp16` first",
    MODEL_FP16_ONNX: "run `python -m export quantize --run-dir {run_dir} --precision fp16` first",
    QUANTIZE_JSON: "run `python -m export quantize --run-dir {run_dir}` first",
    DENSE_INT8_TRT_ONNX: "run `python -m export quantize --run-dir {run_dir} --precision int8 --target tensorrt` first",
    MODEL_INT8_TRT_ONNX: "run `python -m export quantize --run-dir {run_dir} --precision int8 --target tensorrt` first",
}
"""File name → what to run to create it (``{run_dir}`` is filled in)."""

_FILES: dict[str, dict[str, str]] = {
    "onnx": {DENSE: DENSE_ONNX, COMPRESSED: MODEL_ONNX},
    "weights": {DENSE: DENSE_WEIGHTS, COMPRESSED: MODEL_WEIGHTS},
    "engine": {DENSE: DENSE_ENGINE, COMPRESSED: MODEL_ENGINE},
    "int8": {DENSE: DENSE_INT8_ONNX, COMPRESSED: MODEL_INT8_ONNX},
    "fp16": {DENSE: DENSE_FP16_ONNX, COMPRESSED: MODEL_FP16_ONNX},
    "int8-tensorrt": {DENSE: DENSE_INT8_TRT_ONNX, COMPRESSED: MODEL_INT8_TRT_ONNX},
}
QUANTIZED_FILES: tuple[str, ...] = (
    DENSE_INT8_ONNX,
    MODEL_INT8_ONNX,
    DENSE_FP16_ONNX,
    MODEL_FP16_ONNX,
    DENSE_INT8_TRT_ONNX,
    MODEL_INT8_TRT_ONNX,
    QUANTIZE_JSON,
    QUANTIZE_TRT_JSON,
)
"""Files derived from dense.onnx / model.onnx by `export quantize` (stale once those are rewritten)."""


def model_key(which: str) -> str:
    """``"dense"`` → ``"dense"``; ``"model"`` or ``"compressed"`` → ``"compressed"`` (the key in the records).

    Raises:
        UserInputError: for any other name.
    """
    if which == DENSE:
        return DENSE
    if which in ("model", COMPRESSED):
        return COMPRESSED
    raise UserInputError(f"unknown model {which!r} of a run directory; use 'dense' or 'model' (compressed)")


def quantized_key(which: str, precision: str = "int8") -> str:
    """Key of a quantized model in latency.json: ``"dense_int8"``, ``"compressed_int8"``."""
    return f"{model_key(which)}_{precision}"


class RunDir:
    """Paths of one run directory; nothing is read or created by constructing it.

    Args:
        path: the directory (``OUT/<model>/<method>``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """``path / name``."""
        return self.path / name

    def onnx(self, which: str) -> Path:
        """``dense.onnx`` or ``model.onnx`` (``which``: ``"dense"``, ``"model"``/``"compressed"``)."""
        return self.path / _FILES["onnx"][model_key(which)]

    def weights(self, which: str) -> Path:
        """``dense.safetensors`` or ``model.safetensors``."""
        return self.path / _FILES["weights"][model_key(which)]

    def engine(self, which: str) -> Path:
        """``dense.plan`` or ``model.plan``."""
        return self.path / _FILES["engine"][model_key(which)]

    def quantized(self, which: str, precision: str = "int8", target: str = "ort") -> Path:
        """``dense.int8.onnx`` / ``model.int8.onnx`` (``.fp16.onnx``; ``.int8.trt.onnx`` for ``target="tensorrt"``)."""
        kind = f"{precision}-tensorrt" if target == "tensorrt" else precision
        if kind not in _FILES or kind in ("onnx", "weights", "engine"):
            raise UserInputError(f"no quantized file for precision {precision!r} and target {target!r}")
        return self.path / _FILES[kind][model_key(which)]

    plan_json = property(lambda self: self.path / PLAN_JSON, doc="plan.json")
    compress_json = property(lambda self: self.path / COMPRESS_JSON, doc="compress.json")
    raw_weights = property(lambda self: self.path / RAW_WEIGHTS, doc="model.raw.safetensors")
    sparse_onnx = property(lambda self: self.path / SPARSE_ONNX, doc="model.sparse.onnx")
    parity_json = property(lambda self: self.path / PARITY_JSON, doc="parity.json")
    latency_json = property(lambda self: self.path / LATENCY_JSON, doc="latency.json")
    latency_md = property(lambda self: self.path / LATENCY_MD, doc="latency.md")
    latency_png = property(lambda self: self.path / LATENCY_PNG, doc="latency.png")
    report_json = property(lambda self: self.path / REPORT_JSON, doc="report.json")
    report_md = property(lambda self: self.path / REPORT_MD, doc="report.md")

    def require(self, path: str | os.PathLike[str]) -> Path:
        """Return ``path`` if it is a file: a bare name is looked up in this directory, anything else is a path.

        A path (from the methods above, or given by the user) is used as it is, relative to the working
        directory like every other path: joining it onto the run directory again would double a relative
        run directory (``artifacts/m/x/artifacts/m/x/dense.onnx``).

        Raises:
            UserInputError: naming the file and the stage that writes it.
        """
        given = Path(path)
        full = self.path / given if len(given.parts) == 1 and not given.is_absolute() else given
        if not full.is_file():
            hint = STAGE_HINTS.get(full.name, "run the stage that writes it first").format(run_dir=self.path)
            raise UserInputError(f"{full.name} is missing in {str(self.path)!r}; {hint}")
        return full

    def read_compress(self) -> CompressRecord:
        """``compress.json`` as a :class:`CompressRecord` (a missing file names the compress stage)."""
        return CompressRecord.read(self.require(COMPRESS_JSON))

    def read_parity(self) -> ParityRecord:
        """``parity.json`` as a :class:`ParityRecord`."""
        return ParityRecord.read(self.require(PARITY_JSON))

    def read_latency(self) -> LatencyRecord:
        """``latency.json`` as a :class:`LatencyRecord`."""
        return LatencyRecord.read(self.require(LATENCY_JSON))

    def read_quantized(self) -> QuantizedRecord | None:
        """``quantize.json`` as a :class:`QuantizedRecord`, or ``None`` when the run was not quantized."""
        path = self.path / QUANTIZE_JSON
        return QuantizedRecord.read(path) if path.is_file() else None


# Records ----------------------------------------------------------------------------------------------

_R = TypeVar("_R", bound="JsonRecord")
_INTERNAL = ("extra", "key_order")


@dataclass(kw_only=True)
class JsonRecord:
    """Base of the run directory's JSON records.

    Subclasses declare the top-level keys as fields in the order the writer emits them. ``None`` fields
    named in ``OMIT_IF_NONE`` are left out of :meth:`to_dict` (keys written only when they apply);
    a record read from a dict remembers its keys and their order, so it writes back exactly that dict.

    Attributes:
        extra: keys this class does not declare, in their original order.
        key_order: the keys of the dict it was built from (``None`` for a record built in code).
    """

    FILE: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    """Dotted keys that must be present (checked by :meth:`from_dict`)."""
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    key_order: list[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def field_names(cls) -> list[str]:
        """The declared top-level keys, in writing order."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL]

    @classmethod
    def from_dict(cls: type[_R], data: Mapping[str, Any], *, source: str | None = None) -> _R:
        """Build the record from a JSON object.

        Args:
            data: the parsed JSON.
            source: how to name the file in errors (default the file name).

        Raises:
            UserInputError: if ``data`` is not an object or lacks a required key.
        """
        where = source or cls.FILE
        if not isinstance(data, Mapping):
            raise UserInputError(f"{where} must hold a JSON object, got {type(data).__name__}")
        for dotted in cls.REQUIRED:
            node: Any = data
            for part in dotted.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    hint = STAGE_HINTS.get(cls.FILE, "re-run the stage that writes it").replace(" first", " again")
                    raise UserInputError(f"{where} lacks key {dotted!r}; {hint}")
                node = node[part]
        names = cls.field_names()
        known = {name: data[name] for name in names if name in data}
        extra = {key: value for key, value in data.items() if key not in names}
        return cls(**known, extra=extra, key_order=list(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: declared fields in order (see the class docstring for omitted ones), then ``extra``."""
        out: dict[str, Any] = {}
        present = set(self.key_order) if self.key_order is not None else None
        for name in self.field_names():
            value = getattr(self, name)
            if value is None:
                if present is not None and name not in present:
                    continue
                if present is None and name in self.OMIT_IF_NONE:
                    continue
            out[name] = value
        out.update(self.extra)
        if self.key_order is not None:
            rank = {key: i for i, key in enumerate(self.key_order)}
            out = dict(sorted(out.items(), key=lambda item: rank.get(item[0], len(rank))))
        return out

    @classmethod
    def read(cls: type[_R], path: str | os.PathLike[str]) -> _R:
        """Read and validate a file (errors name it as ``FILE in 'dir'``).

        Raises:
            UserInputError: missing, corrupt, or lacking a required key.
        """
        p = Path(path)
        return cls.from_dict(read_json(p, what=p.name), source=f"{p.name} in {str(p.parent)!r}")

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` atomically as indented JSON; return the path."""
        return atomic_write_json(path, self.to_dict())


@dataclass(kw_only=True)
class CompressRecord(JsonRecord):
    """``compress.json``: what the compress stage did, read by export (input shape) and the report.

    ``dense`` / ``compressed`` are ``{"params", "macs"}``; ``accuracy`` (with DATA), ``sparse_storage``
    (low-rank + sparse) and ``dense_training`` are written only when they apply. ``task``
    (``"classification"``, ``"segmentation"``, ``"detection"``) and ``output_names`` (the ONNX outputs,
    e.g. ``["out"]``, ``["cls_logits", "bbox_regression"]``) are absent from files written before them.
    """

    FILE: ClassVar[str] = COMPRESS_JSON
    REQUIRED: ClassVar[tuple[str, ...]] = (
        "model",
        "method",
        "dense.params",
        "dense.macs",
        "compressed.params",
        "compressed.macs",
    )
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset(
        {"sparse_storage", "dense_training", "accuracy", "finetune", "task", "output_names"}
    )

    model: str
    model_spec: str | None = None
    method: str
    weights: str | None = None
    weights_requested: str | None = None
    weights_warning: str | None = None
    input_shape: list[int] | None = None
    num_classes: int | None = None
    task: str | None = None
    output_names: list[str] | None = None
    config: dict[str, Any] | None = None
    dense: dict[str, Any]
    compressed: dict[str, Any]
    ratios: dict[str, Any] | None = None
    target: Any = None
    layers: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None
    wall_s: dict[str, Any] | None = None
    warnings: list[str] | None = None
    sparse_storage: dict[str, Any] | None = None
    dense_training: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None

    def params(self, which: str) -> int:
        """Parameter count of ``"dense"`` or ``"model"``/``"compressed"``."""
        return getattr(self, model_key(which))["params"]

    def macs(self, which: str) -> int:
        """Multiply-accumulates of one forward pass of ``"dense"`` or ``"model"``/``"compressed"``."""
        return getattr(self, model_key(which))["macs"]


@dataclass(kw_only=True)
class ParityRecord(JsonRecord):
    """``parity.json``: ONNX Runtime vs PyTorch for both models.

    ``dense`` / ``compressed`` hold :meth:`export.parity.ParityResult.to_dict` plus ``onnx_bytes``,
    ``export_s``, ``optimize_s`` and ``graph``; ``sparse_onnx`` describes ``model.sparse.onnx`` when
    the export wrote it.
    """

    FILE: ClassVar[str] = PARITY_JSON
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"dense", "compressed", "sparse_onnx"})

    opset: int | None = None
    dynamic_batch: bool | None = None
    atol: float | None = None
    rtol: float | None = None
    dense: dict[str, Any] | None = None
    compressed: dict[str, Any] | None = None
    sparse_onnx: dict[str, Any] | None = None

    def side(self, which: str) -> dict[str, Any] | None:
        """The entry of ``"dense"`` or ``"model"``/``"compressed"``, or ``None``."""
        return getattr(self, model_key(which))


@dataclass(kw_only=True)
class LatencyRecord(JsonRecord):
    """``latency.json`` (and ``python -m runtime onnx --json``): see :func:`runtime.latency_record.latency_record`.

    ``results`` maps a runner key to ``{"n", "p50", "p90", "p99", "mean", "std", "min", "max",
    "throughput", "samples_ms"}`` (ms, items/s). ``gpu_compute`` (CUDA-event stats, trt/torch on a GPU),
    ``models`` and ``speedups`` (the onnx subcommand) are written only when they apply.
    """

    FILE: ClassVar[str] = LATENCY_JSON
    REQUIRED: ClassVar[tuple[str, ...]] = ("backend", "batch", "results")
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"gpu_compute", "models", "speedups"})

    backend: str
    batch: int
    config: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    runners: dict[str, Any] | None = None
    results: dict[str, Any]
    warmup: dict[str, Any] | None = None
    speedup: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    wall_s: float | None = None
    gpu_compute: dict[str, Any] | None = None
    models: dict[str, str] | None = None
    speedups: dict[str, Any] | None = None

    def stats(self, key: str) -> dict[str, Any] | None:
        """``results[key]`` (``key`` as the runner was named: ``"dense"``, ``"compressed"``, ...), or ``None``."""
        return self.results.get(key)


@dataclass(kw_only=True)
class QuantizedRecord(JsonRecord):
    """``quantize.json`` (and ``quantize.trt.json``): what ``python -m export quantize`` did.

    ``dense`` / ``compressed`` are ``{"file", "format", "onnx_bytes", "fp32_onnx_bytes", "agreement": {"rel_l2",
    "cosine", "top1", "max_abs", "n", "finite"}, "float_layers": [...]}``; ``calibration`` is ``{"source", "n",
    "method", "seed"}``; ``candidates`` (``--format auto``) maps ``"dense"`` / ``"compressed"`` to each format
    tried (timing, agreement, gate result, ``chosen``) and the FP32 model timed in the same run;
    ``accuracy`` (with data) is ``{"dense", "compressed"}``, each ``{"top1", "top5", "ci95", "n", "loss"}``.
    """

    FILE: ClassVar[str] = QUANTIZE_JSON
    REQUIRED: ClassVar[tuple[str, ...]] = ("precision", "format", "dense", "compressed")
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"candidates", "accuracy", "timing_note", "inputs", "digests"})

    precision: str
    target: str | None = None
    format: str
    calibration: dict[str, Any] | None = None
    float_rule: dict[str, Any] | None = None
    float_layers: list[str] | None = None
    gate: dict[str, Any] | None = None
    candidates: dict[str, Any] | None = None
    dense: dict[str, Any]
    compressed: dict[str, Any]
    accuracy: dict[str, Any] | None = None
    cpu: dict[str, Any] | None = None
    timing_note: str | None = None
    warnings: list[str] | None = None
    wall_s: float | None = None
    inputs: dict[str, str] | None = None
    digests: dict[str, str] | None = None

    def report_block(self, results: Mapping[str, Any] | None) -> dict[str, Any]:
        """The report's ``"quantized"`` entry; latencies from latency.json ``results`` (``None`` if not timed)."""
        out: dict[str, Any] = {
            "precision": self.precision,
            "format": self.format,
            "calibration": self.calibration,
            "float_layers": list(self.float_layers or []),
        }
        for key in MODELS:
            entry = getattr(self, key) or {}
            stats = (results or {}).get(quantized_key(key, self.precision))
            latency = None
            if isinstance(stats, Mapping) and all(q in stats for q in ("p50", "p90", "p99")):
                latency = {q: stats[q] for q in ("p50", "p90", "p99")}
            out[key] = {
                "onnx_bytes": entry.get("onnx_bytes"),
                "latency_ms": latency,
                "agreement": entry.get("agreement"),
                "format": entry.get("format"),
            }
        out["warnings"] = list(self.warnings or [])
        if self.timing_note:
            out["timing_note"] = self.timing_note
        return out
