"""FLOPS= (fraction of the whole model's MACs to remove) as the target of every method, beside RATIO=."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.api import compress_, method_config, plan_compression
from compress.metrics import count_macs
from compress.zoo import create_model
from lowrank_core.errors import UserInputError

ROOT = Path(__file__).resolve().parents[2]


def _cifar(name: str = "cifar_resnet18_w0.25") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=1).eval()


EXAMPLE = torch.zeros(1, 1, 28, 28)


@pytest.mark.parametrize("method", ["tucker2", "svd", "tai", "vbmf-tucker2"])
@pytest.mark.parametrize("flops", [0.3, 0.6])
def test_lowrank_methods_hit_the_flops_target_in_measured_macs(method: str, flops: float) -> None:
    model = _cifar()
    dense = count_macs(model, EXAMPLE)
    options = {"rank_rule": "uniform"} if method == "vbmf-tucker2" else {}
    config = method_config(method, ratio=None, flops=flops, round_to=1, min_rank=1, **options)
    assert config.ratio is None
    plan = compress_(model, config, EXAMPLE)
    cut = 1.0 - plan.totals["macs_after_measured"] / dense
    # the knob is continuous, ranks are integers: within 3 % of the remaining FLOPs, as for RATIO
    assert cut == pytest.approx(flops, abs=0.03 * (1 - flops))
    assert plan.target["achieved_flops_reduction"] == pytest.approx(cut, abs=1e-9)
    assert plan.totals["macs_after"] == plan.totals["macs_after_measured"]


@pytest.mark.parametrize("method", ["ljsvd", "rjsvd1", "bijsvd"])
def test_joint_svd_bisects_rho_to_the_flops_target(method: str) -> None:
    model = create_model("cifar_resnet34", num_classes=10).eval()
    example = torch.zeros(1, 3, 32, 32)
    plan = plan_compression(model, method_config(method, ratio=None, flops=0.6), example)
    cut = plan.target["achieved_flops_reduction"]
    assert cut == pytest.approx(0.6, abs=0.03 * 0.4)
    assert 0 < plan.target["rho"] < 1


def test_lrsd_flops_counts_sparse_kernel_macs_and_warns_about_the_dense_graph() -> None:
    model = _cifar()
    plan = plan_compression(model, method_config("lrsd", ratio=None, flops=0.5, split="fixed"), EXAMPLE)
    kernel = plan.totals["macs_after_sparse_kernel"] / plan.totals["macs_before"]
    assert kernel == pytest.approx(0.5, abs=0.03 * 0.5)
    assert plan.totals["macs_after"] > plan.totals["macs_after_sparse_kernel"]
    assert any("runs the sparse branch as a dense conv" in w for w in plan.warnings)


def test_unreachable_flops_is_a_one_line_error_stating_the_maximum() -> None:
    from lowrank_core.errors import CompressionError

    model = _cifar()
    config = method_config("tucker2", ratio=None, flops=0.99, round_to=1, min_rank=1)
    with pytest.raises(CompressionError, match=r"FLOPS=0.99 is not reachable.*at most .*% fewer"):
        plan_compression(model, config, EXAMPLE)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, True])
def test_flops_must_be_a_fraction(bad: object) -> None:
    with pytest.raises(UserInputError, match=r"FLOPS must be the fraction of FLOPs to remove"):
        method_config("tucker2", ratio=None, flops=bad)


def test_cli_refuses_ratio_and_flops_together(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "plan", "--model", "cifar_resnet20", "--ratio", "3", "--flops", "0.5",
         "--weights", "random", "--out", str(tmp_path / "plan.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "give one target, not --ratio and --flops" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_plan_with_flops(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "plan", "--model", "cifar_resnet20", "--flops", "0.5", "--round-to", "1",
         "--min-rank", "1", "--weights", "random", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert plan["config"]["flops"] == 0.5
    assert plan["config"]["ratio"] is None
    assert plan["target"]["achieved_flops_reduction"] == pytest.approx(0.5, abs=0.015)
