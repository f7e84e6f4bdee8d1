"""Accuracy where latency matters: ``auto`` vs uniform Tucker-2 vs Tai vs channel pruning at equal *measured* speedups.

On Fashion-MNIST with a CIFAR-style net whose dense ONNX Runtime latency (batch 1, one thread) is well above
per-node overhead, every arm's knob is searched until its *measured* end-to-end speedup over dense is within
``--tolerance`` of each target speedup (interleaved timing, :meth:`OrtTimer.measure`):

* ``auto`` (data-aware: output error proxy on calibration activations) — its planner's predicted-speedup target;
* ``tucker2`` / ``tai`` with a uniform per-layer rank ratio — their ``RATIO``;
* Torch-Pruning ``MagnitudePruner`` (L2 magnitude, channels rounded to 16, head kept) — its pruning ratio.

Each compressed model then gets the same fine-tuning budget (``--finetune-steps`` SGD steps); accuracy is
measured on a fixed seeded test subset, every arm is compared with ``auto`` by an exact paired McNemar test,
and all models are timed once more side by side (the speedups in the table). Writes JSON, a Markdown table
and an accuracy-vs-latency plot. Partial results are written after every arm::

    OMP_NUM_THREADS=1 python -m benchmarks.latency_accuracy --out benchmarks/results/latency_accuracy_fmnist.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.accuracy_harness import dense_baseline, environment, mcnemar, pct, predictions, write_results

ARMS = ("auto", "tucker2", "tai", "prune")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet18_w0.75")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=2, help="dense training epochs")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--eval-samples", type=int, default=2000, help="seeded test subset for every accuracy")
    p.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--tolerance", type=float, default=0.05, help="measured speedup within ±this of the target")
    p.add_argument("--max-tries", type=int, default=6, help="knob evaluations per arm and speed at most")
    p.add_argument("--repeats", type=int, default=40, help="interleaved timing rounds per measurement")
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--round-to", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_accuracy_fmnist.json"))
    return p.parse_args()


# ================================================================================================ arms
def _lowrank_builder(name: str, dense: nn.Module, example: torch.Tensor, round_to: int) -> Callable[[float], Any]:
    from compress.methods import get_method
    from compress.targets import Target

    method = get_method(name)

    def build(ratio: float) -> tuple[nn.Module, dict[str, Any]]:
        config = method.make_config(Target("ratio", ratio), round_to=round_to, min_rank=round_to)
        model = copy.deepcopy(dense)
        plan = method.compress_(model, config, example)
        return model.eval(), {"ratio": ratio, "params_ratio": plan.target.get("achieved_ratio")}

    return build


def _auto_builder(dense: nn.Module, example: torch.Tensor, round_to: int, data: Any, samples: int) -> Callable:
    from compress.methods import get_method
    from compress.targets import Target

    method = get_method("auto")

    def build(speedup: float) -> tuple[nn.Module, dict[str, Any]]:
        config = method.make_config(
            Target("speedup", speedup), round_to=round_to, min_rank=round_to, calibration_samples=samples
        )
        plan = method.plan(dense, config, example, data=data)
        model = copy.deepcopy(dense)
        method.apply_(model, plan)
        chosen: dict[str, int] = {}
        for e in plan.layers:
            chosen[e.action] = chosen.get(e.action, 0) + 1
        info = {
            "planner_speedup": speedup,
            "predicted_speedup": plan.target.get("predicted_speedup"),
            "error_proxy": plan.target["error_proxy"],
            "actions": chosen,
        }
        return model.eval(), info

    return build


def _prune_builder(dense: nn.Module, example: torch.Tensor, round_to: int) -> Callable[[float], Any]:
    import torch_pruning as tp

    def build(ratio: float) -> tuple[nn.Module, dict[str, Any]]:
        model = copy.deepcopy(dense).eval()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)]
        pruner = tp.pruner.MagnitudePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=head,
            round_to=round_to,
        )
        pruner.step()
        return model.eval(), {"pruning_ratio": ratio}

    return build


def _cached_output_errors() -> None:
    """Memoise auto's per-layer output errors and Grams: the knob search plans the same dense model many times."""
    import compress.methods.auto as auto

    errors, grams = auto.output_errors, auto.input_grams
    memo: dict[Any, Any] = {}

    @functools.wraps(errors)
    def cached_errors(fact: Any, module: nn.Module, ranks_list: list, gram: torch.Tensor) -> list[float]:
        key = ("e", id(module), fact.name, tuple(map(tuple, ranks_list)), id(gram))
        if key not in memo:
            memo[key] = errors(fact, module, ranks_list, gram)
        return memo[key]

    @functools.wraps(grams)
    def cached_grams(model: nn.Module, paths: list[str], data: Any, samples: int, **kw: Any) -> dict:
        key = ("g", id(model), tuple(paths), id(data), samples)
        if key not in memo:
            memo[key] = grams(model, paths, data, samples, **kw)
        return memo[key]

    auto.output_errors, auto.input_grams = cached_errors, cached_grams


# ================================================================================================ search
def search(
    build: Callable[[float], tuple[nn.Module, dict[str, Any]]],
    speed_of: Callable[[nn.Module], float],
    target: float,
    start: float,
    bounds: tuple[float, float],
    *,
    tolerance: float,
    max_tries: int,
    log_space: bool,
) -> dict[str, Any]:
    """Search the knob (speedup increasing with it) until the measured speedup is within ``tolerance`` of ``target``."""
    lo, hi = bounds
    x, tries, best = start, [], None
    below: tuple[float, float] | None = None  # (knob, speedup) with speedup < target
    above: tuple[float, float] | None = None
    for _ in range(max_tries):
        try:
            model, info = build(x)
            s = speed_of(model)
        except Exception as exc:  # a knob value the method cannot plan: treat as too far
            print(f"  knob {x:.4g}: {type(exc).__name__}: {exc}", file=sys.stderr)
            tries.append({"knob": x, "error": f"{type(exc).__name__}: {exc}"})
            above = (x, math.inf)
            s, model = math.inf, None
        else:
            tries.append({"knob": x, "measured_speedup": s, **info})
            print(f"  knob {x:.4g}: measured {s:.3f}× (target {target}×)", file=sys.stderr)
            if best is None or abs(s / target - 1) < abs(best[2] / target - 1):
                best = (x, model, s, info)
            if abs(s / target - 1) <= tolerance:
                break
        if s < target:
            below = (x, s) if below is None or x > below[0] else below
        else:
            above = (x, s) if above is None or x < above[0] else above
        if below is not None and above is not None:  # bracketed: interpolate (log speedup vs knob), else bisect
            (x0, s0), (x1, s1) = below, above
            if math.isfinite(s1) and s1 > s0:
                f = (math.log(target) - math.log(s0)) / (math.log(s1) - math.log(s0))
                f = min(max(f, 0.2), 0.8)
            else:
                f = 0.5
            x = math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0))) if log_space else x0 + f * (x1 - x0)
        else:  # extrapolate: speedup roughly ∝ knob (log space) or step the ratio
            x = x * (target / s) ** 1.2 if log_space else x + (0.15 if s < target else -0.15)
        x = min(max(x, lo), hi)
    assert best is not None, "no knob value could be built"
    x, model, s, info = best
    return {"knob": x, "model": model, "measured_speedup": s, "info": info, "tries": tries}


# ================================================================================================ main
def main() -> None:
    args = _parse()
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    from compress.data import calibration_subset
    from compress.latency.ort_timing import OrtTimer
    from compress.methods.base import CalibrationLoader
    from compress.metrics import count_macs, count_params
    from compress.train import TrainConfig, Trainer, evaluate

    baseline = dense_baseline(
        args.model,
        args.data,
        epochs=args.epochs,
        seed=args.seed,
        train_samples=args.train_samples,
        cache_root=args.cache,
        eval_samples=args.eval_samples,
    )
    dense, data = baseline.model.eval(), baseline.data
    shape = baseline.input_shape
    example = torch.zeros(shape)
    timer = OrtTimer(1)
    (dense_ms,) = timer.measure([dense], shape, repeats=args.repeats)
    print(f"dense ORT p50 {dense_ms:.3f} ms (batch 1, one thread)", file=sys.stderr)
    test_sub = calibration_subset(data.test, args.eval_samples, seed=0)
    dense_hits = predictions(dense, test_sub)
    calib = CalibrationLoader(data.train, seed=args.seed)
    _cached_output_errors()

    def speed_of(model: nn.Module) -> float:
        d, c = timer.measure([dense, model], shape, repeats=args.repeats)
        return d / c

    builders, starts = _arms(dense, example, args, calib)
    finetune = TrainConfig(
        epochs=1, max_steps=args.finetune_steps, lr=args.finetune_lr, seed=args.seed, eval_samples=args.eval_samples
    )
    result = _result_header(args, baseline, dense, example, dense_ms, finetune.batch_size)
    models: dict[str, nn.Module] = {}
    hits: dict[str, torch.Tensor] = {}
    for target in args.speedups:
        for arm in args.arms:
            key = f"{arm}@{target:g}x"
            print(f"{key}: searching the knob …", file=sys.stderr)
            build, log_space, bounds = builders[arm]
            t0 = time.perf_counter()
            found = search(
                build,
                speed_of,
                target,
                starts[arm](target),
                bounds,
                tolerance=args.tolerance,
                max_tries=args.max_tries,
                log_space=log_space,
            )
            search_s = time.perf_counter() - t0
            model = found.pop("model")
            raw = evaluate(model, data.test, max_samples=args.eval_samples)
            t0 = time.perf_counter()
            Trainer(model, finetune, data.train, data.test, device="cpu", progress=False).fit()
            finetune_s = time.perf_counter() - t0
            model.eval()
            final = evaluate(model, data.test, max_samples=args.eval_samples)
            models[key], hits[key] = model, predictions(model, test_sub)
            result["runs"][key] = {
                "arm": arm,
                "target_speedup": target,
                "within_tolerance": abs(found["measured_speedup"] / target - 1) <= args.tolerance,
                **found,
                "params": count_params(model),
                "macs": count_macs(model, example),
                "raw": raw.to_dict(),
                "finetuned": final.to_dict(),
                "search_s": search_s,
                "finetune_s": finetune_s,
            }
            if arm != "auto" and f"auto@{target:g}x" in hits:
                result["runs"][key]["mcnemar_vs_auto"] = mcnemar(hits[f"auto@{target:g}x"], hits[key])
            result["wall_s"] = time.perf_counter() - t_start
            write_results(args.out, result, markdown(result))
    times = _final_timing(timer, dense, models, shape, args.repeats, result)
    result["final_dense_ms_p50"] = times[0]
    result["dense"]["hits_vs_dense"] = int(dense_hits.sum())
    result["verdict"] = verdict(result)
    result["status"] = "finished"
    result["wall_s"] = time.perf_counter() - t_start
    write_results(args.out, result, markdown(result))
    plot(result, args.out.with_suffix(".png"))


def _arms(
    dense: nn.Module, example: torch.Tensor, args: argparse.Namespace, calib: Any
) -> tuple[dict[str, Any], dict[str, Callable[[float], float]]]:
    """Each arm's builder, whether its knob is searched in log space and its bounds; and its first knob value."""
    builders = {
        "auto": (_auto_builder(dense, example, args.round_to, calib, args.calibration_samples), True, (1.05, 50.0)),
        "tucker2": (_lowrank_builder("tucker2", dense, example, args.round_to), True, (1.05, 100.0)),
        "tai": (_lowrank_builder("tai", dense, example, args.round_to), True, (1.05, 100.0)),
        "prune": (_prune_builder(dense, example, args.round_to), False, (0.02, 0.95)),
    }
    starts = {
        "auto": lambda s: s,
        "tucker2": lambda s: 1.6 * s,
        "tai": lambda s: 1.6 * s,
        "prune": lambda s: 1 - s**-0.5,
    }
    return builders, starts


def _result_header(
    args: argparse.Namespace,
    baseline: Any,
    dense: nn.Module,
    example: torch.Tensor,
    dense_ms: float,
    finetune_batch: int,
) -> dict[str, Any]:
    """The result file before any run: settings, the dense model's training, accuracy, size and latency."""
    from compress.metrics import count_macs, count_params

    data, shape = baseline.data, baseline.input_shape
    return {
        "what": "accuracy at equal measured ORT speedups: auto vs uniform Tucker-2 vs Tai vs Torch-Pruning magnitude",
        "model": args.model,
        "data": data.info.name,
        "input_shape": list(shape),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dense": {
            "training": {
                "epochs": args.epochs,
                "train_samples": len(data.train),
                "wall_s": baseline.training.get("train_wall_s"),
            },
            "accuracy": baseline.accuracy.to_dict(),
            "params": count_params(dense),
            "macs": count_macs(dense, example),
            "ort_ms_p50": dense_ms,
        },
        "finetune": {"steps": args.finetune_steps, "batch_size": finetune_batch, "lr": args.finetune_lr},
        "latency": "ONNX Runtime CPU, batch 1, intra-op threads 1, interleaved medians (OrtTimer.measure)",
        "environment": environment(1),
        "runs": {},
        "status": "running",
    }


def _final_timing(
    timer: Any, dense: nn.Module, models: dict[str, nn.Module], shape: Any, repeats: int, result: dict[str, Any]
) -> list[float]:
    """One final interleaved timing of every model (the table's speed-ups), recorded in ``result``'s runs."""
    names = list(models)
    times = timer.measure([dense, *models.values()], shape, repeats=repeats)
    for name, ms in zip(names, times[1:], strict=True):
        result["runs"][name]["final_ms_p50"] = ms
        result["runs"][name]["final_speedup"] = times[0] / ms
    return times


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Per target speed: which arm is the most accurate after fine-tuning, and whether it is ``auto``."""
    out = {}
    for target in result["settings"]["speedups"]:
        runs = {k: r for k, r in result["runs"].items() if r["target_speedup"] == target}
        if not runs:
            continue
        best = max(runs, key=lambda k: runs[k]["finetuned"]["top1"])
        out[f"{target:g}x"] = {"most_accurate": best, "auto_most_accurate": runs[best]["arm"] == "auto"}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The README table."""
    d = result["dense"]
    lines = [
        f"{result['model']} on {result['data']} ({result['dense']['training']['train_samples']} training images, "
        f"{result['dense']['training']['epochs']} epochs); dense {pct(d['accuracy'])}, "
        f"ORT {d['ort_ms_p50']:.2f} ms (batch 1, one thread); fine-tuning {result['finetune']['steps']} steps "
        f"of {result['finetune']['batch_size']} for every arm; test subset of {result['settings']['eval_samples']}.",
        "",
        "| target | arm | knob | measured speedup (search) | final speedup | params | MACs | top-1 raw | "
        "top-1 fine-tuned | McNemar vs auto (p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"].values():
        mc = r.get("mcnemar_vs_auto")
        mc_text = "—" if mc is None else f"{mc['only_first_right']}/{mc['only_second_right']} (p={mc['p_value']:.3g})"
        final = r.get("final_speedup")
        lines.append(
            f"| {r['target_speedup']:g}× | {r['arm']} | {r['knob']:.3g} | {r['measured_speedup']:.2f}× | "
            f"{'—' if final is None else f'{final:.2f}×'} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.0f} M | "
            f"{pct(r['raw'])} | {pct(r['finetuned'])} | {mc_text} |"
        )
    if "verdict" in result:
        lines += [
            "",
            "Most accurate after fine-tuning: "
            + ", ".join(f"{k}: {v['most_accurate']}" for k, v in result["verdict"].items()),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Fine-tuned top-1 vs final measured latency, one marker per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = result["dense"]
    ax.scatter(
        [result["final_dense_ms_p50"]], [100 * dense["accuracy"]["top1"]], c="k", marker="*", s=120, label="dense"
    )
    for arm, marker in zip(ARMS, "osD^", strict=True):
        runs = [r for r in result["runs"].values() if r["arm"] == arm and "final_ms_p50" in r]
        if runs:
            ax.plot(
                [r["final_ms_p50"] for r in runs],
                [100 * r["finetuned"]["top1"] for r in runs],
                marker=marker,
                label=arm,
            )
    ax.set_xlabel("ORT CPU latency, batch 1, one thread (ms, p50)")
    ax.set_ylabel("top-1 after fine-tuning (%)")
    ax.set_title(f"{result['model']} on {result['data']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
