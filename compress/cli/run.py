"""``python -m compress run|apply``: load, (train,) compress through the method registry, measure, write the run."""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

from lowrank_core.checks import check_finite_module, check_memory
from lowrank_core.errors import UserInputError

__all__ = ["load", "prepare_data", "run", "train_meta"]


def prepare_data(
    args: argparse.Namespace, spec: str | None = None, weights: str | None = None, image_size: int | None = None
) -> Any:
    """``compress.workflow.prepare`` with the data options of ``args`` (model/weights/size overridable)."""
    from compress.task_models import check_data_supported
    from compress.workflow import prepare

    check_data_supported(spec or args.model, args.data)
    return prepare(
        spec or args.model,
        weights or args.weights,
        args.data,
        data_format=args.data_format,
        image_size=image_size if image_size is not None else getattr(args, "input_size", None),
        seed=args.seed,
        train_samples=getattr(args, "train_samples", None),
    )


def train_meta(loaded: Any, dataset: Any) -> dict[str, Any]:
    """What identifies a training run of ``loaded`` on ``dataset`` (a changed value refuses the cached folder)."""
    return {
        "model_spec": loaded.spec,
        "weights": loaded.weights,
        "data": dataset.info.name,
        "train_samples": len(dataset.train),
    }


def load(args: argparse.Namespace) -> tuple[Any, Any, float, Any]:
    """Model (shaped for ``--data`` when given), an example input, load seconds, and the dataset or None."""
    import torch

    from compress.models import load_model

    t0 = time.perf_counter()
    dataset = None
    if getattr(args, "data", None):
        prepared = prepare_data(args)
        loaded, dataset = prepared.loaded, prepared.data
    else:
        loaded = load_model(
            args.model, args.weights, num_classes=args.num_classes, input_size=args.input_size, seed=args.seed
        )
    check_finite_module(loaded.model, f"{loaded.name} ({loaded.weights})")
    check_memory((max(8, args.batch), *loaded.input_shape), f"the input of {loaded.name}")  # before allocating
    gen = torch.Generator().manual_seed(args.seed)
    example = torch.randn(1, *loaded.input_shape, generator=gen)
    try:  # a model that cannot run is the user's model's fault: say so in one line
        with torch.no_grad():
            loaded.model(example)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserInputError(
            f"the forward pass of {loaded.name} fails on a {list(example.shape)} input ({type(exc).__name__}: "
            f"{first}); fix the model or pass another --input-size"
        ) from None
    return loaded, example, time.perf_counter() - t0, dataset


def train_dense(args: argparse.Namespace, loaded: Any, dataset: Any, method: Any, config: Any) -> dict[str, Any]:
    """``run --train-epochs N``: train the dense model first (cached in the training folder).

    A method with its own training stage (``vbmf-tucker2``: expand, orthogonal regularizer, collapse)
    trains that way, into a folder named after the recipe.
    """
    from compress.train import TrainConfig
    from compress.workflow import train_model

    tag = method.training_tag(config) if config is not None else ""
    default = Path(args.run_dir).parent / f"train-{dataset.info.name}{tag}"
    folder = Path(args.train_dir) if args.train_dir else default
    train_cfg = TrainConfig(epochs=args.train_epochs, seed=args.seed, eval_samples=args.eval_samples)
    meta = train_meta(loaded, dataset)
    how = "" if not tag else f" ({tag[1:]}: expanded/orthogonal training, collapsed afterwards)"
    print(f"training the dense {loaded.name} on {dataset.info.name} for {args.train_epochs} epochs into {folder}{how}")
    record = None
    if config is not None:
        record = method.train_dense(
            loaded.model, dataset, train_cfg, folder, config=config, meta=meta, device=args.device
        )
    if record is not None:
        wall, resumed = record["wall_s"], None
    else:
        result = train_model(loaded.model, dataset, train_cfg, folder, meta=meta, device=args.device)
        wall, resumed = result.wall_s, result.resumed_from_epoch
    loaded.model.cpu().eval()
    loaded.weights = f"trained:{os.path.abspath(folder / 'model.safetensors')}"  # as a weights file: absolute
    loaded.warning = None
    out = {"dir": os.path.abspath(folder), "epochs": args.train_epochs, "wall_s": wall, "resumed_from_epoch": resumed}
    if record:
        out["overparameterized"] = record
    return out


def _method_data(args: argparse.Namespace, method: Any, dataset: Any) -> Any:
    """The ``(images, labels)`` batches a data-aware method draws from: the seeded calibration order."""
    from compress.methods.base import CalibrationLoader, Needs

    if method.needs is Needs.NOTHING:
        return None
    if dataset is None:
        if method.requires_data:
            raise UserInputError(f"method {method.name!r} needs data: add DATA=fashion-mnist or DATA=<folder>")
        return None
    print(f"{method.name}: calibration images from the seeded order of the {dataset.info.name} training split")
    return CalibrationLoader(dataset.train, seed=args.seed)


def run(args: argparse.Namespace, plan_path: str | None = None) -> int:
    """``run`` (plan from ``--method``) or ``apply`` (``plan_path``): compress and write the run directory."""
    from compress.artifacts import save_run
    from compress.cli.options import config_from_args
    from compress.methods import get_method
    from compress.plan import Plan
    from lowrank_core.io import ensure_writable_dir

    ensure_writable_dir(args.run_dir)
    plan = None if plan_path is None else Plan.load(plan_path)
    config = config_from_args(args) if plan is None else None
    method = get_method(config.method if plan is None else plan.method)
    loaded, example, t_load, dataset = load(args)
    trained = None
    if dataset is not None and args.train_epochs:
        trained = train_dense(args, loaded, dataset, method, config)
    data = _method_data(args, method, dataset)
    dense = loaded.model
    compressed = copy.deepcopy(dense)
    plan, t_plan, t_apply = _compress(args, method, plan, config, loaded, dense, compressed, example, data)
    compressed.eval()
    info = _compress_record(args, loaded, plan, dense, compressed, example)
    info["wall_s"] = {"load": t_load, "plan": t_plan, "apply": t_apply, "compress": t_plan + t_apply}
    info["warnings"] = plan.warnings
    if "params_after_with_index" in plan.totals:  # sparse parts: what each storage convention costs
        info["sparse_storage"] = _sparse_storage(plan.totals, info["dense"]["params"])
    if trained is not None:
        info["dense_training"] = trained
    if dataset is not None:
        info["accuracy"] = accuracy_before_finetune(args, dataset, dense, compressed)
    save_run(args.run_dir, info=info, plan=plan, dense=dense, compressed=compressed)
    print(summary(plan, info))
    print(f"wrote {Path(args.run_dir)}/{{plan.json, compress.json, dense.safetensors, model.safetensors}}")
    if dataset is not None and args.finetune_epochs:
        _finetune(args, dataset)
    return 0


def _compress(
    args: argparse.Namespace,
    method: Any,
    plan: Any,
    config: Any,
    loaded: Any,
    dense: Any,
    compressed: Any,
    example: Any,
    data: Any,
) -> tuple[Any, float, float]:
    """Rebuild a saved plan, or plan and apply (to a latency target, in two timed steps, or in one pass).

    Returns:
        The plan and the plan / apply wall times in seconds.
    """
    from compress.cli.options import target_from_args
    from compress.methods.base import Method

    t0 = time.perf_counter()
    latency_target = None if plan is not None else target_from_args(args)
    if plan is not None:
        method.rebuild_(compressed, plan, data=data)
        return plan, 0.0, time.perf_counter() - t0
    if latency_target is not None and latency_target.is_latency:  # every method: see compress.latency.solve
        from compress.latency import LatencyModel
        from compress.latency.solve import compress_to_latency_

        latency = LatencyModel(threads=args.latency_threads, batch=args.batch, precision=args.latency_precision)
        kwargs = {"data": data, "model_name": loaded.name, "latency": latency}
        plan = compress_to_latency_(method, dense, compressed, config, latency_target, example, **kwargs)
        return plan, time.perf_counter() - t0, 0.0
    if type(method).compress_ is Method.compress_:  # plan on the dense model, then apply: timed apart
        plan = method.plan(dense, config, example, data=data, model_name=loaded.name)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        method.apply_(compressed, plan, data=data)
        return plan, t_plan, time.perf_counter() - t0
    # the method plans and applies in one pass (calibration statistics, gradients)
    plan = method.compress_(compressed, config, example, data=data, model_name=loaded.name)
    return plan, time.perf_counter() - t0, 0.0


def _compress_record(
    args: argparse.Namespace, loaded: Any, plan: Any, dense: Any, compressed: Any, example: Any
) -> dict[str, Any]:
    """``compress.json`` without its timings: model, method, weights, sizes, ratios, target, agreement."""
    import torch

    from compress.metrics import count_macs, count_params, output_agreement

    dense_params, comp_params = count_params(dense), count_params(compressed)
    dense_macs, comp_macs = (
        plan.totals.get("macs_before") or count_macs(dense, example),
        count_macs(compressed, example),
    )
    plan.totals.update(params_after_measured=comp_params, macs_after_measured=comp_macs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = torch.randn(8, *loaded.input_shape, generator=gen)
    agreement = output_agreement(dense, compressed, batch)
    return {
        "model": loaded.name,
        "model_spec": loaded.spec,
        "method": plan.method,
        "weights": loaded.weights,
        "weights_requested": loaded.weights_requested,
        "weights_warning": loaded.warning,
        "input_shape": [args.batch, *loaded.input_shape],
        "num_classes": loaded.num_classes,
        "task": loaded.task,
        "output_names": list(loaded.output_names),
        "config": plan.config,
        "dense": {"params": dense_params, "macs": dense_macs},
        "compressed": {"params": comp_params, "macs": comp_macs},
        "ratios": {
            "params": dense_params / comp_params,
            "macs": dense_macs / comp_macs,
            "flops_reduction": 1.0 - comp_macs / dense_macs,
        },
        "target": plan.target,
        "layers": {
            "factorized": len(plan.factorized_layers),
            "kept": len(plan.layers) - len(plan.factorized_layers),
        },
        "agreement": agreement.to_dict(),
    }


def _sparse_storage(totals: dict[str, Any], dense_params: int) -> dict[str, Any]:
    """``compress.json``'s ``sparse_storage``: what each storage convention of the sparse parts costs."""
    return {
        "params_values": totals["params_after"],
        "params_with_index": totals["params_after_with_index"],
        "params_dense_storage": totals["params_after_dense_storage"],
        "ratio_values": dense_params / totals["params_after"],
        "ratio_with_index": dense_params / totals["params_after_with_index"],
        "macs_executed": totals["macs_after"],
        "macs_sparse_kernel": totals.get("macs_after_sparse_kernel"),
        "macs_2to4": totals.get("macs_after_2to4"),
        "note": "the exported graph runs the sparse branch as a dense conv with zeros: its MACs and "
        "(without sparse initializers) its stored size are those of a dense layer",
    }


def _finetune(args: argparse.Namespace, dataset: Any) -> None:
    """``FINETUNE_EPOCHS``: fine-tune the written run and print its accuracy."""
    from compress.train import TrainConfig
    from compress.workflow import finetune_run

    config = TrainConfig(
        epochs=args.finetune_epochs,
        lr=args.finetune_lr,
        seed=args.seed,
        eval_samples=args.eval_samples,
        kd_alpha=0.5 if args.kd else 0.0,
    )
    accuracy = finetune_run(args.run_dir, dataset, config, device=args.device, kd=args.kd)
    print(accuracy_line(accuracy))


def accuracy_before_finetune(args: argparse.Namespace, dataset: Any, dense: Any, compressed: Any) -> dict[str, Any]:
    from compress.train import TrainConfig
    from compress.workflow import evaluate_model

    config = TrainConfig(eval_samples=args.eval_samples)
    accuracy = {
        "data": dataset.info.to_dict(),
        "eval_samples": args.eval_samples,
        "dense": evaluate_model(dense, dataset, config, args.device).to_dict(),
        "raw": evaluate_model(compressed, dataset, config, args.device).to_dict(),
        "finetuned": None,
    }
    print(accuracy_line(accuracy))
    return accuracy


def accuracy_line(accuracy: dict[str, Any]) -> str:
    parts = []
    for key in ("dense", "raw", "finetuned"):
        acc = accuracy.get(key)
        if acc:
            parts.append(f"{key} {100 * acc['top1']:.2f}%")
    n = (accuracy.get("dense") or {}).get("n")
    return f"accuracy on {accuracy['data']['name']} (n={n}): " + ", ".join(parts)


def summary(plan: Any, info: dict[str, Any]) -> str:
    lines = [
        f"{info['model']} / {info['method']}: params {info['dense']['params']:,} → {info['compressed']['params']:,} "
        f"(×{info['ratios']['params']:.2f}), MACs {info['dense']['macs'] / 1e9:.2f}G → "
        f"{info['compressed']['macs'] / 1e9:.2f}G (×{info['ratios']['macs']:.2f}, "
        f"{100 * info['ratios']['flops_reduction']:.1f}% fewer FLOPs); "
        f"{info['layers']['factorized']} layers factorized, {info['layers']['kept']} kept; "
        f"compression {info['wall_s']['compress']:.2f} s",
        f"agreement on 8 random inputs: rel L2 {info['agreement']['rel_l2']:.3g}, "
        f"top-1 agreement {info['agreement']['top1_agreement']:.2f}",
    ]
    sparse = info.get("sparse_storage")
    if sparse:
        lines.append(
            f"low-rank + sparse storage: values ×{sparse['ratio_values']:.2f}, values + indices "
            f"×{sparse['ratio_with_index']:.2f}; the exported graph stores and runs the sparse branch dense "
            f"(params ×{info['ratios']['params']:.2f}, MACs ×{info['ratios']['macs']:.2f}); a sparse kernel would run "
            f"{(sparse['macs_sparse_kernel'] or 0) / 1e6:.1f}M MACs"
        )
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)
