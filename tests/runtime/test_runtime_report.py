"""latency.json/.md/.png and report.json/.md written from a fake run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_core.errors import UserInputError
from runtime.harness import BenchmarkConfig, benchmark
from runtime.latency_record import latency_record, plot_latency, write_latency
from runtime.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAT_KEYS = {"n", "p50", "p90", "p99", "mean", "std", "min", "max", "throughput"}
ENV = {"cpu": {"model": "TestCPU", "logical_cores": 2}, "packages": {"numpy": np.__version__}, "gpu": None}


@pytest.fixture
def fake_result(fake_runner_cls, call_log, fake_clock, x_feed):
    """A benchmark of dense (4 ms) vs compressed (2 ms) fake runners on the fake clock."""
    runners = {
        "dense": fake_runner_cls("dense", log=call_log, clock=fake_clock, cost_s=0.004),
        "compressed": fake_runner_cls("compressed", log=call_log, clock=fake_clock, cost_s=0.002),
    }
    return benchmark(runners, x_feed, BenchmarkConfig(warmup_iters=1, warmup_s=0.0, iters=12, batch=1))


def test_latency_files(tmp_path, fake_result):
    record = write_latency(tmp_path, fake_result, ENV, backend="ort", batch=1)
    on_disk = json.loads((tmp_path / "latency.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert set(on_disk) == {
        "backend",
        "batch",
        "config",
        "env",
        "runners",
        "results",
        "warmup",
        "speedup",
        "memory",
        "wall_s",
    }
    assert (on_disk["backend"], on_disk["batch"]) == ("ort", 1)
    assert on_disk["env"] == ENV
    assert on_disk["config"]["iters"] == 12
    assert list(on_disk["results"]) == ["dense", "compressed"]
    for key, p50 in (("dense", 4.0), ("compressed", 2.0)):
        entry = on_disk["results"][key]
        assert set(entry) == STAT_KEYS | {"samples_ms"}
        assert entry["n"] == 12
        assert len(entry["samples_ms"]) == 12
        assert entry["p50"] == pytest.approx(p50)
        assert entry["samples_ms"] == pytest.approx([p50] * 12)
    speed = on_disk["speedup"]
    assert (speed["baseline"], speed["candidate"]) == ("dense", "compressed")
    assert speed["p50_ratio"] == pytest.approx(
        on_disk["results"]["dense"]["p50"] / on_disk["results"]["compressed"]["p50"]
    )
    assert speed["ci95"] == pytest.approx([2.0, 2.0])
    assert set(on_disk["memory"]) == {"process", "runners"}
    assert set(on_disk["memory"]["runners"]) == {"dense", "compressed"}

    md = (tmp_path / "latency.md").read_text()
    assert "| model | n | p50 ms | p90 ms | p99 ms | mean ± std ms | throughput /s | RSS MB |" in md
    assert "| dense | 12 | 4.000 | 4.000 | 4.000 | 4.000 ± 0.000 | 250.0 |" in md
    assert "| compressed | 12 | 2.000 |" in md
    assert "**2.000×**" in md

    assert (tmp_path / "latency.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_latency_speedup_pair_rules(fake_runner_cls, call_log, x_feed):
    cfg = BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=3)
    three = benchmark({n: fake_runner_cls(n, log=call_log) for n in "abc"}, x_feed, cfg)
    assert latency_record(three, {}, backend="ort", batch=1)["speedup"] is None
    two = benchmark({n: fake_runner_cls(n, log=call_log) for n in "ab"}, x_feed, cfg)
    speed = latency_record(two, {}, backend="ort", batch=1)["speedup"]
    assert (speed["baseline"], speed["candidate"]) == ("a", "b")


def test_plot_latency_png(tmp_path):
    rng = np.random.default_rng(0)
    samples = {"a": rng.lognormal(0, 0.2, 200).tolist(), "b": [1.0, 50.0]}  # an outlier-heavy second model
    path = plot_latency(samples, tmp_path / "p.png", title="t")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    with pytest.raises(UserInputError, match="at least one sample"):
        plot_latency({"a": []}, tmp_path / "q.png")


def test_plotting_leaves_pyplot_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    plot_latency({"a": [1.0, 2.0, 3.0]}, tmp_path / "p.png")
    assert matplotlib.get_backend() == before


# report ----------------------------------------------------------------------------------------------


def _with_latency(run_dir, fake_result):
    write_latency(run_dir, fake_result, ENV, backend="ort", batch=1)
    return run_dir


def test_report_schema_and_ratios(run_dir, fake_result):
    _with_latency(run_dir, fake_result)
    report = write_report(run_dir)
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    contract = {
        "model",
        "method",
        "weights",
        "input_shape",
        "backend",
        "dense",
        "compressed",
        "parity",
        "env",
    }
    extras = {"ratios", "weights_warning", "agreement", "accuracy", "parity_dense", "artifacts", "batch"}
    gpu_sections = {"runners", "jetson", "engines"}  # {} / null / null on a CPU run without engines
    targets = {"target", "latency_model"}  # runtime.report_target
    assert (
        set(on_disk)
        == contract | extras | {"sparse_onnx", "sparse_storage", "warnings", "quantized"} | gpu_sections | targets
    )
    assert on_disk["quantized"] is None  # not quantized (python -m export quantize not run)
    assert (on_disk["runners"], on_disk["jetson"], on_disk["engines"]) == ({}, None, None)
    assert on_disk["accuracy"] is None  # no DATA given
    assert on_disk["sparse_onnx"] is None  # no mostly-zero weights, no sparse copy
    assert on_disk["sparse_storage"] is None  # not a low-rank + sparse run
    assert on_disk["warnings"] == []
    comp = json.loads((run_dir / "compress.json").read_text())
    assert (on_disk["model"], on_disk["method"], on_disk["weights"]) == ("tiny", "tucker2", "random")
    assert on_disk["input_shape"] == [1, 3, 8, 8]
    assert on_disk["backend"] == "ort"
    for side, onnx_name in (("dense", "dense.onnx"), ("compressed", "model.onnx")):
        entry = on_disk[side]
        assert set(entry) == {"params", "macs", "onnx_bytes", "latency_ms"}
        assert set(entry["latency_ms"]) == {"p50", "p90", "p99"}
        assert entry["params"] == comp[side]["params"]
        assert entry["macs"] == comp[side]["macs"]
        assert entry["onnx_bytes"] == (run_dir / onnx_name).stat().st_size
    assert on_disk["dense"]["latency_ms"]["p50"] == pytest.approx(4.0)
    assert on_disk["compressed"]["latency_ms"]["p99"] == pytest.approx(2.0)
    ratios = on_disk["ratios"]
    assert set(ratios) == {
        "params",
        "macs",
        "speedup_p50",
        "speedup_ci95",
        "efficiency",
        "flops_reduction",
        "speedup_quantized_p50",
    }
    assert ratios["speedup_quantized_p50"] is None
    assert ratios["flops_reduction"] == pytest.approx(1 - comp["compressed"]["macs"] / comp["dense"]["macs"])
    assert ratios["params"] == pytest.approx(comp["dense"]["params"] / comp["compressed"]["params"])
    assert ratios["macs"] == pytest.approx(comp["dense"]["macs"] / comp["compressed"]["macs"])
    assert ratios["speedup_p50"] == pytest.approx(2.0)
    assert ratios["speedup_ci95"] == pytest.approx([2.0, 2.0])
    assert ratios["efficiency"] == pytest.approx(ratios["speedup_p50"] / ratios["macs"])
    assert on_disk["parity"]["max_abs"] == 3.0e-6  # the compressed model's
    assert on_disk["parity"]["max_rel"] == 4.0e-6
    assert on_disk["parity_dense"] == {"max_abs": 1.0e-6, "max_rel": 2.0e-6}
    assert on_disk["weights_warning"] == comp["weights_warning"]
    assert on_disk["agreement"] == comp["agreement"]
    assert on_disk["env"] == ENV
    assert on_disk["artifacts"] == sorted(
        [
            "compress.json",
            "dense.onnx",
            "latency.json",
            "latency.md",
            "latency.png",
            "model.onnx",
            "parity.json",
            "report.json",
            "report.md",
        ]
    )


def test_report_markdown(run_dir, fake_result):
    _with_latency(run_dir, fake_result)
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    first = md.splitlines()[0]
    assert "WARNING" in first
    assert "random weights" in first
    assert "| params | 269 | 137 | 1.96× |" in md
    assert "| p50 ms | 4.000 | 2.000 | 2.00× |" in md
    assert "Speedup (p50): 2.00×" in md
    assert "max_abs 3e-06" in md
    assert "![latency](latency.png)" in md
    assert "TestCPU" in md


def test_report_shows_plan_warnings_and_sparse_storage(run_dir, fake_result):
    """An LRSD run: the weight-only warning and the stored-values / sparse-kernel figures reach report.md."""
    comp = json.loads((run_dir / "compress.json").read_text())
    comp["warnings"] = ["no calibration data: solved the weight-only problem"]
    comp["sparse_storage"] = {
        "params_values": 100,
        "params_with_index": 200,
        "params_dense_storage": 1000,
        "ratio_values": 10.0,
        "ratio_with_index": 5.0,
        "macs_executed": comp["compressed"]["macs"],
        "macs_sparse_kernel": comp["dense"]["macs"] // 4,
        "macs_2to4": None,
        "note": "dense with zeros",
    }
    (run_dir / "compress.json").write_text(json.dumps(comp))
    _with_latency(run_dir, fake_result)
    report = write_report(run_dir)
    assert report["warnings"] == comp["warnings"]
    assert report["sparse_storage"]["ratio_values"] == 10.0
    assert "note" not in report["sparse_storage"]
    md = (run_dir / "report.md").read_text()
    assert "> **WARNING: no calibration data: solved the weight-only problem**" in md
    assert "| stored values (L factors + non-zeros of S) | | 100 | 10.00× |" in md
    assert "| stored values + CSR index | | 200 | 5.00× |" in md
    expected = comp["dense"]["macs"] / (comp["dense"]["macs"] // 4)
    row = next(line for line in md.splitlines() if line.startswith("| MACs, sparse kernel |"))
    assert row.endswith(f"| {expected:.2f}× |")
    assert "2:4" not in md


def test_report_without_weights_warning(run_dir, fake_result):
    comp = json.loads((run_dir / "compress.json").read_text())
    comp["weights_warning"] = None
    (run_dir / "compress.json").write_text(json.dumps(comp))
    _with_latency(run_dir, fake_result)
    report = write_report(run_dir)
    assert report["weights_warning"] is None
    assert "WARNING" not in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("missing", "stage"),
    [
        ("compress.json", "python -m compress"),
        ("parity.json", "python -m export"),
        ("latency.json", "python -m runtime bench"),
    ],
)
def test_report_names_the_missing_stage(run_dir, fake_result, missing, stage):
    _with_latency(run_dir, fake_result)
    (run_dir / missing).unlink()
    with pytest.raises(UserInputError, match=stage) as info:
        write_report(run_dir)
    assert missing in str(info.value)
    assert not (run_dir / "report.json").exists()


def test_report_missing_dir_and_missing_keys(tmp_path, run_dir, fake_result):
    with pytest.raises(UserInputError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    _with_latency(run_dir, fake_result)
    comp = json.loads((run_dir / "compress.json").read_text())
    del comp["dense"]["macs"]
    (run_dir / "compress.json").write_text(json.dumps(comp))
    with pytest.raises(UserInputError, match=r"lacks key 'dense\.macs'"):
        write_report(run_dir)


def test_report_falls_back_to_parity_onnx_bytes(run_dir, fake_result):
    _with_latency(run_dir, fake_result)
    (run_dir / "dense.onnx").unlink()
    report = write_report(run_dir)
    assert report["dense"]["onnx_bytes"] == 1  # parity.json's value
    assert "dense.onnx" not in report["artifacts"]


def test_report_carries_dense_raw_finetuned_accuracy(run_dir, fake_result):
    _with_latency(run_dir, fake_result)
    comp_path = run_dir / "compress.json"
    comp = json.loads(comp_path.read_text())

    def acc(top1):
        return {"top1": top1, "n": 10000, "ci95": [top1 - 0.006, top1 + 0.006], "loss": 0.3, "top5": None}

    comp["accuracy"] = {
        "data": {"name": "fashion-mnist"},
        "eval_samples": None,
        "dense": acc(0.912),
        "raw": acc(0.5),
        "finetuned": acc(0.9),
        "finetune": {"epochs": 2, "steps": 936, "wall_s": 120.0, "kd": False, "config": {}},
    }
    comp_path.write_text(json.dumps(comp))
    report = write_report(run_dir)
    assert report["accuracy"]["data"] == "fashion-mnist"
    assert report["accuracy"]["n"] == 10000
    assert [report["accuracy"][k]["top1"] for k in ("dense", "raw", "finetuned")] == [0.912, 0.5, 0.9]
    assert report["accuracy"]["finetune"]["epochs"] == 2
    md = (run_dir / "report.md").read_text()
    assert "| top-1 | 91.20% (90.6–91.8) | 50.00% (49.4–50.6) | 90.00% (89.4–90.6) |" in md

    comp["accuracy"]["finetuned"] = None  # DATA without FINETUNE_EPOCHS
    comp_path.write_text(json.dumps(comp))
    report = write_report(run_dir)
    assert report["accuracy"]["finetuned"] is None
    assert "| top-1 | 91.20% (90.6–91.8) | 50.00% (49.4–50.6) | – |" in (run_dir / "report.md").read_text()


# target and latency model (runtime.report_target) -----------------------------------------------------


def _set_target(run_dir, target):
    comp = json.loads((run_dir / "compress.json").read_text())
    comp["target"] = target
    (run_dir / "compress.json").write_text(json.dumps(comp))


def test_report_target_ratio_without_latency_model(run_dir, fake_result):
    _set_target(run_dir, {"ratio": 2.0, "flops": None, "achieved_ratio": 1.96, "achieved_flops_reduction": 0.49})
    _with_latency(run_dir, fake_result)
    report = write_report(run_dir)
    assert report["target"] == {"kind": "ratio", "value": 2.0, "achieved": pytest.approx(1.96), "met": None}
    model = report["latency_model"]
    assert set(model) >= {"backend", "predicted_ms", "measured_ms", "relative_error", "table"}
    assert (model["backend"], model["predicted_ms"], model["relative_error"], model["table"]) == (None,) * 4
    assert model["measured_ms"] == pytest.approx(report["compressed"]["latency_ms"]["p50"])
    md = (run_dir / "report.md").read_text()
    assert "- Target RATIO=2: achieved params ×1.96" in md
    assert "Latency model" not in md


def test_report_target_flops_and_no_target(run_dir, fake_result):
    _set_target(run_dir, {"ratio": None, "flops": 0.5, "achieved_flops_reduction": 0.52})
    _with_latency(run_dir, fake_result)
    assert write_report(run_dir)["target"] == {"kind": "flops", "value": 0.5, "achieved": 0.52, "met": None}
    _set_target(run_dir, {"ratio": None, "flops": None})  # --no-ratio: the method's own knob
    assert write_report(run_dir)["target"] == {"kind": None, "value": None, "achieved": None, "met": None}


@pytest.mark.parametrize(
    ("kind", "value", "met"), [("speedup", 1.5, True), ("speedup", 3.0, False), ("latency_ms", 1.0, False)]
)
def test_report_latency_target_measured_and_predicted(run_dir, fake_result, kind, value, met):
    table = {"path": "/tmp/latency-ort-cpu-x.json", "entries": 42}
    _set_target(
        run_dir,
        {
            "ratio": 3.1,
            "flops": None,
            "achieved_ratio": 3.1,
            "latency_target": {"kind": kind, "value": value, "predicted_ms": 2.2, "measured_ms": 2.1},
            "latency_model": {"backend": "ort-cpu", "threads": 1, "table": table},
        },
    )
    _with_latency(run_dir, fake_result)  # dense p50 4 ms, compressed p50 2 ms
    report = write_report(run_dir)
    achieved = 2.0  # the measured speedup, or the measured compressed p50 in ms: both 2 here
    assert report["target"] == {"kind": kind, "value": value, "achieved": pytest.approx(achieved), "met": met}
    model = report["latency_model"]
    assert model["backend"] == "ort-cpu"
    assert model["table"] == table
    assert model["predicted_ms"] == pytest.approx(2.2)
    assert model["measured_ms"] == pytest.approx(2.0)
    assert model["relative_error"] == pytest.approx(0.1)  # (predicted - measured) / measured
    assert model["planning_measured_ms"] == pytest.approx(2.1)
    md = (run_dir / "report.md").read_text()
    assert "- Latency model (ort-cpu, 1 thread(s), lookup table /tmp/latency-ort-cpu-x.json (42 entries)): " in md
    assert "predicted 2.200 ms, measured p50 2.000 ms (+10.0%)" in md
    assert ("**missed**" in md) is not met


def test_report_links_profile_when_present(run_dir, fake_result):
    _with_latency(run_dir, fake_result)
    assert "profile.md" not in (write_report(run_dir) and (run_dir / "report.md").read_text())
    (run_dir / "profile.md").write_text("# profile\n")
    report = write_report(run_dir)
    assert "profile.md" in report["artifacts"]
    assert "[profile.md](profile.md)" in (run_dir / "report.md").read_text()
