"""Beyond classifiers: `RATIO=2` on one segmentation, one detection, three timm models and a ViT (ORT CPU).

For each model: compress in-process (Tucker-2 for the CNNs, SVD for the ViT, whose weights are all
Linear), export dense and compressed through the project's pipeline (BN folded, graph cleaned), check
ONNX Runtime parity over every named output, and time the pair side by side with the runtime harness.
Weights are random, re-drawn Kaiming-normal (fan-in) so activations keep their scale through the untrained
nets (SSDlite's own initialisation gives outputs of order 1e-21 and torchvision's ViT a zero head, which
would make parity vacuous); timing does not depend on weight values and accuracy is not measured. The
ViT row also times the dense model with its attention unfused into q/k/v/out Linear layers (the graph
shape the compressed model has), so the speedup of factorization alone is separated from that of
unfusing. Input
sizes are stated per row; they are smaller than the models' defaults (520 for segmentation, 320 for
SSDlite) only where the row says so, to keep the whole run under ten minutes on a 2-core machine.

Usage:
    python -m benchmarks.families --duration 8 --out benchmarks/results/families_ratio2.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compress.attention import unfused_view
from compress.methods import get_method
from compress.metrics import count_macs, count_params
from compress.models import load_model
from export import check_onnx_parity, graph_summary, onnx_from_torch, optimize, save_onnx
from lowrank_core.errors import CompressionError
from lowrank_core.io import atomic_write_json
from runtime import BenchmarkConfig, OrtRunner, benchmark, capture_environment

# family -> (MODEL spec, method, input size)
FAMILIES: dict[str, tuple[str, str, int]] = {
    "segmentation": ("lraspp_mobilenet_v3_large", "tucker2", 224),
    "detection": ("ssdlite320_mobilenet_v3_large", "tucker2", 320),
    "timm-convnext": ("timm:convnext_atto", "tucker2", 224),
    "timm-regnet": ("timm:regnety_008", "tucker2", 224),
    "timm-efficientnet": ("timm:efficientnet_b0", "tucker2", 224),
    "vit": ("vit_b_16", "svd", 224),
}


def _export(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proto = optimize(onnx_from_torch(model, torch.zeros(shape)))
    save_onnx(proto, path)
    parity = check_onnx_parity(model, path, input_shape=shape, raise_on_failure=False)
    summary = graph_summary(proto)
    return {
        "outputs": list(summary["outputs"]),
        "n_nodes": summary["n_nodes"],
        "parity": parity.to_dict(),
        "export_s": time.perf_counter() - t0,
    }


def run_family(family: str, ratio: float, duration: float, threads: int | None, tmp: Path) -> dict[str, Any]:
    """Compress, export and time one family's model; the row of the JSON record."""
    spec, method_name, size = FAMILIES[family]
    loaded = load_model(spec, "random", input_size=size)
    dense = _lively_(loaded.model)
    shape = (1, *loaded.input_shape)
    example = torch.zeros(shape)
    row: dict[str, Any] = {"model": spec, "method": method_name, "input_shape": list(shape), "task": loaded.task}
    dense_params, dense_macs = count_params(dense), count_macs(dense, example)
    model = copy.deepcopy(dense)
    method = get_method(method_name)
    t0 = time.perf_counter()
    try:
        plan = method.compress_(model, method.config_type(method=method_name, ratio=ratio), example, model_name=spec)
    except CompressionError as exc:
        row["error"] = str(exc)
        return row
    row["compress_s"] = time.perf_counter() - t0
    params, macs = count_params(model), count_macs(model, example)
    row.update(
        dense={"params": dense_params, "macs": dense_macs},
        compressed={"params": params, "macs": macs},
        param_ratio=dense_params / params,
        mac_ratio=dense_macs / macs,
        factorized=len(plan.factorized_layers),
        kept=len(plan.layers) - len(plan.factorized_layers),
    )
    paths = {"dense": tmp / f"{family}-dense.onnx", "compressed": tmp / f"{family}-compressed.onnx"}
    row["export"] = {
        "dense": _export(dense, shape, paths["dense"]),
        "compressed": _export(model, shape, paths["compressed"]),
    }
    unfused = unfused_view(dense)
    if unfused is not dense:
        paths["dense_unfused"] = tmp / f"{family}-dense-unfused.onnx"
        row["export"]["dense_unfused"] = _export(unfused, shape, paths["dense_unfused"])
    runners = {k: OrtRunner(v, intra_op_threads=threads) for k, v in paths.items()}
    gen = torch.Generator().manual_seed(0)
    result = benchmark(
        runners,
        {"input": torch.randn(shape, generator=gen).numpy()},
        BenchmarkConfig(duration_s=duration, warmup_s=1.0, batch=1),
    )
    for name in paths:
        stats = result.stats[name]
        row.setdefault("latency_ms", {})[name] = {"p50": stats.p50, "p90": stats.p90, "mean": stats.mean, "n": stats.n}
    est = result.speedup("dense", "compressed")
    row["speedup_p50"] = est.ratio
    row["speedup_ci95"] = list(est.ci95)
    if "dense_unfused" in paths:
        est = result.speedup("dense_unfused", "compressed")
        row["speedup_vs_unfused_p50"] = est.ratio
        row["speedup_vs_unfused_ci95"] = list(est.ci95)
    return row


def _lively_(model: torch.nn.Module) -> torch.nn.Module:
    """Kaiming-normal (fan-in) conv/Linear weights, seeded: untrained activations keep their scale."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0.0, math.sqrt(1.0 / m.weight[0].numel()), generator=gen)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Run the families and write the JSON record."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=8.0, help="seconds of timed inference per dense/compressed pair")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows: dict[str, Any] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            t0 = time.perf_counter()
            rows[family] = run_family(family, args.ratio, args.duration, args.threads, Path(tmp))
            rows[family]["wall_s"] = time.perf_counter() - t0
            r = rows[family]
            if "error" in r:
                print(f"{family}: {r['error']}", file=sys.stderr)
                continue
            print(
                f"{family:<14} {r['model']:<32} params ×{r['param_ratio']:.2f} MACs ×{r['mac_ratio']:.2f} "
                f"parity {'ok' if r['export']['compressed']['parity']['passed'] else 'FAIL'} "
                f"speedup ×{r['speedup_p50']:.2f} ({r['wall_s']:.0f} s)",
                file=sys.stderr,
            )
    record = {
        "ratio": args.ratio,
        "backend": "onnxruntime-cpu",
        "duration_s": args.duration,
        "weights": "random, Kaiming-normal fan-in re-draw (timing does not depend on weight values; accuracy not measured)",
        "total_wall_s": time.perf_counter() - start,
        "rows": rows,
        "env": capture_environment(),
    }
    atomic_write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
