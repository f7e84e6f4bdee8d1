"""Reference result on real data: a CIFAR-style ResNet on Fashion-MNIST, Tucker-2 at params ratio 4 and 10.

Trains the dense model (cached and resumable in ``--cache``), then for each ratio: Tucker-2 (uniform rank
rule bisected to the ratio), raw accuracy, a short fine-tune (the same budget for every ratio), accuracy
again, params, MACs, wall times; finally the ONNX Runtime CPU latency of all models side by side. This
is the baseline every later method is compared with.

Usage (≈ 12 min on 2 CPU cores):
    python -m benchmarks.fmnist_reference --model cifar_resnet18_w0.25 --epochs 3 --ratios 4 10 \
        --finetune-epochs 1 --out benchmarks/results/fmnist_reference.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy_harness import compress_and_finetune, ort_latency, trained_dense
from compress.api import compress_, method_config
from compress.metrics import count_macs, count_params
from compress.train import TrainConfig, evaluate
from compress.workflow import prepare
from lowrank_core.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet18_w0.25")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--ratios", type=float, nargs="+", default=[4.0, 10.0])
    p.add_argument("--method", default="tucker2")
    p.add_argument("--round-to", type=int, default=4)
    p.add_argument("--min-rank", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--eval-samples", type=int, default=None, help="default: the whole test split")
    p.add_argument("--latency-s", type=float, default=20.0, help="seconds of interleaved ORT timing (0 = skip)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency column")
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    prepared = prepare(args.model, "random", args.data, seed=args.seed)
    dense, data = prepared.loaded.model, prepared.data
    example = torch.zeros(1, *prepared.loaded.input_shape)
    train_cfg = TrainConfig(epochs=args.epochs, seed=args.seed, eval_samples=args.eval_samples)
    cache = args.cache / prepared.loaded.name / f"train-{data.info.name}-e{args.epochs}-s{args.seed}"
    meta = {"model_spec": prepared.loaded.spec, "data": data.info.name, "weights": "random-init"}
    print(f"dense training ({args.epochs} epochs, cached in {cache}) …", file=sys.stderr)
    training = trained_dense(dense, data, train_cfg, cache, meta=meta)
    dense_acc = evaluate(dense, data.test, max_samples=args.eval_samples)
    print(f"dense: {dense_acc} (train {training['train_wall_s']:.0f} s)", file=sys.stderr)

    rows: dict[str, Any] = {
        "dense": {
            "params": count_params(dense),
            "macs": count_macs(dense, example),
            "accuracy": dense_acc.to_dict(),
            "train_wall_s": training["train_wall_s"],
            "train_history": training["history"],
        }
    }
    models = {"dense": dense}
    finetune = TrainConfig(
        epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed, eval_samples=args.eval_samples
    )
    for ratio in args.ratios:
        name = f"{args.method}-x{ratio:g}"
        config = method_config(args.method, ratio=ratio, round_to=args.round_to, min_rank=args.min_rank)

        def apply(model: torch.nn.Module, config: Any = config) -> Any:
            return compress_(model, config, example, model_name=prepared.loaded.name)

        model, record = compress_and_finetune(dense, apply, data, finetune, example, eval_samples=args.eval_samples)
        record["param_ratio"] = rows["dense"]["params"] / record["params"]
        record["mac_ratio"] = rows["dense"]["macs"] / record["macs"]
        rows[name] = record
        models[name] = model
        print(
            f"{name}: params ×{record['param_ratio']:.2f}, MACs ×{record['mac_ratio']:.2f}, raw "
            f"{100 * record['raw']['top1']:.2f}% → fine-tuned {100 * record['finetuned']['top1']:.2f}% "
            f"({record['finetune_s']:.0f} s)",
            file=sys.stderr,
        )
    if args.latency_s > 0:
        latency = ort_latency(
            models, (1, *prepared.loaded.input_shape), duration_s=args.latency_s, threads=args.threads
        )
        for name, row in latency.items():
            rows[name]["ort"] = row
    record = {
        "what": "dense / raw / fine-tuned accuracy of Tucker-2 on real data (the baseline for every method)",
        "model": prepared.loaded.name,
        "data": data.info.to_dict(),
        "method": args.method,
        "rank_rule": "uniform per-layer ratio bisected to the whole-model params ratio",
        "round_to": args.round_to,
        "min_rank": args.min_rank,
        "dense_training": train_cfg.to_dict(),
        "finetune": finetune.to_dict(),
        "eval_samples": args.eval_samples or data.info.test_size,
        "ort_threads": args.threads,
        "rows": rows,
        "measured_on": f"{platform.node() or 'unknown host'}: {_cpu()} ({torch.get_num_threads()} torch threads), CPU only",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(args.out, record)
    _print_table(record)
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return platform.processor() or "cpu"


def _print_table(record: dict[str, Any]) -> None:
    print("| model | params | MACs | top-1 raw | top-1 fine-tuned | ORT p50 ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in record["rows"].items():
        raw = row.get("raw") or row.get("accuracy")
        ft = row.get("finetuned") or row.get("accuracy")
        ort = row.get("ort") or {}
        p50 = ort.get("latency_ms", {}).get("p50")
        speedup = ort.get("speedup_p50")
        print(
            f"| {name} | {row['params'] / 1e6:.3f} M | {row['macs'] / 1e6:.1f} M | {100 * raw['top1']:.2f}% | "
            f"{100 * ft['top1']:.2f}% | {'' if p50 is None else f'{p50:.3f}'} | "
            f"{'' if speedup is None else f'{speedup:.2f}×'} |"
        )


if __name__ == "__main__":
    sys.exit(main())
