"""``python -m compress``: plan and apply compression, write a run directory.

Subcommands:
    run     load a model, plan, apply, measure, and write OUT/<model>/<method>/ (plan, weights, compress.json)
    plan    only make plan.json (inspect or edit it, then ``apply``)
    apply   apply an existing plan.json to a fresh base model and write a run directory
    show    print a plan as a per-layer table
    models  list the torchvision model names MODEL accepts
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

from compress._cli import ArgumentParser, run_main
from compress.errors import UserInputError

PROG = "python -m compress"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"RATIO must be a number > 1, got {text!r}") from None
    if not value > 1.0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"RATIO must be a number > 1 (parameter compression factor), got {text!r}")
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
    g.add_argument("--method", default="tucker2", help="tucker2 | svd | tai | cp (decomposition of k×k convs)")
    g.add_argument("--ratio", type=_ratio, default=None, help="whole-model parameter compression factor (default 4)")
    g.add_argument("--rank-rule", default=None, help="uniform (default) | evbmf | energy")
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


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model and write a run directory")
    _add_model_args(run)
    _add_method_args(run)
    run.add_argument("--run-dir", required=True, help="output folder, conventionally OUT/<model>/<method>")

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

    sub.add_parser("models", help="list torchvision model names")
    return parser


def _config(args: argparse.Namespace) -> Any:
    from compress.api import method_config

    ratio = None if args.no_ratio else (args.ratio if args.ratio is not None else 4.0)
    rank_rule = args.rank_rule or ("evbmf" if ratio is None else None)
    round_to = cpu_rank_multiple() if args.round_to == "auto" else args.round_to
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


def _load(args: argparse.Namespace):
    import torch

    from compress.models import load_model

    t0 = time.perf_counter()
    loaded = load_model(
        args.model, args.weights, num_classes=args.num_classes, input_size=args.input_size, seed=args.seed
    )
    gen = torch.Generator().manual_seed(args.seed)
    example = torch.randn(1, *loaded.input_shape, generator=gen)
    return loaded, example, time.perf_counter() - t0


def _run(args: argparse.Namespace, plan_path: str | None = None) -> int:
    import torch

    from compress._io import ensure_writable_dir
    from compress.api import apply_plan_, plan_compression
    from compress.artifacts import save_run
    from compress.metrics import count_macs, count_params, output_agreement
    from compress.plan import Plan

    ensure_writable_dir(args.run_dir)
    config = _config(args) if plan_path is None else None
    loaded, example, t_load = _load(args)
    dense = loaded.model
    compressed = copy.deepcopy(dense)
    t0 = time.perf_counter()
    if plan_path is None:
        plan = plan_compression(dense, config, example, model_name=loaded.name)
    else:
        plan = Plan.load(plan_path)
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
        "ratios": {"params": dense_params / comp_params, "macs": dense_macs / comp_macs},
        "target": plan.target,
        "layers": {
            "factorized": len(plan.factorized_layers),
            "kept": len(plan.layers) - len(plan.factorized_layers),
        },
        "agreement": agreement.to_dict(),
        "wall_s": {"load": t_load, "plan": t_plan, "apply": t_apply, "compress": t_plan + t_apply},
        "warnings": plan.warnings,
    }
    save_run(args.run_dir, info=info, plan=plan, dense=dense, compressed=compressed)
    print(_summary(plan, info))
    print(f"wrote {Path(args.run_dir)}/{{plan.json, compress.json, dense.safetensors, model.safetensors}}")
    return 0


def _summary(plan: Any, info: dict[str, Any]) -> str:
    lines = [
        f"{info['model']} / {info['method']}: params {info['dense']['params']:,} → {info['compressed']['params']:,} "
        f"(×{info['ratios']['params']:.2f}), MACs {info['dense']['macs'] / 1e9:.2f}G → "
        f"{info['compressed']['macs'] / 1e9:.2f}G (×{info['ratios']['macs']:.2f}); "
        f"{info['layers']['factorized']} layers factorized, {info['layers']['kept']} kept; "
        f"compression {info['wall_s']['compress']:.2f} s",
        f"agreement on 8 random inputs: rel L2 {info['agreement']['rel_l2']:.3g}, "
        f"top-1 agreement {info['agreement']['top1_agreement']:.2f}",
    ]
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "models":
        from compress.models import list_models

        print("\n".join(list_models()))
        return 0
    if args.command == "show":
        return _show(args.plan)
    if args.command == "plan":
        from compress.api import plan_compression

        config = _config(args)
        loaded, example, _ = _load(args)
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
