"""Static INT8 quantization of one ONNX file with ONNX Runtime, and the ONNX Runtime helpers around it."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.quantize.rules import (
    CALIBRATION_METHODS,
    FORMATS,
    MIN_FLOAT_RANK,
    RULES,
    SYNTHETIC_CALIBRATION,
    FloatLayer,
    QuantizationError,
    float_layers,
)
from lowrank_core.errors import UserInputError

# Quantizing one file ------------------------------------------------------------------------------------


def _reader(feeds: Sequence[Mapping[str, np.ndarray]]) -> Any:
    """A fresh ``CalibrationDataReader`` over ``feeds``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._feeds, None)
            return None if item is None else dict(item)

    return _Reader()


def quantize_int8(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    calibration: Sequence[Mapping[str, np.ndarray]],
    *,
    fmt: str = "qdq-u8s8",
    method: str = "minmax",
    min_rank: int = MIN_FLOAT_RANK,
    rules: Sequence[str] = RULES,
    reduce_range: bool = False,
) -> list[FloatLayer]:
    """Quantize one FP32 ONNX file to ``dest`` (per-channel weights); return the layers left in float.

    Raises:
        UserInputError: unknown format or calibration method.
        QuantizationError: ONNX Runtime could not pre-process or quantize the model.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fmt not in FORMATS:
        raise UserInputError(f"unknown int8 format {fmt!r}; use one of {', '.join(FORMATS)}")
    if method not in CALIBRATION_METHODS:
        raise UserInputError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    qformat, act, weight, symmetric = FORMATS[fmt]
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(source), str(pre))
            model = onnx.load(str(pre))
            for i, node in enumerate(model.graph.node):  # nodes_to_exclude needs names
                node.name = node.name or f"{node.op_type}_{i}"
            onnx.save(model, str(pre))
            keep = float_layers(model, min_rank=min_rank, rules=rules)
            # TensorRT: symmetric int8 Q/DQ only; biases stay float (it has no int32 DequantizeLinear)
            extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False} if symmetric else {}
            quantize_static(
                str(pre),
                str(dest),
                _reader(calibration),
                quant_format=getattr(QuantFormat, qformat),
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=getattr(QuantType, act),
                weight_type=getattr(QuantType, weight),
                nodes_to_exclude=[f.node for f in keep],
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options=extra,
            )
        except (UserInputError, QuantizationError):
            raise
        except Exception as exc:  # ORT raises bare Exceptions/ValueErrors with long texts
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise QuantizationError(f"ONNX Runtime could not quantize {Path(source).name} ({fmt}): {first}") from None
    return keep


def onnx_outputs(
    path: str | os.PathLike[str], feeds: Sequence[Mapping[str, np.ndarray]], threads: int | None
) -> np.ndarray:
    """The first output of ``path`` over ``feeds``, concatenated along the batch axis (ONNX Runtime, CPU)."""
    from runtime.ort_runner import OrtRunner

    with OrtRunner(path, intra_op_threads=threads, name=Path(path).stem) as runner:
        first = runner.output_names[0]
        return np.concatenate([np.asarray(runner.infer(dict(f))[first]) for f in feeds])


# Inputs -------------------------------------------------------------------------------------------------


@dataclass
class InputSpec:
    """The single float input of a model: its name, the shape of one feed, and whether the batch is dynamic."""

    name: str
    shape: tuple[int, ...]  # batch of one feed first
    dynamic_batch: bool

    def feeds(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Split ``images`` into feeds of the model's batch (a fixed batch pads the last feed by repetition)."""
        b = 32 if self.dynamic_batch else self.shape[0]
        out = []
        for start in range(0, len(images), b):
            chunk = images[start : start + b]
            if not self.dynamic_batch and len(chunk) < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)])
            out.append({self.name: np.ascontiguousarray(chunk, dtype=np.float32)})
        return out

    def synthetic(self, n: int, seed: int) -> np.ndarray:
        """``n`` seeded standard-normal images of the model's shape (without the batch axis)."""
        return np.random.default_rng(seed).standard_normal((n, *self.shape[1:]), dtype=np.float32)


def input_spec(path: Path) -> InputSpec:
    """The :class:`InputSpec` of an ONNX file (read through ONNX Runtime).

    Raises:
        UserInputError: more than one input, or dynamic non-batch dimensions.
    """
    from runtime.ort_runner import OrtRunner

    with OrtRunner(path, name=path.stem) as runner:
        meta = runner.get_input_metadata()
    if len(meta) != 1:
        raise UserInputError(f"{path.name} has {len(meta)} inputs; quantization here takes single-input models")
    ((name, spec),) = meta.items()
    dims = list(spec.shape or ())
    if len(dims) < 2 or any(not isinstance(d, int) or d < 1 for d in dims[1:]):
        raise UserInputError(f"{path.name}: input {name!r} {spec.describe()} needs fixed non-batch dimensions")
    dynamic = not isinstance(dims[0], int) or dims[0] < 1
    return InputSpec(name, (1 if dynamic else int(dims[0]), *(int(d) for d in dims[1:])), dynamic)


#: Overrides /proc/cpuinfo's flags (comma- or space-separated, e.g. ``avx2,fma`` or ``avx2,avx512_vnni``; an
#: ``x86_64`` or ``aarch64`` token sets the architecture): how tests take both CPU paths on one machine.
CPU_FEATURES_ENV = "LOWRANK_DEPLOY_CPU_FEATURES"
_X86_INT8_DOT = frozenset({"avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"})
_ARM_INT8_DOT = frozenset({"asimddp", "i8mm"})
_X86_MARKERS = frozenset({"sse2", "avx", "avx2", "avx512f", "fma"})
_ARM_MARKERS = frozenset({"asimd", "neon", "fp", "evtstrm"})
_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def cpu_int8_support(features: Iterable[str] | None = None) -> dict[str, Any]:
    """The CPU's int8 dot-product extensions (VNNI, AMX; dotprod/i8mm on Arm) and its class.

    Args:
        features: CPU flags to use instead of the machine's (tests); default the :data:`CPU_FEATURES_ENV`
            variable when set, else /proc/cpuinfo.

    Returns:
        ``{"model", "int8_dot", "arch", "cpu_class", "source"}``: ``int8_dot`` lists the int8 dot-product
        flags found (``None`` when the flags are unknown); ``cpu_class`` is ``x86-vnni``, ``x86-no-vnni``,
        ``arm-dotprod``, ``arm-no-dotprod`` or ``unknown``; ``source`` says where the flags came from.
    """
    info: dict[str, Any] = {"model": None, "int8_dot": None, "arch": platform.machine().lower() or None}
    flags: set[str] | None = None
    if features is None and os.environ.get(CPU_FEATURES_ENV) is not None:
        features, info["source"] = os.environ[CPU_FEATURES_ENV].replace(",", " ").split(), CPU_FEATURES_ENV
    if features is not None:
        info.setdefault("source", "argument")
        flags = {f.strip().lower() for f in features if f.strip()}
        arch = next((_ARCHES[f] for f in flags if f in _ARCHES), None)
        if arch is None and flags & _X86_MARKERS:
            arch = "x86_64"
        elif arch is None and flags & _ARM_MARKERS:
            arch = "aarch64"
        info["arch"] = arch or info["arch"]
        flags -= set(_ARCHES)
    else:
        info["source"] = "/proc/cpuinfo"
        with contextlib.suppress(OSError):
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            info["model"] = fields.get("model name") or fields.get("CPU part")
            flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["arch"] = _ARCHES.get(info["arch"] or "", info["arch"])
    if flags:
        info["int8_dot"] = sorted(flags & (_X86_INT8_DOT | _ARM_INT8_DOT))
    if not flags or info["arch"] not in ("x86_64", "aarch64"):
        info["cpu_class"] = "unknown"
    elif info["arch"] == "x86_64":
        info["cpu_class"] = "x86-vnni" if flags & _X86_INT8_DOT else "x86-no-vnni"
    else:
        info["cpu_class"] = "arm-dotprod" if flags & _ARM_INT8_DOT else "arm-no-dotprod"
    return info


@dataclass(frozen=True)
class Int8Remedy:
    """How the int8 weights are quantized for the CPU: full 8 bits, or 7 (``reduce_range``) where u8s8 saturates.

    On x86 without VNNI, ONNX Runtime's u8s8 kernels (MLAS, AVX2 and AVX-512BW) multiply with VPMADDUBSW, which
    adds two u8 x s8 products into a saturating int16: 2 x 255 x 127 = 64770 > 32767, so large activations
    times large weights clip (seen: top-1 agreement 0.156 on an AVX2 AMD EPYC, issue 22). Weights in 7 bits,
    [-64, 64], bound the pair at 2 x 255 x 64 = 32640, which cannot saturate; U8U8 (VPMADDWD) cannot either and
    is added to ``--format auto``'s candidates there. VNNI (VPDPBUSD accumulates in int32), AMX and Arm's
    dot-product instructions do not saturate, so weights keep 8 bits (ONNX Runtime's quantization docs).
    """

    cpu_class: str
    reduce_range: bool
    extra_candidates: tuple[str, ...]
    reason: str
    forced: bool = False

    def reduce_range_for(self, fmt: str) -> bool:
        """Whether ``fmt``'s weights are quantized to 7 bits (only int8 weights saturate VPMADDUBSW)."""
        return self.reduce_range and (self.forced or FORMATS[fmt][2] == "QInt8")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the per-format choice."""
        return {
            **asdict(self),
            "extra_candidates": list(self.extra_candidates),
            "reduce_range_by_format": {f: self.reduce_range_for(f) for f in FORMATS},
        }


def int8_remedy(cpu: Mapping[str, Any], *, reduce_range: bool | None = None) -> Int8Remedy:
    """The weight range and extra ``auto`` formats for ``cpu`` (from :func:`cpu_int8_support`).

    Args:
        cpu: The CPU record.
        reduce_range: ``True``/``False`` forces 7-bit/8-bit weights for every format; ``None`` chooses by CPU.
    """
    cls = str(cpu.get("cpu_class", "unknown"))
    if reduce_range is not None:
        bits = "7-bit" if reduce_range else "8-bit"
        return Int8Remedy(cls, reduce_range, (), f"{bits} weights as requested (--reduce-range)", forced=True)
    if cls == "x86-no-vnni":
        return Int8Remedy(
            cls,
            True,
            ("qdq-u8u8",),
            "x86 without VNNI: u8s8 kernels use VPMADDUBSW, whose int16 pair sums saturate with 8-bit weights; "
            "int8 weights use 7 bits (reduce_range), and U8U8 is timed too",
        )
    why = {
        "x86-vnni": "x86 with VNNI/AMX: int32 accumulation, no saturation; 8-bit weights",
        "arm-dotprod": "Arm dot-product instructions accumulate in int32; 8-bit weights",
        "arm-no-dotprod": "Arm without dot-product instructions: no saturating pair sum like VPMADDUBSW; 8-bit weights",
    }.get(cls, "CPU flags unknown: 8-bit weights (pass --reduce-range on an x86 CPU without VNNI)")
    return Int8Remedy(cls, False, (), why)


def time_candidates(paths: Mapping[str, Path], spec: InputSpec, threads: int | None, seconds: float) -> dict[str, Any]:
    """p50/p90 (ms) of each file, interleaved with :func:`runtime.harness.benchmark`."""
    from runtime.harness import BenchmarkConfig, benchmark, random_feed
    from runtime.ort_runner import OrtRunner

    runners = {key: OrtRunner(path, intra_op_threads=threads, name=key) for key, path in paths.items()}
    config = BenchmarkConfig(warmup_iters=3, warmup_s=0.2, duration_s=seconds, min_iters=10, block=5, block_warmup=1)
    result = benchmark(runners, lambda key, r: random_feed(r.get_input_metadata(), batch=spec.shape[0]), config)
    return {k: {"p50_ms": s.p50, "p90_ms": s.p90, "n": s.n} for k, s in result.stats.items()}


def quantize_onnx_bytes(
    model_bytes: bytes,
    input_shape: Sequence[int],
    *,
    fmt: str = "qdq-u8s8",
    rules: Sequence[str] | None = None,
    seed: int = 0,
) -> bytes:
    """``model_bytes`` (one float input named ``input``) statically quantized to int8 like ``export quantize``.

    Registered as the ``lowrank_deploy.int8_quantizers`` entry point, through which the latency model's int8
    block timing (:mod:`compress.latency.int8`) finds it without importing this stage.

    Args:
        model_bytes: An FP32 ONNX model.
        input_shape: Its input shape (batch first): each calibration feed has it.
        fmt: The int8 format (:data:`export.quantize.FORMATS`).
        rules: Float-layer rules (default: the export's, :data:`export.quantize.RULES`).
        seed: Seed of the synthetic calibration inputs (activation ranges do not change int8 kernel times).

    Raises:
        QuantizationError: ONNX Runtime could not quantize the model.
    """
    rng = np.random.default_rng(seed)
    shape = [int(d) for d in input_shape]
    feeds = [{"input": rng.standard_normal(shape, dtype=np.float32)} for _ in range(SYNTHETIC_CALIBRATION)]
    with tempfile.TemporaryDirectory(prefix="latency-int8-") as tmp:
        source, dest = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model_bytes)
        quantize_int8(source, dest, feeds, fmt=fmt, rules=RULES if rules is None else rules)
        return dest.read_bytes()
