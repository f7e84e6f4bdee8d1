"""Issue 16's accuracy claim: what INT8 costs in top-1 on real data, dense and fine-tuned compressed.

A CIFAR-style ResNet (``cifar_resnet18_w0.25``) on Fashion-MNIST:

1. train the dense net once (:func:`benchmarks.accuracy_harness.dense_baseline`: cached and resumable under
   ``--cache``, the folder every claims script shares, so an existing training with the same subset, epochs
   and seed is reused);
2. compress a copy with each seed method at one target — ``tucker2``, ``vbmf-tucker2`` (plain: the shared
   dense training, no expansion, no orthogonality term), ``ljsvd``, ``lrsd`` at ``RATIO=--ratio`` and ``cc``
   at its default ``FLOPS=0.5`` — and fine-tune it with one shared budget (``--finetune-steps`` of batch 128);
3. export every model like ``python -m export onnx`` (BN folded, ONNX parity checked against PyTorch) and
   quantize it like ``python -m export quantize --data`` (:func:`export.quantize.quantize_int8`: static,
   per-channel weights, MinMax, ``--calibration`` images of the seeded calibration subset of the training
   split, the default float-layer rules) in each of ``--formats``, and with ``--all-int8`` also in the first
   format with no float layers (variant ``<format>+all``: what the float-layer rule buys);
4. run the FP32 and every INT8 ONNX file with ONNX Runtime (CPU, one thread) on the **whole** 10,000-image
   test split and compare them image by image: top-1 of each, the change in points, top-1 agreement, and an
   exact McNemar test of FP32 vs INT8 correctness on the same images. The claim: INT8 costs ≤ 0.5 points.

The result file is rewritten after every model, so an interrupted run keeps what finished
(``"complete": false`` and the reason); ``--time-limit-s`` skips the remaining arms when exceeded.

Usage (the committed figures; ≈ 15–25 min on 2 loaded CPU cores):
    OMP_NUM_THREADS=1 python -m benchmarks.precision_accuracy
    python -m benchmarks.precision_accuracy --render benchmarks/results/precision_fmnist.json   # tables only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.accuracy_harness import compress_and_finetune, dense_baseline, environment, mcnemar, write_results
from compress.api import compress_, method_config
from compress.data import calibration_subset
from compress.methods.base import CalibrationLoader
from compress.metrics import count_macs, count_params
from compress.train import TrainConfig
from compress.train.evaluation import wilson_interval
from export import check_onnx_parity, onnx_from_torch, optimize, save_onnx
from export.quantize import GATE, MIN_FLOAT_RANK, RULES, agreement, cpu_int8_support, quantize_int8
from export.quantize.static import InputSpec, input_spec, onnx_outputs

#: Every seed method's arm: registry name and options (its claims script's settings; targets set in ``main``).
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "tucker2": ("tucker2", {"round_to": 4, "min_rank": 4}),
    "vbmf-tucker2": ("vbmf-tucker2", {"round_to": 4, "min_rank": 4, "expansion": 0, "orthogonality": "none"}),
    "ljsvd": ("ljsvd", {}),
    "cc": ("cc", {}),
    "lrsd": ("lrsd", {}),  # last: its calibration solve is the slowest step
}
DATA_ARMS = ("lrsd", "cc")  # their compress_ reads calibration images (CC: with labels)
CLAIM_POINTS = 0.5


def _test_arrays(split: Any, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(split) if limit is None else min(limit, len(split))
    images, labels = split.batch(range(n))
    return images.numpy(), labels.numpy()


def _logits(path: Path, spec: InputSpec, images: np.ndarray) -> np.ndarray:
    return onnx_outputs(path, spec.feeds(images), 1)[: len(images)]


def _accuracy(hits: np.ndarray) -> dict[str, Any]:
    c, n = int(hits.sum()), len(hits)
    return {"top1": c / n, "n": n, "ci95": list(wilson_interval(c, n))}


def measure_precision(
    model: nn.Module,
    input_shape: tuple[int, ...],
    calib: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    variants: dict[str, tuple[str, list[str] | None]],
    tmp: Path,
    key: str,
) -> dict[str, Any]:
    """Export ``model``, quantize it in each format, and compare FP32 vs INT8 ONNX on the test images."""
    t0 = time.perf_counter()
    fp32 = save_onnx(
        optimize(onnx_from_torch(model.eval(), torch.zeros(input_shape), dynamic_batch=True)), tmp / f"{key}.onnx"
    )
    parity = check_onnx_parity(model, fp32, input_shape=input_shape)
    spec = input_spec(fp32)
    images, labels = test
    ref = _logits(fp32, spec, images)
    hits = ref.argmax(1) == labels
    out: dict[str, Any] = {
        "fp32_onnx_bytes": fp32.stat().st_size,
        "parity_max_abs": parity.max_abs,
        "onnx_fp32": _accuracy(hits),
        "int8": {},
    }
    for label, (fmt, rules) in variants.items():
        path = tmp / f"{key}.{label}.onnx"
        t0 = time.perf_counter()
        kept = quantize_int8(fp32, path, spec.feeds(calib), fmt=fmt, **({} if rules is None else {"rules": rules}))
        quantize_s = time.perf_counter() - t0
        logits = _logits(path, spec, images)
        q_hits = logits.argmax(1) == labels
        agree = agreement(ref, logits)
        out["int8"][label] = {
            "format": fmt,
            "float_rules": list(RULES) if rules is None else rules,
            "accuracy": _accuracy(q_hits),
            "delta_points": 100 * (q_hits.mean() - hits.mean()),
            "mcnemar_fp32_vs_int8": mcnemar(torch.from_numpy(hits), torch.from_numpy(q_hits)),
            "agreement": agree,
            "gate_failures": GATE.failures(agree),
            "float_layers": [f"{f.node} ({f.reason})" for f in kept],
            "onnx_bytes": path.stat().st_size,
            "quantize_s": quantize_s,
        }
    out["measure_s"] = time.perf_counter() - t0
    return out


def _arm_config(arm: str, args: argparse.Namespace) -> Any:
    name, options = ARMS[arm]
    if arm in DATA_ARMS and args.calibration_samples is not None:
        options = {**options, "calibration_samples": args.calibration_samples}
    if arm == "cc":
        return method_config(name, **options)  # its default target, FLOPS=0.5
    return method_config(name, ratio=args.ratio, **options)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Steps 1–4 (see the module docstring); the result file is rewritten after every model."""
    t_start = time.perf_counter()
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
    calib, _ = _test_arrays(calibration_subset(data.train, args.calibration, seed=args.seed), None)
    test = _test_arrays(data.test, args.test_samples)
    variants: dict[str, tuple[str, list[str] | None]] = {fmt: (fmt, None) for fmt in args.formats}
    if args.all_int8:
        variants[f"{args.formats[0]}+all"] = (args.formats[0], [])
    batches = CalibrationLoader(data.train, seed=args.seed, batch_size=128)
    finetune = TrainConfig(
        epochs=1, lr=args.finetune_lr, warmup_epochs=0, max_steps=args.finetune_steps, seed=args.seed
    )
    dense_params, dense_macs = count_params(dense), count_macs(dense, example)
    result = _result_header(args, argv, prepared, data, baseline, finetune, test, calib, variants)

    def save(reason: str | None = None) -> None:
        result["wall_s"] = time.perf_counter() - t_start
        result["incomplete_reason"] = reason
        write_results(args.out, result, markdown(result))

    with tempfile.TemporaryDirectory(prefix="precision-acc-") as tmp_dir:
        tmp = Path(tmp_dir)
        print("[dense] export + quantize + evaluate …", file=sys.stderr)
        row: dict[str, Any] = {
            "params": dense_params,
            "macs": dense_macs,
            "torch_fp32": baseline.accuracy.to_dict(),
            "train_wall_s": baseline.training["train_wall_s"],
        }
        row.update(measure_precision(dense, input_shape, calib, test, variants, tmp, "dense"))
        result["rows"]["dense"] = row
        save("running")
        for arm in args.arms:
            elapsed = time.perf_counter() - t_start
            if elapsed > args.time_limit_s:
                done = list(result["rows"])
                save(f"time limit {args.time_limit_s:.0f} s reached after {elapsed:.0f} s; finished: {done}")
                return result
            config = _arm_config(arm, args)
            loader = batches if arm in DATA_ARMS else None

            def apply(m: nn.Module, config: Any = config, loader: Any = loader) -> Any:
                return compress_(m, config, example, data=loader, model_name=prepared.loaded.name)

            print(f"[{arm}] compress + fine-tune + quantize + evaluate …", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                model, record = compress_and_finetune(
                    dense, apply, data, finetune, example, eval_samples=args.raw_samples
                )
                record["compress_finetune_s"] = time.perf_counter() - t0
                record["raw_eval_images"] = record["raw"]["n"]
                record.pop("finetune_history", None)
                record["config"] = dataclasses.asdict(config)
                record["param_ratio"] = dense_params / record["params"]
                record["flops_reduction"] = 1 - record["macs"] / dense_macs
                record["torch_fp32"] = record.pop("finetuned")
                record.update(measure_precision(model, input_shape, calib, test, variants, tmp, arm))
            except Exception as exc:  # one failing method must not lose the others' figures
                record = {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
            result["rows"][arm] = record
            save("running")
    result["complete"] = True
    result["summary"] = summary(result)
    save(None)
    return result


def _result_header(
    args: argparse.Namespace,
    argv: list[str],
    prepared: Any,
    data: Any,
    baseline: Any,
    finetune: TrainConfig,
    test: Any,
    calib: Any,
    variants: dict[str, tuple[str, list[str] | None]],
) -> dict[str, Any]:
    """The result file before any row: command, claim, model, data, budget, targets and quantization settings."""
    return {
        "benchmark": "precision_accuracy",
        "command": "python -m benchmarks.precision_accuracy " + shlex.join(argv),
        "claim": f"INT8 (static PTQ) costs <= {CLAIM_POINTS} points of top-1, dense and fine-tuned compressed",
        "model": prepared.loaded.name,
        "data": data.info.to_dict(),
        "budget": {
            "train_samples": len(data.train),
            "dense_epochs": args.epochs,
            "finetune_steps": args.finetune_steps,
            "finetune_batch": finetune.batch_size,
            "finetune_lr": args.finetune_lr,
            "method_calibration_samples": args.calibration_samples or "each method's default",
            "test_images": len(test[1]),
            "note": "cut to fit a 25-minute wall budget on 2 shared CPU cores; the dense training is cached",
        },
        "targets": {arm: ("FLOPS=0.5 (cc's default)" if arm == "cc" else f"RATIO={args.ratio:g}") for arm in args.arms},
        "quantization": {
            "api": "export.quantize.quantize_int8 (quant_pre_process + quantize_static)",
            "formats": args.formats,
            "variants": list(variants),
            "per_channel": True,
            "calibration": {
                "source": "data",
                "n": len(calib),
                "method": "minmax",
                "seed": args.seed,
                "split": "train (seeded calibration subset)",
            },
            "float_rules": list(RULES),
            "float_min_rank": MIN_FLOAT_RANK,
            "runtime": "onnxruntime CPU, 1 intra-op thread",
        },
        "dense_training": baseline.train_config.to_dict(),
        "finetune": finetune.to_dict(),
        "rows": {},
        "complete": False,
        "environment": {**environment(1), "cpu_int8": cpu_int8_support()},
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The claim per format: the worst top-1 change over all models, and whether it is within the bound."""
    out = {}
    rows = {k: r for k, r in result["rows"].items() if "int8" in r}
    for fmt in result["quantization"]["variants"]:
        deltas = {k: r["int8"][fmt]["delta_points"] for k, r in rows.items()}
        worst = min(deltas, key=deltas.get)
        out[fmt] = {
            "worst_model": worst,
            "worst_delta_points": deltas[worst],
            "claim_met": all(d >= -CLAIM_POINTS for d in deltas.values()),
            "significant_at_0.05": sorted(
                k for k, r in rows.items() if r["int8"][fmt]["mcnemar_fp32_vs_int8"]["p_value"] < 0.05
            ),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    """The README table of a result record."""
    b, q = result["budget"], result["quantization"]
    lines = [
        f"{result['model']} on Fashion-MNIST ({b['train_samples']} training images, {b['dense_epochs']} epochs; "
        f"compressed models fine-tuned {b['finetune_steps']} steps of {b['finetune_batch']}); static INT8, "
        f"per-channel, {q['calibration']['n']} calibration images, float layers by rule; ONNX Runtime CPU; "
        f"top-1 on {b['test_images']} test images; McNemar: exact paired test FP32 vs INT8 "
        "(images only FP32 got right / only INT8 got right).",
        "",
        "| model | target | params | torch FP32 | ONNX FP32 | INT8 variant | INT8 | Δ points | McNemar p (FP32-only / "
        "INT8-only) | top-1 agreement | float layers |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in result["rows"].items():
        target = result["targets"].get(key, "—")
        if "error" in row:
            lines.append(f"| {key} | {target} | failed: {row['error']} |" + " |" * 8)
            continue
        for fmt, r in row["int8"].items():
            m = r["mcnemar_fp32_vs_int8"]
            lines.append(
                f"| {key} | {target} | {row['params'] / 1e3:.0f} k | {100 * row['torch_fp32']['top1']:.2f} % | "
                f"{100 * row['onnx_fp32']['top1']:.2f} % | {fmt} | {100 * r['accuracy']['top1']:.2f} % | "
                f"{r['delta_points']:+.2f} | {m['p_value']:.2f} ({m['only_first_right']} / {m['only_second_right']}) | "
                f"{100 * r['agreement']['top1']:.2f} % | {len(r['float_layers'])} |"
            )
    lines.append("")
    if result.get("summary"):
        for fmt, s in result["summary"].items():
            lines.append(
                f"{fmt}: worst change {s['worst_delta_points']:+.2f} points ({s['worst_model']}); "
                f"≤ {CLAIM_POINTS} points for every model: {'yes' if s['claim_met'] else 'no'}; "
                f"McNemar p < 0.05: {', '.join(s['significant_at_0.05']) or 'none'}."
            )
    if not result.get("complete"):
        lines.append(f"Incomplete: {result.get('incomplete_reason')}.")
    lines.append(f"Wall time {result.get('wall_s', 0) / 60:.1f} min.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet18_w0.25")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-samples", type=int, default=10000, help="seeded training subset (None: all 60,000)")
    p.add_argument("--epochs", type=int, default=2, help="dense training epochs")
    p.add_argument("--ratio", type=float, default=4.0, help="whole-model params ratio (every arm but cc)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--calibration-samples", type=int, default=None, help="lrsd/cc calibration (default: theirs)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps of batch 128 for every arm")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--raw-samples", type=int, default=1000, help="test images of the raw (pre-fine-tune) accuracy")
    p.add_argument("--formats", nargs="+", default=["qdq-u8s8", "qdq-s8s8"])
    p.add_argument("--all-int8", action=argparse.BooleanOptionalAction, default=True, help="also <format>+all")
    p.add_argument("--calibration", type=int, default=256, help="INT8 calibration images (training split)")
    p.add_argument("--test-samples", type=int, default=None, help="smoke runs only (default: the whole test split)")
    p.add_argument("--time-limit-s", type=float, default=1380.0, help="skip the remaining arms after this")
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_fmnist.json"))
    p.add_argument("--render", type=Path, default=None, help="only print the Markdown tables of a result file")
    args = p.parse_args(argv)
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    torch.manual_seed(args.seed)
    run(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
