"""The run report (``report.json/.md``); the latency record (``latency.json/.md/.png``) is :mod:`runtime.latency_record`.

A run directory (file names and records in :mod:`lowrank_core.rundir`) collects the stages' outputs::

    compress.json   compress stage: model, method, weights, params/MACs, agreement
    dense.onnx      export stage: the dense model
    model.onnx      export stage: the compressed model
    parity.json     export stage: ONNX vs PyTorch error for both models
    latency.json    runtime bench: per-model latency statistics, samples, speedup, memory, environment
    report.json     runtime report: the summary automation reads (stable keys, see :func:`write_report`)

All files are written atomically (temporary name, then rename). matplotlib is imported only inside
:func:`plot_latency`, and it draws on an Agg canvas without touching pyplot's global state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowrank_core.errors import UserInputError
from lowrank_core.integrity import stale_sparse_onnx, verify_chain
from lowrank_core.io import atomic_write_json, atomic_write_text
from lowrank_core.rundir import (
    COMPRESSED,
    DENSE,
    LATENCY_JSON,
    LATENCY_PNG,
    PARITY_JSON,
    REPORT_JSON,
    REPORT_MD,
    SPARSE_ONNX,
    STAGE_HINTS,
    RunDir,
)
from runtime.gpu import engine_records, latency_gpu_lines
from runtime.latency_record import (
    mb,
)
from runtime.report_quantized import quantized_accuracy, quantized_block, quantized_markdown, speedup_quantized_p50
from runtime.report_target import latency_model_block, profile_lines, target_block, target_markdown

BASELINE = DENSE
CANDIDATE = COMPRESSED


# Report -----------------------------------------------------------------------------------------------


def _parity_block(parity: Any, par_c: Mapping[str, Any]) -> dict[str, Any]:
    """``report.json``'s ``parity``: the compressed model against its reference (PyTorch, or the original ONNX)."""
    return {
        "max_abs": par_c.get("max_abs"),
        "max_rel": par_c.get("max_rel"),
        "atol": parity.atol,
        "rtol": parity.rtol,
        "reference": parity.to_dict().get("reference") or "PyTorch",
        **_parity_outputs(par_c),
    }


def write_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Assemble ``report.json`` and ``report.md`` from a run directory; return the JSON dict.

    ``report.json`` keys (a stable contract read by automation)::

        {"model", "method", "weights", "input_shape", "backend", "batch",
         "dense": {"params", "macs", "onnx_bytes", "latency_ms": {"p50", "p90", "p99"}},
         "compressed": {same keys},
         "parity": {"max_abs", "max_rel", "atol", "rtol", "reference",  # compressed ONNX vs its reference
                    "passed", "outputs": {ONNX output name: {"max_abs", "max_rel", "passed"}}},
         "parity_dense": {"max_abs", "max_rel", "passed", "outputs"},  # dense ONNX vs its PyTorch
                    # passed/outputs: absent for a parity.json written before per-output results
         "sparse_onnx": null | {"file", "onnx_bytes", "max_abs", "sparse_values", "n_sparse_initializers"},
         "sparse_storage": null | {"params_values", "params_with_index", "ratio_values", "ratio_with_index",
                                   "macs_sparse_kernel", "macs_2to4"},  # low-rank + sparse (LRSD) runs
         "warnings": [the method's plan warnings, e.g. a weight-only fallback without calibration data],
         "ratios": {"params", "macs", "speedup_p50", "speedup_ci95", "efficiency", "flops_reduction",
                    "speedup_quantized_p50": dense FP32 p50 / compressed quantized p50, or null},
         "target": {"kind": "ratio"|"flops"|"speedup"|"latency_ms"|null, "value", "achieved", "met"},
         "latency_model": {"backend", "predicted_ms", "measured_ms", "relative_error", "table", ...},
                          # see runtime.report_target (null fields without a SPEEDUP/LATENCY_MS target)
         "quantized": null | {"precision", "format", "calibration": {"source", "n", "method", "seed"},
                      "float_layers": [{"model", "node", "op", "reason"}], "warnings": [...],
                      "dense": {"onnx_bytes", "latency_ms": {"p50", "p90", "p99"} | null, "agreement"},
                      "compressed": {same}}   # from quantize.json (python -m export quantize)
         "weights_warning": str | null, "agreement": from compress.json,
         "accuracy": null (no DATA) | {"data", "n", "dense", "raw", "finetuned"}, each {"top1", "top5",
                     "ci95", "n", "loss"} or null (finetuned: null without FINETUNE_EPOCHS);
                     + "quantized": {"dense", "compressed"} (ONNX Runtime) when quantize.json has them,
         "env": from latency.json, "artifacts": [file names in the run directory],
         "runners": {key: {"placement": provider → nodes}} (ort on a GPU provider; else {}),
         "jetson": null | latency.json's tegrastats summary + power mode/clocks,
         "engines": null | {key: engine sidecar: precision, TensorRT, GPU, parity vs ORT, 2:4 sparsity}}

    ``ratios.params`` and ``ratios.macs`` are dense / compressed; ``speedup_p50`` is
    p50(dense) / p50(compressed); ``efficiency`` is ``speedup_p50 / ratios.macs`` (1.0 means the MAC
    reduction fully turned into speed).

    Raises:
        UserInputError: if the directory or a stage's file is missing (naming the stage to run), or a
            file lacks a required key.
    """
    rd = RunDir(run_dir)
    folder = rd.path
    if not folder.is_dir():
        raise UserInputError(f"run directory {str(folder)!r} does not exist; run the compress stage first")
    comp = rd.read_compress()
    parity = rd.read_parity()
    latency = rd.read_latency()
    verify_chain(folder, "report")  # every file combined here comes from one run
    stale = {SPARSE_ONNX} if stale_sparse_onnx(folder) else set()

    sides = _sides(rd, comp, parity, latency)
    quantized = quantized_block(rd, latency)  # quantize.json + the int8 rows of latency.json, or None
    ratios = _ratios(sides, latency, quantized)
    par_c = _require(parity.to_dict(), CANDIDATE, PARITY_JSON, folder)
    par_d = _require(parity.to_dict(), BASELINE, PARITY_JSON, folder)
    report = {
        "model": comp.model,
        "method": comp.method,
        "weights": comp.weights,
        "input_shape": comp.input_shape,
        "backend": latency.backend,
        "batch": latency.batch,
        BASELINE: sides[BASELINE],
        CANDIDATE: sides[CANDIDATE],
        "parity": _parity_block(parity, par_c),
        "parity_dense": {"max_abs": par_d.get("max_abs"), "max_rel": par_d.get("max_rel"), **_parity_outputs(par_d)},
        "sparse_onnx": None if stale else _sparse_onnx(parity.sparse_onnx),
        "sparse_storage": _sparse_storage(comp.sparse_storage),
        "warnings": [str(w) for w in [*(comp.warnings or []), *((quantized or {}).get("warnings") or [])]],
        "ratios": ratios,
        "target": target_block(comp.target, ratios, sides[CANDIDATE]["latency_ms"]["p50"]),
        "latency_model": latency_model_block(
            comp.target,
            sides[CANDIDATE]["latency_ms"]["p50"],
            ((latency.runners or {}).get(CANDIDATE) or {}).get("intra_op_threads"),
        ),
        "weights_warning": comp.weights_warning,
        "agreement": comp.agreement,
        "accuracy": _accuracy(comp.accuracy),
        "quantized": quantized,
        "env": latency.env if latency.env is not None else {},
        "artifacts": _artifacts(folder, stale),
        "runners": {k: {"placement": v["placement"]} for k, v in (latency.runners or {}).items() if v.get("placement")},
        "jetson": latency.extra.get("jetson"),
        "engines": engine_records(rd.path),
    }
    if report["accuracy"] is not None:
        report["accuracy"]["quantized"] = quantized_accuracy(rd) if quantized else None
    atomic_write_json(rd.report_json, report)
    atomic_write_text(rd.report_md, report_markdown(report, has_plot=rd.latency_png.is_file()))
    return report


def _sides(rd: RunDir, comp: Any, parity: Any, latency: Any) -> dict[str, dict[str, Any]]:
    """``dense`` / ``compressed``: params, MACs, ONNX bytes and p50/p90/p99 latency of each side."""
    sides = {}
    for side in (BASELINE, CANDIDATE):
        stats = _require(latency.results, side, LATENCY_JSON, rd.path, prefix="results.")
        sides[side] = {
            "params": comp.params(side),
            "macs": comp.macs(side),
            "onnx_bytes": _onnx_bytes(rd.onnx(side), parity.side(side) or {}),
            "latency_ms": {q: _require(stats, q, LATENCY_JSON, rd.path) for q in ("p50", "p90", "p99")},
        }
    return sides


def _ratios(sides: dict[str, dict[str, Any]], latency: Any, quantized: dict[str, Any] | None) -> dict[str, Any]:
    """``report.json``'s ``ratios``: dense / compressed params and MACs, speed-ups and efficiency."""
    speed = latency.speedup or {}
    if speed.get("baseline", BASELINE) != BASELINE or speed.get("candidate", CANDIDATE) != CANDIDATE:
        speed = {}
    speedup_p50 = speed.get("p50_ratio")
    if speedup_p50 is None:
        speedup_p50 = _ratio(sides[BASELINE]["latency_ms"]["p50"], sides[CANDIDATE]["latency_ms"]["p50"])
    macs_ratio = _ratio(sides[BASELINE]["macs"], sides[CANDIDATE]["macs"])
    return {
        "params": _ratio(sides[BASELINE]["params"], sides[CANDIDATE]["params"]),
        "macs": macs_ratio,
        "speedup_p50": speedup_p50,
        "speedup_ci95": speed.get("ci95"),
        "efficiency": _ratio(speedup_p50, macs_ratio),
        "flops_reduction": None if not macs_ratio else 1.0 - 1.0 / macs_ratio,
        "speedup_quantized_p50": speedup_quantized_p50(sides, quantized),
    }


def _artifacts(folder: Path, stale: set[str]) -> list[str]:
    """The run directory's files (hidden and stale ones left out), the report's own two included."""
    return sorted(
        {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in stale}
        | {REPORT_JSON, REPORT_MD}
    )


def report_markdown(report: Mapping[str, Any], *, has_plot: bool = True) -> str:
    """Human summary of a ``report.json`` dict (warning first, table, ratios, parity, plot, environment)."""
    lines: list[str] = []
    if report.get("weights_warning"):
        lines += [f"> **WARNING: {report['weights_warning']}**", ""]
    lines += [line for w in report.get("warnings") or [] for line in (f"> **WARNING: {w}**", "")]
    lines += [f"# {report['model']} — {report['method']}", ""]
    shape = report.get("input_shape")
    shape_text = "×".join(str(d) for d in shape) if shape else "?"
    lines += [
        f"Weights: {report.get('weights')} · input {shape_text} · backend {report.get('backend')} · "
        f"batch {report.get('batch')}",
        "",
    ]
    d, c, r = report[BASELINE], report[CANDIDATE], report["ratios"]
    lines += [
        "| | dense | compressed | dense / compressed |",
        "|---|---:|---:|---:|",
        f"| params | {_si(d['params'])} | {_si(c['params'])} | {_x(r['params'])} |",
        f"| MACs | {_si(d['macs'])} | {_si(c['macs'])} | {_x(r['macs'])} |",
        f"| ONNX MB | {mb(d['onnx_bytes'])} | {mb(c['onnx_bytes'])} | {_x(_ratio(d['onnx_bytes'], c['onnx_bytes']))} |",
    ]
    sparse = report.get("sparse_onnx")
    if sparse:
        lines.append(
            f"| ONNX MB, sparse initializers ({sparse['file']}) | | {mb(sparse['onnx_bytes'])} | "
            f"{_x(_ratio(d['onnx_bytes'], sparse['onnx_bytes']))} |"
        )
    storage = report.get("sparse_storage")
    if storage:  # the exported graph stores S dense: say what a sparse format stores and a sparse kernel runs
        lines += [
            f"| stored values (L factors + non-zeros of S) | | {_si(storage['params_values'])} | {_x(storage['ratio_values'])} |",
            f"| stored values + CSR index | | {_si(storage['params_with_index'])} | "
            f"{_x(storage['ratio_with_index'])} |",
            f"| MACs, sparse kernel | | {_si(storage['macs_sparse_kernel'])} | "
            f"{_x(_ratio(d['macs'], storage['macs_sparse_kernel']))} |",
        ]
        if storage.get("macs_2to4"):
            lines.append(
                f"| MACs, 2:4 sparse tensor cores | | {_si(storage['macs_2to4'])} | "
                f"{_x(_ratio(d['macs'], storage['macs_2to4']))} |"
            )
    for q in ("p50", "p90", "p99"):
        dq, cq = d["latency_ms"][q], c["latency_ms"][q]
        lines.append(f"| {q} ms | {dq:.3f} | {cq:.3f} | {_x(_ratio(dq, cq))} |")
    quantized_rows, quantized_lines = quantized_markdown(report)
    lines += [*quantized_rows, ""]
    ci = r.get("speedup_ci95")
    ci_text = f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else ""
    eff = r.get("efficiency")
    cut = r.get("flops_reduction")
    cut_text = "" if cut is None else f" ({100 * cut:.1f}% fewer FLOPs)"
    lines += [
        f"- **Speedup (p50): {_x(r['speedup_p50'])}**{ci_text}",
        f"- Params ratio {_x(r['params'])}, MACs ratio {_x(r['macs'])}{cut_text}, efficiency (speedup / MACs ratio) "
        f"{'n/a' if eff is None else f'{eff:.2f}'}",
    ]
    par, par_d = report["parity"], report.get("parity_dense") or {}
    tol = ""
    if par.get("atol") is not None or par.get("rtol") is not None:
        tol = f" (atol {_g(par.get('atol'))}, rtol {_g(par.get('rtol'))})"
    lines.append(
        f"- Parity, compressed ONNX vs {par.get('reference') or 'PyTorch'}: max_abs {_g(par.get('max_abs'))}, "
        f"max_rel {_g(par.get('max_rel'))}{tol}; dense: max_abs {_g(par_d.get('max_abs'))}, "
        f"max_rel {_g(par_d.get('max_rel'))}"
    )
    lines += _parity_output_lines(par, par_d)
    agreement = report.get("agreement")
    if isinstance(agreement, Mapping) and agreement:
        lines.append("- Agreement (dense vs compressed): " + ", ".join(f"{k} {_g(v)}" for k, v in agreement.items()))
    lines += target_markdown(report)
    lines += quantized_lines
    lines += profile_lines(report)
    acc = report.get("accuracy")
    if isinstance(acc, Mapping) and acc:
        lines += ["", f"Accuracy on {acc.get('data')} (test images: {acc.get('n')}, 95% Wilson interval):", ""]
        lines += ["| | dense | compressed, raw | compressed, fine-tuned |", "|---|---:|---:|---:|"]
        lines.append("| top-1 | " + " | ".join(_pct(acc.get(k)) for k in ("dense", "raw", "finetuned")) + " |")
        if any((acc.get(k) or {}).get("top5") is not None for k in ("dense", "raw", "finetuned")):
            lines.append(
                "| top-5 | "
                + " | ".join(
                    "–" if not acc.get(k) or acc[k].get("top5") is None else f"{100 * acc[k]['top5']:.2f}%"
                    for k in ("dense", "raw", "finetuned")
                )
                + " |"
            )
    lines.append("")
    lines += latency_gpu_lines(report)
    if has_plot:
        lines += [f"![latency]({LATENCY_PNG})", ""]
    lines += ["## Environment", ""]
    lines += [f"- {item}" for item in _env_lines(report.get("env") or {})]
    lines.append("")
    return "\n".join(lines)


# Internals --------------------------------------------------------------------------------------------


def _sparse_onnx(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage-only sparse-initializer copy of the compressed ONNX (LRSD), if the export wrote one."""
    if not record:
        return None
    return {k: record.get(k) for k in ("file", "onnx_bytes", "max_abs", "sparse_values", "n_sparse_initializers")}


def _sparse_storage(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """LRSD's honest storage and cost record from compress.json (None for methods without a sparse part)."""
    if not record:
        return None
    keys = ("params_values", "params_with_index", "ratio_values", "ratio_with_index", "macs_sparse_kernel", "macs_2to4")
    return {k: record.get(k) for k in keys}


def _accuracy(record: Any) -> dict[str, Any] | None:
    """The report's accuracy block from compress.json's (None when the run had no data)."""
    if not isinstance(record, Mapping) or not record.get("dense"):
        return None
    keep = ("top1", "top5", "ci95", "n", "loss")
    block: dict[str, Any] = {
        "data": (record.get("data") or {}).get("name"),
        "n": record["dense"].get("n"),
    }
    for key in ("dense", "raw", "finetuned"):
        value = record.get(key)
        block[key] = {k: value.get(k) for k in keep} if isinstance(value, Mapping) else None
    if isinstance(record.get("finetune"), Mapping):
        block["finetune"] = {k: record["finetune"].get(k) for k in ("epochs", "steps", "wall_s", "kd")}
    return block


def _pct(value: Any) -> str:
    if not isinstance(value, Mapping) or value.get("top1") is None:
        return "–"
    lo, hi = value.get("ci95") or (None, None)
    ci = "" if lo is None else f" ({100 * lo:.1f}–{100 * hi:.1f})"
    return f"{100 * value['top1']:.2f}%{ci}"


def _require(data: Mapping[str, Any], key: str, file_name: str, folder: Path, *, prefix: str = "") -> Any:
    if not isinstance(data, Mapping) or key not in data:
        hint = STAGE_HINTS[file_name].format(run_dir=folder).replace(" first", " again")
        raise UserInputError(f"{file_name} in {str(folder)!r} lacks key {prefix + key!r}; {hint}")
    return data[key]


def _parity_outputs(side: Mapping[str, Any]) -> dict[str, Any]:
    """``{"passed", "outputs": {name: {"max_abs", "max_rel", "passed"}}}`` of a parity.json side ({} if not recorded)."""
    outputs = side.get("outputs")
    if not isinstance(outputs, Mapping):
        return {}
    per = {
        str(n): {k: r.get(k) for k in ("max_abs", "max_rel", "passed")}
        for n, r in outputs.items()
        if isinstance(r, Mapping)
    }
    return {"passed": side.get("passed"), "outputs": per}


def _parity_output_lines(par: Mapping[str, Any], par_d: Mapping[str, Any]) -> list[str]:
    """One indented line per named output (models with several outputs, or one not called ``output``)."""
    outputs, dense = par.get("outputs") or {}, par_d.get("outputs") or {}
    if not outputs or list(outputs) == ["output"]:
        return []
    lines = []
    for name, r in outputs.items():
        verdict = {True: "pass", False: "FAIL"}.get(r.get("passed"), "n/a")
        d = dense.get(name) or {}
        lines.append(
            f"  - output `{name}`: {verdict}, max_abs {_g(r.get('max_abs'))}, max_rel {_g(r.get('max_rel'))}; "
            f"dense: max_abs {_g(d.get('max_abs'))}, max_rel {_g(d.get('max_rel'))}"
        )
    return lines


def _onnx_bytes(path: Path, parity_side: Mapping[str, Any]) -> int | None:
    if path.is_file():
        return path.stat().st_size
    value = parity_side.get("onnx_bytes") if isinstance(parity_side, Mapping) else None
    return int(value) if value is not None else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _g(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _si(value: float | None) -> str:
    if value is None:
        return "n/a"
    for factor, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:g}"


def _env_lines(env: Mapping[str, Any]) -> list[str]:
    cpu = env.get("cpu") or {}
    osinfo = env.get("os") or {}
    py = env.get("python") or {}
    pkgs = env.get("packages") or {}
    threads = env.get("threads") or {}
    gpu = env.get("gpu")
    lines = [
        f"CPU: {cpu.get('model')} ({cpu.get('physical_cores')} physical / {cpu.get('logical_cores')} logical "
        f"cores, {cpu.get('affinity_cores')} usable)",
        f"OS: {osinfo.get('system')} {osinfo.get('release')}; Python {py.get('version')}",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in pkgs.items() if v is not None),
        f"ONNX Runtime providers: {', '.join(env.get('onnxruntime_providers') or []) or 'n/a'}",
        f"Threads: torch {threads.get('torch')}, ORT intra-op {threads.get('ort_intra_op') or 'default'}",
        "GPU: "
        + (
            f"{gpu.get('name')} (driver {gpu.get('driver')}, CUDA {gpu.get('cuda_runtime')})"
            if isinstance(gpu, Mapping)
            else "none"
        ),
    ]
    if env.get("jetson"):
        lines.append(f"Jetson: {env['jetson']}")
    lines.append(f"Measured: {env.get('timestamp_utc')}")
    return lines
