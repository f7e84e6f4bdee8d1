"""Hostile input (issue 22): the run directory, the latency table and options that were silently ignored.

Each refusal is one stderr line naming the problem, a non-zero exit and no file under OUT created or
changed; each fix of a silent misbehaviour asserts the behaviour itself (the file kept, the flag used).
The helpers and the one real run of the chain (a tiny ResNet at 32 px, random weights) are those of
``tests/test_hostile_input.py``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from test_hostile_input import BASE, _call

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
