"""Harness: statistics, warm-up and interleaving schedules (on a fake clock), memory record, speedup CI."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lowrank_core.errors import UserInputError
from runtime.base import TensorMeta
from runtime.harness import BenchmarkConfig, LatencyStats, benchmark, random_feed, speedup

# Statistics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 8])
def test_latency_stats_match_numpy(batch):
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=-5.0, sigma=0.3, size=1001)  # seconds, ~7 ms
    stats = LatencyStats.from_samples(samples, batch=batch)
    ms = samples * 1e3
    assert stats.n == 1001
    assert stats.p50 == pytest.approx(np.percentile(ms, 50), rel=1e-12)
    assert stats.p90 == pytest.approx(np.percentile(ms, 90), rel=1e-12)
    assert stats.p99 == pytest.approx(np.percentile(ms, 99), rel=1e-12)
    assert stats.mean == pytest.approx(ms.mean(), rel=1e-12)
    assert stats.std == pytest.approx(ms.std(), rel=1e-12)
    assert stats.min == pytest.approx(ms.min(), rel=1e-12)
    assert stats.max == pytest.approx(ms.max(), rel=1e-12)
    assert stats.throughput == pytest.approx(batch / samples.mean(), rel=1e-12)
    assert stats.min <= stats.p50 <= stats.p90 <= stats.p99 <= stats.max


def test_latency_stats_linear_percentiles_on_a_known_array():
    stats = LatencyStats.from_samples([0.001, 0.002, 0.003, 0.004], batch=2)
    assert stats.p50 == pytest.approx(2.5)  # linear interpolation between 2 and 3 ms
    assert stats.p90 == pytest.approx(3.7)
    assert stats.mean == pytest.approx(2.5)
    assert stats.std == pytest.approx(math.sqrt(1.25))
    assert stats.throughput == pytest.approx(2 / 0.0025)
    assert stats.to_dict() == dataclasses.asdict(stats)
    assert set(stats.to_dict()) == {"n", "p50", "p90", "p99", "mean", "std", "min", "max", "throughput"}


def test_latency_stats_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        LatencyStats.from_samples([], batch=1)


# Config ----------------------------------------------------------------------------------------------


def test_config_defaults():
    cfg = BenchmarkConfig()
    assert (
        cfg.warmup_iters,
        cfg.warmup_s,
        cfg.iters,
        cfg.duration_s,
        cfg.min_iters,
        cfg.interleave,
        cfg.batch,
    ) == (
        10,
        1.0,
        None,
        10.0,
        20,
        True,
        1,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.iters = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iters": 0},
        {"duration_s": 0.0},
        {"warmup_s": -1.0},
        {"warmup_iters": -1},
        {"min_iters": 0},
        {"batch": 0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(UserInputError):
        BenchmarkConfig(**kwargs)


# Schedules on a fake clock ---------------------------------------------------------------------------


COSTS = (1 / 64, 3 / 64)
"""Per-call costs in seconds, exact in binary so the fake clock has no rounding."""


def _runners(fake_runner_cls, call_log, clock=None, costs=(0.0, 0.0)):
    return {
        name: fake_runner_cls(name, log=call_log, clock=clock, cost_s=cost)
        for name, cost in zip(("A", "B"), costs, strict=True)
    }


def test_interleaved_order_alternates(fake_runner_cls, call_log, x_feed):
    runners = _runners(fake_runner_cls, call_log)
    cfg = BenchmarkConfig(warmup_iters=3, warmup_s=0.0, iters=4, block=1, block_warmup=0)
    result = benchmark(runners, x_feed, cfg)
    warm, timed = call_log.calls[:6], call_log.calls[6:]
    assert warm == ["A", "B", "B", "A", "A", "B"]
    assert timed == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert result.order == timed
    assert result.warmup["A"]["iters"] == result.warmup["B"]["iters"] == 3
    assert result.stats["A"].n == result.stats["B"].n == 4
    assert result.samples_s["A"].shape == (4,)


def test_blocks_rewarm_each_runner_before_timing(fake_runner_cls, call_log, x_feed):
    """Each turn: block_warmup untimed calls, then `block` timed ones; turns alternate A B, B A."""
    runners = _runners(fake_runner_cls, call_log)
    cfg = BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=4, block=2, block_warmup=1)
    result = benchmark(runners, x_feed, cfg)
    assert call_log.calls == list("AAABBBBBBAAA")
    assert result.order == list("AABBBBAA")
    assert result.stats["A"].n == result.stats["B"].n == 4


def test_interleaving_three_runners_reverses_each_round(fake_runner_cls, call_log, x_feed):
    runners = {n: fake_runner_cls(n, log=call_log) for n in "ABC"}
    cfg = BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=3, block=1, block_warmup=0)
    result = benchmark(runners, x_feed, cfg)
    assert result.order == list("ABCCBAABC")
    assert call_log.calls == result.order  # no warm-up at all


def test_sequential_order(fake_runner_cls, call_log, x_feed):
    runners = _runners(fake_runner_cls, call_log)
    cfg = BenchmarkConfig(warmup_iters=2, warmup_s=0.0, iters=3, interleave=False)
    result = benchmark(runners, x_feed, cfg)
    assert call_log.calls == ["A", "A", "B", "B", "A", "A", "A", "B", "B", "B"]
    assert result.order == ["A", "A", "A", "B", "B", "B"]


def test_warmup_until_both_iterations_and_time(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=COSTS)
    # Sequential: A needs 8 calls to reach 0.125 s; B reaches it in 3 but must do warmup_iters = 5.
    cfg = BenchmarkConfig(warmup_iters=5, warmup_s=0.125, iters=1, interleave=False)
    result = benchmark(runners, x_feed, cfg)
    assert result.warmup["A"]["iters"] == 8
    assert result.warmup["B"]["iters"] == 5
    assert result.warmup["A"]["s"] == 0.125
    assert result.warmup["B"]["s"] == 5 * 3 / 64


def test_interleaved_warmup_keeps_all_runners_going_until_all_are_warm(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=COSTS)
    cfg = BenchmarkConfig(warmup_iters=2, warmup_s=0.125, iters=1)
    result = benchmark(runners, x_feed, cfg)
    # A needs 8 rounds to reach 0.125 s; B (warm after 3) keeps going so both are hot.
    assert result.warmup["A"]["iters"] == result.warmup["B"]["iters"] == 8
    assert result.warmup["A"]["s"] == 0.125
    assert result.warmup["B"]["s"] == 8 * 3 / 64


def test_samples_are_the_timed_intervals(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=(0.002, 0.005))
    result = benchmark(runners, x_feed, BenchmarkConfig(warmup_iters=1, warmup_s=0.0, iters=6, batch=4))
    np.testing.assert_allclose(result.samples_s["A"], 0.002, rtol=1e-9)
    np.testing.assert_allclose(result.samples_s["B"], 0.005, rtol=1e-9)
    assert result.stats["A"].p50 == pytest.approx(2.0)
    assert result.stats["B"].p99 == pytest.approx(5.0)
    assert result.stats["A"].throughput == pytest.approx(4 / 0.002)


def test_interleaved_duration_budget_is_shared(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=COSTS)
    cfg = BenchmarkConfig(warmup_iters=0, warmup_s=0.0, duration_s=1.0, min_iters=2, block=1, block_warmup=0)
    result = benchmark(runners, x_feed, cfg)
    # Each round costs 4/64 s; rounds stop once 1.0 s has elapsed: 16 rounds.
    assert result.stats["A"].n == result.stats["B"].n == 16


def test_sequential_duration_budget_is_split(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=COSTS)
    cfg = BenchmarkConfig(warmup_iters=0, warmup_s=0.0, duration_s=1.0, min_iters=2, interleave=False)
    result = benchmark(runners, x_feed, cfg)
    assert result.stats["A"].n == 32  # 0.5 s / (1/64 s)
    assert result.stats["B"].n == 11  # ceil(0.5 s / (3/64 s))


def test_min_iters_beats_a_short_duration(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=(1.0, 1.0))
    cfg = BenchmarkConfig(warmup_iters=0, warmup_s=0.0, duration_s=0.5, min_iters=7, block=1, block_warmup=0)
    result = benchmark(runners, x_feed, cfg)
    assert result.stats["A"].n == result.stats["B"].n == 7


# Feeds, activation, memory ---------------------------------------------------------------------------


def test_per_runner_feeds(fake_runner_cls, call_log):
    runners = {"A": fake_runner_cls("A", log=call_log), "B": fake_runner_cls("B", log=call_log, shape=(1, 2))}
    feeds = {"A": {"x": np.zeros((4, 3), np.float32)}, "B": {"x": np.zeros((1, 2), np.float32)}}
    result = benchmark(runners, feeds, BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=2))
    assert result.stats["B"].n == 2
    with pytest.raises(UserInputError, match=r"no feed given for runner\(s\) \['B'\]"):
        benchmark(runners, {"A": feeds["A"]}, BenchmarkConfig(iters=1))


def test_feed_factory_runs_after_activation(fake_runner_cls, call_log):
    runners = _runners(fake_runner_cls, call_log)
    seen = []

    def make(key, runner):
        seen.append((key, runner.is_active))
        return random_feed(runner.get_input_metadata(), batch=3, seed=0)

    result = benchmark(runners, make, BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=1))
    assert seen == [("A", True), ("B", True)]
    assert result.stats["A"].n == 1


def test_benchmark_activates_and_deactivates_only_its_own(fake_runner_cls, call_log, x_feed):
    runners = _runners(fake_runner_cls, call_log)
    runners["B"].activate()
    benchmark(runners, x_feed, BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=1))
    assert (runners["A"].activations, runners["A"].deactivations, runners["A"].is_active) == (1, 1, False)
    assert (runners["B"].activations, runners["B"].deactivations, runners["B"].is_active) == (1, 0, True)


def test_runners_are_deactivated_when_a_feed_is_wrong(fake_runner_cls, call_log):
    runners = _runners(fake_runner_cls, call_log)
    with pytest.raises(UserInputError):
        benchmark(runners, {"x": np.zeros((2, 5), np.float32)}, BenchmarkConfig(iters=1))
    assert all(not r.is_active and r.deactivations == 1 for r in runners.values())


def test_memory_record(fake_runner_cls, call_log, x_feed):
    result = benchmark(_runners(fake_runner_cls, call_log), x_feed, BenchmarkConfig(warmup_s=0.0, iters=2))
    proc = result.memory["process"]
    assert proc["rss_start_bytes"] > 0
    assert proc["rss_end_bytes"] > 0
    assert proc["peak_rss_bytes"] >= proc["rss_end_bytes"]
    for key in ("A", "B"):
        mem = result.memory["runners"][key]
        assert mem["activate_rss_delta_bytes"] == mem["rss_after_activate_bytes"] - mem["rss_before_activate_bytes"]
        assert mem["peak_rss_after_activate_bytes"] >= mem["rss_after_activate_bytes"]
        assert mem["runner"]["fake_device_bytes"] == 1234
    data = result.to_dict()
    assert set(data) == {"config", "runners", "results", "warmup", "memory", "wall_s"}
    assert data["results"]["A"]["samples_ms"] == pytest.approx(list(result.samples_s["A"] * 1e3), abs=1e-6)
    assert "samples_ms" not in result.to_dict(include_samples=False)["results"]["A"]
    assert data["runners"]["A"] == {"name": "A", "backend": "fake", "device": "cpu"}


def test_benchmark_needs_runners(x_feed):
    with pytest.raises(UserInputError, match="at least one runner"):
        benchmark({}, x_feed)


# random_feed -----------------------------------------------------------------------------------------


def test_random_feed_is_seeded_and_shaped():
    meta = {
        "input": TensorMeta(np.dtype("float32"), ("N", 3, 4, 4)),
        "ids": TensorMeta(np.dtype("int64"), (None, 2)),
        "mask": TensorMeta(np.dtype("bool"), ("N", 5)),
    }
    a = random_feed(meta, batch=2, seed=7, model="m")
    b = random_feed(meta, batch=2, seed=7, model="m")
    assert a["input"].shape == (2, 3, 4, 4)
    assert a["input"].dtype == np.float32
    assert a["ids"].shape == (2, 2)
    assert a["ids"].dtype == np.int64
    assert a["mask"].dtype == np.bool_
    for key in meta:
        np.testing.assert_array_equal(a[key], b[key])
    expected = np.random.default_rng(7).standard_normal((2, 3, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(a["input"], expected)


def test_random_feed_errors():
    dyn_hw = {"input": TensorMeta(np.dtype("float32"), ("N", 3, "H", "W"))}
    with pytest.raises(UserInputError, match=r"dynamic axis 2 .*--shape input:Nx3xNxN"):
        random_feed(dyn_hw, model="m")
    feed = random_feed(dyn_hw, shapes={"input": (2, 3, 5, 6)})
    assert feed["input"].shape == (2, 3, 5, 6)
    with pytest.raises(UserInputError, match="contradicts"):
        random_feed(dyn_hw, shapes={"input": (2, 4, 5, 6)})
    fixed = {"input": TensorMeta(np.dtype("float32"), (1, 3))}
    with pytest.raises(UserInputError, match="fixed batch of 1"):
        random_feed(fixed, batch=4)


# Speedup ---------------------------------------------------------------------------------------------


def test_speedup_on_constant_samples_is_exact():
    est = speedup(np.full(50, 0.02), np.full(40, 0.01), n_boot=200, seed=0)
    assert est.ratio == pytest.approx(2.0)
    assert est.ci95 == pytest.approx((2.0, 2.0))


def test_speedup_ratio_and_interval():
    rng = np.random.default_rng(1)
    a = rng.lognormal(np.log(0.010), 0.1, size=400)
    b = rng.lognormal(np.log(0.008), 0.1, size=300)
    est = speedup(a, b, n_boot=500, seed=3)
    assert est.ratio == pytest.approx(np.percentile(a, 50) / np.percentile(b, 50), rel=1e-12)
    lo, hi = est.ci95
    assert lo < est.ratio < hi
    # true ratio 1.25; the 95% CI of the medians' ratio is a few % wide
    assert lo > 1.1
    assert hi < 1.45
    assert speedup(a, b, n_boot=500, seed=3).ci95 == est.ci95  # seeded: reproducible
    assert speedup(a, b, n_boot=500, seed=4).ci95 != est.ci95
    assert est.to_dict()["ci95"] == [lo, hi]
    assert est.to_dict()["p50_ratio"] == est.ratio


def test_speedup_bootstrap_chunks_cover_all_resamples(monkeypatch):
    from runtime import harness

    monkeypatch.setattr(harness, "_BOOT_CHUNK_ELEMS", 100)  # 100 / 50 samples → 2 resamples per chunk
    est = speedup(np.linspace(1, 2, 50), np.linspace(0.5, 1, 50), n_boot=11, seed=0)
    assert est.n_boot == 11
    assert est.ci95[0] <= est.ci95[1]
    assert all(np.isfinite(est.ci95))


@pytest.mark.parametrize(("kwargs", "message"), [({"n_boot": 0}, "n_boot"), ({"confidence": 1.0}, "confidence")])
def test_speedup_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        speedup([1.0], [1.0], **kwargs)


def test_result_speedup_uses_runner_samples(fake_runner_cls, call_log, fake_clock, x_feed):
    runners = _runners(fake_runner_cls, call_log, fake_clock, costs=(0.004, 0.001))
    result = benchmark(runners, x_feed, BenchmarkConfig(warmup_iters=0, warmup_s=0.0, iters=10))
    est = result.speedup("A", "B", n_boot=100)
    assert est.ratio == pytest.approx(4.0)
    with pytest.raises(UserInputError, match="no runner 'C'"):
        result.speedup("A", "C")
