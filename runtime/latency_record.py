"""The latency record of a benchmark: ``latency.json``, ``latency.md`` and ``latency.png``.

:func:`write_latency` writes all three atomically; matplotlib is imported only inside :func:`plot_latency` and
draws on an Agg canvas without touching pyplot's global state (a device without matplotlib gets no plot).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from lowrank_core.io import atomic_path, atomic_write_text
from lowrank_core.rundir import COMPRESSED, DENSE, LatencyRecord, RunDir
from runtime.gpu import latency_gpu_lines
from runtime.harness import BenchmarkResult

__all__ = ["latency_markdown", "latency_record", "latency_table", "mb", "plot_latency", "speedup_pair", "write_latency"]

BASELINE = DENSE
CANDIDATE = COMPRESSED


# ----------------------------------------------------------------------------------------------


def latency_record(
    result: BenchmarkResult,
    env: Mapping[str, Any],
    *,
    backend: str,
    batch: int,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the ``latency.json`` dict from a benchmark result.

    Schema::

        {"backend", "batch", "config": BenchmarkConfig fields, "env": capture_environment(),
         "runners": {key: Runner.info()},
         "results": {key: {"n", "p50", "p90", "p99", "mean", "std", "min", "max", "throughput",
                           "samples_ms": [...]}},            # times in ms, throughput in items/s
         "warmup": {key: {"iters", "s"}},
         "speedup": {"baseline", "candidate", "p50_ratio", "ci95": [lo, hi], "confidence", "n_boot", "seed"}
                    | null,
         "memory": {"process": {...}, "runners": {key: {...}}}, "wall_s"}

    ``speedup`` compares ``compressed`` with ``dense`` when both keys exist, else the second runner with
    the first when there are exactly two, else it is ``null``.
    """
    data = result.to_dict(include_samples=True)
    pair = speedup_pair(list(result.stats))
    speed = None
    if pair is not None:
        estimate = result.speedup(pair[0], pair[1], n_boot=n_boot, seed=seed)
        speed = {"baseline": pair[0], "candidate": pair[1], **estimate.to_dict()}
    return {
        "backend": backend,
        "batch": batch,
        "config": data["config"],
        "env": dict(env),
        "runners": data["runners"],
        "results": data["results"],
        "warmup": data["warmup"],
        "speedup": speed,
        "memory": data["memory"],
        "wall_s": data["wall_s"],
    }


def write_latency(
    run_dir: str | os.PathLike[str],
    result: BenchmarkResult,
    env: Mapping[str, Any],
    *,
    backend: str,
    batch: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``latency.json``, ``latency.md`` and ``latency.png`` into ``run_dir``; return the JSON dict.

    ``extra`` adds top-level keys (e.g. ``jetson``: tegrastats summary, power mode and clocks).

    Without matplotlib (a bare device) the plot is skipped with a note on stderr.

    See :func:`latency_record` for the JSON schema.
    """
    rd = RunDir(run_dir)
    record = latency_record(result, env, backend=backend, batch=batch)
    record.update(extra or {})
    LatencyRecord.from_dict(record).write(rd.latency_json)
    atomic_write_text(rd.latency_md, latency_markdown(record))
    samples = {key: entry["samples_ms"] for key, entry in record["results"].items()}
    try:
        plot_latency(samples, rd.latency_png, title=f"{backend}, batch {batch}")
    except RuntimeUnavailableError as exc:  # a device with numpy + onnxruntime only: no plot, numbers intact
        print(f"note: {rd.latency_png.name} not written: {exc}", file=sys.stderr)
    return record


def latency_markdown(record: Mapping[str, Any]) -> str:
    """Markdown table of a ``latency.json`` dict: model, p50, p90, p99, mean ± std, throughput, RSS."""
    lines = [
        f"# Latency ({record['backend']}, batch {record['batch']})",
        "",
        latency_table(record),
        "",
    ]
    speed = record.get("speedup")
    if speed:
        lo, hi = speed["ci95"]
        lines.append(
            f"Speedup of {speed['candidate']} over {speed['baseline']} (p50 ratio): "
            f"**{speed['p50_ratio']:.3f}×** (95% CI {lo:.3f}–{hi:.3f})"
        )
        lines.append("")
    cfg = record.get("config", {})
    mode = (
        f"interleaved in blocks of {cfg.get('block')} timed runs (after {cfg.get('block_warmup')} untimed) "
        "alternating A B, B A"
        if cfg.get("interleave")
        else "sequential"
    )
    budget = f"{cfg.get('iters')} iterations" if cfg.get("iters") else f"{cfg.get('duration_s')} s"
    lines.append(
        f"Method: {mode}, {budget} per run (min {cfg.get('min_iters')} per model), warm-up "
        f"≥ {cfg.get('warmup_iters')} iterations and ≥ {cfg.get('warmup_s')} s per model."
    )
    lines.append("")
    lines += latency_gpu_lines(record)
    return "\n".join(lines)


def latency_table(record: Mapping[str, Any]) -> str:
    """The Markdown table alone (one row per runner key)."""
    rows = [
        "| model | n | p50 ms | p90 ms | p99 ms | mean ± std ms | throughput /s | RSS MB | +activate MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mem = record.get("memory", {}).get("runners", {})
    for key, stats in record["results"].items():
        runner_mem = mem.get(key, {})
        rows.append(
            f"| {key} | {stats['n']} | {stats['p50']:.3f} | {stats['p90']:.3f} | {stats['p99']:.3f} | "
            f"{stats['mean']:.3f} ± {stats['std']:.3f} | {stats['throughput']:.1f} | "
            f"{mb(runner_mem.get('rss_after_activate_bytes'))} | "
            f"{mb(runner_mem.get('activate_rss_delta_bytes'))} |"
        )
    return "\n".join(rows)


def plot_latency(
    samples_ms: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path:
    """Violin + box plot of per-iteration latency per model, with each p50 annotated; written as PNG.

    Violins and boxes cover samples up to each model's p99 (so rare outliers do not flatten them); p99 is
    marked and the maximum is given under each name. Uses matplotlib's object API on an Agg canvas (no
    pyplot, no global backend switch).

    Raises:
        UserInputError: if a model has no samples.
        RuntimeUnavailableError: if matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeUnavailableError(
            "latency plots need matplotlib; install it with `pip install matplotlib`"
        ) from None

    names = list(samples_ms)
    data = [np.asarray(samples_ms[n], dtype=np.float64) for n in names]
    if not data or any(d.size == 0 for d in data):
        raise UserInputError("plot_latency needs at least one sample per model")
    fig = Figure(figsize=(max(4.0, 1.8 * len(names) + 1.5), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(1, len(names) + 1)
    # Violins show the bulk (up to p99 of each model) so that rare outliers don't squash them; p99 is
    # marked, and the maximum is given in the label.
    p50s = [float(np.percentile(d, 50)) for d in data]
    p99s = [float(np.percentile(d, 99)) for d in data]
    trimmed = [d[d <= hi] if np.count_nonzero(d <= hi) > 1 else d for d, hi in zip(data, p99s, strict=True)]
    ax.violinplot(trimmed, positions=positions, showextrema=False)
    # The box uses every sample, so its median line is the reported p50.
    ax.boxplot(data, positions=positions, widths=0.15, showfliers=False)
    ax.scatter(positions, p99s, marker="_", s=200, color="tab:red", label="p99", zorder=3)
    for pos, p50 in zip(positions, p50s, strict=True):
        ax.annotate(f"p50 {p50:.3f} ms", xy=(pos, p50), xytext=(pos + 0.12, p50), fontsize=8, va="center")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{n}\n(n={d.size}, max {d.max():.3g} ms)" for n, d in zip(names, data, strict=True)])
    top = max(p99s)
    ax.set_ylim(0.0, top * 1.15 if top > 0 else 1.0)
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title(title or "latency")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    dest = Path(path)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    return dest


def speedup_pair(keys: list[str]) -> tuple[str, str] | None:
    """The (baseline, candidate) pair of a result's models: dense vs compressed, or the two models there are."""
    if BASELINE in keys and CANDIDATE in keys:
        return BASELINE, CANDIDATE
    if len(keys) == 2:
        return keys[0], keys[1]
    return None


def mb(value: float | None) -> str:
    """Bytes as megabytes with one decimal (``n/a`` for None)."""
    return "n/a" if value is None else f"{value / 1e6:.1f}"
