"""Issue 7's claim on real data: collaborative compression (pruning + SVD together) vs either alone vs Tucker-2.

Li et al. (CVPR 2021) claim that compressing each conv with input-channel pruning and SVD *together*,
budgets allocated from gradient sensitivities, keeps more accuracy at a FLOPs target than either kind of
unit alone (ResNet-50 ImageNet: −52.9 % FLOPs for −0.56 % top-1). This script repeats the comparison at
small scale on Fashion-MNIST with a CIFAR ResNet-56 (He et al., projection shortcuts):

1. train the dense net once (cached, resumable);
2. for each FLOPs-reduction target (the fraction of the whole model's MACs removed, measured on the
   compressed model's own forward = the exported graph) and each arm — ``CC`` (both units),
   ``pruning-only`` and ``decomposition-only`` (the same sensitivity machinery with one kind of unit),
   ``Tucker-2`` (uniform per-layer ratio, knob bisected to the same FLOPs) — compress a copy (CC: gradients
   on a seeded calibration sample), measure raw accuracy, fine-tune with one shared budget, measure again;
3. paired comparison on the same 10,000 test images (exact McNemar) of CC vs each other arm;
4. params, MACs, exported op counts (Gather = residual-stream channel selection), ORT CPU latency side by
   side in one interleaved run.

Usage (≈ 60 min on 2 idle CPU cores with the defaults; the dense training is cached):
    python -m benchmarks.cc_claims
    python -m benchmarks.cc_claims --render benchmarks/results/cc_claims.json   # tables only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.accuracy_harness import (
    ci_text,
    compress_and_finetune,
    dense_baseline,
    environment,
    mcnemar,
    ort_latency,
    pct,
    predictions,
    speedup_text,
    write_results,
)
from compress.api import compress_, method_config
from compress.methods.base import CalibrationLoader
from compress.methods.cc import CollaborativeConfig
from compress.metrics import count_macs, count_params
from compress.train import TrainConfig

ARMS = ["CC", "pruning-only", "decomposition-only", "Tucker-2"]


def _op_counts(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    from export import onnx_from_torch, optimize
    from export.onnx import graph_summary

    return graph_summary(optimize(onnx_from_torch(model.eval(), torch.zeros(input_shape))))["node_counts"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1–4 (see the module docstring)."""
    baseline = dense_baseline(
        args.model,
        args.data,
        epochs=args.epochs,
        seed=args.seed,
        train_samples=args.train_samples,
        cache_root=args.cache,
    )
    prepared, dense, data, input_shape = baseline.prepared, baseline.model, baseline.data, baseline.input_shape
    example = torch.zeros(input_shape)
    train_cfg, training, dense_acc = baseline.train_config, baseline.training, baseline.accuracy
    # the first calibration_samples images of the seeded calibration order, in batches of 128 (CC re-batches)
    batches = CalibrationLoader(data.train, seed=args.seed, batch_size=128)
    dense_params, dense_macs = count_params(dense), count_macs(dense, example)
    rows: dict[str, Any] = {
        "dense": {
            "params": dense_params,
            "macs": dense_macs,
            "accuracy": dense_acc.to_dict(),
            "train_wall_s": training["train_wall_s"],
            "ops": _op_counts(dense, input_shape),
        }
    }
    models: dict[str, nn.Module] = {"dense": dense}
    hits = {"dense": predictions(dense, data.test)}
    finetune = TrainConfig(
        epochs=args.finetune_epochs, lr=args.finetune_lr, warmup_epochs=0, clip_grad=1.0, seed=args.seed
    )
    for flops in args.flops:
        for arm in args.arms:
            key = f"{arm}-f{flops:g}"
            box: list[Any] = []
            apply = _arm_applier(arm, flops, args, example, batches, prepared.loaded.name, box)
            print(f"[{key}] compress + fine-tune …", file=sys.stderr)
            model, record = compress_and_finetune(dense, apply, data, finetune, example)
            plan = box[0]
            record.pop("plan", None)
            actions: dict[str, int] = {}
            for e in plan.layers:
                actions[e.action] = actions.get(e.action, 0) + 1
            record.update(
                arm=arm,
                flops_target=flops,
                flops_reduction=1.0 - record["macs"] / dense_macs,
                params_reduction=1.0 - record["params"] / dense_params,
                actions=actions,
                ops=_op_counts(model, input_shape),
                target={k: v for k, v in plan.target.items() if not isinstance(v, (list, dict))},
                warnings=plan.warnings,
            )
            rows[key] = record
            models[key] = model
            hits[key] = predictions(model, data.test)
            print(
                f"[{key}] FLOPs −{100 * record['flops_reduction']:.1f}%, params −{100 * record['params_reduction']:.1f}%, "
                f"raw {100 * record['raw']['top1']:.2f}% → {100 * record['finetuned']['top1']:.2f}% "
                f"(compress {record['compress_s']:.0f} s, fine-tune {record['finetune_s']:.0f} s)",
                file=sys.stderr,
            )
    paired = _paired(args, hits)
    if args.latency_s > 0:
        print("ORT latency, all models interleaved …", file=sys.stderr)
        latency = ort_latency(models, input_shape, duration_s=args.latency_s * len(models), threads=args.threads)
        for key, row in latency.items():
            rows[key]["ort"] = row
    return {
        "model": prepared.loaded.name,
        "data": data.info.to_dict(),
        "train_samples": len(data.train),
        "calibration_samples": args.calibration_samples,
        "dense_training": train_cfg.to_dict(),
        "finetune": finetune.to_dict(),
        "rows": rows,
        "paired_after_finetune": paired,
    }


def _arm_applier(
    arm: str, flops: float, args: argparse.Namespace, example: torch.Tensor, batches: Any, name: str, box: list[Any]
) -> Callable[[nn.Module], Any]:
    """The compress step of one arm at one FLOPs target; each plan it makes is appended to ``box``."""
    if arm == "Tucker-2":
        config: Any = method_config("tucker2", ratio=None, flops=flops, round_to=1, min_rank=1, compress_linear=False)

        def apply(m: nn.Module) -> Any:
            box.append(compress_(m, config, example, model_name=name))
            return box[-1]

        return apply
    config = CollaborativeConfig(
        flops=flops,
        prune=arm != "decomposition-only",
        decompose=arm != "pruning-only",
        calibration_samples=args.calibration_samples,
        seed=args.seed,
    )

    def apply_cc(m: nn.Module) -> Any:
        box.append(compress_(m, config, example, data=batches, model_name=name))
        return box[-1]

    return apply_cc


def _paired(args: argparse.Namespace, hits: dict[str, Any]) -> dict[str, Any]:
    """McNemar's test of CC against every other arm at each FLOPs target (after fine-tuning)."""
    paired = {}
    for flops in args.flops:
        base = f"CC-f{flops:g}"
        for arm in args.arms:
            other = f"{arm}-f{flops:g}"
            if arm != "CC" and base in hits and other in hits:
                paired[f"{base} vs {other}"] = mcnemar(hits[base], hits[other])
    return paired


def render_markdown(result: dict[str, Any]) -> str:
    """The README tables of a result file."""
    r = result["cc"]
    d = r["rows"]["dense"]
    lines = [
        f"Dense {r['model']}: {d['params'] / 1e6:.3f} M params, {d['macs'] / 1e6:.1f} M MACs, top-1 "
        f"{pct(d['accuracy'])} {ci_text(d['accuracy'])}; CC gradients on {r['calibration_samples']} training images; "
        f"every arm fine-tuned {r['finetune']['epochs']} epoch(s) (SGD lr {r['finetune']['lr']}, clip 1.0).",
        "",
        "| FLOPs target | arm | FLOPs removed | params removed | Gathers | raw | fine-tuned (95 % CI) | ORT speedup (95 % CI) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in r["rows"].items():
        if key == "dense":
            continue
        lines.append(
            f"| −{100 * row['flops_target']:.0f} % | {row['arm']} | {100 * row['flops_reduction']:.1f} % | "
            f"{100 * row['params_reduction']:.1f} % | {row['ops'].get('Gather', 0)} | {pct(row['raw'])} | "
            f"**{pct(row['finetuned'])}** {ci_text(row['finetuned'])} | {speedup_text(row.get('ort'))} |"
        )
    if r.get("paired_after_finetune"):
        lines += ["", "| paired test after fine-tuning | only first right | only second right | McNemar p |"]
        lines.append("|---|---:|---:|---:|")
        for name, t in r["paired_after_finetune"].items():
            lines.append(f"| {name} | {t['only_first_right']} | {t['only_second_right']} | {t['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-samples", type=int, default=None, help="seeded training subset (default: all 60,000)")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.7], help="FLOPs-reduction targets")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--latency-s", type=float, default=3.0, help="seconds of ORT timing per model (0 = skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cc_claims.json"))
    p.add_argument("--render", type=Path, default=None, help="only print the Markdown tables of a result file")
    args = p.parse_args(argv)
    if args.render is not None:
        print(render_markdown(json.loads(args.render.read_text())))
        return 0
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "cc_claims",
        "command": " ".join(["python", "-m", "benchmarks.cc_claims", *(argv if argv is not None else sys.argv[1:])]),
        "cc": run(args),
        "environment": environment(args.threads),
    }
    result["wall_s"] = time.perf_counter() - t0
    write_results(args.out, result, render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
