"""``lowrank-deploy compare``: which method for my model on my device, all timed in one interleaved run.

``make compare MODEL=resnet34 METHODS="tucker2 tai auto cc" SPEEDUP=3`` (or ``RATIO=`` / ``FLOPS=``) runs
each method's compress and export stages at the same target into its own run directory
``OUT/<model>/<method>/`` (a method that cannot reach the target is recorded with its one-line error and
the rest go on), then times the dense ONNX model and every compressed one **in one interleaved ONNX
Runtime run** (:func:`runtime.harness.benchmark`), so the speedups compare under the same machine state.
It writes ``OUT/<model>/compare.json``, ``compare.md`` and ``compare.png`` (measured speedup against the
output error, or against accuracy with ``DATA``).

``compare.json``::

    {"model", "target": "SPEEDUP=3" | ..., "backend": "ort", "threads", "batch", "duration_s",
     "dense": {"params", "macs", "latency_ms": {"p50", "p90", "p99"}},
     "methods": {name: {"run_dir", "error": null | str, "params", "macs", "ratio_params", "ratio_macs",
                        "latency_ms": {...}, "speedup_p50", "speedup_ci95", "target": report_target block,
                        "agreement": {"rel_l2", "cosine", "top1_agreement", ...},
                        "error_proxy": plan's own error figure or null, "accuracy": {"raw", "finetuned"} | null}},
     "env": runtime.env.capture_environment()}

``agreement.rel_l2`` (‖dense − compressed‖ / ‖dense‖ over 8 seeded random inputs, from ``compress.json``)
is the error every method shares; ``error_proxy`` is whatever the plan itself minimised, named.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowrank_core.errors import LowrankDeployError, UserInputError
from lowrank_core.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["COMPARE_JSON", "COMPARE_MD", "COMPARE_PNG", "compare_markdown", "parse_methods", "run_compare"]

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"
DENSE_KEY = "dense"


def parse_methods(text: str | None) -> list[str]:
    """``METHODS="tucker2 tai auto"`` (spaces or commas) → the names, each once, in order; each must be registered."""
    from compress.methods import get_method

    names = list(dict.fromkeys(n for n in re.split(r"[\s,]+", text or "") if n))
    if not names:
        raise UserInputError('compare needs METHODS="<method> <method> ..." (python -m compress methods lists them)')
    if DENSE_KEY in names:
        raise UserInputError(f"METHODS must not name {DENSE_KEY!r}: the dense model is always timed")
    for name in names:
        get_method(name)  # unknown → one line listing the registered methods
    return names


def _stages_for(values: Mapping[str, str | None], method: str) -> tuple[Path, list[Any]]:
    """The compress and export stages of one method (no per-method bench: everything is timed together)."""
    from lowrank_deploy.pipeline import plan_export

    run_dir, stages = plan_export({**values, "method": method})
    return run_dir, [s for s in stages if s.name in ("compress", "export", "quantize")]


def _target_text(values: Mapping[str, str | None]) -> str:
    given = [(var, values.get(key)) for key, var in (("ratio", "RATIO"), ("flops", "FLOPS"), ("speedup", "SPEEDUP"))]
    given.append(("LATENCY_MS", values.get("latency_ms")))
    chosen = [f"{var}={v}" for var, v in given if v is not None]
    return ", ".join(chosen) or "each method's default target"


def run_compare(values: Mapping[str, str | None]) -> dict[str, Any]:
    """Run ``compare`` from resolved options (``lowrank_deploy.pipeline``'s ``values``); return ``compare.json``.

    Raises:
        UserInputError: an invalid option (checked for every method before anything runs), or no method
            produced a model.
    """
    from lowrank_deploy.pipeline import model_name_of, run_stages

    methods = parse_methods(values.get("methods"))
    planned = {m: _stages_for(values, m) for m in methods}  # every option of every method checked first
    outcomes: dict[str, dict[str, Any]] = {}
    for i, (method, (run_dir, stages)) in enumerate(planned.items(), 1):
        print(f"== compare [{i}/{len(methods)}] {method} → {run_dir}", flush=True)
        try:
            run_stages(run_dir, stages)
            outcomes[method] = {"run_dir": os.path.abspath(run_dir), "error": None}  # compare.json: any cwd
        except LowrankDeployError as exc:
            print(f"compare: {method} failed: {exc}", file=sys.stderr, flush=True)
            outcomes[method] = {"run_dir": os.path.abspath(run_dir), "error": str(exc).splitlines()[0]}
    done = [m for m, o in outcomes.items() if o["error"] is None]
    if not done:
        raise UserInputError(
            "compare: no method produced a model: " + "; ".join(f"{m}: {o['error']}" for m, o in outcomes.items())
        )
    folder = Path(values.get("out") or "") / model_name_of(values.get("model") or "")
    record = _time_all(values, {m: Path(outcomes[m]["run_dir"]) for m in done})
    record["model"] = model_name_of(values.get("model") or "")
    record["target"] = _target_text(values)
    for method, outcome in outcomes.items():
        entry = record["methods"].setdefault(method, {})
        entry.update(outcome)
        if outcome["error"] is None:
            entry.update(_method_facts(Path(outcome["run_dir"]), record, method))
    record["methods"] = {m: record["methods"][m] for m in methods}
    atomic_write_json(folder / COMPARE_JSON, record)
    atomic_write_text(folder / COMPARE_MD, compare_markdown(record, has_plot=_try_plot(record, folder / COMPARE_PNG)))
    print(compare_markdown(record, has_plot=False))
    print(f"compare: {folder / COMPARE_MD}")
    return record


def _time_all(values: Mapping[str, str | None], run_dirs: Mapping[str, Path]) -> dict[str, Any]:
    """Dense (of the first run) and every compressed ``model.onnx``, interleaved in one benchmark."""
    from lowrank_core.checks import check_count, check_duration
    from runtime.base import runner_class
    from runtime.env import capture_environment
    from runtime.harness import BenchmarkConfig, benchmark, random_feed

    threads = None if values.get("threads") is None else check_count(values["threads"], "THREADS", high=4096)
    batch = check_count(values.get("batch") or "1", "BATCH")
    duration = check_duration(values.get("duration") or "10", "DURATION")
    cls = runner_class("ort")
    first = next(iter(run_dirs.values()))
    files = {DENSE_KEY: first / "dense.onnx", **{m: d / "model.onnx" for m, d in run_dirs.items()}}
    runners = {key: cls.from_path(path, name=key, intra_op_threads=threads) for key, path in files.items()}

    def feed(key: str, runner: Any) -> dict[str, Any]:
        return random_feed(runner.get_input_metadata(), batch=batch, seed=0, model=key)

    config = BenchmarkConfig(duration_s=duration, batch=batch)
    print(f"== compare: timing {', '.join(files)} interleaved ({duration:g} s, ORT CPU)", flush=True)
    result = benchmark(runners, feed, config)
    stats = {key: result.stats[key].to_dict() for key in files}
    methods = {}
    for method in run_dirs:
        estimate = result.speedup(DENSE_KEY, method).to_dict()
        methods[method] = {
            "latency_ms": {q: stats[method][q] for q in ("p50", "p90", "p99")},
            "speedup_p50": estimate["p50_ratio"],
            "speedup_ci95": estimate["ci95"],
        }
    return {
        "backend": "ort",
        "threads": threads,
        "batch": batch,
        "duration_s": duration,
        "files": {k: str(v) for k, v in files.items()},
        "dense": {"latency_ms": {q: stats[DENSE_KEY][q] for q in ("p50", "p90", "p99")}},
        "methods": methods,
        "env": capture_environment({"command": "compare", "ort_intra_op_threads": threads}),
    }


def _method_facts(run_dir: Path, record: dict[str, Any], method: str) -> dict[str, Any]:
    """Params, MACs, agreement, accuracy and the target block of one method's run directory."""
    from lowrank_core.rundir import RunDir
    from runtime.report_target import target_block

    comp = RunDir(run_dir).read_compress()
    entry = record["methods"][method]
    dense = record[DENSE_KEY]
    dense.setdefault("params", comp.dense["params"])
    dense.setdefault("macs", comp.dense["macs"])
    params, macs = comp.compressed["params"], comp.compressed["macs"]
    ratios = {
        "params": comp.dense["params"] / params,
        "flops_reduction": 1.0 - macs / comp.dense["macs"],
        "speedup_p50": entry["speedup_p50"],
    }
    target = comp.target if isinstance(comp.target, Mapping) else {}
    accuracy = comp.accuracy if isinstance(comp.accuracy, Mapping) else None
    return {
        "params": params,
        "macs": macs,
        "ratio_params": ratios["params"],
        "ratio_macs": comp.dense["macs"] / macs,
        "target": target_block(target, ratios, entry["latency_ms"]["p50"]),
        "agreement": comp.agreement,
        "error_proxy": _error_proxy(target),
        "accuracy": None
        if accuracy is None
        else {
            "dense": _top1(accuracy.get("dense")),
            "raw": _top1(accuracy.get("raw")),
            "finetuned": _top1(accuracy.get("finetuned")),
        },
        "warnings": list(comp.warnings or []),
    }


def _top1(value: Any) -> float | None:
    return float(value["top1"]) if isinstance(value, Mapping) and value.get("top1") is not None else None


def _error_proxy(target: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the plan minimised, when it says (``auto``'s total error, under the proxy it names)."""
    if target.get("total_error") is not None:
        return {"name": str(target.get("error_proxy") or "plan error"), "value": float(target["total_error"])}
    return None


# Markdown and plot ------------------------------------------------------------------------------------


def compare_markdown(record: Mapping[str, Any], *, has_plot: bool = True) -> str:
    """``compare.md``: one row per method, sorted as given, dense first."""
    dense = record[DENSE_KEY]
    threads = record.get("threads") or "default"
    lines = [
        f"# {record.get('model')}: methods at {record.get('target')}",
        "",
        f"ONNX Runtime CPU, {threads} thread(s), batch {record.get('batch')}; every model timed in one interleaved "
        f"run ({record.get('duration_s'):g} s). rel L2 = ‖dense − compressed‖ / ‖dense‖ of the logits on 8 random "
        "inputs (compress.json).",
        "",
    ]
    acc = any((m.get("accuracy") or {}).get("raw") is not None for m in record["methods"].values())
    head = "| method | p50 ms | speedup (95% CI) | target → achieved | params | MACs | rel L2 | top-1 agree |"
    rule = "|---|---:|---:|---|---:|---:|---:|---:|"
    if acc:
        head += " top-1 raw | top-1 fine-tuned |"
        rule += "---:|---:|"
    lines += [head, rule]
    row = f"| dense | {dense['latency_ms']['p50']:.3f} | 1.00× | | {_si(dense.get('params'))} | {_si(dense.get('macs'))} | 0 | 1 |"
    lines.append(row + (f" {_pct(_dense_acc(record))} | |" if acc else ""))
    for name, m in record["methods"].items():
        if m.get("error"):
            lines.append(f"| {name} | failed: {m['error']} |" + " |" * (rule.count("|") - 3))
            continue
        lo, hi = m["speedup_ci95"]
        target = m.get("target") or {}
        goal = "–"
        if target.get("kind"):
            goal = f"{target['kind']} {target['value']:g} → {_g(target.get('achieved'))}"
        agree = m.get("agreement") or {}
        cells = [
            name,
            f"{m['latency_ms']['p50']:.3f}",
            f"{m['speedup_p50']:.2f}× ({lo:.2f}–{hi:.2f})",
            goal,
            f"{_si(m['params'])} (×{m['ratio_params']:.2f})",
            f"{_si(m['macs'])} (×{m['ratio_macs']:.2f})",
            _g(agree.get("rel_l2")),
            _g(agree.get("top1_agreement")),
        ]
        if acc:
            a = m.get("accuracy") or {}
            cells += [_pct(a.get("raw")), _pct(a.get("finetuned"))]
        lines.append("| " + " | ".join(cells) + " |")
    proxies = [(n, m["error_proxy"]) for n, m in record["methods"].items() if m.get("error_proxy")]
    if proxies:
        lines += ["", "Plan's own error: " + "; ".join(f"{n}: {p['name']} {p['value']:.4g}" for n, p in proxies)]
    if has_plot:
        lines += ["", f"![compare]({COMPARE_PNG})"]
    lines.append("")
    return "\n".join(lines)


def _dense_acc(record: Mapping[str, Any]) -> float | None:
    for m in record["methods"].values():
        value = (m.get("accuracy") or {}).get("dense")
        if value is not None:
            return value
    return None


def _try_plot(record: Mapping[str, Any], path: Path) -> bool:
    try:
        plot_compare(record, path)
    except ImportError as exc:
        print(f"note: {path.name} not written: {exc}", file=sys.stderr)
        return False
    return True


def plot_compare(record: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Measured speedup (x) against output rel L2, or top-1 with DATA (y), one labelled point per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = {n: m for n, m in record["methods"].items() if not m.get("error")}
    use_acc = any((m.get("accuracy") or {}).get("raw") is not None for m in ok.values())
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, m in ok.items():
        a = m.get("accuracy") or {}
        y = (a.get("finetuned") or a.get("raw")) if use_acc else (m.get("agreement") or {}).get("rel_l2")
        if y is None:
            continue
        lo, hi = m["speedup_ci95"]
        x = m["speedup_p50"]
        ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="o", capsize=3)
        ax.annotate(name, xy=(x, y), xytext=(4, 4), textcoords="offset points", fontsize=9)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("measured speedup over dense (p50, 95% CI)")
    ax.set_ylabel("top-1 accuracy" if use_acc else "output rel L2 vs dense (lower is better)")
    ax.set_title(f"{record.get('model')} at {record.get('target')}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    dest = Path(path)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    return dest


def _si(value: Any) -> str:
    if value is None:
        return "n/a"
    for factor, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:g}"


def _g(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"
