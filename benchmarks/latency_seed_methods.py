"""Issue 15's figure: each seed method with ``SPEEDUP=`` — the measured speedup it reaches and what it pays.

On the trained ``cifar_resnet18_w0.25`` / Fashion-MNIST model of :mod:`benchmarks.precision_accuracy` (the same
cached dense training: 10,000 training images, 2 epochs, seed 0 — reused, not retrained), each seed method
— ``vbmf-tucker2`` (plain: expansion 0, no orthogonality term, so no training stage), ``ljsvd``, ``lrsd`` and
``cc`` — is run twice:

* ``speedup``: ``SPEEDUP=--speedup`` through :func:`compress.latency.solve.compress_to_latency_`, called as
  ``python -m compress run --speedup`` calls it (the method's RATIO/FLOPS knob bisected on the latency
  model's prediction, measured end to end, corrected ≤ 3 rounds);
* ``flops``: the method at ``FLOPS=--flops``.

Every compressed model gets the same short fine-tune (``--finetune-steps`` of batch 128, as precision_accuracy),
top-1 raw and fine-tuned on the whole test split, an exact McNemar test vs dense on the same images, params and
MACs ratios. Latency: ONNX Runtime CPU, one intra-op thread, batch ``--batch``; the dense model and every
finished model are timed interleaved in one run (:meth:`OrtTimer.measure`) at the end, and each model beside
dense right after it is built. The result file is rewritten after every arm (``complete: false`` and the reason
when cut short).

Usage (the committed figures)::

    OMP_NUM_THREADS=1 python -m benchmarks.latency_seed_methods
    python -m benchmarks.latency_seed_methods --render benchmarks/results/latency_seed_methods.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.accuracy_harness import (
    compress_and_finetune,
    dense_baseline,
    environment,
    mcnemar,
    predictions,
    write_results,
)
from compress.methods import get_method
from compress.methods.base import CalibrationLoader
from compress.metrics import count_macs, count_params
from compress.targets import Target
from compress.train import TrainConfig

#: Each seed method: registry name, options (precision_accuracy's arms plus small calibration budgets).
METHODS: dict[str, dict[str, Any]] = {
    "vbmf-tucker2": {"round_to": 4, "min_rank": 4, "expansion": 0, "orthogonality": "none"},
    "ljsvd": {},
    "lrsd": {"calibration_samples": 128},
    "cc": {"calibration_samples": 256, "curve_points": 8},
}
DATA_METHODS = ("lrsd", "cc")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Build, fine-tune, evaluate and time every arm; the result file is rewritten after each."""
    from compress.latency.ort_timing import OrtTimer

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
    name = prepared.loaded.name
    example = torch.randn(input_shape, generator=torch.Generator().manual_seed(args.seed))  # as compress run's
    loader = CalibrationLoader(data.train, seed=args.seed)  # as compress run's --data
    finetune = TrainConfig(
        epochs=1, lr=args.finetune_lr, warmup_epochs=0, max_steps=args.finetune_steps, seed=args.seed
    )
    timer = OrtTimer(1)
    time_shape = [args.batch, *input_shape[1:]]
    probe = {b: timer.measure([dense], [b, *input_shape[1:]], repeats=30)[0] for b in sorted({1, args.batch})}
    dense_params, dense_macs = count_params(dense), count_macs(dense, example)
    dense_hits = predictions(dense, data.test)
    sizes = (dense_params, dense_macs)
    result = _result_header(args, argv, name, data, probe, finetune.batch_size, dense_hits, baseline, sizes)
    models: dict[str, nn.Module] = {}

    def save(reason: str | None) -> None:
        result["wall_s"] = time.perf_counter() - t_start
        result["incomplete_reason"] = reason
        write_results(args.out, result, markdown(result))

    save("running")
    for method_name in args.methods:
        method = get_method(method_name)
        options = METHODS[method_name]
        data_arg = loader if method_name in DATA_METHODS else None
        for arm in args.arms:
            key = f"{method_name} {arm}"
            elapsed = time.perf_counter() - t_start
            if elapsed > args.time_limit_s:
                save(
                    f"time limit {args.time_limit_s:.0f} s reached after {elapsed:.0f} s; finished: {list(result['rows'])}"
                )
                return finish(result, models, dense, timer, time_shape, args, save, partial=True)
            print(f"[{key}] compress + fine-tune + evaluate …", file=sys.stderr)
            t0 = time.perf_counter()
            config, apply = _arm_applier(arm, method, options, args, dense, example, data_arg, name)
            try:
                model, record = compress_and_finetune(dense, apply, data, finetune, example)
                record.pop("finetune_history", None)
                record["wall_s"] = time.perf_counter() - t0
                record["config"] = _json_safe(dataclasses.asdict(config))
                record["params_ratio"] = dense_params / record["params"]
                record["macs_ratio"] = dense_macs / record["macs"]
                target = (record.get("plan") or {}).get("target") or {}
                record["latency_target"] = _json_safe(target.pop("latency_target", None))
                record["latency_model"] = _json_safe(target.pop("latency_model", None))
                hits = predictions(model, data.test)
                record["mcnemar_vs_dense"] = mcnemar(dense_hits, hits)
                d_ms, m_ms = timer.measure([dense, model], time_shape, repeats=args.repeats)
                record["paired_timing"] = {"dense_ms": d_ms, "ms": m_ms, "speedup": d_ms / m_ms}
                models[key] = model
            except Exception as exc:  # one failing arm must not lose the others' figures
                record = {
                    "error": f"{type(exc).__name__}: {str(exc).strip()[:400]}",
                    "wall_s": time.perf_counter() - t0,
                }
            result["rows"][key] = record
            save("running")
    return finish(result, models, dense, timer, time_shape, args, save, partial=False)


def _arm_applier(
    arm: str,
    method: Any,
    options: dict[str, Any],
    args: argparse.Namespace,
    dense: nn.Module,
    example: torch.Tensor,
    data_arg: Any,
    name: str,
) -> tuple[Any, Callable[[nn.Module], Any]]:
    """One arm's config and compress step: the latency solve to ``SPEEDUP``, or the method at ``FLOPS``."""
    from compress.latency import LatencyModel
    from compress.latency.solve import compress_to_latency_

    if arm == "speedup":
        config = method.make_config(None, use_default_target=True, **options)
        latency = LatencyModel(threads=1, batch=args.batch)

        def apply(m: nn.Module) -> Any:
            target = Target("speedup", args.speedup)
            return compress_to_latency_(
                method, dense, m, config, target, example, data=data_arg, model_name=name, latency=latency
            )

        return config, apply
    config = method.make_config(Target("flops", args.flops), **options)

    def apply_at_flops(m: nn.Module) -> Any:
        return method.compress_(m, config, example, data=data_arg, model_name=name)

    return config, apply_at_flops


def _result_header(
    args: argparse.Namespace,
    argv: list[str],
    name: str,
    data: Any,
    probe: dict[int, float],
    finetune_batch: int,
    dense_hits: torch.Tensor,
    baseline: Any,
    sizes: tuple[int, int],
) -> dict[str, Any]:
    """The result file before any row: command, model, data, latency settings, budget, targets, the dense model."""
    return {
        "benchmark": "latency_seed_methods",
        "command": "OMP_NUM_THREADS=1 python -m benchmarks.latency_seed_methods " + shlex.join(argv),
        "model": name,
        "data": data.info.to_dict(),
        "latency": {
            "runtime": "onnxruntime CPU, 1 intra-op thread",
            "batch": args.batch,
            "dense_ms_by_batch": {str(b): ms for b, ms in probe.items()},
            "batch_note": args.batch_note,
            "interleaved_repeats": args.repeats,
        },
        "budget": {
            "train_samples": len(data.train),
            "dense_epochs": args.epochs,
            "finetune_steps": args.finetune_steps,
            "finetune_batch": finetune_batch,
            "finetune_lr": args.finetune_lr,
            "calibration": {k: v.get("calibration_samples") for k, v in METHODS.items() if k in DATA_METHODS},
            "cc_curve_points": METHODS["cc"]["curve_points"],
            "solve_rounds": 3,
            "test_images": len(dense_hits),
            "time_limit_s": args.time_limit_s,
            "note": "cut to fit a 35-minute wall budget on 2 shared, loaded CPU cores; the dense training is cached",
        },
        "targets": {"speedup": args.speedup, "flops": args.flops},
        "dense": {
            "params": sizes[0],
            "macs": sizes[1],
            "top1": float(dense_hits.float().mean()),
            "train_wall_s": baseline.training["train_wall_s"],
        },
        "rows": {},
        "complete": False,
        "environment": environment(1),
    }


def finish(
    result: dict[str, Any],
    models: dict[str, nn.Module],
    dense: nn.Module,
    timer: Any,
    shape: list[int],
    args: argparse.Namespace,
    save: Any,
    *,
    partial: bool,
) -> dict[str, Any]:
    """Time dense and every finished model in one interleaved run; write the final record."""
    if models:
        print(f"[final] interleaved timing of dense + {len(models)} models …", file=sys.stderr)
        times = timer.measure([dense, *models.values()], shape, repeats=args.repeats)
        result["dense"]["latency_ms"] = times[0]
        for (key, _), ms in zip(models.items(), times[1:], strict=True):
            result["rows"][key]["latency_ms"] = ms
            result["rows"][key]["speedup"] = times[0] / ms
    if not partial:
        result["complete"] = True
    save(result.get("incomplete_reason") if partial else None)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The README table of a result record."""
    b, lat, d = result["budget"], result["latency"], result["dense"]
    lines = [
        f"{result['model']} on Fashion-MNIST ({b['train_samples']} training images, {b['dense_epochs']} epochs, "
        f"dense top-1 {100 * d['top1']:.2f} %); ONNX Runtime CPU, 1 thread, batch {lat['batch']} "
        f"({lat['batch_note']}); speedups from one interleaved run of dense + all models "
        f"(median of {lat['interleaved_repeats']}); every model fine-tuned {b['finetune_steps']} steps of "
        f"{b['finetune_batch']}; top-1 on {b['test_images']} test images; McNemar: exact paired test vs dense "
        "(images only dense got right / only the model got right).",
        "",
        "| method | target | knob reached | speedup (measured) | params ratio | MACs ratio | top-1 raw | "
        "top-1 fine-tuned | McNemar p vs dense |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in result["rows"].items():
        method, arm = key.split(" ")
        target = (
            f"SPEEDUP={result['targets']['speedup']:g}" if arm == "speedup" else f"FLOPS={result['targets']['flops']:g}"
        )
        if "error" in row:
            lines.append(f"| {method} | {target} | failed: {row['error'][:160]} |" + " |" * 6)
            continue
        knob = "—"
        lt = row.get("latency_target") or {}
        if lt.get("knob"):
            knob = ", ".join(f"{k.upper()}={v:.3g}" for k, v in lt["knob"].items())
            knob += f" ({'met' if lt.get('met') else 'missed'} in solve: {lt.get('achieved', 0):.2f}×)"
        speed = f"{row['speedup']:.2f}×" if "speedup" in row else f"{row['paired_timing']['speedup']:.2f}× (paired)"
        m = row["mcnemar_vs_dense"]
        lines.append(
            f"| {method} | {target} | {knob} | {speed} | ×{row['params_ratio']:.2f} | ×{row['macs_ratio']:.2f} | "
            f"{100 * row['raw']['top1']:.2f} % | {100 * row['finetuned']['top1']:.2f} % | "
            f"{m['p_value']:.2g} ({m['only_first_right']} / {m['only_second_right']}) |"
        )
    lines.append("")
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
    p.add_argument("--train-samples", type=int, default=10000, help="precision_accuracy's dense training (cached)")
    p.add_argument("--epochs", type=int, default=2, help="dense training epochs (precision_accuracy's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--arms", nargs="+", default=["speedup", "flops"], choices=["speedup", "flops"])
    p.add_argument("--speedup", type=float, default=1.5)
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16, help="timing batch (latency model and measurements)")
    p.add_argument(
        "--batch-note",
        default="batch 1 is per-node overhead on this tiny net (dense 0.41 ms), so batch 16 is timed",
        help="why this batch (recorded)",
    )
    p.add_argument("--repeats", type=int, default=40, help="interleaved timing rounds")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--time-limit-s", type=float, default=1200.0, help="skip the remaining arms after this")
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_seed_methods.json"))
    p.add_argument("--render", type=Path, default=None, help="only print the Markdown table of a result file")
    args = p.parse_args(argv)
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    torch.manual_seed(args.seed)
    run(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
