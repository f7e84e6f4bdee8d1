"""Hostile input (issue 17): every bad value or fault is refused in one stderr line, with nothing written.

Each case asserts: a non-zero exit, exactly one stderr line naming the offending value, no traceback, no
new or changed file under OUT (paths, SHA-256 and mtimes snapshotted before and after), and the earlier
run's results intact. One real run of the chain (a tiny ResNet at 32 px, random weights) provides those
earlier results; most cases run in this process through the same ``run_main`` the commands use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from venv_for_make import venv_for_make

from lowrank_core.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests/compress/models.py:tiny_resnet"
BASE = ["--model", FACTORY, "--weights", "random", "--ratio", "2", "--round-to", "2", "--threads", "1"]
BASE += ["--compress-args", "--input-size 32 --min-rank 2"]


def _pipeline(argv: Sequence[str] | None) -> int:
    from lowrank_deploy.__main__ import dispatch as main

    return main(argv, environ={})  # the test process's LRD_* variables never leak in


def _call(capsys: pytest.CaptureFixture[str], main: Callable[..., int], argv: list[str], prog: str = "x"):
    capsys.readouterr()
    try:
        code = run_main(prog, main, argv)
    except SystemExit as exc:  # argparse errors: one line, exit 2
        code = exc.code
    out = capsys.readouterr()
    return code, out.err


def _export(capsys: pytest.CaptureFixture[str], *argv: str):
    return _call(capsys, _pipeline, ["export", *argv], "lowrank-deploy")


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (dotfiles too): relative path → (sha256, mtime_ns)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return out


_MAKE_NOISE = re.compile(r"^make(\[\d+\])?: \*\*\* ")  # make's own "recipe failed" line (make[1] under `make test`)


def error_lines(err: str) -> list[str]:
    """Stderr lines without make's own failure line."""
    return [line for line in err.strip().splitlines() if not _MAKE_NOISE.match(line)]


def assert_refused(code: object, err: str, offending: str, before: dict, out: Path) -> None:
    lines = error_lines(err)
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert offending in lines[0], lines[0]
    assert snapshot(out) == before, "files under OUT changed"


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run: (OUT, run directory)."""
    out = tmp_path_factory.mktemp("hostile") / "out"
    code = _pipeline(["export", *BASE, "--duration", "0.3", "--out", str(out)])
    assert code == 0
    run_dir = out / "models.tiny_resnet" / "tucker2"
    assert (run_dir / "report.json").is_file()
    assert not list(run_dir.glob(".*")), "lock or temporary files left behind"
    return out, run_dir


@pytest.fixture
def copy_run(earlier: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the earlier run directory, for the cases that mutate one."""
    dest = tmp_path / "copy" / "models.tiny_resnet" / "tucker2"
    shutil.copytree(earlier[1], dest)
    return dest


# 1, 3: options validated before any stage writes -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "offending"),
    [
        (["--duration", "0"], "'0'"),
        (["--duration", "inf"], "'inf'"),
        (["--duration", "nan"], "'nan'"),
        (["--duration", "-1"], "'-1'"),
        (["--duration", "1e9"], "'1e9'"),
        (["--ratio", "3", "--duration", "0"], "DURATION"),  # another ratio must not rewrite the run first
        (["--threads", "abc"], "'abc'"),
        (["--threads", "0"], "THREADS"),
        (["--threads", "2.5"], "'2.5'"),
        (["--backend", "bogus"], "'bogus'"),
        (["--method", "bogus"], "'bogus'"),
        (["--ratio", "inf"], "got inf"),
        (["--ratio", "1"], "RATIO must be"),
        (["--ratio", "nan"], "got nan"),
        (["--ratio", "2' --help; touch X; echo '"], "touch X"),
        (["--ratio", "", "--flops", "1.0"], "got 1.0"),
        (["--flops", "0.5"], "--flops"),  # two targets (RATIO from BASE and FLOPS)
        (["--model", "res'net34"], "res'net34"),
        (["--model", "resnet34\n; rm -rf /"], "resnet34"),
        (["--model", "tests/compress/models.py:no such"], "no such"),
        (["--model", "missing_dir/file.py:fn"], "missing_dir/file.py"),
        (["--batch", "0"], "BATCH"),
        (["--batch", "abc"], "'abc'"),
        (["--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
        (["--precision", "fp8"], "'fp8'"),
        (["--data", "/nonexistent/data"], "/nonexistent/data"),
        (["--train-epochs", "-1", "--data", "fashion-mnist"], "'-1'"),
        (["--dynamic-batch", "maybe"], "'maybe'"),
        (["--compress-args", "--bogus-flag"], "--bogus-flag"),
        (["--compress-args", "--exclude 'layer1"], "--exclude 'layer1"),
        (["--compress-args", "--input-size 200000"], "200000x200000"),  # 120+ GB: refused before allocating
        (["--round-to", "abc"], "'abc'"),
    ],
)
def test_bad_option_refused_before_anything_is_written(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str], args: list[str], offending: str
) -> None:
    out, _ = earlier
    before = snapshot(out)
    argv = [*BASE, "--duration", "0.3", "--out", str(out)]
    for flag, value in zip(args[::2], args[1::2], strict=True):  # override or add (as --flag=value)
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        argv.append(f"{flag}={value}")
    argv = [a for a in argv if a != "--ratio="]
    code, err = _export(capsys, *argv)
    assert_refused(code, err, offending, before, out)


def test_out_that_is_a_file_is_refused(earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out, run_dir = earlier
    before = snapshot(out)
    code, err = _export(capsys, *BASE, "--out", str(run_dir / "plan.json"))
    assert_refused(code, err, "plan.json", before, out)


def test_flags_also_come_from_the_environment_and_flags_win(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from lowrank_deploy.__main__ import dispatch as main

    out, _ = earlier
    before = snapshot(out)
    env = {"LRD_DURATION": "inf", "LRD_OUT": str(out), "LRD_RATIO": "", "LRD_MODEL": FACTORY}
    code, err = _call(capsys, lambda argv: main(argv, environ=env), ["export", "--weights", "random"])
    assert_refused(code, err, "'inf'", before, out)
    env["LRD_DURATION"] = "1"
    code, err = _call(capsys, lambda argv: main(argv, environ=env), ["export", "--duration", "-5"])
    assert_refused(code, err, "'-5'", before, out)


# 7, 8: user code and files that fail -------------------------------------------------------------------

BAD_MODELS = """
import sys
import torch
from torch import nn


def raises():
    raise RuntimeError("factory exploded")


def exits():
    sys.exit(3)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        raise ValueError("forward exploded")


def forward_raises():
    return Broken()
"""


@pytest.mark.parametrize(
    ("fn", "offending"),
    [("raises", "factory exploded"), ("exits", "SystemExit"), ("forward_raises", "forward exploded")],
)
def test_user_model_failures_are_one_line_and_leave_no_run_directory(
    earlier: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fn: str, offending: str
) -> None:
    out, _ = earlier
    models = tmp_path / "bad_models.py"
    models.write_text(BAD_MODELS)
    before = snapshot(out)
    argv = [*BASE, "--model", f"{models}:{fn}", "--duration", "0.3", "--out", str(out)]
    argv[argv.index("--model") + 1] = f"{models}:{fn}"
    code, err = _export(capsys, *argv)
    assert_refused(code, err, offending, before, out)
    assert not (out / f"bad_models.{fn}").exists()


def _weights_file(tmp_path: Path, kind: str) -> Path:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from tests.compress.models import tiny_resnet

    state = {k: v.clone() for k, v in tiny_resnet().state_dict().items()}
    if kind == "nan":
        state["conv1.weight"][0, 0, 0, 0] = float("nan")
    elif kind == "inf":
        state["head.weight"][0, 0] = float("inf")
    elif kind == "int64":
        state["conv1.weight"] = state["conv1.weight"].to(torch.int64)
    elif kind == "zeros":
        state = {k: torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "offending"),
    [("nan", "conv1.weight"), ("inf", "head.weight"), ("int64", "int64"), ("zeros", "only zeros")],
)
def test_unusable_weights_are_refused_at_load(
    earlier: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, offending: str
) -> None:
    out, _ = earlier
    weights = _weights_file(tmp_path, kind)
    before = snapshot(out)
    argv = [*BASE, "--duration", "0.3", "--out", str(out)]
    argv[argv.index("--weights") + 1] = str(weights)
    code, err = _export(capsys, *argv)
    assert_refused(code, err, offending, before, out)
    assert str(weights) in err


def test_half_precision_weights_are_converted_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from lowrank_core.checks import check_state_dict

    own = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    check_state_dict({"w": torch.ones(2, 2, dtype=torch.float16), "b": torch.ones(2)}, own, "half.pt")
    err = capsys.readouterr().err
    assert "WARNING" in err
    assert "float16" in err
    assert "converted" in err


def _plan_case(run_dir: Path, tmp_path: Path, case: str) -> Path:
    plan = json.loads((run_dir / "plan.json").read_text())
    path = tmp_path / f"{case}.json"
    if case == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
        return path
    entry = next(layer for layer in plan["layers"] if layer["ranks"])
    if case == "rank_abc":
        entry["ranks"][0] = "abc"
    elif case == "rank_float":
        entry["ranks"][0] = 3.5
    elif case == "method":
        plan["method"] = "bogus"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize(
    ("case", "offending"),
    [("deep", "nested too deeply"), ("rank_abc", "'abc'"), ("rank_float", "3.5"), ("method", "'bogus'")],
)
def test_hostile_plans_are_refused(
    earlier: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, offending: str
) -> None:
    from compress.cli import main as compress_main

    out, run_dir = earlier
    plan = _plan_case(run_dir, tmp_path, case)
    before = snapshot(out)
    argv = ["apply", "--model", FACTORY, "--weights", "random", "--input-size", "32", "--plan", str(plan)]
    code, err = _call(capsys, compress_main, [*argv, "--run-dir", str(run_dir)])
    assert_refused(code, err, offending, before, out)


def test_full_disk_is_one_line_and_leaves_no_partial_file(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lowrank_core.io

    out, _ = earlier
    before = snapshot(out)

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(lowrank_core.io.os, "replace", full)
    argv = [*BASE, "--duration", "0.3", "--out", str(out)]
    argv[argv.index("--ratio") + 1] = "3"  # a different run that would rewrite every file
    code, err = _export(capsys, *argv)
    assert_refused(code, err, "No space left on device", before, out)


def test_onnx_external_data_outside_the_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.__main__ import main as export_main
    from runtime.__main__ import main as runtime_main

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "64")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    w.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    path = tmp_path / "evil" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    before = snapshot(tmp_path)
    code, err = _call(capsys, export_main, ["check", str(path)])
    assert_refused(code, err, "../../etc/passwd", before, tmp_path)
    code, err = _call(capsys, runtime_main, ["onnx", str(path), "--duration", "0.1"])
    assert_refused(code, err, "../../etc/passwd", before, tmp_path)


@pytest.mark.parametrize(
    ("args", "offending"),
    [
        (["--duration", "inf"], "'inf'"),
        (["--duration", "0"], "'0'"),
        (["--iters", "0"], "iterations must be >= 1"),
        (["--iters", "1e12"], "'1e12'"),
        (["--warmup", "nan"], "'nan'"),
        (["--threads", "abc"], "'abc'"),
        (["--batch", "100000000"], "'100000000'"),
        (["--backend", "bogus"], "'bogus'"),
    ],
)
def test_runtime_bench_options_are_bounded(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str], args: list[str], offending: str
) -> None:
    from runtime.__main__ import main as runtime_main

    out, run_dir = earlier
    before = snapshot(out)
    code, err = _call(capsys, runtime_main, ["bench", "--run-dir", str(run_dir), *args])
    assert_refused(code, err, offending, before, out)


def test_non_finite_outputs_fail_parity() -> None:
    import torch

    from export.onnx import onnx_from_torch
    from export.parity import check_onnx_parity

    model = torch.nn.Linear(4, 3).eval()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    proto = onnx_from_torch(model, torch.zeros(1, 4))
    result = check_onnx_parity(model, proto, input_shape=(1, 4), raise_on_failure=False)
    assert not result.passed
    assert result.n_failed >= 1


# 2: a run directory never mixes runs --------------------------------------------------------------------


def test_stale_weights_are_refused_by_export(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main as export_main

    weights = copy_run / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # another run's (or a half-written) file
    before = snapshot(copy_run)
    code, err = _call(capsys, export_main, ["onnx", "--run-dir", str(copy_run)])
    assert_refused(code, err, "model.safetensors", before, copy_run)
    assert "compress stage" in err


def test_swapped_onnx_is_refused_by_bench_and_report(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.__main__ import main as runtime_main

    shutil.copyfile(copy_run / "dense.onnx", copy_run / "model.onnx")
    before = snapshot(copy_run)
    code, err = _call(capsys, runtime_main, ["bench", "--run-dir", str(copy_run), "--duration", "0.1"])
    assert_refused(code, err, "model.onnx", before, copy_run)
    assert "export stage" in err
    code, err = _call(capsys, runtime_main, ["report", "--run-dir", str(copy_run)])
    assert_refused(code, err, "model.onnx", before, copy_run)


def test_report_refuses_an_export_of_other_weights(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.__main__ import main as runtime_main

    parity = json.loads((copy_run / "parity.json").read_text())
    parity["inputs"]["model.safetensors"] = "0" * 64  # parity.json of another compress run
    (copy_run / "parity.json").write_text(json.dumps(parity))
    before = snapshot(copy_run)
    code, err = _call(capsys, runtime_main, ["report", "--run-dir", str(copy_run)])
    assert_refused(code, err, "parity.json", before, copy_run)


def test_report_drops_a_stale_sparse_onnx(copy_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.__main__ import main as runtime_main

    shutil.copyfile(copy_run / "model.onnx", copy_run / "model.sparse.onnx")  # left by an earlier LRSD run
    code, err = _call(capsys, runtime_main, ["report", "--run-dir", str(copy_run)])
    assert code == 0, err
    report = json.loads((copy_run / "report.json").read_text())
    assert "model.sparse.onnx" not in report["artifacts"]
    assert report["sparse_onnx"] is None


def test_concurrent_writer_is_excluded_with_one_line(
    earlier: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, run_dir = earlier
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('locked', flush=True); time.sleep(60)",
            str(run_dir / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        code, err = _export(capsys, *BASE, "--duration", "0.3", "--out", str(out))
        assert_refused(code, err, "in use by another process", before, out)
        assert "4242" in err
    finally:
        holder.kill()
        holder.wait()
        (run_dir / ".lock").unlink(missing_ok=True)


# 6: signals and orphans ---------------------------------------------------------------------------------


# test_hostile_input_run.py: orphan temporary files (only the writer's own) are removed by the next run


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path: Path) -> None:
    code = (
        "import os, signal, sys\n"
        "from lowrank_core.cli import run_main\n"
        "from lowrank_core.io import atomic_path\n"
        "def main(argv):\n"
        "    with atomic_path(sys.argv[1]) as tmp:\n"
        "        tmp.write_bytes(b'half')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        tmp.write_bytes(b'never')\n"
        "    return 0\n"
        "sys.exit(run_main('w', main))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.json")], capture_output=True, text=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines() == ["w: terminated (SIGTERM)"]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_the_chain_cleanly(copy_run: Path) -> None:
    out = copy_run.parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lowrank_deploy", "export", *BASE, "--duration", "120", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if line.startswith("[3/4] bench") or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "lowrank-deploy: terminated (SIGTERM)"
    assert not list(copy_run.glob(".*")), "temporary or lock files left behind"


# 1: the Makefile forwards values as single arguments ----------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_clean_deletes_exactly_the_out_folder_with_a_space(tmp_path: Path) -> None:
    (tmp_path / "runs b").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep").write_text("x")
    venv = venv_for_make()
    proc = subprocess.run(
        ["make", "-s", "clean", f"OUT={tmp_path / 'runs b'}", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "runs b").exists()
    assert (tmp_path / "runs" / "keep").is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize(
    ("variable", "offending"),
    [("RATIO=2' --help; touch {x}; echo '", "touch"), ("MODEL=res'net; touch {x}", "res'net")],
)
def test_make_variable_with_a_quote_runs_nothing(
    earlier: tuple[Path, Path], tmp_path: Path, variable: str, offending: str
) -> None:
    out, _ = earlier
    marker = tmp_path / "X"
    venv = venv_for_make()
    env = {**os.environ, "MAKEFLAGS": "", "OMP_NUM_THREADS": "1"}
    subprocess.run(["make", "-s", "venv", f"VENV={venv}"], cwd=ROOT, capture_output=True, env=env, check=False)
    before = snapshot(out)
    cmd = ["make", "-s", "export", f"MODEL={FACTORY}", variable.format(x=marker), f"OUT={out}", f"VENV={venv}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert not marker.exists(), "a make variable ran a shell command"
    assert_refused(proc.returncode, proc.stderr, offending, before, out)


def _fake_apt(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose ``apt-get`` / ``sudo`` only log their arguments and fail (nothing is installed)."""
    bin_dir, log = tmp_path / "fakebin", tmp_path / "apt.log"
    bin_dir.mkdir()
    for name in ("apt-get", "sudo"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "{log}"\nexit 1\n')
        tool.chmod(0o755)
    return {**os.environ, "MAKEFLAGS": "", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


HOSTILE_DIR = "fm x' ] ; then exit 0; fi; touch {x}; if [ -f 'y"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("present", [True, False], ids=["present", "missing"])
def test_make_data_takes_a_folder_with_a_quote_as_one_value(tmp_path: Path, present: bool) -> None:
    marker = tmp_path / "X"
    folder = tmp_path / HOSTILE_DIR.format(x=marker).replace("/", "_")
    if present:
        folder.mkdir()
        (folder / "train-images-idx3-ubyte.gz").write_bytes(b"")
    env, log = _fake_apt(tmp_path)
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("fakebin")}
    proc = subprocess.run(
        ["make", "-s", "data", f"FASHION_MNIST_DIR={folder}"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert not marker.exists(), "FASHION_MNIST_DIR ran a shell command"
    assert "Traceback" not in proc.stderr
    if present:  # found where the value says: nothing to install
        assert proc.returncode == 0, proc.stderr
        assert not log.exists()
    else:  # the value was tested as one path, then apt-get was asked for the package only
        assert proc.returncode != 0
        (line,) = error_lines(proc.stderr)
        assert line.startswith("error: could not install the Debian package dataset-fashion-mnist")
        assert "dataset-fashion-mnist" in log.read_text().splitlines()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(("fakebin", "apt.log"))} == before


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("package", ["x; touch {x}", "-o=APT::Get::Assume-Yes", 'pkg\' "`touch {x}`"'])
def test_make_data_refuses_a_package_name_that_is_not_one(tmp_path: Path, package: str) -> None:
    marker = tmp_path / "X"
    env, log = _fake_apt(tmp_path)
    value = package.format(x=marker)
    proc = subprocess.run(
        ["make", "-s", "data", f"FASHION_MNIST_DIR={tmp_path / 'nowhere'}", f"FASHION_MNIST_PKG={value}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert not marker.exists(), "FASHION_MNIST_PKG ran a shell command"
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert lines == [f"error: FASHION_MNIST_PKG={value} is not a Debian package name"]
    assert not log.exists(), "apt-get was called with a refused package name"
