"""METHOD=auto SPEEDUP=s vs uniform Tucker-2 RATIO=r (and auto at Tucker-2's speedup), measured side by side on ORT CPU.

Both models are compressed in-process from the same dense model; ``auto`` goes through the latency
solver (:func:`compress.latency.solve.compress_to_latency_`: block lookup table, prediction, end-to-end
measurement); then dense, auto and Tucker-2 are exported and timed interleaved by the same
:class:`~compress.latency.ort_timing.OrtTimer`. The approximation error compared is the plan's weight-space
proxy ``Σ ‖W − Ŵ‖²`` and the output relative L2 on random inputs. Random weights unless ``--weights``.

Usage:
    python -m benchmarks.latency_claims --model resnet34 --speedup 4 --ratio 4 --threads 1 \
        --out benchmarks/results/latency_claims_resnet34_t1.json
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

from compress.latency import LatencyModel
from compress.latency.solve import compress_to_latency_
from compress.methods import get_method
from compress.metrics import count_macs, count_params, output_agreement
from compress.models import load_model
from compress.planning import cpu_rank_multiple
from compress.targets import Target
from lowrank_core.io import atomic_write_json
from runtime import capture_environment


def _weight_error(dense: torch.nn.Module, plan: Any) -> float:
    modules = dict(dense.named_modules())
    return sum(
        (e.rel_error or 0.0) ** 2 * float(modules[e.path].weight.detach().double().pow(2).sum())
        for e in plan.factorized_layers
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet34")
    p.add_argument("--weights", default="random")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--speedup", type=float, default=4.0)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds of the final side-by-side timing")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    loaded = load_model(args.model, args.weights, input_size=args.input_size, seed=0)
    dense = loaded.model.eval()
    x = torch.randn(1, *loaded.input_shape, generator=torch.Generator().manual_seed(0))
    latency = LatencyModel(threads=args.threads, batch=1)
    round_to = cpu_rank_multiple()

    t0 = time.perf_counter()
    auto = get_method("auto")
    auto_model = copy.deepcopy(dense)
    config = auto.make_config(Target("speedup", args.speedup), round_to=round_to)
    auto_plan = compress_to_latency_(
        auto, dense, auto_model, config, Target("speedup", args.speedup), x, model_name=loaded.name, latency=latency
    )
    t_auto = time.perf_counter() - t0

    t0 = time.perf_counter()
    tucker = get_method("tucker2")
    tucker_model = copy.deepcopy(dense)
    tucker_plan = tucker.compress_(
        tucker_model, tucker.make_config(Target("ratio", args.ratio), round_to=round_to), x, model_name=loaded.name
    )
    t_tucker = time.perf_counter() - t0
    profile = latency.profile_dense(dense, x)
    tucker_pred, _ = latency.predict(tucker_model, x, profile)

    # auto at the speedup Tucker-2 reached (its own prediction-corrected measurement): error at equal speed
    (dense_ms, tucker_ms) = latency.timer.measure([dense, tucker_model], latency.shape(x.shape), repeats=args.repeats)
    matched = Target("speedup", round(dense_ms / tucker_ms, 2))
    t0 = time.perf_counter()
    matched_model = copy.deepcopy(dense)
    matched_config = auto.make_config(matched, round_to=round_to)
    matched_plan = compress_to_latency_(
        auto, dense, matched_model, matched_config, matched, x, model_name=loaded.name, latency=latency
    )
    t_matched = time.perf_counter() - t0

    models = [dense, auto_model, tucker_model, matched_model]
    ms = latency.timer.measure(models, latency.shape(x.shape), repeats=args.repeats)
    batch = torch.randn(8, *loaded.input_shape, generator=torch.Generator().manual_seed(1))
    rows = {}
    for i, (name, text, model, plan, predicted, wall) in enumerate(
        (
            ("auto", Target("speedup", args.speedup).text(), auto_model, auto_plan, None, t_auto),
            ("tucker2", Target("ratio", args.ratio).text(), tucker_model, tucker_plan, tucker_pred, t_tucker),
            ("auto-matched", matched.text(), matched_model, matched_plan, None, t_matched),
        ),
        start=1,
    ):
        measured = ms[i]
        if predicted is None:
            predicted = plan.target["latency_target"]["predicted_ms"]
        rows[name] = {
            "target": text,
            "measured_ms": measured,
            "measured_speedup": ms[0] / measured,
            "predicted_ms": predicted,
            "prediction_relative_error": (predicted - measured) / measured,
            "params": count_params(model),
            "macs": count_macs(model, x),
            "weight_error_sq": _weight_error(dense, plan),
            "output_rel_l2": output_agreement(dense, model, batch).to_dict()["rel_l2"],
            "layers_by_action": {a: sum(e.action == a for e in plan.layers) for a in {e.action for e in plan.layers}},
            "compress_wall_s": wall,
        }
    result = {
        "model": loaded.name,
        "weights": loaded.weights,
        "input_shape": [1, *loaded.input_shape],
        "threads": args.threads,
        "round_to": round_to,
        "dense": {"measured_ms": ms[0], "params": count_params(dense), "macs": count_macs(dense, x)},
        "results": rows,
        "auto_latency_target": auto_plan.target["latency_target"],
        "latency_model": latency.to_dict(),
        "environment": capture_environment(),
    }
    atomic_write_json(args.out, result)
    for name, row in rows.items():
        print(
            f"{name:<8} {row['target']:<10} {row['measured_ms']:.2f} ms ×{row['measured_speedup']:.2f} "
            f"(predicted {row['predicted_ms']:.2f} ms, {100 * row['prediction_relative_error']:+.1f}%), "
            f"params {row['params'] / 1e6:.2f}M, MACs {row['macs'] / 1e9:.2f}G, weight err² {row['weight_error_sq']:.4g}, "
            f"out rel L2 {row['output_rel_l2']:.3f}"
        )
    print(f"dense {ms[0]:.2f} ms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
