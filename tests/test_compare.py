"""``lowrank-deploy compare`` / ``make compare``: several methods at one target, timed in one interleaved run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowrank_core.errors import UserInputError
from lowrank_deploy.__main__ import dispatch as main
from lowrank_deploy.compare import compare_markdown, parse_methods

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT / 'tests' / 'compress' / 'models.py'}:tiny_resnet"


def test_parse_methods():
    assert parse_methods("tai  svd,tai\ttucker2") == ["tai", "svd", "tucker2"]
    with pytest.raises(UserInputError, match="METHODS"):
        parse_methods("  ")
    with pytest.raises(UserInputError, match="dense"):
        parse_methods("tai dense")
    with pytest.raises(UserInputError, match="nope"):
        parse_methods("tai nope")


def test_compare_refuses_bad_options_before_writing(tmp_path: Path):
    out = tmp_path / "out"
    argv = ["compare", "--model", TINY, "--methods", "tai svd", "--ratio", "inf", "--out", str(out)]
    with pytest.raises((UserInputError, SystemExit)):
        main(argv, environ={})
    assert not out.exists()


@pytest.mark.serial  # times real ORT sessions
def test_compare_two_methods_one_timed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    argv = ["compare", "--model", TINY, "--methods", "tai svd", "--ratio", "2", "--weights", "random"]
    argv += ["--duration", "0.5", "--threads", "1", "--out", str(out), "--compress-args", "--input-size 32"]
    assert main(argv, environ={}) == 0
    capsys.readouterr()
    folder = out / "models.tiny_resnet"
    record = json.loads((folder / "compare.json").read_text())
    assert (folder / "compare.md").is_file()
    assert (folder / "compare.png").stat().st_size > 0
    assert list(record["methods"]) == ["tai", "svd"]
    assert set(record["files"]) == {"dense", "tai", "svd"}  # one benchmark: dense once, each method once
    assert record["target"] == "RATIO=2"
    assert record["dense"]["latency_ms"]["p50"] > 0
    for name, entry in record["methods"].items():
        run_dir = folder / name
        assert entry["error"] is None
        assert entry["run_dir"] == str(run_dir)
        assert {"model.onnx", "dense.onnx", "compress.json", "plan.json"} <= {p.name for p in run_dir.iterdir()}
        assert not (run_dir / "latency.json").exists()  # no per-method benchmark
        comp = json.loads((run_dir / "compress.json").read_text())
        assert entry["params"] == comp["compressed"]["params"]
        assert entry["ratio_params"] == pytest.approx(comp["dense"]["params"] / comp["compressed"]["params"])
        assert entry["agreement"]["rel_l2"] == pytest.approx(comp["agreement"]["rel_l2"])
        lo, hi = entry["speedup_ci95"]
        assert lo <= entry["speedup_p50"] <= hi
        assert entry["speedup_p50"] == pytest.approx(
            record["dense"]["latency_ms"]["p50"] / entry["latency_ms"]["p50"], rel=1e-6
        )
        assert entry["target"]["kind"] == "ratio"
        assert entry["target"]["value"] == 2.0
    md = (folder / "compare.md").read_text()
    assert "| tai |" in md
    assert "| svd |" in md
    assert "![compare](compare.png)" in md


def test_compare_markdown_lists_a_failed_method():
    record = {
        "model": "m",
        "target": "SPEEDUP=9",
        "threads": 1,
        "batch": 1,
        "duration_s": 1.0,
        "dense": {"params": 10, "macs": 20, "latency_ms": {"p50": 2.0}},
        "methods": {
            "tai": {
                "error": None,
                "latency_ms": {"p50": 1.0},
                "speedup_p50": 2.0,
                "speedup_ci95": [1.9, 2.1],
                "target": {"kind": "speedup", "value": 9.0, "achieved": 2.0},
                "params": 5,
                "ratio_params": 2.0,
                "macs": 10,
                "ratio_macs": 2.0,
                "agreement": {"rel_l2": 0.1, "top1_agreement": 1.0},
            },
            "cc": {"error": "SPEEDUP=9 is out of reach for cc on m: the best speedup found is 1.5×"},
        },
    }
    md = compare_markdown(record, has_plot=False)
    assert "| tai | 1.000 | 2.00× (1.90–2.10) | speedup 9 → 2 |" in md
    assert "| cc | failed: SPEEDUP=9 is out of reach" in md


def test_export_forwards_speedup_latency_ms_and_threads(tmp_path: Path):
    """``make export SPEEDUP=… THREADS=…``: the compress stage predicts at the threads the benchmark uses."""
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    for flag, value in (("--speedup", "2"), ("--latency-ms", "5")):
        args = build_parser().parse_args(["export", "--model", TINY, "--method", "auto", flag, value])
        resolved = resolve(args, {"LRD_THREADS": "2", "LRD_OUT": str(tmp_path)})
        _, stages = plan_export(resolved)
        compress_argv, bench_argv = stages[0].argv, next(s.argv for s in stages if s.name == "bench")
        assert [flag, value] == compress_argv[compress_argv.index(flag) : compress_argv.index(flag) + 2]
        assert compress_argv[-2:] == ["--latency-threads", "2"]
        assert bench_argv[-2:] == ["--threads", "2"]
    args = build_parser().parse_args(["export", "--model", TINY, "--method", "tai", "--ratio", "2"])
    _, stages = plan_export(resolve(args, {"LRD_THREADS": "2", "LRD_OUT": str(tmp_path)}))
    assert "--latency-threads" not in stages[0].argv  # no latency target: nothing to predict
