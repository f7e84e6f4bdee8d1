"""Progress bars of the long per-layer stages: the LRSD solve and CC's sensitivity curves (issue 17).

Each bar counts planned layers on stderr (tqdm, with rate and ETA), is off unless stderr is a terminal or
``progress=True``, and leaves the numbers alone.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import tqdm
from torch import nn

from compress.methods.cc import CollaborativeConfig
from compress.methods.cc.planner import plan_cc
from compress.methods.lrsd import LowRankSparseConfig, lrsd_compress_
from compress.plan import KEEP
from tests.compress.models import TinyResNet

EXAMPLE = torch.zeros(1, 3, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 linear algebra: on 2 shared cores OpenMP spinning makes it much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record every bar's description, total, final count and whether it was shown."""
    seen: list[dict] = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.record = {"desc": kwargs.get("desc"), "total": self.total, "shown": not self.disable}
            seen.append(self.record)

        def close(self) -> None:
            self.record.setdefault("n", self.n)  # close() runs again from __del__
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    return seen


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet(width=8).eval()


def _images(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def _totals_on_stderr(err: str, desc: str) -> set[int]:
    return {int(t) for t in re.findall(rf"{re.escape(desc)}[^\r\n]*?\| *\d+/(\d+) \[", err)}


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric", None])
def test_lrsd_solve_bar_counts_the_planned_layers(mode: str | None, bars: list[dict], capsys) -> None:
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=2, mode=mode or "asymmetric")
    data = None if mode is None else _images()
    plan = lrsd_compress_(_model(), cfg, EXAMPLE, data, model_name="tiny", progress=True)
    planned = len(plan.factorized_layers)
    assert planned == 4  # conv1, conv2, proj, head (stem and depthwise stay dense)
    assert len(bars) == 1
    assert bars[0]["desc"].startswith("lrsd solve")
    assert bars[0]["shown"]
    assert bars[0]["total"] == bars[0]["n"] == planned
    assert _totals_on_stderr(capsys.readouterr().err, "lrsd solve") == {planned}


def test_cc_sensitivity_bar_counts_the_planned_layers(bars: list[dict], capsys) -> None:
    plan = plan_cc(_model(), CollaborativeConfig(flops=0.5), EXAMPLE, model_name="tiny", progress=True)
    planned = len([e for e in plan.layers if e.action != KEEP])
    assert planned == 3  # conv1, conv2, proj (stem, depthwise and the classifier stay dense by rule)
    assert [(b["desc"], b["total"], b["n"], b["shown"]) for b in bars] == [("cc sensitivity", 3, 3, True)]
    assert _totals_on_stderr(capsys.readouterr().err, "cc sensitivity") == {planned}


def test_bars_are_off_when_stderr_is_not_a_terminal_and_change_no_numbers(bars: list[dict], capsys) -> None:
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=2)
    quiet, loud = _model(), _model()
    quiet_plan = lrsd_compress_(quiet, cfg, EXAMPLE, _images(), model_name="tiny")  # capsys: not a terminal
    assert capsys.readouterr().err == ""
    loud_plan = lrsd_compress_(loud, cfg, EXAMPLE, _images(), model_name="tiny", progress=True)
    assert capsys.readouterr().err != ""
    assert [b["shown"] for b in bars] == [False, True]
    assert quiet_plan.to_dict() == loud_plan.to_dict()
    for (name, a), (_, b) in zip(quiet.state_dict().items(), loud.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    cc_quiet = plan_cc(copy.deepcopy(_model()), CollaborativeConfig(flops=0.5), EXAMPLE, model_name="tiny")
    cc_loud = plan_cc(_model(), CollaborativeConfig(flops=0.5), EXAMPLE, model_name="tiny", progress=False)
    assert capsys.readouterr().err == ""
    assert cc_quiet.to_dict() == cc_loud.to_dict()
