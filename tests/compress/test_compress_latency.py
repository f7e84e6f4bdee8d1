"""Latency model, lookup table, knapsack and SPEEDUP/LATENCY_MS targets (a fake, deterministic timer: no timing)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from compress.latency import LatencyModel, LatencyTable
from compress.latency.knapsack import Option, lagrangian_choice, solve_mckp
from compress.latency.solve import compress_to_latency_
from compress.methods import get_method
from compress.targets import Target
from lowrank_core.errors import UserInputError
from tests.compress.models import TinyResNet


class FakeTimer:
    """ms = Σ over Conv2d/Linear leaves of (MACs × 1e-6 + 0.01 per node); a whole model takes 1.25 × that."""

    backend = "fake"
    threads = 1

    def __init__(self) -> None:
        self.calls = 0
        self.measured = 0

    @staticmethod
    def cost(module: nn.Module, input_shape: Sequence[int]) -> float:
        total = [0.0]

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            w = m.weight
            macs = w.numel() * (out[0, 0].numel() if isinstance(m, nn.Conv2d) else 1)
            total[0] += macs * 1e-6 + 0.01

        handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            module.eval()(torch.zeros(*input_shape))
        for h in handles:
            h.remove()
        return total[0]

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        self.calls += 1
        return self.cost(module, input_shape)

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        self.measured += 1
        return [1.25 * self.cost(m, input_shape) for m in models]


def fake_latency(tmp_path, name: str = "lut.json") -> tuple[LatencyModel, FakeTimer]:
    timer = FakeTimer()
    return LatencyModel(timer, LatencyTable(tmp_path / name)), timer


# ------------------------------------------------------------------------------------------- lookup table
def test_table_persists_and_second_model_does_no_timing(tmp_path):
    blocks = [nn.Conv2d(16, 16, 3, padding=1), nn.Sequential(nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 3, padding=1))]
    first, timer1 = fake_latency(tmp_path)
    times = [first.block_ms(b, [1, 16, 8, 8]) for b in blocks]
    assert timer1.calls == 2
    assert first.block_ms(blocks[0], [1, 16, 8, 8]) == times[0]  # in-memory hit
    assert timer1.calls == 2
    first.save()
    second, timer2 = fake_latency(tmp_path)  # a new run: same file, fresh timer
    again = [second.block_ms(b, [1, 16, 8, 8]) for b in blocks]
    assert timer2.calls == 0
    assert again == pytest.approx(times, rel=0, abs=0)
    second.block_ms(blocks[0], [1, 16, 16, 16])  # another geometry is a miss
    assert timer2.calls == 1


def test_table_keys_context_threads(tmp_path):
    model, _timer = fake_latency(tmp_path)
    model.block_ms(nn.Conv2d(4, 4, 3), [1, 4, 8, 8])
    model.save()
    other_timer = FakeTimer()
    other_timer.threads = 2
    other = LatencyModel(other_timer, LatencyTable(tmp_path / "lut.json"))
    other.block_ms(nn.Conv2d(4, 4, 3), [1, 4, 8, 8])
    assert other_timer.calls == 1  # another thread count is another context


def test_dense_profile_and_prediction_are_exact_for_an_additive_timer(tmp_path):
    latency, timer = fake_latency(tmp_path)
    model = TinyResNet().eval()
    x = torch.randn(1, 3, 16, 16)
    profile = latency.profile_dense(model, x)
    assert profile.scale == pytest.approx(1.25, rel=1e-12)
    predicted, _ = latency.predict(model, x, profile)
    assert predicted == pytest.approx(profile.total_ms, rel=1e-12)
    calls = timer.calls
    latency.profile_dense(model, x)  # cached
    assert timer.calls == calls


# ------------------------------------------------------------------------------------------- knapsack
def _brute(groups, budget):
    best = None
    for choice in itertools.product(*[range(len(g)) for g in groups]):
        cost = sum(g[j].cost for g, j in zip(groups, choice, strict=True))
        err = sum(g[j].error for g, j in zip(groups, choice, strict=True))
        if cost <= budget + 1e-12 and (best is None or err < best):
            best = err
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force_on_hull_budgets(seed):
    rng = random.Random(seed)
    groups = [
        [Option(cost=rng.uniform(0.5, 3.0), error=0.0)]
        + [Option(cost=rng.uniform(0.05, 2.0), error=rng.uniform(0.1, 5.0)) for _ in range(3)]
        for _ in range(4)
    ]
    for lam in (0.3, 1.1, 2.7, 6.0):
        choice = lagrangian_choice(groups, lam)
        budget = sum(g[j].cost for g, j in zip(groups, choice, strict=True))
        solution = solve_mckp(groups, budget)
        assert solution.cost <= budget + 1e-12
        assert solution.error == pytest.approx(_brute(groups, budget), abs=1e-12)
    for budget in (2.0, 4.0, 7.0):  # any budget: feasible, and never worse than the brute force by much
        if budget < sum(min(o.cost for o in g) for g in groups):
            continue
        solution = solve_mckp(groups, budget)
        assert solution.cost <= budget + 1e-12
        assert solution.error >= _brute(groups, budget) - 1e-12


def test_knapsack_hand_instance_and_unreachable_budget():
    groups = [
        [Option(10, 0), Option(6, 1), Option(3, 4)],
        [Option(10, 0), Option(5, 2), Option(2, 3)],
    ]
    assert solve_mckp(groups, 20).choice == (0, 0)
    assert solve_mckp(groups, 11).choice == (1, 1)  # 6+5 = 11, error 3 (brute force: 3)
    assert _brute(groups, 11) == 3
    with pytest.raises(UserInputError, match="below the cheapest"):
        solve_mckp(groups, 4)


# ------------------------------------------------------------------------------------------- SPEEDUP / LATENCY_MS
@pytest.mark.parametrize("name", ["tucker2", "svd"])
def test_speedup_target_bisects_the_method_ratio(tmp_path, name):
    latency, _timer = fake_latency(tmp_path)
    method = get_method(name)
    model = TinyResNet(width=64).eval()
    compressed = TinyResNet(width=64).eval()
    compressed.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    config = method.make_config(None, round_to=4, min_rank=4)
    plan = compress_to_latency_(method, model, compressed, config, Target("speedup", 1.5), x, latency=latency)
    record = plan.target["latency_target"]
    assert record["met"]
    assert record["achieved"] >= 1.5
    assert record["relative_error"] == pytest.approx(0.0, abs=1e-9)  # the fake timer is additive
    assert len(record["rounds"]) == 1
    assert "ratio" in record["knob"]
    assert plan.factorized_layers
    assert all(e.rel_error is not None for e in plan.factorized_layers)
    assert compressed(x).shape == (1, 10)
    assert 1.25 * FakeTimer.cost(compressed, [1, 3, 32, 32]) == pytest.approx(record["measured_ms"])


def test_latency_ms_target_and_unreachable_is_one_line(tmp_path):
    latency, _ = fake_latency(tmp_path)
    method = get_method("tucker2")
    model = TinyResNet(width=64).eval()
    x = torch.randn(1, 3, 32, 32)
    dense_ms = latency.profile_dense(model, x).total_ms
    config = method.make_config(None, round_to=4, min_rank=4)
    compressed = TinyResNet(width=64).eval()
    plan = compress_to_latency_(
        method, model, compressed, config, Target("latency_ms", 0.8 * dense_ms), x, latency=latency
    )
    assert plan.target["latency_target"]["measured_ms"] <= 0.8 * dense_ms
    with pytest.raises(UserInputError) as info:
        compress_to_latency_(method, model, TinyResNet(width=64), config, Target("speedup", 50), x, latency=latency)
    message = str(info.value)
    assert "\n" not in message
    assert "SPEEDUP=50 is out of reach for tucker2" in message
    assert "best speedup found is" in message


def test_cli_run_with_speedup_for_a_registered_method(tmp_path, monkeypatch):
    from compress.cli import main
    from compress.plan import Plan

    latency, _ = fake_latency(tmp_path)
    monkeypatch.setattr("compress.latency.LatencyModel", lambda **kw: latency)
    run_dir = tmp_path / "run"
    spec = "tests/compress/models.py:tiny_resnet"
    argv = ["run", "--model", spec, "--input-size", "32", "--method", "svd", "--speedup", "1.3"]
    assert main([*argv, "--round-to", "4", "--min-rank", "4", "--run-dir", str(run_dir)]) == 0
    plan = Plan.load(run_dir / "plan.json")
    assert plan.target["latency_target"]["achieved"] >= 1.3
    with pytest.raises(UserInputError, match="give one target"):
        main([*argv, "--ratio", "3", "--run-dir", str(run_dir)])


def test_ort_timer_times_a_block_and_a_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from compress.latency.ort_timing import OrtTimer

    timer = OrtTimer(1, warmup=1, repeats=2, min_seconds=0.0)
    latency = LatencyModel(timer, LatencyTable(tmp_path / "lut.json"))
    ms = latency.block_ms(nn.Sequential(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 3, padding=1)), [1, 8, 8, 8])
    (total,) = timer.measure([TinyResNet().eval()], [1, 3, 16, 16], repeats=2)
    assert ms > 0
    assert total > 0
    assert "ort-" in latency.context


class SlowCompressedTimer(FakeTimer):
    """Measures every model but the first (dense) 100× slower than predicted: no correction can catch up."""

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        self.measured += 1
        times = [1.25 * self.cost(m, input_shape) for m in models]
        return [times[0], *(100.0 * t for t in times[1:])]


def test_a_corrected_aim_out_of_reach_keeps_the_closest_measured_round(tmp_path):
    timer = SlowCompressedTimer()
    latency = LatencyModel(timer, LatencyTable(tmp_path / "lut.json"))
    method = get_method("tucker2")
    model = TinyResNet(width=64).eval()
    compressed = TinyResNet(width=64).eval()
    compressed.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    config = method.make_config(None, round_to=4, min_rank=4)
    plan = compress_to_latency_(method, model, compressed, config, Target("speedup", 1.5), x, latency=latency)
    record = plan.target["latency_target"]
    measured_rounds = [r for r in record["rounds"] if "measured_ms" in r]
    assert measured_rounds, "round 1 was measured"
    assert "refused" in record["rounds"][-1]  # the corrected aim was beyond the method: no error, the closest kept
    assert record["met"] is False
    assert any("missed as measured" in w for w in plan.warnings)
    best = min(measured_rounds, key=lambda r: r["measured_ms"] / r["dense_measured_ms"])
    assert record["measured_ms"] == pytest.approx(best["measured_ms"])
    assert record["achieved"] == pytest.approx(best["dense_measured_ms"] / best["measured_ms"])
    assert compressed(x).shape == (1, 10)
