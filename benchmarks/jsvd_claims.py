"""Issue 5's claim on real data: joint SVD (LJSVD, RJSVD-1/-2, Bi-JSVD) vs Tai SVD and Tucker-2 at equal CF.

Chen et al. (Neurocomputing 2023) claim that sharing one factor across the same-shaped convs of a ResNet
stage beats per-layer Tai SVD and Tucker-2 at the same compression factor after fine-tuning (Table IV:
ResNet-34 CIFAR-10 at CF 22.07, LJSVD 93.97 % vs Tai 93.66 % vs Tucker 92.83 %). This script repeats the
comparison at small scale on Fashion-MNIST with a CIFAR-style ResNet-34 of reduced width:

1. train the dense net once (cached, resumable);
2. for each compression factor (whole-model parameter ratio) and each scheme — ``tai`` (the paper's
   per-layer baseline with its layer selection), ``tucker2`` (the same layers, uniform per-layer ratio),
   ``ljsvd``, ``rjsvd1``, ``rjsvd2``, ``bijsvd`` (p = 0.5, K = 30) — compress a copy (ρ bisected to the
   ratio), measure raw accuracy, fine-tune with one shared budget, measure again;
3. check that shared factors are still one tensor after fine-tuning;
4. export every model (BN folded, ONNX parity checked) and time them side by side on ONNX Runtime
   (one interleaved run, 1 thread); record params, the paper's CF (BN excluded), FLOPs (2 × MACs),
   ONNX size;
5. paired comparison on the same 10,000 test images (McNemar's exact test) of each joint scheme vs Tai
   and vs Tucker-2 — the confidence intervals of two accuracies overlap long before a paired test
   would call them equal;
6. separately: ImageNet-shape torchvision ResNet-34 (3×224×224, random weights — latency does not depend
   on weight values) compressed by each scheme at the paper's ρ = 0.075 (Table VI's CF 10.98), timed
   against dense on ORT CPU (the paper's Fig. 6 question: is a factorized net really faster?).

Usage (≈ 60–70 min on 2 idle CPU cores with the defaults; the dense training is cached):
    python -m benchmarks.jsvd_claims
    python -m benchmarks.jsvd_claims --render benchmarks/results/jsvd_claims.json   # tables only
"""

from __future__ import annotations

import argparse
import copy
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
from compress.api import compress_, method_config
from compress.methods.jsvd import norm_params
from compress.metrics import count_macs, count_params
from compress.train import TrainConfig

SCHEMES = ["tai", "tucker2", "ljsvd", "rjsvd1", "rjsvd2", "bijsvd"]
JOINT = ["ljsvd", "rjsvd1", "rjsvd2", "bijsvd"]
LABELS = {
    "tai": "Tai SVD",
    "tucker2": "Tucker-2",
    "ljsvd": "LJSVD",
    "rjsvd1": "RJSVD-1",
    "rjsvd2": "RJSVD-2",
    "bijsvd": "Bi-JSVD(0.5)",
}
# The paper decomposes layer2–4 only: stem, layer1 (conv2_x), shortcuts and FC stay dense. Tucker-2 gets
# the same layers so that every scheme spends its budget on the same convs.
TUCKER_EXCLUDE = ("layer1.*", "*downsample*")


def scheme_config(scheme: str, *, ratio: float | None = None, rho: float | None = None, bi_iters: int = 30) -> Any:
    """The method config of one scheme at a parameter ratio (or, for the joint family, an anchor ρ)."""
    if scheme == "tucker2":
        assert ratio is not None
        return method_config(
            "tucker2", ratio=ratio, round_to=1, min_rank=1, exclude=TUCKER_EXCLUDE, compress_linear=False
        )
    name = "jsvd-tai" if scheme == "tai" else scheme
    options: dict[str, Any] = {"bi_iters": bi_iters} if scheme == "bijsvd" else {}
    if rho is not None:
        return method_config(name, ratio=None, rho=rho, **options)
    return method_config(name, ratio=ratio, **options)


def shared_factors_intact(model: nn.Module, plan: Any) -> dict[str, Any]:
    """Whether every joint group's shared factor is still one tensor (same storage in every member).

    RJSVD shares the second (1×F2) conv of each member's chain, LJSVD the first (F1×1); Bi-JSVD members
    are ``ParallelSum(right, left)`` sharing ``right[1]`` and ``left[0]``.
    """
    shared = {"rjsvd": [("", 1)], "ljsvd": [("", 0)], "bijsvd": [("right", 1), ("left", 0)]}
    groups = plan.target.get("groups") or []
    broken = []
    for g in groups:
        for branch, index in shared[g["scheme"]]:
            chains = [model.get_submodule(f"{p}.{branch}" if branch else p) for p in g["members"]]
            if len({chain[index].weight.data_ptr() for chain in chains}) != 1:
                broken.append(f"{g['name']}:{branch or g['scheme']}")
    return {"groups": len(groups), "broken": broken}


def run_fmnist(args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1–5 (see the module docstring)."""
    baseline = dense_baseline(
        args.model,
        args.data,
        epochs=args.epochs,
        seed=args.seed,
        train_samples=args.train_samples,
        cache_root=args.cache,
    )
    prepared, dense, data, training, dense_acc = (
        baseline.prepared,
        baseline.model,
        baseline.data,
        baseline.training,
        baseline.accuracy,
    )
    example = torch.zeros(baseline.input_shape)
    dense_params, bn = count_params(dense), norm_params(dense)
    rows: dict[str, Any] = {
        "dense": {
            "params": dense_params,
            "cf_excluding_bn": 1.0,
            "macs": count_macs(dense, example),
            "accuracy": dense_acc.to_dict(),
            "train_wall_s": training["train_wall_s"],
        }
    }
    models: dict[str, nn.Module] = {"dense": dense}
    hits = {"dense": predictions(dense, data.test)}
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, warmup_epochs=0, seed=args.seed)
    for ratio in args.ratios:
        for scheme in args.schemes:
            key = f"{scheme}-x{ratio:g}"
            config = scheme_config(scheme, ratio=ratio, bi_iters=args.bi_iters)
            box: list[Any] = []

            def apply(m: nn.Module, config: Any = config, box: list[Any] = box) -> Any:
                plan = compress_(m, config, example, model_name=prepared.loaded.name)
                box.append(plan)
                return plan

            print(f"[{key}] compress + fine-tune …", file=sys.stderr)
            model, record = compress_and_finetune(dense, apply, data, finetune, example)
            plan = box[0]
            record.pop("plan", None)
            record.update(
                scheme=scheme,
                ratio_target=ratio,
                ratio_achieved=dense_params / record["params"],
                cf_excluding_bn=(dense_params - bn) / (record["params"] - bn),
                flops=2 * record["macs"],
                rho=plan.target.get("rho"),
                groups=plan.target.get("groups"),
                ranks={e.path: e.ranks for e in plan.factorized_layers},
                sharing_after_finetune=shared_factors_intact(model, plan),
                warnings=plan.warnings,
            )
            if scheme == "bijsvd":
                fits = [e.info["fit_errors"] for e in plan.factorized_layers if "fit_errors" in e.info]
                record["bi_fit_first_last"] = [[f[0], f[-1]] for f in fits]
            rows[key] = record
            models[key] = model
            hits[key] = predictions(model, data.test)
            print(
                f"[{key}] ×{record['ratio_achieved']:.2f} (CF {record['cf_excluding_bn']:.2f}) raw "
                f"{100 * record['raw']['top1']:.2f}% → {100 * record['finetuned']['top1']:.2f}% "
                f"({record['finetune_s']:.0f} s)",
                file=sys.stderr,
            )
    paired: dict[str, Any] = {}
    for ratio in args.ratios:
        for scheme in [s for s in args.schemes if s in JOINT]:
            for base in ("tai", "tucker2"):
                a, b = f"{scheme}-x{ratio:g}", f"{base}-x{ratio:g}"
                if a in hits and b in hits:
                    paired[f"{a} vs {b}"] = mcnemar(hits[a], hits[b])
    if args.latency_s > 0:
        print("ORT latency, all models interleaved …", file=sys.stderr)
        latency = ort_latency(
            models, baseline.input_shape, duration_s=args.latency_s * len(models), threads=args.threads
        )
        for name, row in latency.items():
            rows[name]["ort"] = row
    return {
        "model": prepared.loaded.name,
        "data": data.info.to_dict(),
        "train_samples": len(data.train),
        "dense_training": baseline.train_config.to_dict(),
        "dense_train_history": training.get("history"),
        "finetune": finetune.to_dict(),
        "rows": rows,
        "paired": paired,
    }


def run_imagenet_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Step 6: torchvision ResNet-34 at 224×224, every scheme at ρ vs dense, one interleaved ORT run."""
    from compress.models import load_model

    loaded = load_model("resnet34", "random", seed=args.seed)
    dense = loaded.model.eval()
    example = torch.zeros(1, 3, 224, 224)
    dense_params, bn = count_params(dense), norm_params(dense)
    models: dict[str, nn.Module] = {"dense": dense}
    rows: dict[str, Any] = {"dense": {"params": dense_params, "macs": count_macs(dense, example)}}
    tai_ratio = None
    for scheme in args.schemes:
        model = copy.deepcopy(dense)
        if scheme == "tucker2":
            assert tai_ratio is not None, "tai must come before tucker2 (Tucker-2 takes Tai's ratio)"
            config = scheme_config("tucker2", ratio=tai_ratio)
        else:
            config = scheme_config(scheme, rho=args.imagenet_rho, bi_iters=args.bi_iters)
        t0 = time.perf_counter()
        plan = compress_(model, config, example, model_name="resnet34")
        wall = time.perf_counter() - t0
        params = count_params(model)
        if scheme == "tai":
            tai_ratio = dense_params / params
        rows[scheme] = {
            "params": params,
            "macs": count_macs(model, example),
            "ratio": dense_params / params,
            "cf_excluding_bn": (dense_params - bn) / (params - bn),
            "rho": plan.target.get("rho"),
            "compress_s": wall,
        }
        models[scheme] = model.eval()
        print(f"[imagenet {scheme}] CF {rows[scheme]['cf_excluding_bn']:.2f} ({wall:.1f} s)", file=sys.stderr)
    if args.latency_s > 0:
        latency = ort_latency(
            models, (1, 3, 224, 224), duration_s=args.imagenet_latency_s * len(models), threads=args.threads
        )
        for name, row in latency.items():
            rows[name]["ort"] = row
    return {
        "model": "resnet34 (torchvision, random weights)",
        "input": [1, 3, 224, 224],
        "rho": args.imagenet_rho,
        "rows": rows,
    }


def render_markdown(result: dict[str, Any]) -> str:
    """The README tables of a result file."""
    fm = result["fmnist"]
    dense = fm["rows"]["dense"]
    lines = [
        f"Dense {fm['model']}: {dense['params'] / 1e6:.3f} M params, {2 * dense['macs'] / 1e6:.1f} M FLOPs, "
        f"top-1 {pct(dense['accuracy'])} {ci_text(dense['accuracy'])}; ORT p50 "
        f"{(dense.get('ort') or {}).get('latency_ms', {}).get('p50', float('nan')):.3f} ms.",
        "",
        "| target | scheme | CF (BN excl.) | params | FLOPs | ONNX KB | raw | fine-tuned (95 % CI) | ORT speedup (95 % CI) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in fm["rows"].items():
        if key == "dense":
            continue
        ort = row.get("ort") or {}
        kb = f"{ort['onnx_bytes'] / 1024:.0f}" if "onnx_bytes" in ort else "—"
        lines.append(
            f"| ×{row['ratio_target']:g} | {LABELS[row['scheme']]} | {row['cf_excluding_bn']:.2f} | "
            f"{row['params'] / 1e6:.3f} M | {row['flops'] / 1e6:.1f} M | {kb} | {pct(row['raw'])} | "
            f"**{pct(row['finetuned'])}** {ci_text(row['finetuned'])} | {speedup_text(ort)} |"
        )
    if fm.get("paired"):
        lines += ["", "| paired test (same 10,000 images) | only first right | only second right | McNemar p |"]
        lines.append("|---|---:|---:|---:|")
        for name, t in fm["paired"].items():
            lines.append(f"| {name} | {t['only_first_right']} | {t['only_second_right']} | {t['p_value']:.3g} |")
    im = result.get("imagenet")
    if im:
        lines += [
            "",
            f"ImageNet-shape ResNet-34 (3×224×224, batch 1, ORT CPU, 1 thread), every scheme at ρ = {im['rho']:g}:",
            "",
            "| scheme | CF (BN excl.) | params | FLOPs | p50 ms | speedup vs dense (95 % CI) | efficiency |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        d = im["rows"]["dense"]
        p50 = (d.get("ort") or {}).get("latency_ms", {}).get("p50")
        lines.append(f"| dense | 1.00 | {d['params'] / 1e6:.2f} M | {2 * d['macs'] / 1e9:.2f} G | {p50:.1f} | — | — |")
        for key, row in im["rows"].items():
            if key == "dense":
                continue
            ort = row.get("ort") or {}
            eff = ort.get("speedup_p50", float("nan")) / (d["macs"] / row["macs"])
            lines.append(
                f"| {LABELS[key]} | {row['cf_excluding_bn']:.2f} | {row['params'] / 1e6:.2f} M | "
                f"{2 * row['macs'] / 1e9:.2f} G | {ort.get('latency_ms', {}).get('p50', float('nan')):.1f} | "
                f"{speedup_text(ort)} | {eff:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs compression factor: fine-tuned (solid) and raw (dashed) per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["fmnist"]["rows"]
    fig, (ax_ft, ax_raw) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scheme in SCHEMES:
        pts = sorted((r["cf_excluding_bn"], r) for k, r in rows.items() if k != "dense" and r["scheme"] == scheme)
        if not pts:
            continue
        cf = [p[0] for p in pts]
        ft = [100 * p[1]["finetuned"]["top1"] for p in pts]
        lo = [100 * (p[1]["finetuned"]["top1"] - p[1]["finetuned"]["ci95"][0]) for p in pts]
        hi = [100 * (p[1]["finetuned"]["ci95"][1] - p[1]["finetuned"]["top1"]) for p in pts]
        ax_ft.errorbar(cf, ft, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[scheme])
        ax_raw.plot(cf, [100 * p[1]["raw"]["top1"] for p in pts], marker="o", linestyle="--", label=LABELS[scheme])
    dense = 100 * rows["dense"]["accuracy"]["top1"]
    for ax, title in ((ax_ft, "after fine-tuning"), (ax_raw, "raw (before fine-tuning)")):
        ax.axhline(dense, color="gray", linewidth=0.8, linestyle=":", label="dense")
        ax.set_xlabel("compression factor (params, BN excluded)")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"{result['fmnist']['model']} on Fashion-MNIST, {title}", fontsize=9)
        ax.grid(alpha=0.3)
    ax_ft.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet34_w0.25")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-samples", type=int, default=None, help="seeded training subset (default: all 60,000)")
    p.add_argument("--epochs", type=int, default=5, help="dense training epochs")
    p.add_argument("--ratios", type=float, nargs="+", default=[8.0, 16.0], help="whole-model parameter ratios")
    p.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    p.add_argument("--bi-iters", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--latency-s", type=float, default=4.0, help="seconds of ORT timing per model (0 = skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--imagenet-rho", type=float, default=0.075, help="ρ of the 224×224 latency part (0 = skip)")
    p.add_argument("--imagenet-latency-s", type=float, default=8.0)
    p.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/jsvd_claims.json"))
    p.add_argument("--render", type=Path, default=None, help="only print the Markdown tables of a result file")
    args = p.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        print(render_markdown(result))
        plot(result, args.render.with_suffix(".png"))
        return 0
    if "tucker2" in args.schemes and "tai" in args.schemes:
        args.schemes = ["tai", *[s for s in args.schemes if s != "tai"]]  # Tucker-2 at Tai's ratio (ImageNet part)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "jsvd_claims",
        "command": " ".join(["python", "-m", "benchmarks.jsvd_claims", *(argv if argv is not None else sys.argv[1:])]),
        "fmnist": run_fmnist(args),
    }
    if args.imagenet_rho > 0:
        result["imagenet"] = run_imagenet_latency(args)
    result["environment"] = environment(args.threads)
    result["wall_s"] = time.perf_counter() - t0
    write_results(args.out, result, render_markdown(result))
    plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
