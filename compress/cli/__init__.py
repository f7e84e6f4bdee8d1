"""``python -m compress``: plan and apply compression, write a run directory.

Subcommands:
    run     load a model, plan, apply, measure, and write OUT/<model>/<method>/ (plan, weights, compress.json)
    plan    only make plan.json (inspect or edit it, then ``apply``)
    apply   apply an existing plan.json to a fresh base model and write a run directory
    show    print a plan as a per-layer table
    models  list the model names MODEL accepts (the CIFAR-style zoo, then torchvision)
    methods list the registered methods (built-in and plug-ins), what they need and their options
    train   train a model on a dataset (resumable checkpoints; torchrun for several processes)
    finetune  fine-tune a run directory's compressed model; records dense / raw / fine-tuned accuracy
    eval    accuracy of a model (or a run directory's two models) on a dataset's test split

The method options come from the method registry (:mod:`compress.methods`): no command here knows a
method by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.cli.options import (
    add_data_args,
    add_method_args,
    add_model_args,
    add_train_args,
    config_from_args,
    target_from_args,
    train_config,
)
from compress.cli.run import accuracy_line, load, prepare_data, run, train_meta
from compress.methods.base import nonneg_int, positive_int
from lowrank_core.cli import ArgumentParser
from lowrank_core.errors import UserInputError
from lowrank_core.integrity import run_lock

__all__ = ["PROG", "build_parser", "main"]

PROG = "python -m compress"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (method options from the registry)."""
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model and write a run directory")
    add_model_args(run)
    add_method_args(run)
    run.add_argument("--run-dir", required=True, help="output folder, conventionally OUT/<model>/<method>")
    add_data_args(run, required=False)
    run.add_argument(
        "--train-epochs",
        type=nonneg_int,
        default=0,
        help="with --data: first train the dense model for N epochs (cached in --train-dir)",
    )
    run.add_argument("--train-dir", default=None, help="training folder (default: <run-dir>/../train-<data>)")
    run.add_argument("--finetune-epochs", type=nonneg_int, default=0, help="with --data: fine-tune for N epochs")
    run.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning peak learning rate (0.01)")
    run.add_argument("--kd", action="store_true", help="fine-tune with distillation from the dense model")

    plan = sub.add_parser("plan", help="only write plan.json")
    add_model_args(plan)
    add_method_args(plan)
    plan.add_argument("--out", required=True, help="plan.json to write")

    apply = sub.add_parser("apply", help="apply an existing plan and write a run directory")
    add_model_args(apply)
    apply.add_argument("--plan", required=True, help="plan.json to apply")
    apply.add_argument("--run-dir", required=True, help="output folder")

    show = sub.add_parser("show", help="print a plan as a table")
    show.add_argument("plan", help="plan.json")

    sub.add_parser("models", help="list model names")
    sub.add_parser("methods", help="list the registered methods")

    train = sub.add_parser("train", help="train a model on a dataset (torchrun for several processes)")
    add_model_args(train)
    add_data_args(train, required=True)
    add_train_args(train, epochs=3, lr=None)
    train.set_defaults(weights="random")  # training starts from a fresh init unless --weights says otherwise
    train.add_argument("--out", required=True, help="training folder: checkpoint.pt, train_log.json, model.safetensors")
    train.add_argument("--restart", action="store_true", help="discard a checkpoint in --out instead of resuming")

    finetune = sub.add_parser("finetune", help="fine-tune a run directory's compressed model")
    finetune.add_argument("--run-dir", required=True, help="run directory written by `run`")
    finetune.add_argument("--seed", type=int, default=0)
    add_data_args(finetune, required=True)
    add_train_args(finetune, epochs=1, lr=0.01)
    finetune.add_argument(
        "--kd", action="store_true", help="distil from the run's dense model (default --kd-alpha 0.5)"
    )
    finetune.add_argument("--restart", action="store_true", help="discard an earlier fine-tuning checkpoint")

    ev = sub.add_parser("eval", help="accuracy on a dataset's test split")
    ev.add_argument("--model", default=None, help="model spec (with --weights), or use --run-dir")
    ev.add_argument("--weights", default="auto")
    ev.add_argument("--run-dir", default=None, help="evaluate a run directory's dense and compressed models")
    ev.add_argument("--seed", type=int, default=0)
    add_data_args(ev, required=True)
    ev.add_argument("--batch-size", type=positive_int, default=512)
    return parser


def _show(path: str) -> int:
    from compress.plan import Plan

    plan = Plan.load(path)
    print(f"{plan.model} / {plan.method}  target {json.dumps(plan.target)}")
    print(f"{'layer':<28} {'shape':<18} {'action':<14} {'ranks':<12} {'params':>18} {'MMACs':>16}  note")
    for e in plan.layers:
        ranks = "" if e.ranks is None else "x".join(str(r) for r in e.ranks)
        note = e.reason or ("" if e.rel_error is None else f"rel.err {e.rel_error:.3f}")
        print(
            f"{e.path:<28} {'x'.join(map(str, e.shape)):<18} {e.action:<14} {ranks:<12} "
            f"{e.params_before:>8,}→{e.params_after:<9,} {e.macs_before / 1e6:>7.1f}→{e.macs_after / 1e6:<8.1f} {note}"
        )
    for w in plan.warnings:
        print(f"WARNING: {w}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import shutil

    from compress.workflow import train_model

    if args.kd_alpha:
        raise UserInputError("train has no teacher for --kd-alpha; distillation belongs to finetune/run --kd")
    prepared = prepare_data(args)
    loaded, dataset = prepared.loaded, prepared.data
    if loaded.warning and args.weights not in ("auto", "random"):
        print(f"WARNING: {loaded.warning}", file=sys.stderr)
    out = Path(args.out)
    if args.restart and out.exists():
        for name in ("checkpoint.pt", "train_log.json", "train.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "finetune", ignore_errors=True)
    config = train_config(args)
    meta = train_meta(loaded, dataset)
    result = train_model(loaded.model, dataset, config, out, meta=meta, device=args.device)
    if result.final is not None:
        print(
            f"{loaded.name} on {dataset.info.name}: {result.final} after {len(result.history)} epochs, {result.wall_s:.0f} s"
        )
    print(f"wrote {out}/{{model.safetensors, checkpoint.pt, train_log.json, train.json}}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import shutil

    from compress.artifacts import load_run
    from compress.workflow import FINETUNE_DIR, finetune_run

    run = load_run(args.run_dir)
    prepared = prepare_data(args, run.info["model_spec"], "random", image_size=int(run.info["input_shape"][-1]))
    if tuple(prepared.loaded.input_shape) != tuple(run.input_shape[1:]):
        raise UserInputError(
            f"{args.data} gives inputs {list(prepared.loaded.input_shape)} but the run was compressed for "
            f"{list(run.input_shape[1:])}; use the dataset the model was trained on"
        )
    if args.restart:
        shutil.rmtree(Path(args.run_dir) / FINETUNE_DIR, ignore_errors=True)
    config = train_config(args)
    if args.kd and not config.kd_alpha:
        import dataclasses

        config = dataclasses.replace(config, kd_alpha=0.5)
    accuracy = finetune_run(args.run_dir, prepared.data, config, device=args.device, kd=config.kd_alpha > 0)
    print(accuracy_line(accuracy))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from compress.train import TrainConfig
    from compress.workflow import evaluate_model

    config = TrainConfig(eval_samples=args.eval_samples, eval_batch_size=args.batch_size)
    if args.run_dir:
        from compress.artifacts import load_run

        run = load_run(args.run_dir)
        dataset = prepare_data(args, run.info["model_spec"], "random", image_size=int(run.info["input_shape"][-1])).data
        for name, model in (("dense", run.dense), ("compressed", run.compressed)):
            print(f"{name}: {evaluate_model(model, dataset, config, args.device)}")
        return 0
    if not args.model:
        raise UserInputError("eval needs --model (with --weights) or --run-dir")
    prepared = prepare_data(args)
    print(f"{prepared.loaded.name}: {evaluate_model(prepared.loaded.model, prepared.data, config, args.device)}")
    return 0


def _methods() -> int:
    from compress.methods import load_methods

    for name, method in sorted(load_methods().items()):
        target = method.default_target.text() if method.default_target else "none"
        flags = " ".join(o.flag for o in method.options)
        print(f"{name:<14} needs {method.needs.value:<9} default {target:<10} {method.summary}")
        if flags:
            print(f"{'':<14} options: {flags}")
    return 0


def _plan_latency(args: argparse.Namespace, target: Any) -> contextlib.AbstractContextManager[Any]:
    """For a latency target, the latency model of ``--latency-threads``/``--latency-precision``/``--batch``, as `run`."""
    if target is None or not target.is_latency:
        return contextlib.nullcontext()
    from compress.latency import LatencyModel, use_latency_model

    return use_latency_model(
        LatencyModel(threads=args.latency_threads, batch=args.batch, precision=args.latency_precision)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "models":
        from compress.models import list_models

        print("\n".join(list_models()))
        return 0
    if args.command == "methods":
        return _methods()
    if args.command == "show":
        return _show(args.plan)
    if args.command == "train":
        return _train(args)
    if args.command == "finetune":
        with run_lock(args.run_dir, stage="compress"):  # a new model.safetensors: what was made from it goes
            return _finetune(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plan":
        from compress.methods import get_method

        config = config_from_args(args)
        target = target_from_args(args)
        if target is not None and target.is_latency and target.kind not in get_method(args.method).target_fields:
            raise UserInputError(f"{target.text()} is reached by measuring compressed models: use `{PROG} run`")
        if args.model.lower().endswith(".onnx"):  # a model given only as ONNX: compress.onnx_in
            from compress.onnx_in.run import plan_onnx_cli

            return plan_onnx_cli(args)
        loaded, example, _, _ = load(args)
        with _plan_latency(args, target):
            plan = get_method(config.method).plan(loaded.model, config, example, model_name=loaded.name)
        plan.save(args.out)
        print(
            f"wrote {args.out}: {len(plan.factorized_layers)} layers factorized, ratio ×{plan.target['achieved_ratio']:.2f}"
        )
        return 0
    if args.command == "apply":
        if not Path(args.plan).is_file():
            raise UserInputError(f"plan {args.plan!r} does not exist; write one with `{PROG} plan`")
        with run_lock(args.run_dir, create=True, stage="compress"):
            if args.model.lower().endswith(".onnx"):
                from compress.onnx_in.run import run_onnx

                return run_onnx(args, plan_path=args.plan)
            return run(args, plan_path=args.plan)
    if args.model.lower().endswith(".onnx"):  # a model given only as ONNX: compress.onnx_in
        from compress.onnx_in.run import run_onnx

        with run_lock(args.run_dir, create=True, stage="compress"):
            return run_onnx(args)
    with run_lock(args.run_dir, create=True, stage="compress"):
        return run(args)
