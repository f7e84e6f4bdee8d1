"""The results tables of the docs and the README, each rendered from one committed JSON in benchmarks/results/.

A block either reuses the benchmark's own table function (``python -m benchmarks.<name> --render FILE`` prints
the same) or is written here for the benchmarks that only print their table while they run.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["BLOCKS", "RESULTS", "load"]

RESULTS = Path(__file__).resolve().parents[1] / "results"
"""``benchmarks/results/``: the JSON behind every figure."""


@cache
def load(name: str) -> dict[str, Any]:
    """The committed result ``benchmarks/results/<name>``."""
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _table(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; ``align`` holds ``l`` or ``r`` per column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(value: float, ci: Sequence[float], digits: int = 2, unit: str = "") -> str:
    return f"{value:.{digits}f}{unit} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"


def _pct(acc: dict[str, Any] | None) -> str:
    return "—" if acc is None else f"{100 * acc['top1']:.2f} %"


def _pct_ci(acc: dict[str, Any]) -> str:
    low, high = acc["ci95"]
    return f"({100 * low:.1f}–{100 * high:.1f})"


def _bold(cells: Sequence[str]) -> list[str]:
    return [f"**{c}**" for c in cells]


def _source(*names: str) -> str:
    files = ", ".join(f"`benchmarks/results/{n}`" for n in names)
    return f"*Rendered from {files} by `python -m benchmarks.render`.*"


def _delegate(module: str, function: str, name: str) -> Callable[[], str]:
    """A block made by a benchmark module's own table function (imported only when rendered)."""

    def block() -> str:
        render = getattr(importlib.import_module(f"benchmarks.{module}"), function)
        return render(load(name)).strip() + "\n\n" + _source(name)

    return block


# The two commands --------------------------------------------------------------------------------------


def make_export_timing() -> str:
    """Wall time of ``make export MODEL=resnet34`` per run."""
    record = load("make_export_timing.json")
    rows = [
        [str(i), f"{run['wall_s']:.1f}", f"{run['compress_wall_s']['compress']:.1f}", run["weights"]]
        for i, run in enumerate(record["runs"], 1)
    ]
    cpu = record["env"]["cpu"]
    table = _table(["run", "wall s", "compress s", "weights"], "rrrl", rows)
    return (
        f"`{record['command']}`, `OMP_NUM_THREADS={record['OMP_NUM_THREADS']}`, {cpu['model']}, "
        f"{cpu['logical_cores']} vCPUs: **{record['wall_s_min']:.0f}–{record['wall_s_max']:.0f} s**.\n\n"
        f"{table}\n\n{_source('make_export_timing.json')}"
    )


# ResNet-34 speedup sweep --------------------------------------------------------------------------------

_SWEEP_NAMES = {
    "round16": "tucker2, ranks ×16 (the default here)",
    "round8": "tucker2, ranks ×8",
    "round32": "tucker2, ranks ×32",
    "svd16": "channel SVD, ×16",
    "tai16": "Tai spatial SVD, ×16",
}


def _sweep_cells(row: dict[str, Any]) -> list[str]:
    if "speedup_p50" not in row:
        return [f"{row['latency_ms']['p50']:.2f}", "—", "—"]
    return [f"{row['latency_ms']['p50']:.2f}", _ci(row["speedup_p50"], row["speedup_ci95"]), f"{row['efficiency']:.2f}"]


def speedup_sweep() -> str:
    """ResNet-34 dense vs Tucker-2 / SVD / Tai at 1 and 2 ORT threads."""
    one, two = load("resnet34_tucker2_sweep_t1.json")["rows"], load("resnet34_tucker2_sweep_t2.json")["rows"]
    rows = [["dense", "1.00", "1.00", *_sweep_cells(one["dense"]), *_sweep_cells(two["dense"])]]
    for key, name in _SWEEP_NAMES.items():
        first = [name, f"{one[key]['param_ratio']:.2f}", f"{one[key]['mac_ratio']:.2f}", *_sweep_cells(one[key])]
        rows.append([*(_bold(first) if key == "round16" else first), *_sweep_cells(two[key])])
    header = ["variant", "params ×", "MACs ×", "p50 ms, 1 thread", "speedup (95 % CI)", "efficiency"]
    header += ["p50 ms, 2 threads", "speedup (95 % CI)", "efficiency"]
    table = _table(header, "lrrrrrrrr", rows)
    return f"{table}\n\n{_source('resnet34_tucker2_sweep_t1.json', 'resnet34_tucker2_sweep_t2.json')}"


def sweep_parity() -> str:
    """ONNX Runtime vs PyTorch of every model of the sweep (one thread's run)."""
    rows = [
        [
            "dense" if key == "dense" else _SWEEP_NAMES[key],
            f"{row['parity']['max_abs']:.1e}",
            f"{row['parity']['rel_l2']:.1e}",
            "pass" if row["parity"]["passed"] else "FAIL",
        ]
        for key, row in load("resnet34_tucker2_sweep_t1.json")["rows"].items()
    ]
    table = _table(["model", "max abs error", "rel L2", "parity (atol = rtol = 1e-3)"], "lrrl", rows)
    return f"{table}\n\n{_source('resnet34_tucker2_sweep_t1.json')}"


def front_page() -> str:
    """The README's one table: ResNet-34, one ORT thread, dense vs each per-layer method at RATIO=4."""
    record = load("resnet34_tucker2_sweep_t1.json")
    rows = [["dense", "1.00", "1.00", f"{record['rows']['dense']['latency_ms']['p50']:.1f}", "—"]]
    for key in ("round16", "svd16", "tai16"):
        row = record["rows"][key]
        name = {"round16": "Tucker-2 (the default)", "svd16": "channel SVD", "tai16": "Tai spatial SVD"}[key]
        rows.append(
            [
                name,
                f"{row['param_ratio']:.2f}",
                f"{row['mac_ratio']:.2f}",
                f"{row['latency_ms']['p50']:.1f}",
                _ci(row["speedup_p50"], row["speedup_ci95"], unit="×"),
            ]
        )
    table = _table(["ResNet-34, RATIO=4", "params ×", "MACs ×", "p50 ms", "speedup (95 % CI)"], "lrrrr", rows)
    return f"{table}\n\n{_source('resnet34_tucker2_sweep_t1.json')}"


def bench_pipeline() -> str:
    """``make bench``: compression wall time and (noisy) latency medians."""
    record = load("bench_pipeline.json")
    rows = [
        [f"`{b['name']}`", f"{b['stats']['median']:.3f}", f"{b['stats']['min']:.3f}", str(b["stats"]["rounds"])]
        for b in record["benchmarks"]
    ]
    table = _table(["benchmark", "median s", "min s", "rounds"], "lrrr", rows)
    return f"{table}\n\n{_source('bench_pipeline.json')}"


# INT8 ---------------------------------------------------------------------------------------------------


def precision_resnet34() -> str:
    """ResNet-34 FP32 / INT8, dense and Tucker-2, one interleaved run."""
    record = load("precision_resnet34.json")
    dense_format, compressed_format = (f.split(" (")[0].upper() for f in record["quantized"]["format"].split(", "))
    names = {
        "dense_fp32": "dense FP32",
        "compressed_fp32": f"Tucker-2 RATIO={record['ratio_target']:g}, FP32",
        "dense_int8": f"dense INT8 ({dense_format.replace('-', ' ')}, stem + classifier float)",
        "compressed_int8": f"Tucker-2 INT8 ({compressed_format.replace('-', ' ')}, stem + classifier float)",
        "dense_int8_all": "dense INT8, every layer",
        "compressed_int8_all": "Tucker-2 INT8, every layer",
    }
    rows = []
    for key, name in names.items():
        speed = record["speedup_vs_dense_fp32"].get(key)
        agreement = record["agreement"].get(key)
        cells = [
            f"{record['latency_ms'][key]['p50']:.1f}",
            "1.00" if speed is None else _ci(speed["p50_ratio"], speed["ci95"]),
        ]
        if key == "compressed_int8":
            label, cells = "**Tucker-2 INT8** " + name.removeprefix("Tucker-2 INT8 "), _bold(cells)
        else:
            label = name
        rows.append(
            [
                label,
                *cells,
                f"{record['onnx_bytes'][key] / 1e6:.1f}",
                "–" if agreement is None else f"{100 * agreement['rel_l2']:.1f} %",
                "–" if agreement is None else f"{agreement['top1']:.2f}",
            ]
        )
    header = ["model", "p50 ms", "× dense FP32 (95 % CI)", "ONNX MB", "output rel. L2 vs FP32", "top-1 agreement"]
    return f"{_table(header, 'lrrrrr', rows)}\n\n{_source('precision_resnet34.json')}"


_PRECISION_NAMES = {
    "dense": "dense",
    "tucker2": "Tucker-2",
    "vbmf-tucker2": "VBMF Tucker-2 (plain training)",
    "ljsvd": "LJSVD",
    "cc": "CC",
    "lrsd": "LRSD (L+S)",
}


def _delta(points: float) -> str:
    return f"{points:+.2f}".replace("-", "−")


def precision_fmnist() -> str:
    """FP32 vs INT8 top-1 of dense and every seed method on Fashion-MNIST, three INT8 variants."""
    record = load("precision_fmnist.json")
    rows = []
    for key, row in record["rows"].items():
        target = record["targets"].get(key, "—").split(" (")[0]
        int8 = row["int8"]
        u8s8 = int8["qdq-u8s8"]["mcnemar_fp32_vs_int8"]
        cells = [
            f"{100 * int8[v]['accuracy']['top1']:.2f} % ({_delta(int8[v]['delta_points'])})"
            for v in ("qdq-u8s8", "qdq-s8s8", "qdq-u8s8+all")
        ]
        params = f"{row['params'] / 1e3:.0f} k"
        if key == "lrsd":  # its graph executes S dense: the column counts it as stored, zeros included
            target, params = f"{target} (stored values)", params + "†"
        rows.append(
            [
                _PRECISION_NAMES.get(key, key),
                target,
                params,
                f"{100 * row['onnx_fp32']['top1']:.2f} %",
                *cells,
                f"{u8s8['p_value']:.2f} ({u8s8['only_first_right']} / {u8s8['only_second_right']})",
                str(len(int8["qdq-u8s8"]["float_layers"])),
            ]
        )
    header = ["model", "target", "params", "FP32 top-1", "INT8 U8S8 (Δ points)", "INT8 S8S8 (Δ)"]
    header += ["INT8 U8S8, every layer (Δ)", "McNemar p, U8S8 (FP32-only / INT8-only right)", "float layers"]
    return f"{_table(header, 'llrrrrrrr', rows)}\n\n{_source('precision_fmnist.json')}"


# Accuracy on real data ----------------------------------------------------------------------------------


def fmnist_reference() -> str:
    """Tucker-2 on Fashion-MNIST: dense / raw / fine-tuned top-1 and ORT latency."""
    record = load("fmnist_reference.json")
    rows = []
    for key, row in record["rows"].items():
        ort = row["ort"]
        if key == "dense":
            epochs = record["dense_training"]["epochs"]
            rows.append(
                [
                    "dense",
                    f"{row['params'] / 1e6:.3f} M",
                    f"{row['macs'] / 1e6:.1f} M",
                    "—",
                    f"{_pct(row['accuracy'])} {_pct_ci(row['accuracy'])}",
                    f"train {epochs} epochs: {row['train_wall_s']:.0f} s*",
                    f"{ort['latency_ms']['p50']:.3f} ms",
                    "—",
                ]
            )
            continue
        rows.append(
            [
                f"Tucker-2, params ×{row['param_ratio']:.2f}",
                f"{row['params'] / 1e6:.3f} M",
                f"{row['macs'] / 1e6:.1f} M (×{row['mac_ratio']:.2f})",
                _pct(row["raw"]),
                f"**{_pct(row['finetuned'])}** {_pct_ci(row['finetuned'])}",
                f"{row['finetune_s']:.0f} s",
                f"{ort['latency_ms']['p50']:.3f} ms",
                _ci(ort["speedup_p50"], ort["speedup_ci95"], unit="×").replace("× (", "× ("),
            ]
        )
    header = ["model", "params", "MACs", "top-1 raw", "top-1 fine-tuned (95 % CI)", "fine-tune wall"]
    header += ["ORT p50, 1 thread", "speedup (95 % CI)"]
    return f"{_table(header, 'lrrrrrrr', rows)}\n\n{_source('fmnist_reference.json')}"


def vbmf_tucker2() -> str:
    """The VBMF + Tucker-2 tables; an arm loaded from the cache shows no training wall time."""
    text = _delegate("vbmf_tucker_claims", "render_markdown", "vbmf_tucker_claims.json")()
    return re.sub(r"(\d+ steps), 0 s \|", r"\1, — (cached) |", text)


# Families -----------------------------------------------------------------------------------------------


def _short(value: float) -> str:
    return f"{value:.1e}"


def families() -> str:
    """One model per family at RATIO=2: parity of every output and ORT speedup."""
    record = load("families_ratio2.json")
    rows = []
    for family, row in record["rows"].items():
        parity = row["export"]["compressed"]["parity"]
        latency = row["latency_ms"]
        speedup = _ci(row["speedup_p50"], row["speedup_ci95"])
        if "speedup_vs_unfused_p50" in row:
            unfused = latency["dense_unfused"]["p50"]
            speedup += (
                f"; vs the unfused dense graph ({unfused:.1f} ms) "
                f"{_ci(row['speedup_vs_unfused_p50'], row['speedup_vs_unfused_ci95'])}"
            )
        rows.append(
            [
                family,
                f"`{row['model']}`",
                row["method"],
                str(row["input_shape"][-1]),
                ", ".join(row["export"]["compressed"]["outputs"]),
                f"×{row['param_ratio']:.2f} / ×{row['mac_ratio']:.2f}",
                f"{row['factorized']} / {row['kept']}",
                f"{'pass' if parity['passed'] else 'FAIL'}, max abs {parity['max_abs']:.1e}, "
                f"rel L2 {parity['rel_l2']:.1e}",
                f"{latency['dense']['p50']:.1f} → {latency['compressed']['p50']:.1f}",
                speedup,
            ]
        )
    header = ["family", "model", "method", "input", "ONNX outputs", "params / MACs ratio", "factorized / kept"]
    header += ["parity (atol = rtol = 1e-3)", "ORT p50 ms dense → compressed", "ORT CPU speedup (95 % CI)"]
    return f"{_table(header, 'lllrlrrlrl', rows)}\n\n{_source('families_ratio2.json')}"


# Latency-aware planning ---------------------------------------------------------------------------------

_PLAN_NAMES = {"auto": "`auto`, {t}", "tucker2": "`tucker2`, {t}", "auto-matched": "`auto` at Tucker-2's speed ({t})"}


def latency_claims() -> str:
    """``auto SPEEDUP=4`` vs ``tucker2 RATIO=4`` on ResNet-34: measured vs predicted latency."""
    record = load("latency_claims_resnet34_t1.json")
    dense = record["dense"]
    rows = []
    for key, row in record["results"].items():
        name = _PLAN_NAMES.get(key, f"`{key}`, {{t}}").format(t=row["target"])
        rows.append(
            [
                name,
                f"{row['measured_ms']:.2f} ms",
                f"{row['measured_speedup']:.2f}×",
                f"{row['predicted_ms']:.2f} ms",
                f"{100 * row['prediction_relative_error']:+.1f} %".replace("-", "−"),
                f"{row['params'] / 1e6:.2f} M",
                f"{row['macs'] / 1e9:.2f} G",
                f"{row['weight_error_sq']:.0f}",
            ]
        )
    header = ["plan", "measured p50", "measured speedup", "predicted", "prediction error", "params", "MACs"]
    header.append("Σ‖W − Ŵ‖²")
    head = (
        f"Dense: {dense['measured_ms']:.2f} ms, {dense['params'] / 1e6:.2f} M params, {dense['macs'] / 1e9:.2f} G MACs."
    )
    return f"{head}\n\n{_table(header, 'lrrrrrrr', rows)}\n\n{_source('latency_claims_resnet34_t1.json')}"


_ARM_NAMES = {"auto": "**auto**", "tucker2": "Tucker-2", "tai": "Tai", "prune": "pruning"}


def _p(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def latency_accuracy() -> str:
    """Accuracy at equal measured latency: auto vs Tucker-2 vs Tai vs channel pruning."""
    record = load("latency_accuracy_fmnist.json")
    rows = []
    for run in record["runs"].values():
        arm, mc = run["arm"], run.get("mcnemar_vs_auto")
        knob = f"{run['knob']:.3g}"
        if arm in ("tucker2", "tai"):
            knob = f"RATIO={knob}"
        finetuned = _pct(run["finetuned"])
        rows.append(
            [
                f"{run['target_speedup']:g}×",
                _ARM_NAMES.get(arm, arm),
                knob,
                f"{run['final_speedup']:.2f}×",
                f"{run['params'] / 1e6:.2f} M",
                f"{run['macs'] / 1e6:.0f} M",
                _pct(run["raw"]),
                f"**{finetuned}**" if arm == "auto" else finetuned,
                "—" if mc is None else f"{mc['only_first_right']} / {mc['only_second_right']}, p = {_p(mc['p_value'])}",
            ]
        )
    header = ["target", "arm", "knob", "measured speedup", "params", "MACs", "top-1 raw", "top-1 fine-tuned"]
    header.append("McNemar vs auto")
    return f"{_table(header, 'lllrrrrrl', rows)}\n\n{_source('latency_accuracy_fmnist.json')}"


_MERGE_NAMES = {
    "dense": "dense",
    "unmerged": "Bi-JSVD, two branches (before)",
    "merged_shared": "merged, shared factors kept once (exported now)",
    "merged_materialized": "merged, stacked weights stored per layer",
}


def bijsvd_merge() -> str:
    """Bi-JSVD exported as two branches vs as one conv pair."""
    record = load("bijsvd_merge_cifar_resnet34.json")
    rows = []
    for key, name in _MERGE_NAMES.items():
        row = record["models"][key]
        concat = row["file_ops"].get("Concat", 0)
        speed = row.get("speedup_vs_dense")
        rows.append(
            [
                name,
                f"{row['file_nodes']}" + (f" ({concat} Concat)" if concat else ""),
                f"{row['runtime_kernels']} ({row['runtime_conv_kernels']})",
                f"{row['onnx_bytes'] / 1e6:.2f}",
                f"{row['p50_ms']:.2f} ms",
                "1" if speed is None else _ci(speed["p50_ratio"], speed["ci95"], unit="×"),
            ]
        )
    merged = record["merged_vs_unmerged"]["merged_shared"]["speedup"]
    header = ["graph", "ONNX nodes", "kernels run by ORT (Conv/Gemm)", "ONNX MB", "p50", "speedup vs dense (95 % CI)"]
    tail = (
        f"Merged (shared factors kept once) vs two branches: {merged['p50_ratio']:.3f}× "
        f"(95 % CI {merged['ci95'][0]:.3f}–{merged['ci95'][1]:.3f})."
    )
    return f"{_table(header, 'lrrrrr', rows)}\n\n{tail}\n\n{_source('bijsvd_merge_cifar_resnet34.json')}"


# Soak ---------------------------------------------------------------------------------------------------


def soak() -> str:
    """RSS of an ONNX Runtime-only process over 20,000 inferences."""
    record = load("soak.json")
    summary, model = record["summary"], record["model"]
    rows = [
        [
            f"{model['name']} {model['method']} (×{model['ratio']:.2f})",
            f"{record['iters']:,}",
            f"{record['every']:,}",
            f"{summary['rss_min_mib']:.1f}–{summary['rss_max_mib']:.1f}",
            f"+{summary['drift_mib']:.2f} ({summary['drift_from']})",
            f"+{summary['drift_second_half_mib']:.2f}",
            "yes" if summary["torch_imported"] else "no",
        ]
    ]
    header = ["model", "inferences", "sampled every", "RSS MiB", "drift MiB", "drift, last half", "torch imported"]
    return f"{_table(header, 'lrrrrrl', rows)}\n\n{_source('soak.json')}"


BLOCKS: dict[str, Callable[[], str]] = {
    "readme.results": front_page,
    "results.make-export-timing": make_export_timing,
    "results.speedup-sweep": speedup_sweep,
    "results.sweep-parity": sweep_parity,
    "results.bench-pipeline": bench_pipeline,
    "results.precision-resnet34": precision_resnet34,
    "results.precision-fmnist": precision_fmnist,
    "results.fmnist-reference": fmnist_reference,
    "results.vbmf-tucker2": vbmf_tucker2,
    "results.jsvd": _delegate("jsvd_claims", "render_markdown", "jsvd_claims.json"),
    "results.lrsd": _delegate("lrsd_claims", "render_markdown", "lrsd_claims.json"),
    "results.cc": _delegate("cc_claims", "render_markdown", "cc_claims.json"),
    "results.families": families,
    "results.latency-claims": latency_claims,
    "results.latency-seed-methods": _delegate("latency_seed_methods", "markdown", "latency_seed_methods.json"),
    "results.latency-accuracy": latency_accuracy,
    "results.bijsvd-merge": bijsvd_merge,
    "results.soak": soak,
}
"""Every results block, by the name its page's markers use."""
