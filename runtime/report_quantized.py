"""The quantized part of the run report: ``report.json["quantized"]`` and its Markdown rows.

``python -m export quantize`` writes ``quantize.json`` (:class:`lowrank_core.rundir.QuantizedRecord`);
``python -m runtime bench`` times ``dense_int8`` / ``compressed_int8`` beside the FP32 models in one
interleaved run. This module joins the two for :func:`runtime.report.write_report`: FP32 rows stay, the
quantized ones are added, so one report answers what low-rank buys, what INT8 buys and what both buy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lowrank_core.integrity import file_digests
from lowrank_core.rundir import COMPRESSED, DENSE, LatencyRecord, RunDir

__all__ = ["quantized_accuracy", "quantized_block", "quantized_markdown", "speedup_quantized_p50"]


def quantized_block(rd: RunDir, latency: LatencyRecord) -> dict[str, Any] | None:
    """``report.json["quantized"]``, or ``None`` without ``quantize.json`` or when it is stale.

    Stale: the record's ``inputs`` digests differ from the current ``dense.onnx`` / ``model.onnx`` (it
    quantized files of another export).
    """
    record = rd.read_quantized()
    if record is None:
        return None
    if record.inputs and file_digests(rd.path, list(record.inputs)) != record.inputs:
        return None
    return record.report_block(latency.results)


def speedup_quantized_p50(report: Mapping[str, Any], quantized: Mapping[str, Any] | None) -> float | None:
    """Dense FP32 p50 / compressed quantized p50 (``None`` when the quantized model was not timed)."""
    latency = ((quantized or {}).get(COMPRESSED) or {}).get("latency_ms")
    dense = (report.get(DENSE) or {}).get("latency_ms") or {}
    if not latency or not latency.get("p50") or dense.get("p50") is None:
        return None
    return float(dense["p50"]) / float(latency["p50"])


def quantized_accuracy(rd: RunDir) -> dict[str, Any] | None:
    """``accuracy.quantized = {"dense", "compressed"}`` from ``quantize.json`` (with data), else ``None``."""
    record = rd.read_quantized()
    if record is None or not record.accuracy:
        return None
    keep = ("top1", "top5", "ci95", "n", "loss")
    return {k: {f: v.get(f) for f in keep} if isinstance(v, Mapping) else None for k, v in record.accuracy.items()}


def quantized_markdown(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(rows for the dense/compressed table, bullet lines) describing ``report["quantized"]``."""
    q = report.get("quantized")
    if not q:
        return [], []
    d, c = q[DENSE], q[COMPRESSED]
    one_format = d.get("format") == c.get("format") and q.get("format") != q.get("precision")
    label = f"{q['precision']}, {q['format']}" if one_format else q["precision"]
    rows = [
        f"| ONNX MB, {label} | {_mb(d.get('onnx_bytes'))} | {_mb(c.get('onnx_bytes'))} | "
        f"{_x(_ratio(d.get('onnx_bytes'), c.get('onnx_bytes')))} |"
    ]
    if d.get("latency_ms") and c.get("latency_ms"):
        for p in ("p50", "p90", "p99"):
            dq, cq = d["latency_ms"][p], c["latency_ms"][p]
            rows.append(f"| {p} ms, {label} | {dq:.3f} | {cq:.3f} | {_x(_ratio(dq, cq))} |")
    ratios = report.get("ratios") or {}
    bullets = []
    if ratios.get("speedup_quantized_p50") is not None:
        dense_fp32 = (report.get(DENSE) or {}).get("latency_ms", {}).get("p50")
        bullets.append(
            f"- **Speedup, compressed {q['precision']} vs dense FP32 (p50): {_x(ratios['speedup_quantized_p50'])}** "
            f"(low-rank alone {_x(ratios.get('speedup_p50'))}; {q['precision']} alone "
            f"{_x(_ratio(dense_fp32, (d.get('latency_ms') or {}).get('p50')))})"
        )
    elif q.get("timing_note"):
        bullets.append(f"- {q['precision']} latency {q['timing_note']}")
    if not one_format and q.get("format") != q.get("precision"):
        bullets.append(f"- {q['precision']} format (auto: the fastest per model): {q['format']}")
    calib = q.get("calibration") or {}
    if calib:
        bullets.append(f"- Calibration: {calib.get('n')} {calib.get('source')} inputs, {calib.get('method')}")
    for key, side in ((DENSE, d), (COMPRESSED, c)):
        a = side.get("agreement") or {}
        bullets.append(
            f"- {key} {q['precision']} vs FP32 ONNX ({a.get('n')} inputs): rel_l2 {_g(a.get('rel_l2'))}, "
            f"cosine {_g(a.get('cosine'), 6)}, top-1 agreement {_g(a.get('top1'))}, max_abs {_g(a.get('max_abs'))}"
        )
    layers = q.get("float_layers") or []
    if layers:
        names = ", ".join(f"{f.get('model')}:{f.get('node')} ({f.get('reason')})" for f in layers[:12])
        more = f", … {len(layers) - 12} more" if len(layers) > 12 else ""
        bullets.append(f"- Left in float ({len(layers)}): {names}{more}")
    acc = (report.get("accuracy") or {}).get("quantized") if isinstance(report.get("accuracy"), Mapping) else None
    if acc:
        parts = [f"{k} {100 * v['top1']:.2f}% (n={v['n']})" for k, v in acc.items() if v and v.get("top1") is not None]
        bullets.append(f"- Accuracy, {q['precision']} ONNX (ONNX Runtime): " + ", ".join(parts))
    return rows, bullets


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}"


def _g(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)
