"""Shared machinery of the real-data benchmarks: a cached dense model, compress → raw → fine-tune, latency.

Every method's accuracy benchmark (Tucker-2 reference, joint SVD, LRSD, CC, …) answers the same
questions with the same budget, so they share this code:

* :func:`trained_dense` trains (or reloads, from a cache folder with a resumable checkpoint) the dense
  model on the dataset; :func:`dense_baseline` does it for a model/dataset pair by name, in the cache
  folder layout every claims script shares, and measures the dense accuracy;
* :func:`compress_and_finetune` applies one compression variant to a copy, measures raw accuracy,
  fine-tunes with the given budget, measures again, and records params/MACs/wall times;
* :func:`ort_latency` exports every model through the project's export pipeline (BN folded, parity
  checked) and times them side by side with the runtime harness (ratios from one interleaved run);
* :func:`predictions` + :func:`mcnemar` compare two models on the same test images (paired exact test),
  and the ``*_text`` helpers format result tables.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.data import Dataset
from compress.metrics import count_macs, count_params
from compress.train import Accuracy, TrainConfig, Trainer, evaluate

__all__ = [
    "DenseBaseline",
    "ci_text",
    "compress_and_finetune",
    "cpu_name",
    "dense_baseline",
    "environment",
    "mcnemar",
    "ort_latency",
    "pct",
    "predictions",
    "speedup_text",
    "trained_dense",
    "write_results",
]


def trained_dense(
    model: nn.Module, data: Dataset, config: TrainConfig, cache_dir: Path, *, meta: dict[str, Any]
) -> dict[str, Any]:
    """Train ``model`` in place (resuming/reusing ``cache_dir``); return the training record."""
    from compress.workflow import train_model

    t0 = time.perf_counter()
    result = train_model(model, data, config, cache_dir, meta=meta, device="cpu", progress=False)
    model.eval()
    record = result.to_dict()
    record["wall_s_this_call"] = time.perf_counter() - t0
    record["train_wall_s"] = sum(e["wall_s"] for e in result.history)
    return record


@dataclass
class DenseBaseline:
    """The trained dense model of a claims benchmark and what was measured on it."""

    prepared: Any  # compress.workflow.Prepared: the loaded model spec and the dataset
    train_config: TrainConfig
    training: dict[str, Any]  # :func:`trained_dense`'s record
    accuracy: Accuracy

    @property
    def model(self) -> nn.Module:
        """The trained dense model (in eval mode)."""
        return self.prepared.loaded.model

    @property
    def data(self) -> Dataset:
        """The dataset (training subset and test split)."""
        return self.prepared.data

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's batch-1 input shape."""
        return (1, *self.prepared.loaded.input_shape)


def dense_baseline(
    model_name: str,
    data_name: str,
    *,
    epochs: int,
    seed: int,
    train_samples: int | None,
    cache_root: Path,
    label: str = "",
    eval_samples: int | None = None,
) -> DenseBaseline:
    """Load ``model_name`` with random init, train it (cached in ``cache_root``), evaluate it on the test split.

    The cache folder is ``<cache_root>/<model>/train-<data>-n<train images>-e<epochs>-s<seed>``, so every
    script asking for the same dense training reuses it. ``eval_samples`` evaluates on a fixed seeded subset
    of the test split (per epoch and at the end) instead of all of it.
    """
    from compress.workflow import prepare

    prepared = prepare(model_name, "random", data_name, seed=seed, train_samples=train_samples)
    dense, data = prepared.loaded.model, prepared.data
    train_config = TrainConfig(epochs=epochs, seed=seed, eval_samples=eval_samples)
    cache = cache_root / prepared.loaded.name / f"train-{data.info.name}-n{len(data.train)}-e{epochs}-s{seed}"
    meta = {"model_spec": prepared.loaded.spec, "data": data.info.name, "weights": "random-init"}
    print(f"{label}dense training ({epochs} epochs on {len(data.train)} images, cached in {cache}) …", file=sys.stderr)
    training = trained_dense(dense, data, train_config, cache, meta=meta)
    accuracy = evaluate(dense, data.test, max_samples=eval_samples)
    print(f"{label}dense: {accuracy}", file=sys.stderr)
    return DenseBaseline(prepared, train_config, training, accuracy)


def compress_and_finetune(
    dense: nn.Module,
    compress_fn: Callable[[nn.Module], Any],
    data: Dataset,
    finetune: TrainConfig,
    example: torch.Tensor,
    *,
    eval_samples: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress a copy of ``dense`` with ``compress_fn`` (in place), fine-tune it, measure both stages.

    Returns:
        The fine-tuned model and its record: params, MACs, compress wall time, raw and fine-tuned
        accuracy (Accuracy dicts), fine-tuning wall time and per-epoch history.
    """
    model = copy.deepcopy(dense).eval()
    t0 = time.perf_counter()
    plan = compress_fn(model)
    compress_s = time.perf_counter() - t0
    model.eval()
    raw = evaluate(model, data.test, max_samples=eval_samples)
    t0 = time.perf_counter()
    result = Trainer(model, finetune, data.train, data.test, device="cpu", progress=False).fit()
    finetune_s = time.perf_counter() - t0
    model.eval()
    final = result.final if result.final is not None else evaluate(model, data.test, max_samples=eval_samples)
    record = {
        "params": count_params(model),
        "macs": count_macs(model, example),
        "compress_s": compress_s,
        "raw": raw.to_dict(),
        "finetuned": final.to_dict(),
        "finetune_s": finetune_s,
        "finetune_history": result.history,
        "plan": None if plan is None or not hasattr(plan, "to_dict") else _plan_summary(plan),
    }
    return model, record


def _plan_summary(plan: Any) -> dict[str, Any]:
    return {
        "target": plan.target,
        "ranks": {e.path: e.ranks for e in plan.factorized_layers},
        "kept": [e.path for e in plan.layers if not e.ranks],
    }


def ort_latency(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    *,
    duration_s: float = 20.0,
    threads: int | None = 1,
    baseline: str = "dense",
) -> dict[str, dict[str, Any]]:
    """Export each model (BN folded, parity checked) and time all of them side by side on ORT CPU."""
    from export import check_onnx_parity, onnx_from_torch, optimize, save_onnx
    from runtime import BenchmarkConfig, OrtRunner, benchmark

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            proto = optimize(onnx_from_torch(model.eval(), torch.zeros(input_shape)))
            save_onnx(proto, path)
            parity = check_onnx_parity(model, path, input_shape=input_shape)
            paths[name] = path
            rows[name] = {"onnx_bytes": path.stat().st_size, "parity_max_abs": parity.max_abs}
        runners = {k: OrtRunner(v, intra_op_threads=threads) for k, v in paths.items()}
        gen = torch.Generator().manual_seed(0)
        feed = {"input": torch.randn(input_shape, generator=gen).numpy()}
        result = benchmark(runners, feed, BenchmarkConfig(duration_s=duration_s, warmup_s=1.0, batch=input_shape[0]))
    for name, row in rows.items():
        s = result.stats[name]
        row["latency_ms"] = {"p50": s.p50, "p90": s.p90, "p99": s.p99, "n": s.n}
        if name != baseline:
            est = result.speedup(baseline, name)
            row["speedup_p50"] = est.ratio
            row["speedup_ci95"] = list(est.ci95)
    return rows


def predictions(model: nn.Module, split: Any, batch_size: int = 1000) -> torch.Tensor:
    """Top-1 correctness (bool per test image, in split order) for the paired test."""
    from compress.data import BatchLoader

    model.eval()
    hits = []
    with torch.no_grad():
        for images, labels in BatchLoader(split, batch_size, shuffle=False):
            hits.append(model(images).argmax(1) == labels)
    return torch.cat(hits)


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Exact two-sided McNemar test of two classifiers' correctness on the same images."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return {"only_first_right": only_a, "only_second_right": only_b, "p_value": p}


def pct(acc: dict[str, Any] | None) -> str:
    """``92.57 %`` from an Accuracy dict (``—`` for none)."""
    return "—" if not acc else f"{100 * acc['top1']:.2f} %"


def ci_text(acc: dict[str, Any]) -> str:
    """``(92.0–93.1)``: the Wilson 95 % interval of an Accuracy dict, in percent."""
    return f"({100 * acc['ci95'][0]:.1f}–{100 * acc['ci95'][1]:.1f})"


def speedup_text(ort: dict[str, Any] | None) -> str:
    """``2.03× (1.98–2.10)`` from an :func:`ort_latency` row (``—`` for the baseline or no timing)."""
    if not ort or "speedup_p50" not in ort:
        return "—"
    lo, hi = ort["speedup_ci95"]
    return f"{ort['speedup_p50']:.2f}× ({lo:.2f}–{hi:.2f})"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for result files."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return platform.processor() or "cpu"


def environment(ort_threads: int | None) -> dict[str, Any]:
    """What a result file records about the machine it was measured on."""
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "ort_threads": ort_threads,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(out: Path, result: dict[str, Any], markdown: str) -> None:
    """``out`` (JSON, atomically) and its ``.md`` twin with the README tables; echo the tables to stderr."""
    from lowrank_core.io import atomic_path, atomic_write_json

    atomic_write_json(out, result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown)
    print(markdown, file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
