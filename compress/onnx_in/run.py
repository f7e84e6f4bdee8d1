"""The ``MODEL=path/to/model.onnx`` route of the run directory: the compress stage and the export stage's agreement.

``python -m compress run --model m.onnx --method tucker2 --ratio 4 --run-dir D`` (:func:`run_onnx`) writes
``plan.json``, ``dense.onnx`` (the input, validated: external data inlined, nodes sorted), ``model.onnx``
(the rewritten graph) and ``compress.json``, whose ``digests`` name those files and whose ``source``
records the original file and its SHA-256. ``python -m export onnx --run-dir D`` (:func:`export_onnx_run`)
then measures, with ONNX Runtime on seeded inputs, the **agreement with the original ONNX** of both files
(``parity.json``, ``"reference": "original ONNX"``; :mod:`export.onnx_input`): ``dense.onnx`` must reproduce it within the export
tolerances; ``model.onnx`` is an approximation, so its numbers are recorded, and only non-finite outputs fail.
The bench, quantize and report stages then run unchanged on the two ONNX files. ``DATA=<folder of .npy
model inputs>`` makes the channel-SVD family data-aware (:mod:`compress.onnx_in.data`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from compress.onnx_in.core import analyze_onnx, apply_onnx_plan, onnx_agreement, plan_onnx
from compress.onnx_in.data import load_npy_inputs
from compress.onnx_in.planner import check_onnx_method
from compress.plan import Plan
from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_write_onnx

__all__ = [
    "DENSE_FILE",
    "MODEL_FILE",
    "PLAN_FILE",
    "REFERENCE",
    "SOURCE_KEY",
    "check_onnx_export",
    "is_onnx_run",
    "plan_onnx_cli",
    "run_onnx",
]

SOURCE_KEY = "source"
REFERENCE = "original ONNX"
PLAN_FILE, DENSE_FILE, MODEL_FILE = "plan.json", "dense.onnx", "model.onnx"
_PLAN, _DENSE, _MODEL = PLAN_FILE, DENSE_FILE, MODEL_FILE


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
    from lowrank_core.integrity import DIGESTS, file_digests, sha256_file
    from lowrank_core.io import ensure_writable_dir
    from lowrank_core.rundir import CompressRecord

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
    atomic_write_onnx(graph.model, folder / _DENSE)
    atomic_write_onnx(model, folder / _MODEL)
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
    from lowrank_core.io import read_json

    path = Path(run_dir) / "compress.json"
    if not path.is_file():
        return False
    data = read_json(path, what="compress.json")
    return (
        isinstance(data, dict) and isinstance(data.get(SOURCE_KEY), dict) and data[SOURCE_KEY].get("format") == "onnx"
    )


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
