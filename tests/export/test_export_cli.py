"""Tests for ``python -m export``: ``check`` in a subprocess, ``onnx`` in-process on a fake run."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from export_helpers import SmallCNN, factorized_chain, randomize_bn_, seeded
from onnx import numpy_helper

import export.__main__ as cli
from export import load_onnx, save_onnx
from lowrank_core.cli import run_main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_check_garbage_file_exits_1_with_one_line(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xffnot onnx at all" * 10)
    proc = run_cli("check", str(bad))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("python -m export: error: ")
    assert str(bad) in lines[0]


def test_check_prints_graph_summary_json(tmp_path, resnet18_case):
    path = save_onnx(resnet18_case.optimized, tmp_path / "r18.onnx")
    proc = run_cli("check", str(path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["node_counts"]["Conv"] == 20
    assert summary["file_bytes"] == path.stat().st_size
    assert summary["shared_initializers"] == {}


# ------------------------------------------------------------------------------------------------
# python -m export onnx --run-dir DIR (the compress stage's load_run replaced by a fake)
# ------------------------------------------------------------------------------------------------


def fake_run(input_shape=(1, 3, 16, 16)):
    dense = randomize_bn_(seeded(SmallCNN)).eval()
    compressed = randomize_bn_(seeded(SmallCNN)).eval()
    compressed.block[0] = seeded(lambda: factorized_chain(8, 4, 8), seed=1)  # 1×1 → 3×3 → 1×1
    return types.SimpleNamespace(dense=dense, compressed=compressed, input_shape=input_shape, info={})


@pytest.fixture
def install_run(monkeypatch):
    """Make ``compress.artifacts.load_run`` return a given run (faking the module if it is absent)."""

    def install(run):
        def load_run(run_dir):
            if not Path(run_dir).is_dir():
                from lowrank_core.errors import UserInputError

                raise UserInputError(f"run directory {str(run_dir)!r} does not exist")
            return run

        try:
            import compress.artifacts as artifacts
        except ImportError:  # the compress stage is not there yet: provide the module
            artifacts = types.ModuleType("compress.artifacts")
            monkeypatch.setitem(sys.modules, "compress.artifacts", artifacts)
        monkeypatch.setattr(artifacts, "load_run", load_run, raising=False)

    return install


def test_onnx_writes_optimized_models_and_parity_json(tmp_path, install_run, capsys):
    install_run(fake_run())
    assert cli.main(["onnx", "--run-dir", str(tmp_path), "--batch", "2", "--dynamic-batch"]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx", "model.onnx", "parity.json"]
    record = json.loads((tmp_path / "parity.json").read_text())
    assert {k: record[k] for k in ("opset", "dynamic_batch", "atol", "rtol")} == {
        "opset": 18,
        "dynamic_batch": True,
        "atol": 1e-3,
        "rtol": 1e-3,
    }
    for key, filename in (("dense", "dense.onnx"), ("compressed", "model.onnx")):
        entry = record[key]
        assert entry["passed"] is True
        assert entry["shape"] == [4, 5]  # 2 batches of --batch 2
        assert entry["max_abs"] < 1e-5
        assert entry["onnx_bytes"] == (tmp_path / filename).stat().st_size
        assert entry["export_s"] > 0
        graph = entry["graph"]
        assert "BatchNormalization" not in graph["node_counts"]
        assert isinstance(graph["inputs"]["input"][0], str)  # symbolic batch
        assert load_onnx(tmp_path / filename).graph.node  # a valid file
    assert record["compressed"]["graph"]["node_counts"]["Conv"] == record["dense"]["graph"]["node_counts"]["Conv"] + 2
    out = capsys.readouterr().out
    assert "dense " in out
    assert "compressed " in out
    assert out.count("parity PASS") == 2


def test_onnx_parity_failure_still_writes_json_and_exits_1(tmp_path, install_run, monkeypatch, capsys):
    install_run(fake_run())
    real_optimize = cli.optimize
    calls = []

    def broken_optimize(model, **kwargs):  # a faulty pass that corrupts the compressed model's weights
        out = real_optimize(model, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            init = next(i for i in out.graph.initializer if len(i.dims) == 4)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        return out

    monkeypatch.setattr(cli, "optimize", broken_optimize)
    code = run_main(cli.PROG, cli.main, ["onnx", "--run-dir", str(tmp_path), "--opset", "17"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("python -m export: error: ONNX Runtime vs PyTorch parity failed for compressed")
    record = json.loads((tmp_path / "parity.json").read_text())
    assert record["dense"]["passed"] is True
    assert record["compressed"]["passed"] is False
    assert record["compressed"]["max_abs"] > 1e-3
    assert record["opset"] == 17
    assert onnx.load(str(tmp_path / "model.onnx")).opset_import[0].version == 17


def test_onnx_missing_run_dir_exits_1_without_creating_it(tmp_path, install_run, capsys):
    install_run(fake_run())
    missing = tmp_path / "nope"
    assert run_main(cli.PROG, cli.main, ["onnx", "--run-dir", str(missing)]) == 1
    assert not missing.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "does not exist" in err[0]


def test_onnx_rejects_old_opset_and_bad_batch(tmp_path, capsys):
    assert run_main(cli.PROG, cli.main, ["onnx", "--run-dir", str(tmp_path), "--opset", "16"]) == 1
    assert run_main(cli.PROG, cli.main, ["onnx", "--run-dir", str(tmp_path), "--batch", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "use 17 or newer" in err[0]
    assert "--batch must be >= 1" in err[1]
    assert list(tmp_path.iterdir()) == []  # nothing written
