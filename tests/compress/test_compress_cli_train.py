"""``python -m compress train|finetune|eval`` and ``run --data`` on real Fashion-MNIST subsets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (make data installs the Debian package dataset-fashion-mnist)",
)
MODEL = "cifar_resnet20_w0.25"
SMALL = ["--train-samples", "512", "--eval-samples", "200", "--batch-size", "64"]


def _compress(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--data", "/nonexistent/data"], "nor an existing folder"),
        (["--data", "cifar-11"], "nor an existing folder"),
        (["--data", "fashion-mnist", "--optimizer", "lbfgs"], "invalid choice"),
        (["--data", "fashion-mnist", "--model", "cifar_resnet19"], "unknown model"),
    ],
)
def test_train_bad_input_is_one_line(tmp_path, args, pattern):
    base = ["train", "--model", MODEL, "--out", str(tmp_path / "t")]
    if "--model" in args:
        base = ["train", "--out", str(tmp_path / "t")]
    proc = _compress(*base, *args)
    assert proc.returncode in (1, 2)
    assert pattern in _one_error_line(proc)


def test_wrong_dataset_layout_is_one_line(tmp_path):
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    proc = _compress("train", "--model", MODEL, "--data", str(folder), "--out", str(tmp_path / "t"))
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "not_a_dataset" in line


@needs_fmnist
def test_train_writes_weights_log_and_summary(tmp_path):
    out = tmp_path / "train"
    proc = _compress("train", "--model", MODEL, "--data", "fashion-mnist", "--epochs", "1", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" not in proc.stderr  # training from scratch is the point, not a warning
    summary = json.loads((out / "train.json").read_text())
    assert summary["data"]["name"] == "fashion-mnist"
    assert summary["meta"]["train_samples"] == 512
    assert summary["result"]["steps"] == 512 // 64
    assert summary["result"]["final"]["n"] == 200
    log = json.loads((out / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1]
    assert (out / "model.safetensors").stat().st_size > 0
    assert not list(out.glob(".*tmp*"))

    # other settings in the same folder: refused, not mixed
    proc = _compress("train", "--model", MODEL, "--data", "fashion-mnist", "--lr", "0.3", "--out", str(out), *SMALL)
    assert proc.returncode == 1
    assert "--restart" in _one_error_line(proc)

    # the weights load back as WEIGHTS= and evaluate to the recorded accuracy
    proc = _compress(
        "eval", "--model", MODEL, "--weights", str(out / "model.safetensors"), "--data", "fashion-mnist",
        "--eval-samples", "200",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"top-1 {100 * summary['result']['final']['top1']:.2f}%" in proc.stdout


@pytest.mark.serial  # the kill must land between two checkpoints: keep CPU contention away
@needs_fmnist
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "train"
    args = ["train", "--model", MODEL, "--data", "fashion-mnist", "--epochs", "3", "--out", str(out), *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "train_log.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = json.loads((out / "train_log.json").read_text())["epochs"]
    assert 1 <= len(first) < 3, "the kill should land after the first checkpoint and before the end"
    assert not (out / "train.json").exists()

    done = _compress(*args)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "train.json").read_text())
    history = summary["result"]["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert summary["result"]["resumed_from_epoch"] == len(first)
    assert history[0]["loss"] == pytest.approx(first[0]["loss"], rel=1e-9)


@needs_fmnist
def test_corrupt_checkpoint_in_the_folder_is_one_line(tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 this is not a zip")
    proc = _compress("train", "--model", MODEL, "--data", "fashion-mnist", "--out", str(out), *SMALL)
    assert proc.returncode == 1
    assert "corrupt" in _one_error_line(proc)


@needs_fmnist
def test_run_with_data_records_dense_raw_and_finetuned_accuracy(tmp_path):
    run_dir = tmp_path / "run" / "tucker2"
    proc = _compress(
        "run", "--model", MODEL, "--weights", "random", "--ratio", "2", "--round-to", "2", "--min-rank", "2",
        "--data", "fashion-mnist", "--train-epochs", "2", "--finetune-epochs", "1", "--train-samples", "2048",
        "--eval-samples", "200", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run_dir / "compress.json").read_text())
    acc = info["accuracy"]
    assert acc["data"]["name"] == "fashion-mnist"
    for key in ("dense", "raw", "finetuned"):
        assert acc[key]["n"] == 200
        assert 0.0 <= acc[key]["ci95"][0] <= acc[key]["top1"] <= acc[key]["ci95"][1] <= 1.0
    # 32 steps on 2048 images: well above chance (0.1; its 95 % upper bound at n = 200 is 0.145). The exact
    # figure (0.29–0.4) depends on the CPU's float rounding, so the bound is statistical, not a point value.
    assert acc["dense"]["top1"] > 0.2
    assert info["input_shape"] == [1, 1, 28, 28]
    assert info["weights"].startswith("trained:")
    assert info["weights_warning"] is None
    assert (run_dir / "model.raw.safetensors").is_file()
    assert (tmp_path / "run" / "train-fashion-mnist" / "checkpoint.pt").is_file()

    # the fine-tuning checkpoint alone (weights + plan) rebuilds the compressed model
    import copy

    from compress.api import apply_plan_
    from compress.plan import Plan
    from compress.train import load_checkpoint
    from compress.zoo import create_model

    ckpt = load_checkpoint(run_dir / "finetune" / "checkpoint.pt")
    meta = json.loads(ckpt["meta_json"])
    rebuilt = apply_plan_(copy.deepcopy(create_model(MODEL, in_channels=1)), Plan.from_dict(meta["plan"]), init="empty")
    rebuilt.load_state_dict(ckpt["model"])  # strict: every tensor of the compressed architecture is there

    # the run directory reloads (1-channel stem) and its models evaluate to the recorded figures
    proc = _compress("eval", "--run-dir", str(run_dir), "--data", "fashion-mnist", "--eval-samples", "200")
    assert proc.returncode == 0, proc.stderr
    assert f"dense: top-1 {100 * acc['dense']['top1']:.2f}%" in proc.stdout
    assert f"compressed: top-1 {100 * acc['finetuned']['top1']:.2f}%" in proc.stdout

    # fine-tuning again with another budget restarts from the raw weights and updates the record
    proc = _compress(
        "finetune", "--run-dir", str(run_dir), "--data", "fashion-mnist", "--epochs", "1", "--max-steps", "2",
        "--eval-samples", "200", "--train-samples", "2048", "--batch-size", "64", "--restart",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = json.loads((run_dir / "compress.json").read_text())["accuracy"]
    assert again["finetune"]["steps"] == 2
    assert again["raw"] == acc["raw"]


@needs_fmnist
def test_finetune_on_data_of_another_shape_is_refused(tmp_path):
    from compress.zoo import create_model

    run_dir = tmp_path / "run"
    proc = _compress(
        "run", "--model", MODEL, "--weights", "random", "--ratio", "2", "--round-to", "2", "--min-rank", "2",
        "--input-size", "32", "--num-classes", "10", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert create_model(MODEL).conv1.in_channels == 3
    proc = _compress("finetune", "--run-dir", str(run_dir), "--data", "fashion-mnist", "--epochs", "1")
    assert proc.returncode == 1
    assert "compressed for" in _one_error_line(proc)
