"""The target part of the run report: ``report.json["target"]``, ``["latency_model"]`` and their Markdown.

``compress.json["target"]`` is the plan's target record (``Plan.target``): every method writes
``ratio`` / ``flops`` and what it achieved (``achieved_ratio``, ``achieved_flops_reduction``); a run with
``SPEEDUP=`` / ``LATENCY_MS=`` (:func:`compress.latency.solve.compress_to_latency_`) adds
``latency_target`` (goal, predicted and planning-time measured ms) and ``latency_model`` (backend,
threads, lookup table). This module turns that, with the benchmark's ``latency.json``, into two stable
blocks:

* ``target`` — ``{"kind": "ratio"|"flops"|"speedup"|"latency_ms"|null, "value", "achieved"}``. ``achieved``
  is *measured* for latency targets (the speedup or the compressed p50 of this run's benchmark) and the
  plan's achieved parameter ratio / FLOPs reduction otherwise.
* ``latency_model`` — ``{"backend", "predicted_ms", "measured_ms", "relative_error", "table", ...}``:
  the planner's prediction checked against the benchmark's compressed p50. Without a latency target
  nothing was predicted (a post-hoc prediction would need torch and the block timings): ``measured_ms``
  is still the benchmark's p50 and the other fields are ``null``.

Reads JSON only (no torch), like the rest of :mod:`runtime.report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PROFILE_MD", "TARGET_KINDS", "latency_model_block", "profile_lines", "target_block", "target_markdown"]

PROFILE_MD = "profile.md"  # written by ``python -m runtime profile`` (runtime.profile)

TARGET_KINDS = ("ratio", "flops", "speedup", "latency_ms")
_ENV_NAMES = {"ratio": "RATIO", "flops": "FLOPS", "speedup": "SPEEDUP", "latency_ms": "LATENCY_MS"}
_FORMATS = {
    "ratio": "params ×{:.2f}",
    "flops": "{:.1%} of FLOPs removed",
    "speedup": "{:.2f}× measured (p50)",
    "latency_ms": "{:.3f} ms measured (p50)",
}


def _planned(plan_target: Any) -> tuple[str | None, float | None]:
    """The kind and value the run was planned for, from ``compress.json["target"]``."""
    if not isinstance(plan_target, Mapping):
        return None, None
    latency = plan_target.get("latency_target")
    if isinstance(latency, Mapping) and latency.get("kind") in TARGET_KINDS:
        return str(latency["kind"]), _float(latency.get("value"))
    if plan_target.get("kind") in TARGET_KINDS and plan_target.get("value") is not None:  # METHOD=auto
        return str(plan_target["kind"]), _float(plan_target["value"])
    for kind in ("flops", "ratio"):  # a FLOPS run may still record the ratio it derived, not the reverse
        if plan_target.get(kind) is not None:
            return kind, _float(plan_target[kind])
    return None, None


def target_block(plan_target: Any, ratios: Mapping[str, Any], compressed_p50: float | None) -> dict[str, Any]:
    """``report.json["target"]``: what the run aimed at and what it reached.

    Args:
        plan_target: ``compress.json["target"]`` (the plan's target record), or ``None``.
        ratios: The report's ``ratios`` block (``speedup_p50`` is this run's measured speedup).
        compressed_p50: The compressed model's p50 of ``latency.json`` in ms.
    """
    kind, value = _planned(plan_target)
    record = plan_target if isinstance(plan_target, Mapping) else {}
    achieved: float | None = None
    if kind == "speedup":
        achieved = _float(ratios.get("speedup_p50"))
    elif kind == "latency_ms":
        achieved = _float(compressed_p50)
    elif kind == "ratio":
        achieved = _float(record.get("achieved_ratio", ratios.get("params")))
    elif kind == "flops":
        achieved = _float(record.get("achieved_flops_reduction", ratios.get("flops_reduction")))
    met = None  # judged for the measured (latency) kinds only: the others are met by construction of the plan
    if kind in ("speedup", "latency_ms") and value is not None and achieved is not None:
        met = achieved <= value if kind == "latency_ms" else achieved >= value
    return {"kind": kind, "value": value, "achieved": achieved, "met": met}


def latency_model_block(plan_target: Any, compressed_p50: float | None, bench_threads: Any = None) -> dict[str, Any]:
    """``report.json["latency_model"]``: the planner's predicted ms against the benchmark's compressed p50.

    Args:
        plan_target: ``compress.json["target"]``.
        compressed_p50: The compressed model's p50 of ``latency.json`` in ms.
        bench_threads: Intra-op threads the benchmark ran with (``None`` = ONNX Runtime's default).

    Returns:
        ``{"backend", "predicted_ms", "measured_ms", "relative_error", "table", "threads",
        "bench_threads", "planning_measured_ms"}``; ``relative_error`` is ``(predicted − measured) /
        measured``. Without a latency target every field but ``measured_ms`` and ``bench_threads`` is
        ``None``.
    """
    record = plan_target if isinstance(plan_target, Mapping) else {}
    latency = record.get("latency_target") if isinstance(record.get("latency_target"), Mapping) else {}
    model = record.get("latency_model") if isinstance(record.get("latency_model"), Mapping) else {}
    predicted = _float(latency.get("predicted_ms", record.get("predicted_ms")))
    measured = _float(compressed_p50)
    error = None if predicted is None or not measured else (predicted - measured) / measured
    table = model.get("table")
    return {
        "backend": model.get("backend"),
        "predicted_ms": predicted,
        "measured_ms": measured,
        "relative_error": error,
        "table": dict(table) if isinstance(table, Mapping) else table,
        "threads": model.get("threads"),
        "bench_threads": bench_threads,
        "planning_measured_ms": _float(latency.get("measured_ms")),
    }


def target_markdown(report: Mapping[str, Any]) -> list[str]:
    """Bullet lines for ``report.md``: the target and, with a latency target, prediction vs measurement."""
    lines: list[str] = []
    target = report.get("target") or {}
    kind = target.get("kind")
    if kind is not None:
        value, achieved, met = target.get("value"), target.get("achieved"), target.get("met")
        verdict = "" if met is None else (" — met" if met else " — **missed**")
        goal = "n/a" if value is None else f"{_ENV_NAMES[kind]}={value:g}"
        reached = "n/a" if achieved is None else _FORMATS[kind].format(achieved)
        lines.append(f"- Target {goal}: achieved {reached}{verdict}")
    model = report.get("latency_model") or {}
    if model.get("predicted_ms") is not None:
        err = model.get("relative_error")
        table = model.get("table") or {}
        where = f", lookup table {table.get('path')} ({table.get('entries')} entries)" if table else ""
        lines.append(
            f"- Latency model ({model.get('backend')}, {model.get('threads')} thread(s){where}): predicted "
            f"{model['predicted_ms']:.3f} ms, measured p50 {_ms(model.get('measured_ms'))}"
            + ("" if err is None else f" ({100 * err:+.1f}%)")
        )
        threads, bench = model.get("threads"), model.get("bench_threads")
        if threads is not None and bench != threads:
            lines.append(
                f"- Note: the prediction is for {threads} thread(s) but the benchmark ran with "
                f"{'the default' if bench is None else bench}; rerun the benchmark with THREADS={threads} to compare"
            )
    return lines


def profile_lines(report: Mapping[str, Any]) -> list[str]:
    """A link to ``profile.md`` (``python -m runtime profile``) when the run directory has one."""
    if PROFILE_MD not in (report.get("artifacts") or []):
        return []
    return [f"- Per-layer profile (where the time goes, dense vs compressed): [{PROFILE_MD}]({PROFILE_MD})"]


def _ms(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f} ms"


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
