"""``make export`` on a segmentation and a detection model, end to end (issue 19).

``make export MODEL=lraspp_mobilenet_v3_large|ssdlite320_mobilenet_v3_large INPUT_SIZE=64 RATIO=2`` runs
compress → export ONNX → bench → report. The weights are a file (``WEIGHTS=path``) holding a Kaiming
(fan-in) re-initialisation: torchvision's own random initialisation of SSDlite gives outputs of order
1e-14, against which any parity tolerance passes. Checked: compress.json's ``task``/``output_names``,
one ONNX output per name, parity.json and report.json with a passing result for every output, the params
ratio, and the report's per-output lines. Also: INPUT_SIZE and DATA refused before any stage writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from venv_for_make import venv_for_make

from lowrank_core.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64

CASES = [
    ("lraspp_mobilenet_v3_large", "segmentation", ["out"]),
    ("ssdlite320_mobilenet_v3_large", "detection", ["cls_logits", "bbox_regression"]),
]


def _lively_weights(name: str, path: Path) -> Path:
    """The model's random weights with Kaiming fan-in conv/Linear weights (activations keep their scale)."""
    from compress.models import load_model

    model = load_model(name, "random", input_size=SIZE).model
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=math.sqrt(1.0 / m.weight[0].numel()))
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize(("name", "task", "outputs"), CASES)
def test_make_export_segmentation_and_detection(tmp_path: Path, name: str, task: str, outputs: list[str]) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    venv = venv_for_make()
    out = tmp_path / "artifacts"
    weights = _lively_weights(name, tmp_path / f"{name}.pth")
    cmd = [
        "make", "export", f"MODEL={name}", f"INPUT_SIZE={SIZE}", "RATIO=2", f"WEIGHTS={weights}", "DURATION=1",
        "THREADS=1", f"OUT={out}", f"VENV={venv}",
    ]  # fmt: skip
    env = {**os.environ, "MAKEFLAGS": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / name / "tucker2"

    info = json.loads((run_dir / "compress.json").read_text())
    assert info["task"] == task
    assert info["output_names"] == outputs
    assert info["input_shape"] == [1, 3, SIZE, SIZE]
    for file in ("dense.onnx", "model.onnx"):
        assert [o.name for o in onnx.load(run_dir / file).graph.output] == outputs

    parity = json.loads((run_dir / "parity.json").read_text())
    for side in ("dense", "compressed"):
        per = parity[side]["outputs"]
        assert list(per) == outputs
        for result in per.values():
            assert result["passed"] is True
            assert result["max_abs"] < 1e-3
            assert result["rel_l2"] < 1e-5  # not vacuous: the outputs are of order 1, not 1e-14
        assert parity[side]["passed"] is True

    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "report.md").is_file()
    assert report["input_shape"] == [1, 3, SIZE, SIZE]
    assert report["parity"]["passed"] is True
    assert list(report["parity"]["outputs"]) == outputs
    assert all(r["passed"] for r in report["parity"]["outputs"].values())
    assert list(report["parity_dense"]["outputs"]) == outputs
    assert report["ratios"]["params"] == pytest.approx(2.0, rel=0.05)
    for side in ("dense", "compressed"):
        assert report[side]["latency_ms"]["p50"] > 0
    md = (run_dir / "report.md").read_text()
    for output in outputs:
        assert f"output `{output}`: pass" in md


def _plan(tmp_path: Path, **values: str) -> None:
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    args = build_parser().parse_args(["export"])
    env = {"LRD_OUT": str(tmp_path / "out"), "LRD_WEIGHTS": "random", **{f"LRD_{k}": v for k, v in values.items()}}
    plan_export(resolve(args, env))


@pytest.mark.parametrize("value", ["0", "-3", "abc", "64.5", "100000", "1e3"])
def test_input_size_is_refused_before_any_stage_writes(tmp_path: Path, value: str) -> None:
    with pytest.raises(UserInputError, match=r"^INPUT_SIZE must be a whole number in \[1, 8192\]"):
        _plan(tmp_path, MODEL="lraspp_mobilenet_v3_large", INPUT_SIZE=value)
    assert not (tmp_path / "out").exists()


def test_input_size_reaches_the_compress_stage(tmp_path: Path) -> None:
    from lowrank_deploy.pipeline import build_parser, plan_export, resolve

    env = {"LRD_OUT": str(tmp_path / "out"), "LRD_MODEL": "lraspp_mobilenet_v3_large", "LRD_INPUT_SIZE": " 96 "}
    _, stages = plan_export(resolve(build_parser().parse_args(["export"]), env))
    argv = stages[0].argv
    assert argv[argv.index("--input-size") + 1] == "96"
    _, stages = plan_export(resolve(build_parser().parse_args(["export"]), {**env, "LRD_INPUT_SIZE": ""}))
    assert "--input-size" not in stages[0].argv  # empty: the model's own size (520 for segmentation)
    makefile = (ROOT / "Makefile").read_text()
    assert " INPUT_SIZE " in makefile.split("_LRD_VARS :=", 1)[1].split("\n", 1)[0]


def test_data_is_refused_for_a_detection_model_before_any_stage_writes(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="ssdlite320_mobilenet_v3_large is a detection model"):
        _plan(tmp_path, MODEL="ssdlite320_mobilenet_v3_large", DATA=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_compress_json_written_before_task_fields_still_reads() -> None:
    from lowrank_core.rundir import CompressRecord

    old = {
        "model": "resnet18",
        "method": "svd",
        "dense": {"params": 2, "macs": 4},
        "compressed": {"params": 1, "macs": 2},
    }
    record = CompressRecord.from_dict(old)
    assert record.task is None
    assert record.output_names is None
    assert record.to_dict() == old
    new = CompressRecord.from_dict({**old, "task": "detection", "output_names": ["cls_logits", "bbox_regression"]})
    assert new.output_names == ["cls_logits", "bbox_regression"]
    assert list(new.to_dict()) == [*old, "task", "output_names"]
