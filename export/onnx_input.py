"""The export stage of an ONNX-input run (``MODEL=path/to/model.onnx``): agreement with the original ONNX.

:mod:`compress.onnx_in.run` writes ``dense.onnx`` (the validated input) and ``model.onnx`` (the rewritten
graph); ``python -m export onnx --run-dir D`` (:func:`export_onnx_run`) measures, with ONNX Runtime on seeded
inputs, how both agree with the original file (``parity.json``, ``"reference": "original ONNX"``):
``dense.onnx`` must reproduce it within the export tolerances; ``model.onnx`` is an approximation, so its
numbers are recorded, and only non-finite outputs fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from compress.onnx_in.data import load_npy_inputs
from compress.onnx_in.graph import input_specs, load_input_model, ort_run, seeded_feeds
from compress.onnx_in.run import DENSE_FILE, MODEL_FILE, PLAN_FILE, REFERENCE, SOURCE_KEY
from export.onnx import graph_summary
from export.parity import compare_outputs
from lowrank_core.errors import ParityError, UserInputError

__all__ = ["export_onnx_run"]

_PLAN, _DENSE, _MODEL = PLAN_FILE, DENSE_FILE, MODEL_FILE


def export_onnx_run(args: argparse.Namespace) -> int:
    """``python -m export onnx --run-dir D`` for an ONNX-input run: agreement of both files with the original."""
    import onnx

    from lowrank_core.integrity import DIGESTS, INPUTS, file_digests, sha256_file, verify_chain
    from lowrank_core.io import read_json
    from lowrank_core.rundir import QUANTIZED_FILES, ParityRecord, RunDir

    run_dir = Path(args.run_dir)
    verify_chain(run_dir, "export")
    info = read_json(run_dir / "compress.json", what="compress.json")
    source = info[SOURCE_KEY]
    original_path = Path(source["path"])
    if not original_path.is_file() or sha256_file(original_path) != source.get("sha256"):
        raise UserInputError(
            f"the original ONNX {str(original_path)!r} is missing or changed since the compress stage; re-run it"
        )
    original = load_input_model(original_path)
    shape = info.get("input_shape") or []
    size = int(shape[-1]) if len(shape) == 4 else None
    specs = input_specs(original, batch=args.batch or int(shape[0] if shape else 1), input_size=size)
    record: dict[str, Any] = {
        "opset": next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), None),
        "dynamic_batch": None,
        "atol": args.atol,
        "rtol": args.rtol,
        "reference": REFERENCE,
        "original_sha256": source["sha256"],
        INPUTS: file_digests(run_dir, (_PLAN, _DENSE, _MODEL)),
    }
    for stale in QUANTIZED_FILES:
        (run_dir / stale).unlink(missing_ok=True)
    feeds = [seeded_feeds(specs, seed) for seed in range(4)]
    reference = [ort_run(original, f) for f in feeds]
    failures = []
    for key, name in (("dense", _DENSE), ("compressed", _MODEL)):
        path = run_dir / name
        model = onnx.load(str(path))
        actual = [ort_run(model, f) for f in feeds]
        ref = np.concatenate([np.concatenate([v.ravel() for v in r.values()]) for r in reference])
        act = np.concatenate([np.concatenate([v.ravel() for v in a.values()]) for a in actual])
        result = compare_outputs(ref, act, atol=args.atol, rtol=args.rtol)
        gated = key == "dense"
        record[key] = {
            **result.to_dict(),
            "reference": REFERENCE,
            "gated": gated,
            "onnx_bytes": path.stat().st_size,
            "graph": graph_summary(model, path=path),
        }
        verdict = ("PASS" if result.passed else "FAIL") if gated else "recorded (approximation)"
        print(
            f"{key:<10} {name:<11} vs the original ONNX: max_abs {result.max_abs:.3g} rel_l2 {result.rel_l2:.3g} "
            f"cosine {result.cosine:.6f} — {verdict}"
        )
        if gated and not result.passed:
            failures.append(f"{name}: {result}")
        if not gated and result.n_nonfinite:
            failures.append(f"{name}: {result.n_nonfinite} non-finite outputs")
    if source.get("data"):  # the compressed model on the calibration inputs too
        batches = load_npy_inputs(source["data"], specs[0], limit=64)
        compressed = onnx.load(str(run_dir / _MODEL))
        ref = np.concatenate([_flat_run(original, {specs[0].name: b}) for b in batches])
        act = np.concatenate([_flat_run(compressed, {specs[0].name: b}) for b in batches])
        on_data = compare_outputs(ref, act, atol=args.atol, rtol=args.rtol)
        n = int(sum(len(b) for b in batches))
        record["compressed_on_data"] = {"data": source["data"], "n": n, **on_data.to_dict()}
        print(f"compressed    on DATA ({n} inputs) vs the original ONNX: rel_l2 {on_data.rel_l2:.3g}")
    record[DIGESTS] = file_digests(run_dir, (_DENSE, _MODEL))
    path = ParityRecord.from_dict(record).write(RunDir(run_dir).parity_json)
    print(f"wrote {path}")
    if failures:
        raise ParityError(f"agreement with the original ONNX failed for {'; '.join(failures)}")
    return 0


def _flat_run(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Every output of one ORT run, flattened and concatenated."""
    return np.concatenate([v.ravel() for v in ort_run(model, feeds).values()])
