"""``quantize_run``: quantize both ONNX files of a run directory, check them, write ``quantize.json``."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from export.quantize.rules import (
    AGREEMENT_INPUTS,
    AUTO_CANDIDATES,
    DATA_CALIBRATION,
    FORMATS,
    FP16_TIMING_NOTE,
    GATE,
    MIN_FLOAT_RANK,
    PRECISIONS,
    RULES,
    SYNTHETIC_CALIBRATION,
    SYNTHETIC_WARNING,
    TARGETS,
    TRT_FORMAT,
    FloatLayer,
    Gate,
    QuantizationError,
    agreement,
)
from export.quantize.static import (
    InputSpec,
    Int8Remedy,
    cpu_int8_support,
    input_spec,
    int8_remedy,
    onnx_outputs,
    quantize_int8,
    time_candidates,
)
from lowrank_core.errors import UserInputError
from lowrank_core.integrity import file_digests
from lowrank_core.io import atomic_path, ensure_writable_dir
from lowrank_core.rundir import MODELS, QUANTIZE_JSON, QUANTIZE_TRT_JSON, QuantizedRecord, RunDir


def _data_images(data: str, spec: InputSpec, split: str, n: int, seed: int) -> tuple[Any, np.ndarray]:
    """``n`` seeded images of a split of ``data`` shaped for the model (lazy import of compress.data)."""
    try:
        from compress.data import calibration_subset, load_data
    except ImportError as exc:
        raise UserInputError(f"--data needs the compress stage installed ({exc})") from None
    dataset = load_data(data, image_size=spec.shape[-1], channels=spec.shape[1])
    part = getattr(dataset, split)
    subset = calibration_subset(part, min(n, len(part)), seed=seed)
    images, _ = subset.batch(range(len(subset)))
    return dataset, images.numpy()


def _onnx_accuracy(path: Path, spec: InputSpec, split: Any, threads: int | None) -> dict[str, Any]:
    """Top-1 (top-5 above 10 classes), Wilson interval, mean cross-entropy of an ONNX file on ``split``."""
    from compress.train.evaluation import wilson_interval

    chunks, ys = [], []
    for start in range(0, len(split), 256):  # 256 images in memory at a time
        images, labels = split.batch(range(start, min(start + 256, len(split))))
        chunks.append(onnx_outputs(path, spec.feeds(images.numpy()), threads)[: len(labels)])
        ys.append(labels.numpy())
    logits, y = np.concatenate(chunks).astype(np.float64), np.concatenate(ys)
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]))
    top = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
    c1 = int((top[:, 0] == y).sum())
    top5 = float((top == y[:, None]).any(axis=1).mean()) if logits.shape[1] > 10 else None
    n = len(y)
    return {"top1": c1 / n, "top5": top5, "ci95": list(wilson_interval(c1, n)), "n": n, "loss": loss}


def quantize_run(
    run_dir: str | os.PathLike[str],
    *,
    precision: str = "int8",
    target: str = "ort",
    fmt: str = "auto",
    calibration: int | None = None,
    method: str = "minmax",
    data: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    min_rank: int = MIN_FLOAT_RANK,
    rules: Sequence[str] = RULES,
    reduce_range: bool | None = None,
    auto_seconds: float = 3.0,
    eval_samples: int | None = None,
    gate: Gate = GATE,
    cpu_features: Sequence[str] | None = None,
) -> QuantizedRecord:
    """Quantize both ONNX files of a run directory and write the record (see the module docstring).

    ``reduce_range=None`` chooses the weights' range by CPU (:func:`~export.quantize.static.int8_remedy`: 7 bits
    on x86 without VNNI, where ONNX Runtime's u8s8 kernels saturate, plus U8U8 among the ``auto`` formats);
    ``cpu_features`` replaces the machine's CPU flags (tests take both paths with it). ``quantize.json``'s
    ``cpu`` records the CPU class and the choice (``int8_remedy``); each side its ``reduce_range``.

    Raises:
        UserInputError: bad options or a missing ONNX file.
        QuantizationError: a model failed the gate or could not be quantized; nothing is written then.
    """
    _check_options(precision, target, fmt, calibration)
    start = time.perf_counter()
    rd = RunDir(ensure_writable_dir(run_dir))
    sources = {key: rd.require(rd.onnx(key)) for key in MODELS}
    spec = input_spec(sources["compressed"])
    warnings: list[str] = []
    cpu, remedy = _cpu_remedy(precision, target, cpu_features, reduce_range, warnings)

    dataset = None
    if data:
        dataset, agree_images = _data_images(data, spec, "test", AGREEMENT_INPUTS, seed + 1)
    else:
        agree_images = spec.synthetic(AGREEMENT_INPUTS, seed + 1)
    agree_feeds = spec.feeds(agree_images)
    refs = {key: onnx_outputs(path, agree_feeds, threads)[:AGREEMENT_INPUTS] for key, path in sources.items()}

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=rd.path) as tmp_dir:
        tmp = Path(tmp_dir)
        if precision == "fp16":
            calib_record, candidates, chosen = None, None, dict.fromkeys(MODELS, "fp16")
            outs = {key: tmp / f"{key}.onnx" for key in MODELS}
            kept: dict[str, list[FloatLayer]] = {key: [] for key in MODELS}
            _write_fp16(sources, outs)
        else:
            feeds, calib_record = _calibration(data, spec, calibration, seed, method, warnings)
            formats = [TRT_FORMAT] if target == "tensorrt" else _formats(fmt, remedy)
            options = {"method": method, "min_rank": min_rank, "rules": rules}
            candidates, chosen, outs, kept = _quantize_int8_models(
                sources,
                feeds,
                formats,
                refs,
                agree_feeds,
                spec,
                threads,
                auto_seconds,
                gate,
                options,
                remedy,
                tmp,
            )
        sides, fmt_text = _gate(
            rd, precision, target, chosen, outs, sources, refs, agree_feeds, threads, kept, gate, remedy
        )
        accuracy = None if dataset is None else _accuracy(dataset, outs, spec, threads, eval_samples)
        for key in MODELS:
            with atomic_path(rd.quantized(key, precision, target)) as dest:
                os.replace(outs[key], dest)
    record = QuantizedRecord(
        precision=precision,
        target=target,
        format=fmt_text,
        calibration=calib_record,
        float_rule={"rules": list(rules), "min_rank": min_rank},
        float_layers=[{"model": key, **f} for key in MODELS for f in sides[key]["float_layers"]],
        gate={**asdict(gate), "passed": True, "inputs": "data" if data else "synthetic", "n": AGREEMENT_INPUTS},
        candidates=candidates,
        dense=sides["dense"],
        compressed=sides["compressed"],
        accuracy=accuracy,
        cpu=cpu,
        timing_note=FP16_TIMING_NOTE if precision == "fp16" else None,
        warnings=warnings,
        wall_s=round(time.perf_counter() - start, 3),
        inputs=file_digests(rd.path, [p.name for p in sources.values()]),
        digests=file_digests(rd.path, [rd.quantized(key, precision, target).name for key in MODELS]),
    )
    record.write(rd.file(QUANTIZE_TRT_JSON if target == "tensorrt" else QUANTIZE_JSON))
    return record


def _calibration(
    data: str | None, spec: InputSpec, calibration: int | None, seed: int, method: str, warnings: list[str]
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The calibration feeds (``data``'s train split, or seeded synthetic inputs with a warning) and their record."""
    n = calibration or (DATA_CALIBRATION if data else SYNTHETIC_CALIBRATION)
    if data:
        _, calib_images = _data_images(data, spec, "train", n, seed)
    else:
        calib_images = spec.synthetic(n, seed)
        warnings.insert(0, SYNTHETIC_WARNING.format(n=n))
    record: dict[str, Any] = {
        "source": "data" if data else "synthetic",
        "n": len(calib_images),
        "method": method,
        "seed": seed,
    }
    if data:
        record["data"] = data
    return spec.feeds(calib_images), record


def _accuracy(
    dataset: Any, outs: Mapping[str, Path], spec: InputSpec, threads: int | None, eval_samples: int | None
) -> dict[str, Any]:
    """Each quantized model's accuracy on ``dataset``'s test split (lazy import of compress's evaluation)."""
    from compress.train.evaluation import eval_subset

    test = eval_subset(dataset.test, eval_samples)
    return {key: _onnx_accuracy(outs[key], spec, test, threads) for key in MODELS}


def _check_options(precision: str, target: str, fmt: str, calibration: int | None) -> None:
    """Refuse an unknown precision, target or format, FP16 for TensorRT, or an empty calibration set."""
    if precision not in PRECISIONS or target not in TARGETS:
        raise UserInputError(f"use --precision {'|'.join(PRECISIONS)} and --target {'|'.join(TARGETS)}")
    if target == "tensorrt" and precision != "int8":
        raise UserInputError("--target tensorrt is for int8; TensorRT converts FP16 itself (`export engine`)")
    if fmt != "auto" and fmt not in FORMATS:
        raise UserInputError(f"unknown --format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if calibration is not None and calibration < 1:
        raise UserInputError(f"--calibration must be >= 1, got {calibration}")


def _cpu_remedy(
    precision: str, target: str, cpu_features: Sequence[str] | None, reduce_range: bool | None, warnings: list[str]
) -> tuple[dict[str, Any], Int8Remedy]:
    """This CPU's int8 support and the weights' range chosen for it; appends the no-VNNI warning to ``warnings``."""
    cpu = cpu_int8_support(cpu_features)
    remedy = int8_remedy(cpu, reduce_range=reduce_range)
    if precision == "int8" and target == "tensorrt":  # TensorRT's GPU kernels: the CPU's remedy does not apply
        remedy = Int8Remedy(cpu["cpu_class"], False, (), "TensorRT target: 8-bit symmetric weights, whatever the CPU")
    if precision == "int8" and target == "ort":
        cpu = {**cpu, "int8_remedy": remedy.to_dict()}
        if cpu["int8_dot"] == []:
            warnings.append(
                "this CPU has no int8 dot-product instructions (VNNI): INT8 may not be faster (onnxruntime#17389)"
                + (
                    "; int8 weights quantized to 7 bits so its u8s8 kernels cannot saturate"
                    if remedy.reduce_range
                    else ""
                )
            )
    return cpu, remedy


def _formats(fmt: str, remedy: Int8Remedy) -> list[str]:
    """The int8 formats to try: the given one, or every ``auto`` candidate (plus the CPU remedy's)."""
    return [*AUTO_CANDIDATES, *remedy.extra_candidates] if fmt == "auto" else [fmt]


def _quantize_int8_models(
    sources: Mapping[str, Path],
    feeds: list[dict[str, np.ndarray]],
    formats: list[str],
    refs: Mapping[str, np.ndarray],
    agree_feeds: list[dict[str, np.ndarray]],
    spec: InputSpec,
    threads: int | None,
    auto_seconds: float,
    gate: Gate,
    options: dict[str, Any],
    remedy: Int8Remedy,
    tmp: Path,
) -> tuple[dict[str, Any] | None, dict[str, str], dict[str, Path], dict[str, list[FloatLayer]]]:
    """Quantize both models to int8 in ``tmp``: in the one format, or each in its fastest (``auto``).

    Returns:
        The timed candidates (``None`` with one format), the chosen format, the quantized file and the layers
        kept in float, each per model.
    """
    candidates: dict[str, Any] | None = None
    chosen, kept = dict.fromkeys(MODELS, formats[0]), {}
    if len(formats) > 1:  # auto: each model gets its fastest format (they differ: S8S8 vs U8S8 kernels)
        candidates = {"threads": threads}
        for key in MODELS:
            candidates[key], chosen[key], kept[key] = _pick_format(
                formats,
                key,
                sources[key],
                feeds,
                refs[key],
                agree_feeds,
                spec,
                threads,
                auto_seconds,
                gate,
                options,
                remedy,
                tmp,
            )
    outs = {key: tmp / f"{key}.{chosen[key]}.onnx" for key in MODELS}
    for key in MODELS:
        if key not in kept:
            kept[key] = quantize_int8(
                sources[key],
                outs[key],
                feeds,
                fmt=chosen[key],
                reduce_range=remedy.reduce_range_for(chosen[key]),
                **options,
            )
    return candidates, chosen, outs, kept


def _gate(
    rd: RunDir,
    precision: str,
    target: str,
    chosen: Mapping[str, str],
    outs: Mapping[str, Path],
    sources: Mapping[str, Path],
    refs: Mapping[str, np.ndarray],
    agree_feeds: list[dict[str, np.ndarray]],
    threads: int | None,
    kept: Mapping[str, list[FloatLayer]],
    gate: Gate,
    remedy: Int8Remedy,
) -> tuple[dict[str, Any], str]:
    """Each quantized model's agreement with its float model, checked against the gate; the record's sides.

    Raises:
        QuantizationError: a model failed the gate.
    """
    sides: dict[str, Any] = {}
    failures = []
    same = chosen["dense"] == chosen["compressed"]
    fmt_text = chosen["compressed"] if same else f"{chosen['dense']} (dense), {chosen['compressed']} (compressed)"
    for key in MODELS:
        agree = agreement(refs[key], onnx_outputs(outs[key], agree_feeds, threads)[:AGREEMENT_INPUTS])
        failures += [f"{key}: {why}" for why in gate.failures(agree)]
        sides[key] = {
            "file": rd.quantized(key, precision, target).name,
            "format": chosen[key],
            "reduce_range": precision == "int8" and remedy.reduce_range_for(chosen[key]),
            "onnx_bytes": outs[key].stat().st_size,
            "fp32_onnx_bytes": sources[key].stat().st_size,
            "agreement": agree,
            "float_layers": [asdict(f) for f in kept[key]],
        }
    if failures:
        raise QuantizationError(f"{precision} ({fmt_text}) failed the gate ({gate}): {'; '.join(failures)}")
    return sides, fmt_text


def _write_fp16(sources: Mapping[str, Path], outs: Mapping[str, Path]) -> None:
    import onnx

    from export.tensorrt.precision import convert_onnx_to_fp16

    for key, path in sources.items():
        onnx.save(convert_onnx_to_fp16(onnx.load(str(path))), str(outs[key]))


def _pick_format(
    formats: Sequence[str],
    key: str,
    source: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    ref: np.ndarray,
    agree_feeds: Sequence[Mapping[str, np.ndarray]],
    spec: InputSpec,
    threads: int | None,
    seconds: float,
    gate: Gate,
    options: Mapping[str, Any],
    remedy: Int8Remedy,
    tmp: Path,
) -> tuple[dict[str, Any], str, list[FloatLayer]]:
    """``--format auto`` for one model: quantize it in each format, gate, time the passing ones interleaved.

    Returns the candidates' record (with the FP32 model timed in the same run), the chosen format and its
    float layers.
    """
    candidates: dict[str, Any] = {}
    passing = {}
    kept: dict[str, list[FloatLayer]] = {}
    for fmt in formats:
        path = tmp / f"{key}.{fmt}.onnx"
        kept[fmt] = quantize_int8(source, path, feeds, fmt=fmt, reduce_range=remedy.reduce_range_for(fmt), **options)
        agree = agreement(ref, onnx_outputs(path, agree_feeds, threads)[:AGREEMENT_INPUTS])
        why = gate.failures(agree)
        candidates[fmt] = {
            "agreement": agree,
            "gate_failures": why,
            "p50_ms": None,
            "reduce_range": remedy.reduce_range_for(fmt),
        }
        if not why:
            passing[fmt] = path
    if not passing:
        detail = "; ".join(f"{f}: {', '.join(c['gate_failures'])}" for f, c in candidates.items())
        raise QuantizationError(f"{key}: every int8 format failed the gate ({gate}): {detail}")
    timings = time_candidates({**passing, "fp32": source}, spec, threads, seconds)
    for fmt in passing:
        candidates[fmt].update(timings[fmt])
    chosen = min(passing, key=lambda f: timings[f]["p50_ms"])
    for fmt, entry in candidates.items():
        entry["chosen"] = fmt == chosen
    candidates["fp32"] = {**timings["fp32"], "note": f"the {key} FP32 model, timed in the same run"}
    return candidates, chosen, kept[chosen]
