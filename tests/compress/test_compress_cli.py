"""The compress command line: bad input is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FACTORY = str(Path(__file__).with_name("models.py")) + ":tiny_resnet"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_run_writes_a_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "tiny" / "tucker2"
    proc = _run(
        "run",
        "--model",
        FACTORY,
        "--weights",
        "random",
        "--input-size",
        "16",
        "--ratio",
        "2",
        "--round-to",
        "2",
        "--min-rank",
        "2",
        "--run-dir",
        str(run_dir),
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run_dir / "compress.json").read_text())
    assert info["model"] == "models.tiny_resnet"
    assert info["input_shape"] == [1, 3, 16, 16]
    assert info["ratios"]["params"] == pytest.approx(2.0, rel=0.03)
    for name in ("plan.json", "dense.safetensors", "model.safetensors"):
        assert (run_dir / name).stat().st_size > 0
    assert not list(run_dir.glob(".*tmp*")), "temporary files left behind"

    from compress.artifacts import load_run

    run = load_run(run_dir)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (run.dense(x) - run.compressed(x)).abs().max() > 0  # really compressed
    assert sum(p.numel() for p in run.compressed.parameters()) == info["compressed"]["params"]


@pytest.mark.parametrize(
    ("args", "exit_code", "pattern"),
    [
        (["--model", "resnet343"], 1, "unknown model 'resnet343' (did you mean resnet34"),
        (["--model", "resnet18", "--method", "tuker"], 1, "unknown method 'tuker'"),
        (["--model", "resnet18", "--ratio", "abc"], 2, "RATIO must be a number > 1"),
        (["--model", "resnet18", "--ratio", "1"], 2, "RATIO must be a number > 1"),
        (["--model", "resnet18", "--ratio", "-2"], 2, "RATIO must be a number > 1"),
        (["--model", "resnet18", "--input-size", "64", "--weights", "random", "--ratio", "5000"], 1, "not reachable"),
        (["--model", "nofile.py:build"], 1, "model factory file 'nofile.py' does not exist"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], exit_code: int, pattern: str) -> None:
    proc = _run("run", *args, "--run-dir", str(tmp_path / "out"))
    assert proc.returncode == exit_code
    assert pattern in _one_error_line(proc)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage-zip"])
def test_corrupt_weights_file(tmp_path: Path, content: bytes) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(content)
    proc = _run("run", "--model", FACTORY, "--weights", str(weights), "--run-dir", str(tmp_path / "out"))
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "w.pt" in line
    assert "empty" in line or "corrupt" in line
    assert not (tmp_path / "out" / "compress.json").exists()


def test_missing_and_mismatched_weights(tmp_path: Path) -> None:
    proc = _run("run", "--model", FACTORY, "--weights", str(tmp_path / "absent.pt"), "--run-dir", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "does not exist" in _one_error_line(proc)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    proc = _run("run", "--model", FACTORY, "--weights", str(tmp_path / "other.pt"), "--run-dir", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "does not match the model" in _one_error_line(proc)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a pickled nn.Module (arbitrary code on load) is not accepted."""
    from tests.compress.models import TinyResNet

    torch.save(TinyResNet(), tmp_path / "module.pt")
    proc = _run("run", "--model", FACTORY, "--weights", str(tmp_path / "module.pt"), "--run-dir", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "not a weights-only checkpoint" in _one_error_line(proc)


def test_state_dict_weights_are_loaded(tmp_path: Path) -> None:
    from tests.compress.models import TinyResNet

    torch.manual_seed(3)
    model = TinyResNet()
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, tmp_path / "ckpt.pt")
    from compress.models import load_model

    loaded = load_model(FACTORY, str(tmp_path / "ckpt.pt"))
    assert loaded.weights == str(tmp_path / "ckpt.pt")
    assert loaded.warning is None
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unwritable_out(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _run("run", "--model", FACTORY, "--run-dir", str(blocker / "sub"))
    assert proc.returncode == 1
    assert "not writable" in _one_error_line(proc)


def test_imagenet_weights_unavailable_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WEIGHTS=imagenet fails clearly; WEIGHTS=auto falls back to random init with a recorded warning."""
    import torch.hub

    from compress.models import load_model
    from lowrank_core.errors import UserInputError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(UserInputError, match="WEIGHTS=imagenet: pretrained weights for resnet18 are unavailable"):
        load_model("resnet18", "imagenet")
    loaded = load_model("resnet18", "auto")
    assert loaded.weights == "random"
    assert loaded.warning is not None
    assert "RANDOM WEIGHTS" in loaded.warning
