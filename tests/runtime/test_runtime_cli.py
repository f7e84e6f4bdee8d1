"""``python -m runtime``: exit codes and outputs (a few real subprocesses, the rest in-process)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from lowrank_core.cli import run_main
from runtime.__main__ import main

FAST = ["--iters", "4", "--warmup", "0", "--warmup-iters", "1"]


def _run(argv, capsys):
    code = run_main("runtime", main, argv)
    out, err = capsys.readouterr()
    return code, out, err


# Subprocesses ----------------------------------------------------------------------------------------


def test_help(run_cli):
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("bench", "report", "onnx", "env"):
        assert command in proc.stdout


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    assert "--no-interleave" in capsys.readouterr().out


def test_unknown_backend_is_one_line_exit_1(run_cli, run_dir):
    proc = run_cli("bench", "--run-dir", str(run_dir), "--backend", "tflite")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("runtime: error: unknown backend 'tflite'")
    assert "ort" in lines[0]
    assert "torch" in lines[0]


def test_missing_run_dir_is_exit_1(run_cli, tmp_path):
    proc = run_cli("bench", "--run-dir", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "does not exist" in proc.stderr


def test_report_missing_run_dir(tmp_path, capsys):
    code, _, err = _run(["report", "--run-dir", str(tmp_path / "missing")], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "does not exist" in err


@pytest.mark.serial  # times real ORT sessions
def test_bench_then_report(run_cli, run_dir):
    proc = run_cli("bench", "--run-dir", str(run_dir), "--threads", "1", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "| dense | 4 |" in proc.stdout
    latency = json.loads((run_dir / "latency.json").read_text())
    assert latency["backend"] == "ort"
    assert latency["runners"]["dense"]["providers_in_use"] == ["CPUExecutionProvider"]
    assert latency["runners"]["compressed"]["intra_op_threads"] == 1
    assert latency["env"]["threads"]["ort_intra_op"] == 1
    assert latency["results"]["compressed"]["n"] == 4
    proc = run_cli("report", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("> **WARNING")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ratios"]["speedup_p50"] == pytest.approx(latency["speedup"]["p50_ratio"])


def test_env_prints_json(run_cli):
    proc = run_cli("env")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["python"]["version"]
    assert env["packages"]["numpy"] == np.__version__


# In-process ------------------------------------------------------------------------------------------


@pytest.mark.serial  # times real ORT sessions
def test_bench_sequential_and_batch(run_dir, capsys):
    code, out, _ = _run(["bench", "--run-dir", str(run_dir), "--no-interleave", "--batch", "3", *FAST], capsys)
    assert code == 0
    latency = json.loads((run_dir / "latency.json").read_text())
    assert latency["config"]["interleave"] is False
    assert latency["batch"] == 3
    stats = latency["results"]["dense"]
    assert stats["throughput"] == pytest.approx(3 / (stats["mean"] / 1e3))
    assert "sequential" in out


def test_bench_missing_onnx_names_the_export_stage(run_dir, capsys):
    (run_dir / "model.onnx").unlink()
    code, _, err = _run(["bench", "--run-dir", str(run_dir), *FAST], capsys)
    assert code == 1
    assert "model.onnx is missing" in err
    assert "python -m export" in err


def test_bench_cuda_without_gpu_build(run_dir, capsys):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu installed")
    code, _, err = _run(["bench", "--run-dir", str(run_dir), "--device", "cuda", *FAST], capsys)
    assert code == 1
    assert "onnxruntime-gpu" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_rejects_bad_config(run_dir, capsys):
    code, _, err = _run(["bench", "--run-dir", str(run_dir), "--iters", "0"], capsys)
    assert code == 1
    assert "iterations must be >= 1" in err


def test_bench_torch_uses_load_run(run_dir, capsys, monkeypatch, tiny_onnx, onnx_factory):
    artifacts = pytest.importorskip("compress.artifacts")
    small = onnx_factory("small", channels=2, seed=3)
    calls = []

    def fake_load_run(path):
        calls.append(path)
        return SimpleNamespace(
            dense=tiny_onnx.torch_module(),
            compressed=small.torch_module(),
            input_shape=(1, 3, 8, 8),
            info={"model": "tiny"},
        )

    monkeypatch.setattr(artifacts, "load_run", fake_load_run)
    code, out, err = _run(["bench", "--run-dir", str(run_dir), "--backend", "torch", "--batch", "2", *FAST], capsys)
    assert code == 0, err
    assert calls == [run_dir]
    latency = json.loads((run_dir / "latency.json").read_text())
    assert latency["backend"] == "torch"
    assert latency["runners"]["dense"]["backend"] == "torch"
    assert latency["runners"]["dense"]["inputs"] == {"input": "float32[?,3,8,8]"}
    assert latency["results"]["compressed"]["n"] == 4
    assert "| compressed | 4 |" in out


@pytest.mark.serial  # times real ORT sessions
def test_onnx_side_by_side(tmp_path, tiny_onnx, onnx_factory, capsys):
    other = onnx_factory("other", channels=2, seed=4)
    out_json = tmp_path / "out" / "cmp.json"
    argv = ["onnx", str(tiny_onnx.path), str(other.path), "--json", str(out_json), "--batch", "2", *FAST]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    record = json.loads(out_json.read_text())
    assert list(record["results"]) == ["tiny", "other"]
    assert record["models"] == {"tiny": str(tiny_onnx.path), "other": str(other.path)}
    assert set(record["speedups"]) == {"other"}
    ratio = record["results"]["tiny"]["p50"] / record["results"]["other"]["p50"]
    assert record["speedups"]["other"]["p50_ratio"] == pytest.approx(ratio)
    assert record["speedup"]["p50_ratio"] == pytest.approx(ratio)
    assert record["batch"] == 2
    assert "other vs tiny" in out


def test_onnx_same_stem_gets_unique_names(tmp_path, onnx_factory, capsys):
    first = onnx_factory("m", channels=2)
    second_dir = tmp_path / "b"
    second_dir.mkdir()
    second = second_dir / "m.onnx"
    second.write_bytes(first.path.read_bytes())
    out_json = tmp_path / "r.json"
    code, _, _ = _run(["onnx", str(first.path), str(second), "--json", str(out_json), *FAST], capsys)
    assert code == 0
    assert list(json.loads(out_json.read_text())["results"]) == ["m", "m-2"]


def test_onnx_dynamic_spatial_needs_a_shape(onnx_factory, capsys):
    model = onnx_factory("dyn", spatial=("H", "W"))
    code, _, err = _run(["onnx", str(model.path), *FAST], capsys)
    assert code == 1
    assert "dynamic axis 2" in err
    assert "--shape input:Nx3xNxN" in err
    code, out, _ = _run(["onnx", str(model.path), "--shape", "input:1x3x6x5", *FAST], capsys)
    assert code == 0
    assert "| dyn | 4 |" in out


@pytest.mark.parametrize("bad", ["input", "input:", ":1x3", "input:1xAx3"])
def test_onnx_bad_shape_syntax(tiny_onnx, capsys, bad):
    code, _, err = _run(["onnx", str(tiny_onnx.path), "--shape", bad, *FAST], capsys)
    assert code == 1
    assert "NAME:DIMS" in err


def test_onnx_missing_file(tmp_path, capsys):
    code, _, err = _run(["onnx", str(tmp_path / "nope.onnx"), *FAST], capsys)
    assert code == 1
    assert "does not exist" in err


def test_onnx_fixed_batch_mismatch(onnx_factory, capsys):
    model = onnx_factory("fixed", batch=1)
    code, _, err = _run(["onnx", str(model.path), "--batch", "4", *FAST], capsys)
    assert code == 1
    assert "fixed batch of 1" in err
