"""Hostile input (issue 22): the run directory, the latency table and options that were silently ignored.

Each refusal is one stderr line naming the problem, a non-zero exit and no file under OUT created or
changed; each fix of a silent misbehaviour asserts the behaviour itself (the file kept, the flag used).
The helpers and the one real run of the chain (a tiny ResNet at 32 px, random weights) are those of
``tests/test_hostile_input.py``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_hostile_input import BASE, _call, _export, assert_refused, snapshot
from torch import nn

from lowrank_deploy.io import atomic_path

FOLDER = ("models.tiny_resnet", "tucker2")


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run: (OUT, run directory)."""
    from test_hostile_input import _pipeline

    out = tmp_path_factory.mktemp("hostile_run") / "out"
    assert _pipeline(["export", *BASE, "--duration", "0.3", "--out", str(out)]) == 0
    run_dir = out.joinpath(*FOLDER)
    assert (run_dir / "report.json").is_file()
    return out, run_dir


@pytest.fixture
def copy_run(earlier: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the earlier run directory, for the cases that mutate one."""
    dest = tmp_path / "copy" / FOLDER[0] / FOLDER[1]
    shutil.copytree(earlier[1], dest)
    return dest


def _writer_temp_name(folder: Path, name: str) -> str:
    """The name :func:`atomic_path` gives the temporary file of ``folder/name`` (as a SIGKILL leaves it)."""
    with contextlib.suppress(RuntimeError), atomic_path(folder / name) as tmp:
        taken = tmp.name
        raise RuntimeError("killed")
    (folder / taken).write_bytes(b"partial")
    return taken


# Orphan cleanup removes only the writer's own temporary files ------------------------------------------


def test_orphan_cleanup_removes_only_the_writers_temporary_files(
    copy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.__main__ import main as runtime_main

    written = [_writer_temp_name(copy_run, n) for n in ("model.onnx", "plan.json", "model.int8.onnx", "latency.png")]
    assert all(n.endswith(".lrd-tmp" + Path(n).suffix) for n in written), written
    for name in (".write-test-k3j9x_qa", ".model.k3j9x_qa.tmp.onnx"):  # the probe; an older version's orphan
        (copy_run / name).write_bytes(b"partial")
    users = [".notes.2024.tmp.txt", ".backup.v1.tmpl", ".keep", ".notes.abcdefgh.tmp.txt", ".model.tmp.onnx"]
    users += [".plan.abc123.tmp.json", ".write-test-mine"]  # near misses: 6 random characters, a short probe
    for name in users:
        (copy_run / name).write_text("the user's")
    code, err = _call(capsys, runtime_main, ["report", "--run-dir", str(copy_run)])
    assert code == 0, err
    assert sorted(p.name for p in copy_run.glob(".*")) == sorted(users)
    assert all((copy_run / n).read_text() == "the user's" for n in users)


# Refused before any stage writes: a too-long OUT, options that need DATA, INT8 timed by a backend that cannot


@pytest.mark.parametrize(
    ("args", "offending"),
    [
        (["--finetune-epochs", "2"], "FINETUNE_EPOCHS=2 needs DATA"),
        (["--train-epochs", "1"], "TRAIN_EPOCHS=1 needs DATA"),
        (["--eval-samples", "5"], "EVAL_SAMPLES=5 needs DATA"),
        (["--train-epochs", "1", "--finetune-epochs", "1"], "TRAIN_EPOCHS=1, FINETUNE_EPOCHS=1 need DATA"),
        (["--precision", "int8", "--backend", "torch"], "PRECISION=int8 is timed with BACKEND=ort"),
        (["--ratio", "3", "--precision", "int8", "--backend", "torch"], "not BACKEND=torch"),
    ],
)
def test_options_that_would_be_ignored_are_refused_before_anything_is_written(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str], args: list[str], offending: str
) -> None:
    out, _ = earlier
    before = snapshot(out)
    code, err = _export(capsys, *BASE, *args, "--out", str(out))
    assert_refused(code, err, offending, before, out)
    assert "choose" in err or "give DATA=" in err or "use BACKEND=ort" in err  # the fix, in the same line


def test_data_options_reach_the_compress_stage_with_data(tmp_path: Path) -> None:
    from lowrank_deploy.pipeline import _resolve, build_parser, plan_export

    env = {"LRD_MODEL": "tests/compress/models.py:tiny_resnet", "LRD_OUT": str(tmp_path), "LRD_DATA": str(tmp_path)}
    env |= {"LRD_FINETUNE_EPOCHS": "1", "LRD_EVAL_SAMPLES": "5", "LRD_RATIO": "2"}
    _, stages = plan_export(_resolve(build_parser().parse_args(["export"]), env))
    argv = stages[0].argv
    assert argv[argv.index("--finetune-epochs") + 1] == "1"
    assert argv[argv.index("--eval-samples") + 1] == "5"
    assert list(tmp_path.iterdir()) == []  # validation writes nothing


@pytest.mark.parametrize("where", ["out", "nested"])
def test_an_out_too_long_for_the_file_system_is_one_line(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str], where: str
) -> None:
    out, _ = earlier
    long_out = out / ("a" * 300) if where == "out" else out / "fine" / ("b" * 256) / "x"
    before = snapshot(out)
    code, err = _export(capsys, *BASE, "--out", str(long_out))
    assert_refused(code, err, "choose a shorter OUT", before, out)
    assert f"of {300 if where == 'out' else 256} bytes" in err
    assert not (out / "fine").exists()


# `compress plan` uses --latency-threads, --latency-precision and --batch as `compress run` does ---------------


class CountingTimer:
    """A fake timer: ms = parameters / 1e3 + 0.01 (never asserted as a time), with the threads and precision given."""

    backend = "fake"

    def __init__(self, threads: int, precision: str) -> None:
        self.threads, self.precision, self.precision_tag = threads, precision, precision
        self.calls = 0

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        self.calls += 1
        return sum(p.numel() for p in module.parameters()) / 1e3 + 0.01

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        return [1.25 * self.time_module(m, input_shape) for m in models]


def test_compress_plan_uses_the_latency_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from compress.cli import main as compress_main
    from compress.latency import LatencyModel, LatencyTable

    seen: list[dict[str, object]] = []

    def fake_model(**kw: object) -> LatencyModel:
        seen.append(kw)
        timer = CountingTimer(int(kw["threads"]), str(kw["precision"]))  # type: ignore[call-overload]
        return LatencyModel(timer, LatencyTable(tmp_path / "lut.json"), **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("compress.latency.LatencyModel", fake_model)
    plan_path = tmp_path / "plan.json"
    argv = ["plan", "--model", "tests/compress/models.py:tiny_resnet", "--input-size", "32", "--method", "auto"]
    argv += ["--speedup", "1.2", "--latency-threads", "3", "--latency-precision", "int8", "--batch", "2"]
    code, err = _call(capsys, compress_main, [*argv, "--out", str(plan_path)])
    assert code == 0, err
    assert seen == [{"threads": 3, "batch": 2, "precision": "int8"}]
    recorded = json.loads(plan_path.read_text())["target"]["latency_model"]
    assert (recorded["threads"], recorded["precision"], recorded["batch"]) == (3, "int8", 2)
    assert "|threads=3|int8|" in recorded["context"]
