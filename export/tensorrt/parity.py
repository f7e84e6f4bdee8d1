"""TensorRT engine vs ONNX Runtime parity on seeded inputs, recorded in the engine sidecar.

After ``python -m export engine`` builds ``model.plan`` it runs the engine and ONNX Runtime (CPU
provider, the float32 ONNX it was built from) on the same seeded random inputs and compares every output
with :func:`export.parity.compare_outputs` (an element fails when both ``absdiff > atol`` and
``absdiff / |ref| > rtol``). Tolerances depend on the engine precision (:data:`ENGINE_TOLERANCES`):

* ``fp32``: 5e-3 — TensorRT uses TF32 tensor cores for FP32 convolutions by default (10-bit mantissa
  on the products), so the float32 reference is not matched to 1e-5 as ONNX Runtime matches PyTorch.
* ``fp16``: 1e-2 — FP16 weights and activations (10-bit mantissa, ~5e-4 relative per value, summed over
  the depth of the network).
* ``int8``: 1e-1 — INT8 quantization (8-bit weights and activations) loses far more; the record also
  keeps ``rel_l2``, cosine and top-1 agreement, which say more about an INT8 model than the worst element.

The runners come from :mod:`runtime` (``TrtRunner`` and ``OrtRunner``), imported inside
:func:`engine_parity`; tests pass fakes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_write_json, read_json

ENGINE_TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (5e-3, 5e-3), "fp16": (1e-2, 1e-2), "int8": (1e-1, 1e-1)}
"""Engine precision → (atol, rtol) against the float32 ONNX in ONNX Runtime."""

REFERENCE = "onnxruntime CPUExecutionProvider on the float32 ONNX"


def engine_parity(
    engine_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    *,
    precision: str,
    batch: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    engine_runner: Any = None,
    reference_runner: Any = None,
) -> dict[str, Any]:
    """Run the engine and ONNX Runtime on the same seeded inputs and compare every output.

    Args:
        engine_path: the ``.plan`` (with its sidecar).
        onnx_path: the float32 ONNX the engine was built from.
        precision: ``fp32``, ``fp16`` or ``int8``: picks the default tolerances.
        batch: batch of the inputs where axis 0 is dynamic (must lie in the engine's profile).
        seed: seed of :func:`runtime.harness.random_feed`.
        atol: absolute tolerance (default from :data:`ENGINE_TOLERANCES`).
        rtol: relative tolerance (default from :data:`ENGINE_TOLERANCES`).
        engine_runner: a :class:`runtime.base.Runner` for the engine (default ``TrtRunner(engine_path)``).
        reference_runner: a runner for the ONNX (default ``OrtRunner(onnx_path, providers=("cpu",))``).

    Returns:
        ``{"reference", "precision", "atol", "rtol", "batch", "seed", "passed", "max_abs", "max_rel",
        "rel_l2", "cosine_min", "top1_agreement", "outputs": {name: ParityResult.to_dict()}}``.

    Raises:
        UserInputError: unknown precision, or the engine and the ONNX disagree on output names.
        RuntimeUnavailableError: TensorRT, a GPU or ONNX Runtime is missing (from the runners).
    """
    from export.parity import compare_outputs
    from runtime.harness import random_feed

    if precision not in ENGINE_TOLERANCES:
        raise UserInputError(f"unknown precision {precision!r}; use one of: {', '.join(ENGINE_TOLERANCES)}")
    default_atol, default_rtol = ENGINE_TOLERANCES[precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if engine_runner is None:
        from runtime.trt_runner import TrtRunner

        engine_runner = TrtRunner(engine_path, name="engine", gpu_timing=False)
    if reference_runner is None:
        from runtime.ort_runner import OrtRunner

        reference_runner = OrtRunner(onnx_path, providers=("cpu",), name="onnxruntime")

    with engine_runner, reference_runner:
        meta = engine_runner.get_input_metadata()
        first = next(iter(meta.values()), None)
        run_batch = batch
        if first is not None and first.shape and not first.is_dynamic(0):
            run_batch = int(str(first.shape[0]))  # a fixed axis is an int
        feed = random_feed(meta, batch=run_batch, seed=seed, model=Path(engine_path).name)
        ref_meta = reference_runner.get_input_metadata()
        ref_feed = {name: np.asarray(feed[name]).astype(spec.dtype, copy=False) for name, spec in ref_meta.items()}
        actual = engine_runner.infer(feed)
        expected = reference_runner.infer(ref_feed)

    if set(actual) != set(expected):
        raise UserInputError(
            f"engine outputs {sorted(actual)} differ from the ONNX outputs {sorted(expected)}; rebuild the engine"
        )
    results = {
        name: compare_outputs(expected[name], np.asarray(actual[name], dtype=np.float32), atol=atol, rtol=rtol)
        for name in expected
    }
    top1 = [r.top1_agreement for r in results.values() if r.top1_agreement is not None]
    return {
        "reference": REFERENCE,
        "precision": precision,
        "atol": atol,
        "rtol": rtol,
        "batch": run_batch,
        "seed": seed,
        "passed": all(r.passed for r in results.values()),
        "max_abs": max(r.max_abs for r in results.values()),
        "max_rel": max(r.max_rel for r in results.values()),
        "rel_l2": max(r.rel_l2 for r in results.values()),
        "cosine_min": min(r.cosine for r in results.values()),
        "top1_agreement": min(top1) if top1 else None,
        "outputs": {name: r.to_dict() for name, r in results.items()},
    }


def record_parity(engine_path: str | os.PathLike[str], parity: Mapping[str, Any]) -> Path:
    """Add ``parity`` to the engine's sidecar (``model.plan.json``), rewriting it atomically; return its path."""
    from runtime.trt_engine import sidecar_path

    side = sidecar_path(engine_path)
    meta = read_json(side, what="engine sidecar")
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in parity.items()}
    meta["parity"] = clean
    return atomic_write_json(side, meta)
