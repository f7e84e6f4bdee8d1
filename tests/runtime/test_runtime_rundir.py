"""The run-directory contract (lowrank_core.rundir), runners built from it, and a torch-free ``runtime``.

The last tests run ``python -m runtime`` in a subprocess where ``torch``, ``compress``, ``export``,
``onnx`` and ``matplotlib`` cannot be imported, as on a device with numpy + onnxruntime only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lowrank_core import rundir
from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_write_json
from lowrank_core.rundir import CompressRecord, LatencyRecord, ParityRecord, RunDir
from runtime import base
from runtime.__main__ import main
from runtime.base import register_runner, runner_class

REPO_ROOT = Path(__file__).resolve().parents[2]
# What tests/runtime/conftest.py's run_dir fixture writes (kept in step with it by test_fixture_records_match).
COMPRESS_JSON = {
    "model": "tiny",
    "method": "tucker2",
    "weights": "random",
    "weights_warning": "random weights: accuracy numbers are meaningless",
    "input_shape": [1, 3, 8, 8],
    "dense": {"params": 8 * 3 * 9 + 8 + 5 * 8 + 5, "macs": 8 * 27 * 64 + 40},
    "compressed": {"params": 4 * 3 * 9 + 4 + 5 * 4 + 5, "macs": 4 * 27 * 64 + 20},
    "agreement": {"top1": 0.98, "rel_l2": 0.012},
}
PARITY_JSON = {
    "dense": {"max_abs": 1.0e-6, "max_rel": 2.0e-6, "mean_abs": 1.0e-7, "onnx_bytes": 1},
    "compressed": {"max_abs": 3.0e-6, "max_rel": 4.0e-6, "mean_abs": 2.0e-7, "onnx_bytes": 1},
    "atol": 1e-5,
    "rtol": 1e-5,
}

# A compress.json as the compress stage writes it (every key, writer order, optional blocks present).
FULL_COMPRESS = {
    "model": "resnet18",
    "model_spec": "resnet18",
    "method": "lrsd",
    "weights": "random",
    "weights_requested": "auto",
    "weights_warning": None,
    "input_shape": [1, 3, 32, 32],
    "num_classes": 10,
    "config": {"rank_ratio": 0.5},
    "dense": {"params": 1000, "macs": 5000},
    "compressed": {"params": 400, "macs": 2100},
    "ratios": {"params": 2.5, "macs": 5000 / 2100, "flops_reduction": 0.58},
    "target": {"ratio": 4},
    "layers": {"factorized": 3, "kept": 2},
    "agreement": {"rel_l2": 0.01, "top1_agreement": 0.9},
    "wall_s": {"load": 0.1, "plan": 0.2, "apply": 0.3, "compress": 0.5},
    "warnings": ["weight-only fallback"],
    "sparse_storage": {"params_values": 410, "macs_2to4": None},
    "accuracy": {"dense": {"top1": 0.9}, "raw": None, "finetuned": None},
    "unknown_future_key": [1, 2],
}


# Records ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (CompressRecord, COMPRESS_JSON),
        (CompressRecord, FULL_COMPRESS),
        (ParityRecord, PARITY_JSON),
        (ParityRecord, {"opset": 18, "dynamic_batch": False, "atol": 1e-4, "rtol": 1e-3, "dense": {"max_abs": 0.0}}),
        (LatencyRecord, {"backend": "ort", "batch": 1, "results": {"a": {"p50": 1.5}}, "speedup": None, "x": 1}),
    ],
)
def test_records_round_trip_exactly(tmp_path, cls, data):
    record = cls.from_dict(data)
    out = record.to_dict()
    assert out == data
    assert list(out) == list(data)  # key order too
    src, dst = tmp_path / "src.json", tmp_path / "dst.json"
    atomic_write_json(src, data)
    cls.read(src).write(dst)
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.serial  # times real ORT sessions
def test_real_latency_json_round_trips_byte_for_byte(run_dir, capsys):
    assert main(["bench", "--run-dir", str(run_dir), "--iters", "6", "--warmup", "0", "--warmup-iters", "1"]) == 0
    capsys.readouterr()
    path = RunDir(run_dir).latency_json
    record = LatencyRecord.read(path)
    assert record.backend == "ort"
    assert record.batch == 1
    assert record.stats("compressed")["n"] == 6
    assert record.stats("dense")["p50"] > 0
    assert record.speedup["baseline"] == "dense"
    copy = path.with_name("copy.json")
    record.write(copy)
    assert copy.read_bytes() == path.read_bytes()


def test_typed_fields_and_accessors():
    comp = CompressRecord.from_dict(FULL_COMPRESS)
    assert comp.params("dense") == 1000
    assert comp.macs("model") == 2100  # "model" names the compressed model, as its file names do
    assert comp.params("compressed") == 400
    assert comp.extra == {"unknown_future_key": [1, 2]}
    parity = ParityRecord.from_dict(PARITY_JSON)
    assert parity.side("model")["max_abs"] == pytest.approx(3.0e-6)
    assert parity.sparse_onnx is None


def test_record_built_in_code_writes_the_writer_key_order():
    rec = CompressRecord(model="m", method="svd", dense={"params": 10, "macs": 20}, compressed={"params": 5, "macs": 8})
    out = rec.to_dict()
    # optional blocks (sparse_storage, dense_training, accuracy, finetune) are left out; the rest is written
    assert "sparse_storage" not in out
    assert "accuracy" not in out
    assert out["weights_warning"] is None
    assert list(out)[:4] == ["model", "model_spec", "method", "weights"]
    assert list(out) == [f for f in CompressRecord.field_names() if f in out]
    assert CompressRecord.from_dict(out).to_dict() == out


def test_missing_required_key_names_file_key_and_stage(tmp_path):
    data = json.loads(json.dumps(COMPRESS_JSON))
    del data["compressed"]["macs"]
    with pytest.raises(UserInputError, match=r"compress.json lacks key 'compressed\.macs'; .*python -m compress"):
        CompressRecord.from_dict(data)
    atomic_write_json(tmp_path / "compress.json", [1])
    with pytest.raises(UserInputError, match="must hold a JSON object"):
        CompressRecord.read(tmp_path / "compress.json")


def test_run_dir_paths(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.onnx("dense").name == "dense.onnx"
    assert rd.onnx("model") == rd.onnx("compressed") == tmp_path / "model.onnx"
    assert rd.engine("dense").name == "dense.plan"
    assert rd.weights("model").name == "model.safetensors"
    assert rd.parity_json.name == rundir.PARITY_JSON == "parity.json"
    assert rd.sparse_onnx.name == "model.sparse.onnx"
    assert os.fspath(rd) == str(tmp_path)
    with pytest.raises(UserInputError, match="unknown model 'teacher'"):
        rd.onnx("teacher")
    with pytest.raises(UserInputError, match=r"latency.json is missing .*python -m runtime bench"):
        rd.read_latency()


# Runners from a run directory -------------------------------------------------------------------------


def test_fixture_records_match(run_dir):
    assert CompressRecord.read(run_dir / "compress.json").to_dict() == COMPRESS_JSON
    assert ParityRecord.read(run_dir / "parity.json").to_dict() == PARITY_JSON


def test_ort_from_run_dir_runs_the_right_file(tmp_path, onnx_factory):
    folder = tmp_path / "run"
    folder.mkdir()
    dense = onnx_factory("run/dense", channels=8, seed=1)
    comp = onnx_factory("run/model", channels=4, seed=2)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)
    import torch

    for which, tiny, key in (("dense", dense, "dense"), ("model", comp, "compressed")):
        runner = runner_class("ort").from_run_dir(folder, which, intra_op_threads=1)
        assert runner.name == key
        assert runner.onnx_path == tiny.path
        with runner:
            out = runner.infer({"input": x})["output"]
        with torch.no_grad():
            ref = tiny.torch_module()(torch.from_numpy(x)).numpy()
        assert out.shape == (2, 5)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    (folder / "model.onnx").unlink()
    with pytest.raises(UserInputError, match=r"model.onnx is missing .*python -m export"):
        runner_class("ort").bench_runners(folder)


def test_ort_cli_options_map_device_to_providers():
    ort = runner_class("ort")
    opts = ort.cli_options({"device": "tensorrt", "threads": 3, "spin": True})
    assert opts == {"providers": ("tensorrt", "cuda"), "intra_op_threads": 3, "allow_spinning": True}
    assert ort.cli_env({"threads": 3}) == {"ort_intra_op_threads": 3}
    with pytest.raises(UserInputError, match="unknown --device 'tpu' for ort"):
        ort.cli_options({"device": "tpu"})


def test_trt_bench_runners_need_model_plan_and_take_dense_when_built(tmp_path):
    trt = runner_class("trt")
    with pytest.raises(UserInputError, match=r"model.plan is missing .*python -m export engine"):
        trt.bench_runners(tmp_path, device="cuda")
    (tmp_path / "model.plan").write_bytes(b"x")
    assert list(trt.bench_runners(tmp_path, device="cuda")) == ["compressed"]
    (tmp_path / "dense.plan").write_bytes(b"x")
    runners = trt.bench_runners(tmp_path, device="cuda:1")
    assert {k: (r.engine_path.name, r.device) for k, r in runners.items()} == {
        "dense": ("dense.plan", "cuda:1"),
        "compressed": ("model.plan", "cuda:1"),
    }
    assert trt.cli_options({"device": "cpu", "engine": None}) == {"device": "cuda", "engine": None}
    only = trt.bench_runners(tmp_path, engine=tmp_path / "dense.plan", device="cuda")
    assert list(only) == ["compressed"]
    assert only["compressed"].engine_path.name == "dense.plan"


def test_torch_from_run_dir_loads_the_run_once(monkeypatch, tmp_path, onnx_factory):
    import torch

    dense = onnx_factory("d", channels=8, seed=1).torch_module()
    comp = onnx_factory("c", channels=4, seed=2).torch_module()
    loads = []

    def load_run(run_dir):
        loads.append(str(run_dir))
        return types.SimpleNamespace(input_shape=(1, 3, 8, 8), dense=dense, compressed=comp)

    fake = types.ModuleType("compress.artifacts")
    fake.load_run = load_run
    monkeypatch.setitem(sys.modules, "compress.artifacts", fake)
    cls = runner_class("torch")
    runners = cls.bench_runners(tmp_path, **cls.cli_options({"device": "cpu", "threads": None}))
    assert loads == [str(tmp_path)]
    assert [r.name for r in runners.values()] == ["dense", "compressed"]
    x = np.ones((3, 3, 8, 8), dtype=np.float32)
    with runners["compressed"] as runner:
        assert runner.get_input_metadata()["input"].shape == (None, 3, 8, 8)
        out = next(iter(runner.infer({"input": x}).values()))
    with torch.no_grad():
        np.testing.assert_allclose(out, comp(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
    single = cls.from_run_dir(tmp_path, "dense")
    assert single.name == "dense"
    assert len(loads) == 2
    with pytest.raises(UserInputError, match="--cuda-graph need --device cuda"):
        cls.cli_options({"device": "cpu", "cuda_graph": True})


def test_cli_builds_any_registered_backend(monkeypatch, run_dir, capsys, fake_runner_cls):
    """The CLI names no backend: a runner registered by a test benchmarks like the built-in ones."""

    class BenchFake(fake_runner_cls):
        @classmethod
        def bench_runners(cls, run_dir, **options):
            return {key: cls(name=key, **options) for key in ("dense", "compressed")}

        @classmethod
        def cli_options(cls, args):
            return {"shape": ("N", int(args["batch"]) + 1)}

        @classmethod
        def cli_env(cls, args):
            return {"fake_option": 7}

    monkeypatch.setattr(base, "_RUNNERS", dict(base._RUNNERS))
    register_runner("benchfake")(BenchFake)
    argv = ["bench", "--run-dir", str(run_dir), "--backend", "benchfake", "--iters", "5", "--warmup", "0"]
    assert main([*argv, "--warmup-iters", "1", "--batch", "2"]) == 0
    capsys.readouterr()
    record = LatencyRecord.read(run_dir / "latency.json")
    assert record.backend == "benchfake"
    assert record.batch == 2
    assert {k: v["n"] for k, v in record.results.items()} == {"dense": 5, "compressed": 5}
    assert record.env["extra"]["fake_option"] == 7


# runtime alone: numpy + onnxruntime --------------------------------------------------------------------

BLOCKED = ("torch", "compress", "export", "onnx", "matplotlib")
BOOTSTRAP = f"""
import runpy, sys

class BlockFinder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked on this device: " + name)
        return None

sys.meta_path.insert(0, BlockFinder())
sys.argv = ["runtime", *sys.argv[1:]]
try:
    runpy.run_module("runtime", run_name="__main__", alter_sys=True)
finally:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
    print("LEAKED", leaked, file=sys.stderr)
"""


def _run_bare(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.serial  # times real ORT sessions
def test_runtime_bench_and_report_without_torch_compress_export(run_dir):
    timing = ["--iters", "12", "--warmup", "0", "--warmup-iters", "2", "--min-iters", "5"]
    proc = _run_bare("bench", "--run-dir", str(run_dir), "--threads", "1", *timing)
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stderr
    assert "latency.png not written" in proc.stderr  # matplotlib is blocked too: numbers, no plot
    record = json.loads((run_dir / "latency.json").read_text())
    for key in ("dense", "compressed"):
        stats = record["results"][key]
        assert stats["n"] == 12
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
        assert len(stats["samples_ms"]) == 12
    assert record["speedup"]["p50_ratio"] > 0
    assert record["env"]["threads"]["ort_intra_op"] == 1

    proc = _run_bare("report", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "report.json").read_text())
    dense_params, comp_params = COMPRESS_JSON["dense"]["params"], COMPRESS_JSON["compressed"]["params"]
    assert report["ratios"]["params"] == pytest.approx(dense_params / comp_params, rel=1e-12)
    assert report["compressed"]["latency_ms"]["p50"] == record["results"]["compressed"]["p50"]


@pytest.mark.serial  # times real ORT sessions
def test_runtime_onnx_files_without_torch(tmp_path, onnx_factory):
    onnx_factory("a", channels=8, seed=1)
    onnx_factory("b", channels=4, seed=2)
    out = tmp_path / "ab.json"
    proc = _run_bare(
        "onnx", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--json", str(out), "--iters", "8", "--warmup", "0"
    )
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stderr
    record = LatencyRecord.read(out)
    assert record.models == {"a": str(tmp_path / "a.onnx"), "b": str(tmp_path / "b.onnx")}
    assert {k: v["n"] for k, v in record.results.items()} == {"a": 8, "b": 8}
    assert record.results["b"]["p50"] > 0
    assert record.speedups["b"]["p50_ratio"] > 0
