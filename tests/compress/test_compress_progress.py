"""Long stages say what they are doing, also in a log, and the latency solver reuses knob-independent work (issue 22).

* :class:`lowrank_core.progress.Progress` writes throttled plain lines with an ETA when stderr is not a
  terminal (a tqdm bar on one); every stage uses it: CC/LRSD/auto planning, training, the solver's steps.
* Inside :func:`compress.reuse.reuse_scope` CC's gradients, curves and heuristic runs and LRSD's
  calibration statistics are computed once, and every plan equals the one made without the scope.

No timing is asserted: the throttle interval is set to 0 (every update writes a line) or made huge.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import compress.methods.cc.planner as cc_planner
import compress.methods.lrsd.apply as lrsd_apply
from compress.latency import LatencyModel, LatencyTable
from compress.latency.solve import compress_to_latency_
from compress.methods import get_method
from compress.methods.cc import CollaborativeConfig
from compress.methods.cc.allocation import HeuristicRun, heuristic_trajectory
from compress.methods.cc.modules import ConvShape
from compress.methods.cc.planner import plan_cc
from compress.methods.lrsd import LowRankSparseConfig, lrsd_compress_
from compress.reuse import fingerprint, reuse_scope
from compress.targets import Target
from compress.train import TrainConfig, Trainer
from lowrank_core.progress import ENV_INTERVAL, ENV_MODE, Progress, heartbeat
from tests.compress.models import TinyResNet
from tests.compress.test_compress_latency import FakeTimer

EXAMPLE = torch.zeros(1, 3, 16, 16)
ETA_LINE = re.compile(r"^\[progress\] (?P<desc>[^:]+(?::[^:]+)?): \d+/\d+ \w[\w ]*s \(\d+%\), .* elapsed, ETA ")


@pytest.fixture(autouse=True)
def _one_thread_and_lines(monkeypatch: pytest.MonkeyPatch):
    """One thread (small float64 algebra on shared cores); every update writes a line; no terminal mode."""
    monkeypatch.setenv(ENV_INTERVAL, "0")
    monkeypatch.delenv(ENV_MODE, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet(width=8).eval()


def _images(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def _labelled(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(x, torch.randint(0, 10, (4,), generator=g)) for x in _images(n)]


def _eta_lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"[progress] {prefix}") and ETA_LINE.match(line)]


# ------------------------------------------------------------------------------------------- the helper
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_throttled_lines_with_an_eta_and_a_final_line_in_a_log() -> None:
    out = io.StringIO()
    with Progress(4, "stage", unit="layer", interval=0, stream=out) as bar:
        for i in range(4):
            bar.update(1, f"layer {i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("[progress] stage: 1/4 layers (25%), ")
    assert ", ETA " in lines[0]
    assert lines[0].endswith("; layer 0")
    assert lines[-1].startswith("[progress] stage: done, 4/4 layers in ")
    quiet = io.StringIO()
    with Progress(4, "stage", interval=3600, stream=quiet) as bar:  # a short stage under the interval: silent
        bar.update(4)
    assert quiet.getvalue() == ""
    off = io.StringIO()
    with Progress(4, "stage", interval=0, enabled=False, stream=off) as bar:
        bar.update(4)
    assert off.getvalue() == ""


def test_the_eta_follows_the_recent_rate_not_a_slow_first_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("lowrank_core.progress.time.perf_counter", lambda: clock[0])
    bar = Progress(10, "solve", interval=3600, stream=io.StringIO())
    for seconds in (100.0, 1.0, 1.0, 1.0):  # the first step fills the caches, the others reuse them
        clock[0] += seconds
        bar.update(1)
    assert bar.eta() == pytest.approx(6.0)  # 6 steps left at 1 s each (the mean would say 61.8 s)


def test_progress_on_a_terminal_is_a_bar_and_the_heartbeat_stays_off_there() -> None:
    tty = _Tty()
    with Progress(3, "stage", unit="layer", interval=0, stream=tty) as bar:
        assert bar.mode == "bar"
        bar.update(3)
    assert "[progress]" not in tty.getvalue()
    assert "/3 [" in tty.getvalue()  # tqdm's own bar
    with heartbeat("export", interval=0.01, stream=tty):
        torch.manual_seed(0)
    assert "still running" not in tty.getvalue()


def test_heartbeat_writes_lines_while_an_opaque_call_runs() -> None:
    out = io.StringIO()
    stop = __import__("threading").Event()
    with heartbeat("onnx export", interval=0.01, stream=out):
        stop.wait(0.2)  # the block runs for 0.2 s: several 0.01 s beats
    text = out.getvalue()
    assert "[progress] onnx export: still running, " in text
    assert text.splitlines()[-1].startswith("[progress] onnx export: done in ")


# ------------------------------------------------------------------------------------------- the stages
def test_cc_planning_writes_progress_lines_to_a_redirected_stderr(capsys) -> None:
    plan_cc(_model(), CollaborativeConfig(flops=0.5), EXAMPLE, _labelled(), model_name="tiny")
    err = capsys.readouterr().err  # capsys: stderr is not a terminal
    for stage in ("cc gradient statistics", "cc sensitivity curves", "cc heuristic"):
        assert _eta_lines(err, stage), (stage, err)
    assert "[progress] cc sensitivity curves: done, 3/3 layers in " in err


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric", None])
def test_lrsd_solve_writes_progress_lines(mode: str | None, capsys) -> None:
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=2, mode=mode or "asymmetric")
    plan = lrsd_compress_(_model(), cfg, EXAMPLE, None if mode is None else _images(), model_name="tiny")
    err = capsys.readouterr().err
    planned = len(plan.factorized_layers)
    assert planned == 4
    lines = _eta_lines(err, "lrsd solve")
    counts = [line.split(": ", 1)[1].split(" ", 1)[0] for line in lines]
    assert {f"{i}/{planned}" for i in range(1, planned + 1)} <= set(counts)
    assert any("final solve r=" in line for line in lines)  # a long layer's own steps are told too


def test_training_writes_epoch_batch_loss_and_eta_lines(capsys) -> None:
    from compress.data import DataInfo, TensorSplit

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8)
    info = DataInfo("toy", "tensor", "", 10, 3, 16, (0.5,) * 3, (0.25,) * 3, tuple("0123456789"), 24, 0)
    train = TensorSplit(
        images,
        torch.arange(24) % 10,
        info=info,
        name="train",
        augment=False,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        pad=0,
        flip=False,
    )
    Trainer(_model(), TrainConfig(epochs=1, batch_size=8, lr=0.01, amp=False), train, device="cpu").fit()
    err = capsys.readouterr().err
    lines = _eta_lines(err, "train epoch 1/1")
    assert len(lines) == 3, err  # one per batch at interval 0
    assert "; loss " in lines[-1]
    assert "train top-1" in lines[-1]


def test_progress_false_is_silent_and_changes_no_numbers(capsys) -> None:
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=2)
    quiet, loud = _model(), _model()
    quiet_plan = lrsd_compress_(quiet, cfg, EXAMPLE, _images(), model_name="tiny", progress=False)
    assert capsys.readouterr().err == ""
    loud_plan = lrsd_compress_(loud, cfg, EXAMPLE, _images(), model_name="tiny")
    assert capsys.readouterr().err != ""
    assert quiet_plan.to_dict() == loud_plan.to_dict()
    for (name, a), (_, b) in zip(quiet.state_dict().items(), loud.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------- reuse
def test_a_resumed_heuristic_run_equals_a_fresh_run_for_every_target() -> None:
    torch.manual_seed(0)
    weight, grad = torch.randn(16, 8, 3, 3), torch.randn(16, 8, 3, 3)
    shape = ConvShape(16, 8, 9, 36)
    run = HeuristicRun(weight, grad, shape)
    for frac in (0.5, 0.2, 0.9, 0.0, 0.7, 2.0):  # out of order, below and beyond what was run
        fresh = heuristic_trajectory(weight, grad, shape, frac * shape.dense_macs)
        kept = run.trajectory(frac * shape.dense_macs)
        assert (kept.steps, kept.order, kept.interval) == (fresh.steps, fresh.order, fresh.interval)
        for name in ("n_pruned", "rank", "decomposed", "reduction", "prune_only_reduction", "channel_scores"):
            assert (getattr(kept, name) == getattr(fresh, name)).all(), (frac, name)


def test_cc_plans_in_a_reuse_scope_equal_fresh_plans_for_every_knob() -> None:
    model, data = _model(), _labelled()
    knobs = [CollaborativeConfig(flops=f) for f in (0.5, 0.3, 0.7)] + [CollaborativeConfig(ratio=2.0)]
    fresh = [plan_cc(_model(), cfg, EXAMPLE, data, model_name="tiny").to_dict() for cfg in knobs]
    with reuse_scope() as memo:
        kept = [plan_cc(copy.deepcopy(model), cfg, EXAMPLE, data, model_name="tiny").to_dict() for cfg in knobs]
    assert kept == fresh
    assert memo.computed["cc gradients"] == 1
    assert memo.computed["cc sensitivity"] == 3  # one curve per compressed conv, for all four knobs
    assert memo.hits["cc heuristic"] > 0


def test_lrsd_plans_in_a_reuse_scope_equal_fresh_plans_for_every_knob() -> None:
    images = _images()
    for mode in ("symmetric", "asymmetric"):
        knobs = [LowRankSparseConfig(ratio=r, split_grid=3, split_iters=1, iters=2, mode=mode) for r in (2.0, 3.0)]
        fresh = [lrsd_compress_(_model(), cfg, EXAMPLE, images, model_name="tiny").to_dict() for cfg in knobs]
        with reuse_scope() as memo:
            kept = [lrsd_compress_(_model(), cfg, EXAMPLE, images, model_name="tiny").to_dict() for cfg in knobs]
        assert kept == fresh, mode
        assert memo.hits.get("lrsd statistics", 0) >= 1, mode  # symmetric: all; asymmetric: the dense-prefix layer


def test_fingerprint_follows_content_not_identity() -> None:
    model = _model()
    twin = copy.deepcopy(model)
    assert fingerprint(model) == fingerprint(twin)
    with torch.no_grad():
        twin.conv1.weight[0, 0, 0, 0] += 1.0
    assert fingerprint(model) != fingerprint(twin)


def _latency(tmp_path) -> LatencyModel:
    return LatencyModel(FakeTimer(), LatencyTable(tmp_path / "lut.json"))


def test_the_solver_computes_cc_statistics_once_and_writes_step_lines(tmp_path, monkeypatch, capsys) -> None:
    calls = {"gradients": 0, "curves": 0}
    real_grads, real_curve = cc_planner.gradient_statistics, cc_planner.sensitivity_curve

    def grads(*args, **kwargs):
        calls["gradients"] += 1
        return real_grads(*args, **kwargs)

    def curve(*args, **kwargs):
        calls["curves"] += 1
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(cc_planner, "gradient_statistics", grads)
    monkeypatch.setattr(cc_planner, "sensitivity_curve", curve)
    method = get_method("cc")
    model = TinyResNet(width=16).eval()
    data = [(x.repeat(1, 1, 2, 2), y) for x, y in _labelled()]
    x = torch.zeros(1, 3, 32, 32)
    config = method.make_config(None, round_to=1)
    plan = compress_to_latency_(
        method, model, copy.deepcopy(model), config, Target("speedup", 1.2), x, data=data, latency=_latency(tmp_path)
    )
    assert plan.target["latency_target"]["met"]
    assert calls == {"gradients": 1, "curves": 3}  # once per solve, not once per bisection step
    err = capsys.readouterr().err
    steps = _eta_lines(err, "cc latency solve, round 1")
    assert len(steps) == 9  # BISECTION_STEPS + the top end
    assert all(re.search(r"; FLOPS=[\d.]+(: beyond|, predicted [\d.]+ ms)", line) for line in steps), steps


def test_the_solver_computes_lrsd_statistics_once(tmp_path, monkeypatch) -> None:
    calls = [0]
    real = lrsd_apply.collect_stats

    def stats(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lrsd_apply, "collect_stats", stats)
    method = get_method("lrsd")
    model = TinyResNet(width=16).eval()
    data = [(x.repeat(1, 1, 2, 2), y) for x, y in _labelled()]
    x = torch.zeros(1, 3, 32, 32)
    config = method.make_config(None, mode="symmetric", parts="lowrank", iters=1, calibration_samples=8)
    compress_to_latency_(
        method, model, copy.deepcopy(model), config, Target("speedup", 1.2), x, data=data, latency=_latency(tmp_path)
    )
    assert calls[0] == 1  # symmetric statistics: one collection for every step and the final solve


def test_a_command_with_stderr_redirected_to_a_file_writes_progress_lines(tmp_path) -> None:
    """``python -m compress plan … 2>log``: the log holds the CC stages' lines with an ETA."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "compress", "plan", "--model", "cifar_resnet20", "--method", "cc", "--flops", "0.5",
             "--weights", "random", "--out", str(tmp_path / "plan.json")],
            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=err, text=True, timeout=600,
            env={**os.environ, ENV_INTERVAL: "0", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text
    assert _eta_lines(text, "cc sensitivity curves")
    assert _eta_lines(text, "cc heuristic")


def test_a_silent_stage_of_the_chain_still_says_it_runs_in_a_log(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``lowrank-deploy``'s stages each run inside a heartbeat: a stage that prints nothing is not silent."""
    import time

    from lowrank_deploy.pipeline import Stage, run_stages

    monkeypatch.setenv(ENV_INTERVAL, "0.05")
    monkeypatch.setenv(ENV_MODE, "lines")

    def silent(argv) -> int:
        time.sleep(0.4)  # eight intervals without a line of its own
        return 0

    assert run_stages(tmp_path / "run", [Stage("bench", "runtime", ["bench"], silent)]) == 0
    err = capsys.readouterr().err
    beats = [line for line in err.splitlines() if "[1/1] bench: still running" in line]
    assert len(beats) >= 2, err
