"""``python -m compress``: plan and apply compression, write a run directory.

Subcommands:
    run     load a model, plan, apply, measure, and write OUT/<model>/<method>/ (plan, weights, compress.json)
    plan    only make plan.json (inspect or edit it, then ``apply``)
    apply   apply an existing plan.json to a fresh base model and write a run directory
    show    print a plan as a per-layer table
    models  list the model names MODEL accepts (the CIFAR-style zoo, then torchvision)
    train   train a model on a dataset (resumable checkpoints; torchrun for several processes)
    finetune  fine-tune a run directory's compressed model; records dense / raw / fine-tuned accuracy
    eval    accuracy of a model (or a run directory's two models) on a dataset's test split
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowrank_deploy.cli import ArgumentParser, run_main
from lowrank_deploy.errors import UserInputError

PROG = "python -m compress"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"RATIO must be a number > 1, got {text!r}") from None
    if not value > 1.0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"RATIO must be a number > 1 (parameter compression factor), got {text!r}")
    return value


def _flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"FLOPS must be a fraction in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"FLOPS must be the fraction of FLOPs to remove, in (0, 1) (0.5 = half the FLOPs), got {text!r}"
        )
    return value


def _round_to(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="torchvision model name, or path/to/file.py:function")
    g.add_argument(
        "--weights",
        default="auto",
        help="auto (pretrained if available, else random + warning) | imagenet | random | path to weights",
    )
    g.add_argument("--num-classes", type=_positive_int, default=None, help="classes of a randomly initialised model")
    g.add_argument("--input-size", type=_positive_int, default=None, help="square input size (default 224)")
    g.add_argument("--batch", type=_positive_int, default=1, help="batch size recorded for export and timing")
    g.add_argument("--seed", type=int, default=0, help="seed of random initialisation and test inputs")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument(
        "--method", default="tucker2", help="tucker2 | svd | tai | cp | vbmf-tucker2 | … (README lists every method)"
    )
    g.add_argument("--ratio", type=_ratio, default=None, help="whole-model parameter compression factor (default 4)")
    g.add_argument(
        "--flops",
        type=_flops,
        default=None,
        help="instead of --ratio: fraction of the whole model's FLOPs (MACs) to remove, e.g. 0.5 = half",
    )
    g.add_argument("--rank-rule", default=None, help="uniform (default) | param-reduction | evbmf | energy")
    g.add_argument("--energy", type=float, default=None, help="retained energy for --rank-rule energy without --ratio")
    g.add_argument("--omega", type=float, default=None, help="EVBMF weakening factor without --ratio (1 = plain EVBMF)")
    g.add_argument(
        "--round-to",
        type=_round_to,
        default="auto",
        help="round ranks to a multiple of N; auto (default) = the SIMD block of this CPU's ONNX Runtime "
        "conv kernels: 16 with AVX-512, else 8",
    )
    g.add_argument("--min-rank", type=_positive_int, default=None, help="smallest rank (default 8)")
    g.add_argument("--hooi-iters", type=int, default=None, help="HOOI sweeps after HOSVD for Tucker-2 (default 0)")
    g.add_argument("--exclude", action="append", default=None, help="fnmatch pattern of layers to keep dense")
    g.add_argument("--no-ratio", action="store_true", help="use the rank rule's own knob instead of a ratio")
    v = p.add_argument_group("vbmf-tucker2 (over-parameterized orthogonal training, EVBMF ranks, Tucker-2)")
    v.add_argument(
        "--expansion", type=int, default=None, help="ExpandNets rate of the training stage (default 4; 0 = off)"
    )
    v.add_argument(
        "--orthogonality", default=None, help="so (default) | srip | none: regularizer of the training stage"
    )
    v.add_argument("--orth-weight", type=float, default=None, help="λ_orth at the start of training (default 1e-4)")
    ls = p.add_argument_group("lrsd (low-rank + sparse, fitted to layer responses on calibration data)")
    ls.add_argument("--s-step", default=None, help="grasp (default) | hard: the sparse-part update")
    ls.add_argument("--structured", default=None, help="none (default) | 2:4: NVIDIA 2:4 pattern for the sparse part")
    ls.add_argument("--lrsd-mode", dest="mode", default=None, help="asymmetric (default) | symmetric calibration")
    ls.add_argument(
        "--calibration-samples",
        type=_positive_int,
        default=None,
        help="calibration images (lrsd default 256; cc: gradient images, default 512)",
    )
    ls.add_argument("--split", default=None, help="search (default) | fixed: rank/cardinality split per layer")
    ls.add_argument(
        "--lrsd-parts", dest="parts", default=None, help="both (default, L + S) | lowrank (c = 0) | sparse (r = 0)"
    )
    v.add_argument("--stages", type=_positive_int, default=None, help="MUSCO multi-stage fine-tuning in N groups")
    j = p.add_argument_group("joint SVD (ljsvd | rjsvd1 | rjsvd2 | bijsvd | jsvd-tai)")
    j.add_argument("--rho", type=float, default=None, help="anchor rank rate ρ of the paper instead of --ratio (0.04)")
    j.add_argument("--bi-p", type=float, default=None, help="bijsvd: left proportion p = r_l/(r_l+r_r) (default 0.5)")
    j.add_argument("--bi-iters", type=_positive_int, default=None, help="bijsvd: alternating iterations K (default 30)")
    cc = p.add_argument_group(
        "cc (collaborative compression: input-channel pruning + SVD from gradient sensitivities)",
        "gradients come from --calibration-samples seeded training images of --data (none: weight-only scores); "
        "--round-to N rounds kept channels and ranks down to multiples of N (auto: no rounding, as the paper)",
    )
    cc.add_argument(
        "--cc-gamma", dest="gamma", type=float, default=None, help="weight γ of the remaining-space term (default 0.9)"
    )
    cc.add_argument(
        "--cc-mode",
        dest="cc_mode",
        choices=("both", "prune", "decompose"),
        default=None,
        help="both (default) | prune (pruning-only arm) | decompose (decomposition-only arm)",
    )
    cc.add_argument(
        "--cc-weighting", dest="weighting", default=None, help="slope (default: the code's equal slope) | lagrangian"
    )
    cc.add_argument(
        "--cc-curve-points",
        dest="curve_points",
        type=_nonneg_int,
        default=None,
        help="removal counts per sensitivity curve (default 32; 0 = every count, as the code)",
    )


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def _add_data_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        default=None,
        help="fashion-mnist (built in, Debian package dataset-fashion-mnist) or a folder: CIFAR-10/100 python "
        "batches, IDX files, or an ImageFolder tree with train/ and val/",
    )
    g.add_argument("--data-format", default=None, help="idx | cifar10 | cifar100 | imagefolder (default: detected)")
    g.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=None,
        help="evaluate on a fixed seeded subset of N test images (fast mode; default: the whole test split)",
    )
    g.add_argument(
        "--train-samples",
        type=_positive_int,
        default=None,
        help="train on a fixed seeded subset of N training images (smoke runs; default: all)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")


def _add_train_args(p: argparse.ArgumentParser, *, epochs: int, lr: float | None, prefix: str = "") -> None:
    """Training hyper-parameters; ``prefix`` namespaces them (``--finetune-lr``) inside ``run``."""
    g = p.add_argument_group(f"{prefix or 'training'} options".strip())
    dash = f"--{prefix}-" if prefix else "--"
    dest = f"{prefix}_" if prefix else ""
    g.add_argument(
        f"{dash}epochs", dest=f"{dest}epochs", type=_nonneg_int, default=epochs, help=f"epochs (default {epochs})"
    )
    g.add_argument(
        f"{dash}batch-size", dest=f"{dest}batch_size", type=_positive_int, default=128, help="global batch size"
    )
    g.add_argument(f"{dash}optimizer", dest=f"{dest}optimizer", default="sgd", choices=("sgd", "adamw"))
    g.add_argument(
        f"{dash}lr", dest=f"{dest}lr", type=float, default=lr, help="peak learning rate (SGD 0.1, AdamW 1e-3)"
    )
    g.add_argument(f"{dash}weight-decay", dest=f"{dest}weight_decay", type=float, default=5e-4, help="not on BN (5e-4)")
    g.add_argument(f"{dash}schedule", dest=f"{dest}schedule", default="cosine", choices=("cosine", "step", "constant"))
    g.add_argument(
        f"{dash}milestones",
        dest=f"{dest}milestones",
        type=float,
        nargs="*",
        default=(),
        help="epochs of the step schedule",
    )
    g.add_argument(f"{dash}warmup-epochs", dest=f"{dest}warmup_epochs", type=float, default=0.0)
    g.add_argument(f"{dash}label-smoothing", dest=f"{dest}label_smoothing", type=float, default=0.0)
    g.add_argument(
        f"{dash}kd-alpha",
        dest=f"{dest}kd_alpha",
        type=float,
        default=0.0,
        help="weight of distillation from the dense model (0 = off; needs a teacher: finetune and run only)",
    )
    g.add_argument(f"{dash}kd-temperature", dest=f"{dest}kd_temperature", type=float, default=4.0)
    g.add_argument(f"{dash}clip-grad", dest=f"{dest}clip_grad", type=float, default=None, help="max gradient norm")
    g.add_argument(
        f"{dash}max-steps", dest=f"{dest}max_steps", type=_positive_int, default=None, help="stop after N steps"
    )
    g.add_argument(f"{dash}workers", dest=f"{dest}workers", type=_nonneg_int, default=0, help="data-loading processes")
    g.add_argument(f"{dash}no-amp", dest=f"{dest}no_amp", action="store_true", help="no autocast on CUDA")
    g.add_argument(f"{dash}channels-last", dest=f"{dest}channels_last", action="store_true")


def _train_config(args: argparse.Namespace, prefix: str = "") -> Any:
    from compress.train import TrainConfig

    def get(name: str) -> Any:
        return getattr(args, f"{prefix}_{name}" if prefix else name)

    return TrainConfig(
        epochs=get("epochs"),
        batch_size=get("batch_size"),
        optimizer=get("optimizer"),
        lr=get("lr"),
        weight_decay=get("weight_decay"),
        schedule=get("schedule"),
        milestones=tuple(get("milestones") or ()),
        warmup_epochs=get("warmup_epochs"),
        label_smoothing=get("label_smoothing"),
        kd_alpha=get("kd_alpha"),
        kd_temperature=get("kd_temperature"),
        clip_grad=get("clip_grad"),
        max_steps=get("max_steps"),
        num_workers=get("workers"),
        amp=not get("no_amp"),
        channels_last=get("channels_last"),
        seed=args.seed,
        eval_samples=args.eval_samples,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model and write a run directory")
    _add_model_args(run)
    _add_method_args(run)
    run.add_argument("--run-dir", required=True, help="output folder, conventionally OUT/<model>/<method>")
    _add_data_args(run, required=False)
    run.add_argument(
        "--train-epochs",
        type=_nonneg_int,
        default=0,
        help="with --data: first train the dense model for N epochs (cached in --train-dir)",
    )
    run.add_argument("--train-dir", default=None, help="training folder (default: <run-dir>/../train-<data>)")
    run.add_argument("--finetune-epochs", type=_nonneg_int, default=0, help="with --data: fine-tune for N epochs")
    run.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning peak learning rate (0.01)")
    run.add_argument("--kd", action="store_true", help="fine-tune with distillation from the dense model")

    plan = sub.add_parser("plan", help="only write plan.json")
    _add_model_args(plan)
    _add_method_args(plan)
    plan.add_argument("--out", required=True, help="plan.json to write")

    apply = sub.add_parser("apply", help="apply an existing plan and write a run directory")
    _add_model_args(apply)
    apply.add_argument("--plan", required=True, help="plan.json to apply")
    apply.add_argument("--run-dir", required=True, help="output folder")

    show = sub.add_parser("show", help="print a plan as a table")
    show.add_argument("plan", help="plan.json")

    sub.add_parser("models", help="list model names")

    train = sub.add_parser("train", help="train a model on a dataset (torchrun for several processes)")
    _add_model_args(train)
    _add_data_args(train, required=True)
    _add_train_args(train, epochs=3, lr=None)
    train.set_defaults(weights="random")  # training starts from a fresh init unless --weights says otherwise
    train.add_argument("--out", required=True, help="training folder: checkpoint.pt, train_log.json, model.safetensors")
    train.add_argument("--restart", action="store_true", help="discard a checkpoint in --out instead of resuming")

    finetune = sub.add_parser("finetune", help="fine-tune a run directory's compressed model")
    finetune.add_argument("--run-dir", required=True, help="run directory written by `run`")
    finetune.add_argument("--seed", type=int, default=0)
    _add_data_args(finetune, required=True)
    _add_train_args(finetune, epochs=1, lr=0.01)
    finetune.add_argument(
        "--kd", action="store_true", help="distil from the run's dense model (default --kd-alpha 0.5)"
    )
    finetune.add_argument("--restart", action="store_true", help="discard an earlier fine-tuning checkpoint")

    ev = sub.add_parser("eval", help="accuracy on a dataset's test split")
    ev.add_argument("--model", default=None, help="model spec (with --weights), or use --run-dir")
    ev.add_argument("--weights", default="auto")
    ev.add_argument("--run-dir", default=None, help="evaluate a run directory's dense and compressed models")
    ev.add_argument("--seed", type=int, default=0)
    _add_data_args(ev, required=True)
    ev.add_argument("--batch-size", type=_positive_int, default=512)
    return parser


def _config(args: argparse.Namespace) -> Any:
    from compress.api import method_config

    rho = getattr(args, "rho", None)  # joint SVD: ρ replaces the default ratio
    flops = getattr(args, "flops", None)  # a FLOPs target replaces the default ratio for every method
    controls = [name for name, v in (("--ratio", args.ratio), ("--flops", flops), ("--rho", rho)) if v is not None]
    if len(controls) > 1:
        raise UserInputError(f"give one target, not {' and '.join(controls)} (RATIO=, FLOPS= or --rho)")
    default_ratio = rho is None and flops is None
    ratio = None if args.no_ratio or not default_ratio else (args.ratio or 4.0)
    rank_rule = args.rank_rule or ("evbmf" if ratio is None and default_ratio else None)
    # auto aligns every method to the CPU's blocking, cc included: unrounded kept-channel counts made a CC
    # ResNet-56 at −50 % FLOPs 0.79× of dense on ORT, multiples of 16 1.16× (README); --round-to 1 = the paper
    round_to = cpu_rank_multiple() if args.round_to == "auto" else args.round_to
    cc_mode = getattr(args, "cc_mode", None)
    cc_flags = [
        flag
        for flag, value in (
            ("--cc-gamma", args.gamma),
            ("--cc-mode", cc_mode),
            ("--cc-weighting", args.weighting),
            ("--cc-curve-points", args.curve_points),
        )
        if value is not None
    ]
    if cc_flags and args.method != "cc":
        raise UserInputError(f"{', '.join(cc_flags)} only apply to --method cc; drop them or use METHOD=cc")
    return method_config(
        args.method,
        ratio=ratio,
        rank_rule=rank_rule,
        energy=args.energy,
        omega=args.omega,
        round_to=round_to,
        min_rank=args.min_rank,
        hooi_iters=args.hooi_iters,
        exclude=tuple(args.exclude) if args.exclude else None,
        expansion=args.expansion,
        orthogonality=args.orthogonality,
        orth_weight=args.orth_weight,
        stages=args.stages,
        rho=rho,
        flops=flops,
        bi_p=args.bi_p,
        bi_iters=args.bi_iters,
        s_step=args.s_step,
        structured=args.structured,
        mode=args.mode,
        calibration_samples=args.calibration_samples,
        split=args.split,
        parts=args.parts,
        gamma=args.gamma,
        decompose=None if cc_mode is None else cc_mode != "prune",
        prune=None if cc_mode is None else cc_mode != "decompose",
        weighting=args.weighting,
        curve_points=args.curve_points,
    )


def cpu_rank_multiple() -> int:
    """Rank multiple that suits this CPU: 16 with AVX-512, else 8.

    ONNX Runtime's NCHWc conv kernels use 16-channel blocks with AVX-512 and 8 otherwise (MLAS ``MlasNchwcGetBlockSize``). 16 is also a multiple of 8, so it stays
    aligned for FP16 tensor cores. Measured here (ResNet-34, Tucker-2, RATIO=4, one ORT thread):
    multiples of 8 gave 3.12× at efficiency 0.84, multiples of 16 gave 3.33× at 0.96
    (benchmarks/results/resnet34_tucker2_sweep_t1.json).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def _prepare(
    args: argparse.Namespace, spec: str | None = None, weights: str | None = None, image_size: int | None = None
) -> Any:
    """``compress.workflow.prepare`` with the data options of ``args`` (model/weights/size overridable)."""
    from compress.workflow import prepare

    return prepare(
        spec or args.model,
        weights or args.weights,
        args.data,
        data_format=args.data_format,
        image_size=image_size if image_size is not None else getattr(args, "input_size", None),
        seed=args.seed,
        train_samples=getattr(args, "train_samples", None),
    )


def _train_meta(loaded: Any, dataset: Any) -> dict[str, Any]:
    """What identifies a training run of ``loaded`` on ``dataset`` (a changed value refuses the cached folder)."""
    return {
        "model_spec": loaded.spec,
        "weights": loaded.weights,
        "data": dataset.info.name,
        "train_samples": len(dataset.train),
    }


def _load(args: argparse.Namespace) -> tuple[Any, Any, float, Any]:
    """Model (shaped for ``--data`` when given), an example input, load seconds, and the dataset or None."""
    import torch

    from compress.models import load_model

    t0 = time.perf_counter()
    dataset = None
    if getattr(args, "data", None):
        prepared = _prepare(args)
        loaded, dataset = prepared.loaded, prepared.data
    else:
        loaded = load_model(
            args.model, args.weights, num_classes=args.num_classes, input_size=args.input_size, seed=args.seed
        )
    gen = torch.Generator().manual_seed(args.seed)
    example = torch.randn(1, *loaded.input_shape, generator=gen)
    return loaded, example, time.perf_counter() - t0, dataset


def _train_dense(args: argparse.Namespace, loaded: Any, dataset: Any, method_config: Any = None) -> dict[str, Any]:
    """``run --train-epochs N``: train the dense model first (cached in the training folder).

    A method with its own training stage (``vbmf-tucker2``: expand, orthogonal regularizer, collapse)
    trains that way, into a folder named after the recipe.
    """
    from compress.train import TrainConfig
    from compress.workflow import train_model

    recipe = method_config.dense_training() if hasattr(method_config, "dense_training") else None
    tag = recipe.tag() if recipe is not None else ""
    default = Path(args.run_dir).parent / f"train-{dataset.info.name}{tag}"
    folder = Path(args.train_dir) if args.train_dir else default
    config = TrainConfig(epochs=args.train_epochs, seed=args.seed, eval_samples=args.eval_samples)
    meta = _train_meta(loaded, dataset)
    how = "" if not tag else f" ({tag[1:]}: expanded/orthogonal training, collapsed afterwards)"
    print(f"training the dense {loaded.name} on {dataset.info.name} for {args.train_epochs} epochs into {folder}{how}")
    record: dict[str, Any] = {}
    if recipe is not None and not recipe.plain:
        from compress.vbmf_tucker import train_overparameterized

        record = train_overparameterized(loaded.model, dataset, config, folder, recipe, meta=meta, device=args.device)
        wall, resumed = record["wall_s"], None
    else:
        result = train_model(loaded.model, dataset, config, folder, meta=meta, device=args.device)
        wall, resumed = result.wall_s, result.resumed_from_epoch
    loaded.model.cpu().eval()
    loaded.weights = f"trained:{folder / 'model.safetensors'}"
    loaded.warning = None
    out = {"dir": str(folder), "epochs": args.train_epochs, "wall_s": wall, "resumed_from_epoch": resumed}
    if record:
        out["overparameterized"] = record
    return out


def _run(args: argparse.Namespace, plan_path: str | None = None) -> int:
    import torch

    from compress.api import apply_plan_, plan_compression
    from compress.artifacts import save_run
    from compress.metrics import count_macs, count_params, output_agreement
    from compress.plan import Plan
    from lowrank_deploy.io import ensure_writable_dir

    ensure_writable_dir(args.run_dir)
    config = _config(args) if plan_path is None else None
    loaded, example, t_load, dataset = _load(args)
    trained = _train_dense(args, loaded, dataset, config) if dataset is not None and args.train_epochs else None
    dense = loaded.model
    compressed = copy.deepcopy(dense)
    t0 = time.perf_counter()
    plan = None if plan_path is None else Plan.load(plan_path)
    method = config.method if plan is None else plan.method
    if method == "lrsd":  # the solve needs calibration statistics: plan, calibrate and apply in one call
        plan = _lrsd(args, compressed, config, example, loaded.name, dataset, plan)
        t_plan, t_apply = time.perf_counter() - t0, 0.0
    elif method == "cc":  # the sensitivities need labelled calibration data: plan and apply in one call
        plan = _cc(args, compressed, config, example, loaded.name, dataset, plan)
        t_plan, t_apply = time.perf_counter() - t0, 0.0
    else:
        if plan is None:
            plan = plan_compression(dense, config, example, model_name=loaded.name)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_plan_(compressed, plan)
        t_apply = time.perf_counter() - t0
    compressed.eval()

    dense_params, comp_params = count_params(dense), count_params(compressed)
    dense_macs, comp_macs = (
        plan.totals.get("macs_before") or count_macs(dense, example),
        count_macs(compressed, example),
    )
    plan.totals.update(params_after_measured=comp_params, macs_after_measured=comp_macs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = torch.randn(8, *loaded.input_shape, generator=gen)
    agreement = output_agreement(dense, compressed, batch)
    info = {
        "model": loaded.name,
        "model_spec": loaded.spec,
        "method": plan.method,
        "weights": loaded.weights,
        "weights_requested": loaded.weights_requested,
        "weights_warning": loaded.warning,
        "input_shape": [args.batch, *loaded.input_shape],
        "num_classes": loaded.num_classes,
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
        "wall_s": {"load": t_load, "plan": t_plan, "apply": t_apply, "compress": t_plan + t_apply},
        "warnings": plan.warnings,
    }
    if "params_after_with_index" in plan.totals:  # sparse parts: what each storage convention costs
        totals = plan.totals
        info["sparse_storage"] = {
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
    if trained is not None:
        info["dense_training"] = trained
    if dataset is not None:
        info["accuracy"] = _accuracy_before_finetune(args, dataset, dense, compressed)
    save_run(args.run_dir, info=info, plan=plan, dense=dense, compressed=compressed)
    print(_summary(plan, info))
    print(f"wrote {Path(args.run_dir)}/{{plan.json, compress.json, dense.safetensors, model.safetensors}}")
    if dataset is not None and args.finetune_epochs:
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
        print(_accuracy_line(accuracy))
    return 0


def _lrsd(args: argparse.Namespace, model: Any, config: Any, example: Any, name: str, dataset: Any, plan: Any) -> Any:
    """LRSD: calibration batches from the training split (or the weight-only fallback), then solve in place."""
    import torch

    from compress.lowrank_sparse import LowRankSparseConfig, calibration_batches, lrsd_compress_

    if plan is not None:
        config = LowRankSparseConfig.from_dict(plan.config)
    batches = None
    if dataset is not None:
        batches = calibration_batches(dataset.train, config.calibration_samples, 64, seed=args.seed)
        print(f"lrsd: calibrating on {config.calibration_samples} seeded training images of {dataset.info.name}")
    # The solver is thousands of small float64 products: one thread is faster than several (and much
    # faster on a shared machine, where idle OpenMP workers spin); restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lrsd_compress_(model, config, example, batches, model_name=name, plan=plan)
    finally:
        torch.set_num_threads(threads)


def _cc(args: argparse.Namespace, model: Any, config: Any, example: Any, name: str, dataset: Any, plan: Any) -> Any:
    """CC: gradients on seeded labelled training images (or the weight-only fallback), then plan and apply in place."""
    from compress.api import apply_plan_
    from compress.collaborative import cc_compress_, gradient_batches

    if plan is not None:  # a saved plan fixes every decision: rebuild it from the model's weights
        apply_plan_(model, plan)
        return plan
    batches = None
    if dataset is not None:
        n = min(config.calibration_samples, len(dataset.train))
        batches = gradient_batches(dataset.train, n, seed=config.seed)
        print(f"cc: gradient statistics on {n} seeded training images of {dataset.info.name}")
    return cc_compress_(model, config, example, batches, model_name=name)


def _accuracy_before_finetune(args: argparse.Namespace, dataset: Any, dense: Any, compressed: Any) -> dict[str, Any]:
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
    print(_accuracy_line(accuracy))
    return accuracy


def _accuracy_line(accuracy: dict[str, Any]) -> str:
    parts = []
    for key in ("dense", "raw", "finetuned"):
        acc = accuracy.get(key)
        if acc:
            parts.append(f"{key} {100 * acc['top1']:.2f}%")
    n = (accuracy.get("dense") or {}).get("n")
    return f"accuracy on {accuracy['data']['name']} (n={n}): " + ", ".join(parts)


def _summary(plan: Any, info: dict[str, Any]) -> str:
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
    prepared = _prepare(args)
    loaded, dataset = prepared.loaded, prepared.data
    if loaded.warning and args.weights not in ("auto", "random"):
        print(f"WARNING: {loaded.warning}", file=sys.stderr)
    out = Path(args.out)
    if args.restart and out.exists():
        for name in ("checkpoint.pt", "train_log.json", "train.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "finetune", ignore_errors=True)
    config = _train_config(args)
    meta = _train_meta(loaded, dataset)
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
    prepared = _prepare(args, run.info["model_spec"], "random", image_size=int(run.info["input_shape"][-1]))
    if tuple(prepared.loaded.input_shape) != tuple(run.input_shape[1:]):
        raise UserInputError(
            f"{args.data} gives inputs {list(prepared.loaded.input_shape)} but the run was compressed for "
            f"{list(run.input_shape[1:])}; use the dataset the model was trained on"
        )
    if args.restart:
        shutil.rmtree(Path(args.run_dir) / FINETUNE_DIR, ignore_errors=True)
    config = _train_config(args)
    if args.kd and not config.kd_alpha:
        import dataclasses

        config = dataclasses.replace(config, kd_alpha=0.5)
    accuracy = finetune_run(args.run_dir, prepared.data, config, device=args.device, kd=config.kd_alpha > 0)
    print(_accuracy_line(accuracy))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from compress.train import TrainConfig
    from compress.workflow import evaluate_model

    config = TrainConfig(eval_samples=args.eval_samples, eval_batch_size=args.batch_size)
    if args.run_dir:
        from compress.artifacts import load_run

        run = load_run(args.run_dir)
        dataset = _prepare(args, run.info["model_spec"], "random", image_size=int(run.info["input_shape"][-1])).data
        for name, model in (("dense", run.dense), ("compressed", run.compressed)):
            print(f"{name}: {evaluate_model(model, dataset, config, args.device)}")
        return 0
    if not args.model:
        raise UserInputError("eval needs --model (with --weights) or --run-dir")
    prepared = _prepare(args)
    print(f"{prepared.loaded.name}: {evaluate_model(prepared.loaded.model, prepared.data, config, args.device)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "models":
        from compress.models import list_models

        print("\n".join(list_models()))
        return 0
    if args.command == "show":
        return _show(args.plan)
    if args.command == "train":
        return _train(args)
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plan":
        from compress.api import plan_compression

        config = _config(args)
        loaded, example, _, _ = _load(args)
        plan = plan_compression(loaded.model, config, example, model_name=loaded.name)
        plan.save(args.out)
        print(
            f"wrote {args.out}: {len(plan.factorized_layers)} layers factorized, ratio ×{plan.target['achieved_ratio']:.2f}"
        )
        return 0
    if args.command == "apply":
        if not Path(args.plan).is_file():
            raise UserInputError(f"plan {args.plan!r} does not exist; write one with `{PROG} plan`")
        return _run(args, plan_path=args.plan)
    return _run(args)


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
