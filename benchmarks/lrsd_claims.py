"""Issue 6's claim on real data: low-rank + sparse (L+S) vs low-rank only vs sparse only at equal budget.

Yu et al. (CVPR 2017) claim that approximating each layer by a low-rank plus a sparse part, fitted to the
layer's responses on a few calibration images, keeps more accuracy than either part alone at the same
number of stored values, and needs less retraining (VGG-16 15× smaller with no top-5 loss). This script
repeats the comparison at small scale on Fashion-MNIST, for a CIFAR-style ResNet-18 and a VGG-style net
with an FC-heavy head (``cifar_vgg11``):

1. train each dense net once (cached, resumable);
2. for each parameter ratio (stored values, index not charged — the paper's convention) and each arm —
   ``L+S`` (rank/cardinality split searched per layer on the calibration objective, GraSP S-step,
   asymmetric statistics), ``L`` (c = 0: the whole budget buys rank), ``S`` (r = 0: data-aware pruning),
   ``L+S 2:4`` (S constrained to NVIDIA's 2:4 pattern) — solve on the same seeded calibration sample,
   measure raw accuracy, fine-tune briefly (same steps for every arm; S keeps its support), measure again;
3. paired comparison on the same test images (exact McNemar) of L+S vs each other arm;
4. the honest cost columns: stored values, values + CSR index, the exported graph's executed MACs (the
   sparse branch runs as a dense conv), the MACs a sparse kernel / 2:4 tensor cores would execute,
   ONNX size dense and with sparse initializers, ORT CPU latency side by side.

Usage (≈ 45–60 min on 2 idle CPU cores with the defaults; dense trainings are cached):
    python -m benchmarks.lrsd_claims
    python -m benchmarks.lrsd_claims --render benchmarks/results/lrsd_claims.json   # tables only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
from compress.api import compress_
from compress.methods.base import CalibrationLoader
from compress.methods.lrsd import LowRankSparseConfig
from compress.metrics import count_macs, count_params
from compress.train import TrainConfig

ARMS: dict[str, dict[str, Any]] = {
    "L+S": {"parts": "both"},
    "L": {"parts": "lowrank"},
    "S": {"parts": "sparse"},
    "L+S 2:4": {"parts": "both", "structured": "2:4"},
}


def sparse_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of the optimized ONNX file, dense and with mostly-zero weights as sparse initializers."""
    from export import onnx_from_torch, optimize
    from export.sparse import sparsify_initializers

    proto = optimize(onnx_from_torch(model.eval(), torch.zeros(input_shape)))
    sparse = sparsify_initializers(proto)
    return {"dense_file": proto.ByteSize(), "sparse_file": sparse.ByteSize()}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1–4 for one model."""
    baseline = dense_baseline(
        name,
        args.data,
        epochs=args.epochs,
        seed=args.seed,
        train_samples=args.train_samples,
        cache_root=args.cache,
        label=f"[{name}] ",
    )
    prepared, dense, data, input_shape = baseline.prepared, baseline.model, baseline.data, baseline.input_shape
    example = torch.zeros(input_shape)
    train_cfg, training, dense_acc = baseline.train_config, baseline.training, baseline.accuracy
    batches = CalibrationLoader(data.train, seed=args.seed)  # LRSD takes calibration_samples images, batches of 64
    dense_params = count_params(dense)
    rows: dict[str, Any] = {
        "dense": {
            "params": dense_params,
            "macs": count_macs(dense, example),
            "accuracy": dense_acc.to_dict(),
            "train_wall_s": training["train_wall_s"],
            **sparse_onnx_bytes(dense, input_shape),
        }
    }
    models: dict[str, nn.Module] = {"dense": dense}
    hits = {"dense": predictions(dense, data.test)}
    finetune = TrainConfig(
        epochs=1, lr=args.finetune_lr, warmup_epochs=0, max_steps=args.finetune_steps, seed=args.seed
    )
    for ratio in args.ratios:
        for arm in args.arms:
            key = f"{arm}-x{ratio:g}"
            config = LowRankSparseConfig(ratio=ratio, calibration_samples=args.calibration_samples, **ARMS[arm])
            box: list[Any] = []

            def apply(m: nn.Module, config: LowRankSparseConfig = config, box: list[Any] = box) -> Any:
                # the method solves on one thread (thousands of small float64 products) and restores the setting
                plan = compress_(m, config, example, data=batches, model_name=prepared.loaded.name)
                box.append(plan)
                return plan

            print(f"[{name} {key}] solve + fine-tune …", file=sys.stderr)
            model, record = compress_and_finetune(dense, apply, data, finetune, example)
            plan = box[0]
            record.pop("plan", None)
            totals = plan.totals
            fact = plan.factorized_layers
            record.update(
                arm=arm,
                ratio_target=ratio,
                ratio_values=dense_params / totals["params_after"],
                ratio_with_index=dense_params / totals["params_after_with_index"],
                params_values=totals["params_after"],
                params_with_index=totals["params_after_with_index"],
                params_dense_storage=totals["params_after_dense_storage"],
                macs_executed=totals["macs_after"],
                macs_sparse_kernel=totals["macs_after_sparse_kernel"],
                macs_2to4=totals.get("macs_after_2to4"),
                ranks={e.path: e.ranks[0] for e in fact},
                cardinalities={e.path: e.info["cardinality"] for e in fact},
                response_error_mean=sum(e.info["response_error"] for e in fact) / max(len(fact), 1),
                calibration=plan.target.get("calibration"),
                warnings=plan.warnings,
                **sparse_onnx_bytes(model, input_shape),
            )
            rows[key] = record
            models[key] = model
            hits[key] = predictions(model, data.test)
            print(
                f"[{name} {key}] values ×{record['ratio_values']:.2f} (with index ×{record['ratio_with_index']:.2f}), "
                f"raw {100 * record['raw']['top1']:.2f}% → {100 * record['finetuned']['top1']:.2f}% "
                f"(solve {record['compress_s']:.0f} s, fine-tune {record['finetune_s']:.0f} s)",
                file=sys.stderr,
            )
    paired = {}
    for ratio in args.ratios:  # predictions are taken after fine-tuning (raw accuracy is in the rows)
        base = f"L+S-x{ratio:g}"
        for arm in args.arms:
            other = f"{arm}-x{ratio:g}"
            if arm != "L+S" and base in hits and other in hits:
                paired[f"{base} vs {other}"] = mcnemar(hits[base], hits[other])
    if args.latency_s > 0:
        print(f"[{name}] ORT latency, all models interleaved …", file=sys.stderr)
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


def render_markdown(result: dict[str, Any]) -> str:
    """The README tables of a result file."""
    lines: list[str] = []
    for block in result["models"]:
        rows = block["rows"]
        d = rows["dense"]
        lines += [
            f"**{block['model']}** — dense {d['params'] / 1e6:.3f} M params, {d['macs'] / 1e6:.1f} M MACs, top-1 "
            f"{pct(d['accuracy'])} {ci_text(d['accuracy'])}; calibration {block['calibration_samples']} training "
            f"images; fine-tuning {block['finetune']['max_steps']} steps of {block['finetune']['batch_size']} for every arm.",
            "",
            "| target | arm | ×values | ×values+index | MACs run by the ONNX graph | MACs, sparse kernel | ONNX KB (sparse init.) | raw | fine-tuned (95 % CI) | ORT speedup |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, row in rows.items():
            if key == "dense":
                continue
            kernel = row["macs_2to4"] if row["arm"].endswith("2:4") else row["macs_sparse_kernel"]
            lines.append(
                f"| ×{row['ratio_target']:g} | {row['arm']} | {row['ratio_values']:.2f} | {row['ratio_with_index']:.2f} | "
                f"{row['macs_executed'] / 1e6:.1f} M ({row['macs_executed'] / d['macs']:.2f}×) | "
                f"{kernel / 1e6:.1f} M{' (2:4)' if row['arm'].endswith('2:4') else ''} | "
                f"{row['dense_file'] / 1024:.0f} ({row['sparse_file'] / 1024:.0f}) | {pct(row['raw'])} | "
                f"**{pct(row['finetuned'])}** {ci_text(row['finetuned'])} | {speedup_text(row.get('ort'))} |"
            )
        if block.get("paired_after_finetune"):
            lines += ["", "| paired test after fine-tuning | only first right | only second right | McNemar p |"]
            lines.append("|---|---:|---:|---:|")
            for name, t in block["paired_after_finetune"].items():
                lines.append(f"| {name} | {t['only_first_right']} | {t['only_second_right']} | {t['p_value']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar_resnet18_w0.25", "cifar_vgg11_w0.25"])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-samples", type=int, default=None, help="seeded training subset (default: all 60,000)")
    p.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    p.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0], help="whole-model ratios of stored values")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps of batch 128 for every arm")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--latency-s", type=float, default=3.0, help="seconds of ORT timing per model (0 = skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lrsd_claims.json"))
    p.add_argument("--render", type=Path, default=None, help="only print the Markdown tables of a result file")
    args = p.parse_args(argv)
    if args.render is not None:
        print(render_markdown(json.loads(args.render.read_text())))
        return 0
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "lrsd_claims",
        "command": " ".join(["python", "-m", "benchmarks.lrsd_claims", *(argv if argv is not None else sys.argv[1:])]),
        "models": [run_model(name, args) for name in args.models],
        "environment": environment(args.threads),
    }
    result["wall_s"] = time.perf_counter() - t0
    write_results(args.out, result, render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
