"""Hostile input (issue 22): the run directory, the latency table and options that were silently ignored.

Each refusal is one stderr line naming the problem, a non-zero exit and no file under OUT created or
changed; each fix of a silent misbehaviour asserts the behaviour itself (the file kept, the flag used).
The helpers and the one real run of the chain (a tiny ResNet at 32 px, random weights) are those of
``tests/test_hostile_input.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from test_hostile_input import BASE, FACTORY, ROOT, _call, _export, assert_refused, snapshot
from torch import nn

from lowrank_core.io import atomic_path

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
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    env = {"LRD_MODEL": "tests/compress/models.py:tiny_resnet", "LRD_OUT": str(tmp_path), "LRD_DATA": str(tmp_path)}
    env |= {"LRD_FINETUNE_EPOCHS": "1", "LRD_EVAL_SAMPLES": "5", "LRD_RATIO": "2"}
    _, stages = plan_export(resolve(build_parser().parse_args(["export"]), env))
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


# The latency lookup table: an entry is a measurement; an unusable cache costs one warning, never the run -------


PLAN_ARGS = ["plan", "--model", "tests/compress/models.py:tiny_resnet", "--input-size", "32", "--method", "auto"]
PLAN_ARGS += ["--speedup", "1.3", "--round-to", "2", "--min-rank", "2"]


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> list[CountingTimer]:
    """``OrtTimer`` replaced by :class:`CountingTimer` (the default latency model, on the default table path)."""
    made: list[CountingTimer] = []

    def timer(threads: int = 1, *, precision: str = "fp32", **_: object) -> CountingTimer:
        made.append(CountingTimer(threads, precision))
        made[-1].backend = "ort-cpu"
        return made[-1]

    monkeypatch.setattr("compress.latency.ort_timing.OrtTimer", timer)
    monkeypatch.setattr("compress.latency._defaults", {})
    return made


def _plan(capsys: pytest.CaptureFixture[str], out: Path) -> tuple[dict, list[str]]:
    """``compress plan`` of METHOD=auto SPEEDUP=1.3: the plan and the stderr lines."""
    from compress.cli import main as compress_main

    code, err = _call(capsys, compress_main, [*PLAN_ARGS, "--out", str(out)])
    assert code == 0, err
    assert "Traceback" not in err
    return json.loads(out.read_text()), [line for line in err.splitlines() if line.startswith("WARNING: latency")]


def _poison(table: dict, how: str) -> dict:
    for section in table["sections"].values():
        for record in section.values():
            if how == "missing":
                del record["ms"]
            else:
                record["ms"] = {"negative": -1, "nan": float("nan"), "inf": float("inf"), "zero": 0}.get(how, how)
    if how == "section-list":
        table["sections"] = {k: list(v.values()) for k, v in table["sections"].items()}
    if how == "record-list":
        table["sections"] = {k: {key: [1.0] for key in v} for k, v in table["sections"].items()}
    return table


@pytest.mark.parametrize(
    "how", ["negative", "nan", "inf", "zero", "fast", True, "missing", "section-list", "record-list"]
)
def test_latency_table_entries_that_are_not_measurements_are_dropped_and_retimed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_ort: list[CountingTimer],
    how: object,
) -> None:
    from compress.latency import default_table_path

    monkeypatch.setenv("LOWRANK_DEPLOY_CACHE", str(tmp_path / "cache"))
    clean, warnings = _plan(capsys, tmp_path / "clean.json")
    assert warnings == []
    (table_path,) = (tmp_path / "cache").iterdir()
    assert table_path == default_table_path("ort-cpu")
    timed = sum(t.calls for t in fake_ort)
    good = json.loads(table_path.read_text())
    entries = sum(len(s) for s in good["sections"].values())
    assert timed == entries > 0

    table_path.write_text(json.dumps(_poison(json.loads(table_path.read_text()), str(how) if how is not True else "t")))
    if how is True:
        table_path.write_text(table_path.read_text().replace('"t"', "true"))
    fake_ort.clear()
    again, warnings = _plan(capsys, tmp_path / "again.json")
    assert len(warnings) == 1, warnings
    assert f"{entries} entries are not measurements" in warnings[0]
    assert sum(t.calls for t in fake_ort) == timed  # every poisoned entry re-timed
    target = again["target"]
    assert target["predicted_ms"] > 0
    assert target["predicted_ms"] == pytest.approx(clean["target"]["predicted_ms"])  # not "predicted -22 ms"
    assert [e["action"] for e in again["layers"]] == [e["action"] for e in clean["layers"]]
    assert any(e["action"] != "keep" for e in again["layers"])  # something was compressed
    assert json.loads(table_path.read_text()) == good  # the poisoned file was replaced by measurements

    fake_ort.clear()
    _, warnings = _plan(capsys, tmp_path / "third.json")  # the poison does not outlive one run
    assert warnings == []
    assert sum(t.calls for t in fake_ort) == 0


@pytest.mark.parametrize("where", ["table-is-a-folder", "cache-is-a-file", "read-only"])
def test_an_unusable_latency_cache_is_one_warning_and_the_run_goes_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_ort: list[CountingTimer],
    where: str,
) -> None:
    import lowrank_core.io
    from compress.latency import default_table_path

    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWRANK_DEPLOY_CACHE", str(cache))
    if where == "table-is-a-folder":
        default_table_path("ort-cpu").mkdir(parents=True)
    elif where == "cache-is-a-file":
        cache.write_text("not a folder")
    else:  # as a read-only folder does to a non-root user (root writes anyway): the temporary file is refused
        cache.mkdir()

        real = tempfile.mkstemp

        def refuse(*args: Any, **kwargs: Any) -> tuple[int, str]:
            if Path(kwargs["dir"]) == cache:
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        monkeypatch.setattr(lowrank_core.io.tempfile, "mkstemp", refuse)
    before = snapshot(tmp_path)
    plan, warnings = _plan(capsys, tmp_path / "plan.json")
    assert len(warnings) == 1, warnings
    assert "kept in memory only" in warnings[0]
    assert "OUT" not in warnings[0]
    assert plan["target"]["predicted_ms"] > 0
    assert plan["target"]["latency_model"]["table"]["path"] is None
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "plan.json"} == before  # the cache was left as it was


def test_latency_cache_folder_honours_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.latency.table import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWRANK_DEPLOY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "lowrank-deploy"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "lowrank-deploy"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lowrank-deploy"
    monkeypatch.setenv("LOWRANK_DEPLOY_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# A re-run killed mid-way leaves nothing of the earlier run downstream of what it rewrote -----------------------


def test_a_killed_rerun_leaves_no_report_of_the_earlier_run(copy_run: Path) -> None:
    from lowrank_core.integrity import STAGE_OUTPUTS

    out = copy_run.parents[1]
    earlier_report = json.loads((copy_run / "report.json").read_text())
    assert earlier_report["ratios"]["params"] == pytest.approx(2, rel=0.15)
    argv = [a if a != "2" else "3" for a in BASE]  # --ratio 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lowrank_deploy", "export", *argv, "--duration", "120", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if line.startswith("[2/4] export") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)  # no handler runs: what is on disk is what the stages left
    proc.wait(timeout=60)
    plan = json.loads((copy_run / "plan.json").read_text())
    assert plan["target"]["ratio"] == 3  # the re-run's plan
    left = {p.name for p in copy_run.iterdir()}
    stale = set(STAGE_OUTPUTS["bench"] + STAGE_OUTPUTS["report"] + STAGE_OUTPUTS["quantize"])
    assert not left & stale, left & stale  # no latency.* or report.* of RATIO=2 beside the RATIO=3 plan
    assert {"plan.json", "compress.json", "dense.safetensors", "model.safetensors"} <= left


def test_a_stage_run_on_its_own_clears_what_its_files_make_stale(
    copy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve
    from runtime.__main__ import main as runtime_main

    (copy_run / "profile.json").write_text("{}")  # made from the ONNX files, not from the benchmark
    code, err = _call(capsys, runtime_main, ["bench", "--run-dir", str(copy_run), "--duration", "0.2"])
    assert code == 0, err
    assert not (copy_run / "report.json").exists()
    assert (copy_run / "latency.json").is_file()
    assert (copy_run / "profile.json").is_file()
    argv = [a if a != "2" else "3" for a in BASE]  # compress alone, another ratio
    _, stages = plan_export(
        resolve(build_parser().parse_args(["export", *argv, "--out", str(copy_run.parents[1])]), {})
    )
    code, err = _call(capsys, stages[0].run, stages[0].argv)
    assert code == 0, err
    assert {p.name for p in copy_run.iterdir()} == {
        "plan.json",
        "compress.json",
        "dense.safetensors",
        "model.safetensors",
    }


def test_clear_downstream_follows_the_stage_table(tmp_path: Path) -> None:
    from lowrank_core.integrity import STAGE_OUTPUTS, clear_downstream, downstream

    assert downstream("compress") == ["export", "quantize", "engine", "profile", "bench", "report"]
    assert downstream("quantize") == ["engine", "bench", "report"]
    assert downstream("bench") == ["report"]
    assert downstream("engine") == downstream("profile") == downstream("report") == []  # an ORT report stays
    every = [n for names in STAGE_OUTPUTS.values() for n in names]
    for name in [*every, "notes.txt"]:
        (tmp_path / name).write_text("x")
    assert clear_downstream(tmp_path, "bench") == list(STAGE_OUTPUTS["report"])
    removed = clear_downstream(tmp_path, "compress", keep=("model.onnx",))  # what the stage itself just wrote
    assert sorted(removed) == sorted(
        set(every) - set(STAGE_OUTPUTS["compress"]) - {"model.onnx", *STAGE_OUTPUTS["report"]}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*STAGE_OUTPUTS["compress"], "model.onnx", "notes.txt"])


# A quote in OUT is a folder name like any other: one argument, never a shell word ------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_export_takes_an_out_with_quotes_as_one_literal_folder(tmp_path: Path) -> None:
    from venv_for_make import venv_for_make

    venv = venv_for_make()
    marker = tmp_path / "X"
    out = tmp_path / f"""it's "q"; touch {marker}; echo '"""
    env = {**os.environ, "MAKEFLAGS": "", "OMP_NUM_THREADS": "1"}
    variables = [f"MODEL={FACTORY}", "WEIGHTS=random", "RATIO=2", "ROUND_TO=2", "THREADS=1", "DURATION=0.3"]
    variables += ["COMPRESS_ARGS=--input-size 32 --min-rank 2", f"OUT={out}", f"VENV={venv}"]
    proc = subprocess.run(["make", "-s", "export", *variables], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "OUT ran a shell command"
    strays = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert strays == []  # every file under OUT, the folder named exactly as given (the marker's "/" included)
    report = json.loads(out.joinpath(*FOLDER, "report.json").read_text())
    assert report["ratios"]["params"] == pytest.approx(2, rel=0.15)
