"""The ``MODEL=path/to/model.onnx`` route of the run directory: the compress stage and the export stage's agreement.

``python -m compress run --model m.onnx --method tucker2 --ratio 4 --run-dir D`` (:func:`run_onnx`) writes
``plan.json``, ``dense.onnx`` (the input, validated: external data inlined, nodes sorted), ``model.onnx``
(the rewritten graph) and ``compress.json``, whose ``digests`` name those files and whose ``source``
records the original file and its SHA-256. ``python -m export onnx --run-dir D`` (:func:`export_onnx_run`)
then measures, with ONNX Runtime on seeded inputs, the **agreement with the original ONNX** of both files
(``parity.json``, ``"reference": "original ONNX"``): ``dense.onnx`` must reproduce it within the export
tolerances; ``model.onnx`` is an approximation, so its numbers are recorded, and only non-finite outputs fail.
The bench, quantize and report stages then run unchanged on the two ONNX files. ``DATA=<folder of .npy
model inputs>`` makes the channel-SVD family data-aware (:mod:`compress.onnx_in.data`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.onnx_in.core import analyze_onnx, apply_onnx_plan, onnx_agreement, plan_onnx
from compress.onnx_in.data import load_npy_inputs
from compress.onnx_in.graph import input_specs, load_input_model, ort_run, seeded_feeds
from compress.onnx_in.planner import check_onnx_method
from compress.plan import Plan
from lowrank_deploy.errors import ParityError, UserInputError

__all__ = [
    "REFERENCE",
    "SOURCE_KEY",
    "check_onnx_export",
    "export_onnx_run",
    "is_onnx_run",
    "plan_onnx_cli",
    "run_onnx",
]

SOURCE_KEY = "source"
REFERENCE = "original ONNX"
_PLAN, _DENSE, _MODEL = "plan.json", "dense.onnx", "model.onnx"


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """One line for each option the ONNX route cannot honour."""
    check_onnx_method(args.method)
    if getattr(args, "finetune_epochs", 0) or getattr(args, "train_epochs", 0):
        raise UserInputError(
            "training and fine-tuning need the PyTorch model: an ONNX input is compressed post-training only "
            "(drop TRAIN_EPOCHS/FINETUNE_EPOCHS, or give MODEL=<torchvision name or file.py:function>)"
        )
    data = getattr(args, "data", None)
    if data and not Path(data).is_dir():
        raise UserInputError(f"DATA={data}: for an ONNX model DATA is a folder of .npy arrays of model inputs")
    if getattr(args, "weights", "auto") not in (None, "auto"):
        raise UserInputError(f"WEIGHTS={args.weights} does not apply to an ONNX model: its weights are in the file")
    if getattr(args, "num_classes", None):
        raise UserInputError("--num-classes does not apply to an ONNX model: its classifier is in the file")


def run_onnx(args: argparse.Namespace, plan_path: str | None = None) -> int:
    """``python -m compress run|apply --model path/to/model.onnx``: plan (or read ``plan_path``), rewrite, write the run."""
    from compress.cli.options import config_from_args, target_from_args
    from export.onnx import save_onnx
    from lowrank_deploy.integrity import DIGESTS, file_digests, sha256_file
    from lowrank_deploy.io import ensure_writable_dir
    from lowrank_deploy.rundir import CompressRecord

    if plan_path is not None:
        args.method = Plan.load(plan_path).method
    _refuse_unsupported(args)
    target = None if plan_path is not None else target_from_args(args)
    t0 = time.perf_counter()
    graph = analyze_onnx(args.model, input_size=args.input_size)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    if plan_path is not None:
        plan = Plan.load(plan_path)
    elif args.method == "auto" or (target is not None and target.is_latency):
        from compress.onnx_in.latency import plan_onnx_latency

        if target is not None and target.is_latency and getattr(args, "latency_precision", "fp32") != "fp32":
            raise UserInputError("int8 latency planning is not supported on ONNX input yet; drop PRECISION=int8")
        threads = getattr(args, "latency_threads", None) or 1
        plan = plan_onnx_latency(graph, config_from_args(args), target, batch=args.batch, threads=threads)
    else:
        plan = plan_onnx(graph, config_from_args(args))
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = load_npy_inputs(args.data, graph.specs[0]) if getattr(args, "data", None) else None
    model = apply_onnx_plan(graph, plan, data=data)
    t_apply = time.perf_counter() - t0
    agreement, _, _ = onnx_agreement(graph.model, model, graph.specs, seed=args.seed + 1)

    folder = ensure_writable_dir(args.run_dir)
    plan.save(folder / _PLAN)  # first: the chain clears the later stages' files (dense/model.onnx too) on it
    save_onnx(graph.model, folder / _DENSE)
    save_onnx(model, folder / _MODEL)
    totals = plan.totals
    dense = {"params": totals["params_before"], "macs": totals["macs_before"]}
    comp = {"params": totals["params_after_measured"], "macs": totals["macs_after_measured"]}
    outputs = [o.name for o in graph.model.graph.output]
    info: dict[str, Any] = {
        "model": graph.name,
        "model_spec": str(args.model),
        "method": plan.method,
        "weights": f"onnx:{args.model}",
        "weights_requested": None,
        "weights_warning": None,
        "input_shape": [args.batch, *graph.input_shape[1:]],
        "num_classes": None,
        "task": "classification" if len(outputs) == 1 else None,
        "output_names": outputs,
        "config": plan.config,
        "dense": dense,
        "compressed": comp,
        "ratios": {
            "params": dense["params"] / comp["params"],
            "macs": dense["macs"] / max(comp["macs"], 1),
            "flops_reduction": 1.0 - comp["macs"] / max(dense["macs"], 1),
        },
        "target": plan.target,
        "layers": {"factorized": len(plan.factorized_layers), "kept": len(plan.layers) - len(plan.factorized_layers)},
        "agreement": agreement,
        "wall_s": {"load": t_load, "plan": t_plan, "apply": t_apply, "compress": t_plan + t_apply},
        "warnings": plan.warnings,
    }
    record = CompressRecord.from_dict(info)
    record.extra[SOURCE_KEY] = {
        "format": "onnx",
        "path": str(Path(args.model).resolve()),
        "sha256": sha256_file(args.model),
    }
    if data is not None:
        record.extra[SOURCE_KEY]["data"] = str(Path(args.data).resolve())
    record.extra[DIGESTS] = file_digests(folder, (_PLAN, _DENSE, _MODEL))
    record.write(folder / "compress.json")
    print(
        f"{graph.name} (ONNX) / {plan.method}: params {dense['params']:,} → {comp['params']:,} "
        f"(×{info['ratios']['params']:.2f}), MACs {dense['macs'] / 1e9:.3f}G → {comp['macs'] / 1e9:.3f}G "
        f"(×{info['ratios']['macs']:.2f}); {info['layers']['factorized']} layers factorized, "
        f"{info['layers']['kept']} kept; compression {t_plan + t_apply:.2f} s"
    )
    print(
        f"agreement with the original ONNX on 8 seeded inputs: rel L2 {agreement['rel_l2']:.3g}, "
        f"top-1 agreement {agreement['top1_agreement']:.2f}"
    )
    for warning in plan.warnings:
        print(f"WARNING: {warning}")
    print(f"wrote {folder}/{{plan.json, compress.json, dense.onnx, model.onnx}}")
    return 0


def plan_onnx_cli(args: argparse.Namespace) -> int:
    """``python -m compress plan --model path/to/model.onnx --out plan.json``: only the plan."""
    from compress.cli.options import config_from_args, target_from_args

    _refuse_unsupported(args)
    target = target_from_args(args)
    if target is not None and target.is_latency:
        raise UserInputError(f"{target.text()} is reached by measuring compressed models: use `python -m compress run`")
    graph = analyze_onnx(args.model, input_size=args.input_size)
    config = config_from_args(args)
    if args.method == "auto":
        from compress.onnx_in.latency import plan_onnx_latency

        plan = plan_onnx_latency(graph, config, None)
    else:
        plan = plan_onnx(graph, config)
    plan.save(args.out)
    print(
        f"wrote {args.out}: {len(plan.factorized_layers)} layers factorized, ratio ×{plan.target['achieved_ratio']:.2f}"
    )
    return 0


def is_onnx_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` was written by :func:`run_onnx` (its ``compress.json`` has an ONNX ``source``)."""
    from lowrank_deploy.io import read_json

    path = Path(run_dir) / "compress.json"
    if not path.is_file():
        return False
    data = read_json(path, what="compress.json")
    return (
        isinstance(data, dict) and isinstance(data.get(SOURCE_KEY), dict) and data[SOURCE_KEY].get("format") == "onnx"
    )


def export_onnx_run(args: argparse.Namespace) -> int:
    """``python -m export onnx --run-dir D`` for an ONNX-input run: agreement of both files with the original."""
    import onnx

    from export.onnx import graph_summary
    from export.parity import compare_outputs
    from lowrank_deploy.integrity import DIGESTS, INPUTS, file_digests, sha256_file, verify_chain
    from lowrank_deploy.io import read_json
    from lowrank_deploy.rundir import QUANTIZED_FILES, ParityRecord, RunDir

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


def check_onnx_export(values: dict[str, str | None]) -> None:
    """``lowrank-deploy export`` with ``MODEL=path/to/model.onnx``: refuse what the ONNX route cannot do, in one line."""
    check_onnx_method(values.get("method") or "")
    data = values.get("data")
    if data and not Path(data).is_dir():
        raise UserInputError(f"DATA={data}: for an ONNX model DATA is a folder of .npy arrays of model inputs")
    if data and (values.get("precision") or "fp32") != "fp32":
        raise UserInputError("PRECISION=int8/fp16 calibrates on DATA as an image dataset; with an ONNX model drop one")
    for key, var in (("train_epochs", "TRAIN_EPOCHS"), ("finetune_epochs", "FINETUNE_EPOCHS")):
        if (values.get(key) or "0").strip() not in ("0", ""):
            raise UserInputError(
                f"{var} needs the PyTorch model: an ONNX input is compressed post-training only; drop {var}"
            )
    if (values.get("weights") or "auto") != "auto":
        raise UserInputError(
            f"WEIGHTS={values['weights']} does not apply to an ONNX model: its weights are in the file"
        )
    latency = values.get("speedup") or values.get("latency_ms")
    if latency and (values.get("precision") or "fp32") == "int8":
        raise UserInputError("int8 latency planning is not supported on ONNX input yet; drop PRECISION=int8 or SPEEDUP")
    if (values.get("backend") or "ort") == "torch":
        raise UserInputError("BACKEND=torch times PyTorch modules; an ONNX input has none: use BACKEND=ort")
