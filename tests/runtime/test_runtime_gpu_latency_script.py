"""benchmarks/gpu_latency.py on CPU: argument parsing, the case list and the JSON shape with fake runners.

The GPU measurement itself runs only where CUDA is visible (``main`` exits 1 here, writing nothing).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_latency
from lowrank_core.io import atomic_write_json


def test_defaults_cover_the_issue_matrix():
    args = gpu_latency.parse_args([])
    assert args.model == "resnet34"
    assert args.ratio == 4.0
    assert args.methods == ("dense", "tucker2", "auto")
    assert args.batches == (1, 32)
    assert args.precisions == ("fp32", "fp16", "bf16")
    assert args.modes == ("eager", "graph")
    cases = gpu_latency.torch_cases(args)
    assert len(cases) == 2 * 3 * 2
    assert cases[0] == {"batch": 1, "precision": "fp32", "mode": "eager"}
    assert cases[-1] == {"batch": 32, "precision": "bf16", "mode": "graph"}
    # time budget: 12 torch cases × (duration + 3 models × warm-up) + 2 ORT cases stay well under 8 minutes
    assert 14 * (args.duration + 3 * args.warmup) < 120
    assert args.budget_s <= 420


@pytest.mark.parametrize(
    "argv",
    [["--precisions", "fp8"], ["--modes", "lazy"], ["--batches", "1,x"], ["--methods", "tucker2"], ["--ratio", "1"]],
)
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        gpu_latency.parse_args(argv)


def test_json_shape_with_fake_runners(tmp_path, fake_runner_cls):
    args = gpu_latency.parse_args(
        ["--batches", "1,32", "--precisions", "fp16", "--modes", "graph", "--duration", "0.01"]
    )
    models = {"dense": object(), "tucker2": object(), "auto": object()}
    made = []

    def make(key, module, case):
        made.append((key, case["precision"], case["mode"]))
        runner = fake_runner_cls(key)
        runner.gpu_times_s = [0.001] * 1000
        return runner

    clock = iter([0.0, 0.0, 99.0])
    rows = gpu_latency.measure_torch(
        models,
        [*gpu_latency.torch_cases(args), {"batch": 1, "precision": "fp32", "mode": "eager"}],
        make,
        duration_s=0.01,
        warmup_s=0.0,
        deadline=10.0,
        gpu_memory=lambda: {"torch_max_allocated_bytes": 1},
        clock=lambda: next(clock),
    )
    assert [r.get("skipped") for r in rows] == [None, None, "time budget"]
    assert made[:3] == [("dense", "fp16", "graph"), ("tucker2", "fp16", "graph"), ("auto", "fp16", "graph")]
    row = rows[1]
    assert (row["backend"], row["batch"], row["precision"], row["mode"]) == ("torch", 32, "fp16", "graph")
    assert set(row["models"]) == {"dense", "tucker2", "auto"}
    assert row["models"]["auto"]["gpu_ms"]["p50"] == pytest.approx(1.0)
    assert set(row["models"]["dense"]["host_ms"]) >= {"p50", "p90", "p99", "n", "throughput"}
    assert set(row["speedups"]) == {"tucker2", "auto"}
    assert row["gpu_memory"] == {"torch_max_allocated_bytes": 1}

    info = {
        "dense": {"params": 4, "macs": 400},
        "tucker2": {"params": 1, "macs": 100},
        "auto": {"params": 1, "macs": 200},
    }
    record = gpu_latency.build_record(args, rows, info, gpu={"name": "Fake GPU"}, env={}, wall_s=1.0)
    out = atomic_write_json(tmp_path / "gpu.json", record)
    back = json.loads(out.read_text())
    assert back["gpu"] == {"name": "Fake GPU"}
    assert back["settings"]["methods"] == ["dense", "tucker2", "auto"]
    summary = back["summary"]
    assert set(summary) == {"tucker2", "auto"}
    assert summary["tucker2"]["macs_ratio"] == 4.0
    assert summary["auto"]["macs_ratio"] == 2.0
    speed = summary["tucker2"]["speedup_p50"]
    assert summary["tucker2"]["efficiency"] == pytest.approx(speed / 4.0)
    assert summary["tucker2"]["goal_met"] is (speed >= 0.6 * 4.0)


def test_main_without_cuda_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert gpu_latency.main(["--out", str(tmp_path / "x.json")]) == 1
    assert not (tmp_path / "x.json").exists()
