"""Latency benchmark harness: warm-up, interleaved timing, percentiles, memory and a bootstrapped speedup.

Method (why it looks like this):

* Every runner syncs inside :meth:`Runner.infer`, so ``time.perf_counter()`` around that call is the
  full host-side latency of one inference.
* Warm-up runs until *both* ``warmup_iters`` inferences and ``warmup_s`` seconds of inference have
  been spent on each runner (lazy allocation, autotuning, caches, clocks ramping up).
* Interleaved measurement runs rounds in which every runner does one timed inference, alternating the
  order each round (A B, B A, ...), so frequency drift, thermal throttling and noisy neighbours hit all
  runners alike; a time budget covers all runners together.
* The report gives p50/p90/p99, mean, std, min and max (not just the mean), the per-iteration samples,
  and a bootstrap confidence interval for the p50 ratio, because shared machines are noisy.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lowrank_core.errors import UserInputError
from runtime.base import Dim, Feed, Runner, TensorMeta, process_rss_bytes

_now = time.perf_counter
"""The interval clock (indirected so tests can drive the harness with a fake clock)."""

_BOOT_CHUNK_ELEMS = 4_000_000


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies; times in milliseconds.

    Percentiles use numpy's default (linear interpolation); ``std`` is the population standard deviation
    (numpy's default, ``ddof=0``); ``throughput`` is items per second, ``batch / mean`` seconds.
    """

    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    throughput: float

    @classmethod
    def from_samples(cls, samples_s: np.ndarray | list[float], batch: int = 1) -> LatencyStats:
        """Summarise per-iteration latencies given in seconds.

        Raises:
            ValueError: if there are no samples or ``batch`` < 1.
        """
        samples = np.asarray(samples_s, dtype=np.float64).ravel()
        if samples.size == 0:
            raise ValueError("cannot summarise an empty list of latency samples")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        ms = samples * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        mean_s = float(samples.mean())
        return cls(
            n=int(samples.size),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            mean=float(ms.mean()),
            std=float(ms.std()),
            min=float(ms.min()),
            max=float(ms.max()),
            throughput=batch / mean_s if mean_s > 0 else math.inf,
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict with the field names as keys."""
        return asdict(self)


@dataclass(frozen=True)
class BenchmarkConfig:
    """How long to warm up and measure.

    Attributes:
        warmup_iters: minimum warm-up inferences per runner.
        warmup_s: minimum warm-up inference time per runner, in seconds; warm-up lasts until both
            minimums are met.
        iters: exact number of timed inferences per runner; when set, ``duration_s`` is ignored.
        duration_s: time budget for the whole measurement, shared by all runners (used when ``iters``
            is ``None``).
        min_iters: minimum timed inferences per runner in duration mode.
        interleave: alternate runners round by round (A B, B A, ...) instead of one after the other.
        block: timed inferences a runner does in a row on its turn of an interleaved round.
        block_warmup: untimed inferences at the start of each turn, so each runner is measured with
            its own weights back in the caches. With per-iteration alternation (block=1, no re-warm) a
            compressed ResNet-34 whose 22 MB of weights fit this machine's 32 MB L3 was timed after the
            dense model had flushed it: 15 ms instead of the 11 ms it runs at in an application.
        turn_pause_s: idle time before each turn, so thread pools of the runner that just ran stop
            spin-waiting before the next one is timed (ONNX Runtime spins for a while after each run).
        batch: items per inference, for throughput.
    """

    warmup_iters: int = 10
    warmup_s: float = 1.0
    iters: int | None = None
    duration_s: float = 10.0
    min_iters: int = 20
    interleave: bool = True
    block: int = 10
    block_warmup: int = 2
    turn_pause_s: float = 0.05
    batch: int = 1

    def __post_init__(self) -> None:
        """Reject impossible settings with one-line messages."""
        if self.warmup_iters < 0:
            raise UserInputError(f"warm-up iterations must be >= 0, got {self.warmup_iters}")
        if not self.warmup_s >= 0:
            raise UserInputError(f"warm-up time must be >= 0 s, got {self.warmup_s}")
        if self.iters is not None and self.iters < 1:
            raise UserInputError(f"iterations must be >= 1, got {self.iters}")
        if not self.duration_s > 0:
            raise UserInputError(f"duration must be > 0 s, got {self.duration_s}")
        if self.min_iters < 1:
            raise UserInputError(f"min_iters must be >= 1, got {self.min_iters}")
        if self.batch < 1:
            raise UserInputError(f"batch must be >= 1, got {self.batch}")
        if not self.turn_pause_s >= 0:
            raise UserInputError(f"turn_pause_s must be >= 0, got {self.turn_pause_s}")
        if self.block < 1 or self.block_warmup < 0:
            raise UserInputError(f"block must be >= 1 and block_warmup >= 0, got {self.block}, {self.block_warmup}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the field names as keys."""
        return asdict(self)


@dataclass(frozen=True)
class SpeedupEstimate:
    """Speedup of a candidate over a baseline: ``p50(baseline) / p50(candidate)``, with a bootstrap CI.

    Attributes:
        ratio: the point estimate; > 1 means the candidate is faster.
        ci95: (low, high) percentile-bootstrap interval at ``confidence``.
        confidence: the interval's coverage (0.95 unless asked otherwise).
        n_boot: bootstrap resamples.
        seed: seed of the numpy ``Generator`` used for resampling.
    """

    ratio: float
    ci95: tuple[float, float]
    confidence: float
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """``{"p50_ratio", "ci95": [lo, hi], "confidence", "n_boot", "seed"}``."""
        return {
            "p50_ratio": self.ratio,
            "ci95": [self.ci95[0], self.ci95[1]],
            "confidence": self.confidence,
            "n_boot": self.n_boot,
            "seed": self.seed,
        }


def speedup(
    baseline_s: np.ndarray | list[float],
    candidate_s: np.ndarray | list[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> SpeedupEstimate:
    """Speedup of a candidate over a baseline from per-iteration latencies.

    The point estimate is ``p50(baseline) / p50(candidate)``. The interval resamples both sample sets
    independently with replacement (``n_boot`` times, seeded ``numpy.random.Generator``) and takes the
    percentiles of the resampled ratios.

    Args:
        baseline_s: latencies of the baseline (any unit, same as ``candidate_s``).
        candidate_s: latencies of the candidate.
        n_boot: bootstrap resamples.
        seed: seed for the resampling generator.
        confidence: coverage of the interval, in (0, 1).

    Raises:
        ValueError: for empty samples, non-positive medians, ``n_boot`` < 1 or a confidence outside (0, 1).
    """
    a = np.asarray(baseline_s, dtype=np.float64).ravel()
    b = np.asarray(candidate_s, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("speedup needs at least one sample for each side")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    med_b = float(np.percentile(b, 50))
    if med_b <= 0:
        raise ValueError("the candidate's median latency must be positive")
    ratio = float(np.percentile(a, 50)) / med_b

    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(a.size, b.size))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx_a = rng.integers(0, a.size, size=(stop - start, a.size))
        idx_b = rng.integers(0, b.size, size=(stop - start, b.size))
        ratios[start:stop] = np.median(a[idx_a], axis=1) / np.median(b[idx_b], axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(ratios, [tail, 100.0 - tail])
    return SpeedupEstimate(ratio=ratio, ci95=(float(lo), float(hi)), confidence=confidence, n_boot=n_boot, seed=seed)


@dataclass
class BenchmarkResult:
    """Everything one :func:`benchmark` call measured.

    Attributes:
        config: the settings used.
        runners: runner key → :meth:`Runner.info` (backend, device, providers, ...).
        samples_s: runner key → per-iteration latencies in seconds, in measurement order.
        stats: runner key → :class:`LatencyStats`.
        warmup: runner key → ``{"iters", "s"}`` actually spent warming up.
        memory: ``{"process": {...}, "runners": {key: {...}}}``, bytes (see :func:`benchmark`).
        wall_s: wall time of warm-up plus measurement.
        order: runner key of every timed inference, in execution order (shows the interleaving).
    """

    config: BenchmarkConfig
    runners: dict[str, dict[str, Any]]
    samples_s: dict[str, np.ndarray]
    stats: dict[str, LatencyStats]
    warmup: dict[str, dict[str, float]]
    memory: dict[str, Any]
    wall_s: float
    order: list[str] = field(default_factory=list)

    def speedup(self, baseline: str, candidate: str, *, n_boot: int = 2000, seed: int = 0) -> SpeedupEstimate:
        """Speedup of runner ``candidate`` over runner ``baseline`` (p50 ratio with bootstrap CI).

        Raises:
            UserInputError: if either key was not benchmarked.
        """
        for key in (baseline, candidate):
            if key not in self.samples_s:
                raise UserInputError(f"no runner {key!r} in this result; have {sorted(self.samples_s)}")
        return speedup(self.samples_s[baseline], self.samples_s[candidate], n_boot=n_boot, seed=seed)

    def to_dict(self, *, include_samples: bool = True) -> dict[str, Any]:
        """JSON-ready dict; per-runner stats carry ``samples_ms`` unless ``include_samples`` is False."""
        results = {}
        for key, stats in self.stats.items():
            entry: dict[str, Any] = stats.to_dict()
            if include_samples:
                # 1 ns resolution is what perf_counter gives; rounding keeps latency.json small.
                entry["samples_ms"] = np.round(self.samples_s[key] * 1e3, 6).tolist()
            results[key] = entry
        return {
            "config": self.config.to_dict(),
            "runners": self.runners,
            "results": results,
            "warmup": self.warmup,
            "memory": self.memory,
            "wall_s": self.wall_s,
        }


FeedFactory = Callable[[str, Runner], Feed]
"""Builds a runner's feed once it is active (so it can read :meth:`Runner.get_input_metadata`)."""


def benchmark(
    runners: Mapping[str, Runner],
    feeds: Mapping[str, Feed] | Feed | FeedFactory,
    config: BenchmarkConfig | None = None,
    *,
    monitor: contextlib.AbstractContextManager[Any] | None = None,
) -> BenchmarkResult:
    """Warm up and time several runners on the same machine, interleaved by default.

    Runners that are not active yet are activated here (as context managers) and deactivated on return;
    runners already active are left active.

    Memory recorded (bytes; ``None`` where the platform cannot tell):

    * ``process``: RSS at start and end, and the process peak RSS (``getrusage`` ``ru_maxrss``).
    * ``runners[key]``: RSS just before and after its activation and the difference, the peak RSS after
      activation, and :meth:`Runner.memory` after measurement (device memory where the runner reports it).

    Args:
        runners: key (``"dense"``, ``"compressed"``, file stem, ...) → runner.
        feeds: one feed shared by all runners, runner key → feed, or a callable ``(key, runner) -> feed``
            called after activation (e.g. to build inputs from the runner's input metadata).
        config: warm-up and measurement settings; default :class:`BenchmarkConfig()`.
        monitor: a context manager entered around the timed phase only (after warm-up), e.g.
            :class:`runtime.jetson.TegrastatsSampler` sampling power and clocks beside the timed runs.

    Raises:
        UserInputError: for no runners, or per-runner feeds that miss a runner; also whatever the
            runners raise for invalid feeds.
    """
    config = config if config is not None else BenchmarkConfig()
    if not runners:
        raise UserInputError("benchmark needs at least one runner")
    keys = list(runners)
    per_runner = None if callable(feeds) and not isinstance(feeds, Mapping) else _split_feeds(keys, feeds)
    start_wall = _now()
    memory: dict[str, Any] = {"process": {"rss_start_bytes": process_rss_bytes()}, "runners": {}}

    with contextlib.ExitStack() as stack:
        for key in keys:
            runner = runners[key]
            before = process_rss_bytes()
            if not runner.is_active:
                stack.enter_context(runner)
            after = process_rss_bytes()
            memory["runners"][key] = {
                "rss_before_activate_bytes": before,
                "rss_after_activate_bytes": after,
                "activate_rss_delta_bytes": None if before is None or after is None else after - before,
                "peak_rss_after_activate_bytes": _max_known(peak_rss_bytes(), after),
            }

        if per_runner is None:
            per_runner = {key: feeds(key, runners[key]) for key in keys}  # type: ignore[operator]
        warmup = _warm_up(runners, keys, per_runner, config)
        gc.collect()
        order: list[str] = []
        with monitor if monitor is not None else contextlib.nullcontext():
            samples = _measure(runners, keys, per_runner, config, order)

        for key in keys:
            memory["runners"][key]["runner"] = runners[key].memory()
        infos = {key: runners[key].info() for key in keys}

    memory["process"]["rss_end_bytes"] = process_rss_bytes()
    memory["process"]["peak_rss_bytes"] = _max_known(peak_rss_bytes(), memory["process"]["rss_end_bytes"])
    arrays = {key: np.asarray(samples[key], dtype=np.float64) for key in keys}
    return BenchmarkResult(
        config=config,
        runners=infos,
        samples_s=arrays,
        stats={key: LatencyStats.from_samples(arrays[key], config.batch) for key in keys},
        warmup=warmup,
        memory=memory,
        wall_s=_now() - start_wall,
        order=order,
    )


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process in bytes, or ``None`` where unsupported.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS), raised to the current RSS if that
    is higher: the kernel updates the two counters separately, so the recorded peak can lag slightly.
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak) if sys.platform == "darwin" else int(peak) * 1024
    current = process_rss_bytes()
    return max(peak, current) if current is not None else peak


def random_feed(
    metadata: Mapping[str, TensorMeta],
    *,
    batch: int = 1,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    model: str = "model",
) -> dict[str, np.ndarray]:
    """Seeded random inputs for a model: standard normal floats, 0/1 integers, random booleans.

    Axis 0, when dynamic, becomes ``batch``; any other dynamic axis needs a concrete shape in ``shapes``.

    Args:
        metadata: input name → :class:`TensorMeta`, e.g. from :meth:`Runner.get_input_metadata`.
        batch: size of a dynamic axis 0; must equal a fixed axis 0.
        seed: seed of the ``numpy.random.Generator``; inputs are drawn in metadata order.
        shapes: input name → full concrete shape, overriding the metadata.
        model: model name used in error messages.

    Raises:
        UserInputError: for a dynamic non-batch axis without a shape, a fixed batch axis that differs from
            ``batch``, an override that contradicts a fixed axis, or an unsupported dtype.
    """
    shapes = shapes if shapes is not None else {}
    rng = np.random.default_rng(seed)
    feed = {}
    for input_name, spec in metadata.items():
        shape = _concrete_shape(input_name, spec, batch, shapes.get(input_name), model)
        kind = spec.dtype.kind
        if kind == "f":
            feed[input_name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype, copy=False)
        elif kind in "iu":
            feed[input_name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        elif kind == "b":
            feed[input_name] = rng.random(shape) < 0.5
        else:
            raise UserInputError(f"{model}: cannot generate inputs of dtype {spec.dtype} for {input_name!r}")
    return feed


def _concrete_shape(
    input_name: str, spec: TensorMeta, batch: int, override: Sequence[int] | None, model: str
) -> tuple[int, ...]:
    hint = f"give one with --shape {input_name}:" + "x".join(
        str(d) if isinstance(d, int) and d >= 0 else "N" for d in (spec.shape or ("N",))
    )
    if override is not None:
        shape = tuple(int(d) for d in override)
        if spec.shape is not None:
            if len(shape) != len(spec.shape):
                raise UserInputError(
                    f"{model}: shape {list(shape)} for {input_name!r} has rank {len(shape)}, model expects "
                    f"{spec.describe()}"
                )
            for axis, dim in enumerate(spec.shape):
                if not spec.is_dynamic(axis) and shape[axis] != dim:
                    raise UserInputError(
                        f"{model}: shape {list(shape)} for {input_name!r} contradicts {spec.describe()} at axis {axis}"
                    )
        return shape
    if spec.shape is None:
        raise UserInputError(f"{model}: input {input_name!r} has an unknown shape; {hint}")
    dims: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if not spec.is_dynamic(axis):
            if axis == 0 and dim != batch:
                raise UserInputError(
                    f"{model}: input {input_name!r} has a fixed batch of {dim} ({spec.describe()}) but batch "
                    f"{batch} was asked; re-export with a dynamic batch axis or use --batch {dim}"
                )
            dims.append(int(dim))  # type: ignore[arg-type]
        elif axis == 0:
            dims.append(batch)
        else:
            raise UserInputError(
                f"{model}: input {input_name!r} has dynamic axis {axis} ({_dim_text(dim)}) in {spec.describe()}; {hint}"
            )
    return tuple(dims)


def _dim_text(dim: Dim) -> str:
    return "unnamed" if dim is None else repr(dim)


# Internals --------------------------------------------------------------------------------------------


def _max_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _split_feeds(keys: list[str], feeds: Mapping[str, Feed] | Feed) -> dict[str, Feed]:
    """Turn a shared feed or a runner-key → feed mapping into runner-key → feed."""
    if not isinstance(feeds, Mapping):
        raise UserInputError(f"feeds must be a mapping, got {type(feeds).__name__}")
    values = list(feeds.values())
    if values and all(isinstance(v, Mapping) for v in values):
        missing = [k for k in keys if k not in feeds]
        if missing:
            raise UserInputError(f"no feed given for runner(s) {missing}; feeds cover {sorted(feeds)}")
        return {k: feeds[k] for k in keys}
    return dict.fromkeys(keys, feeds)  # type: ignore[arg-type]


def _timed(runner: Runner, feed: Feed) -> float:
    start = _now()
    runner.infer(feed)
    return _now() - start


def _round_order(keys: list[str], round_index: int) -> list[str]:
    """A B C, C B A, A B C, ...: each runner alternates between early and late positions."""
    return keys if round_index % 2 == 0 else keys[::-1]


def _warm_up(
    runners: Mapping[str, Runner], keys: list[str], feeds: dict[str, Feed], config: BenchmarkConfig
) -> dict[str, dict[str, float]]:
    """Warm every runner until it has done ``warmup_iters`` inferences and spent ``warmup_s`` in them.

    Interleaved mode warms in alternating rounds until every runner is done, so all of them are hot
    when measurement starts; sequential mode warms each runner on its own.
    """
    count = dict.fromkeys(keys, 0)
    spent = dict.fromkeys(keys, 0.0)

    def done(key: str) -> bool:
        return count[key] >= config.warmup_iters and spent[key] >= config.warmup_s

    if config.interleave:
        round_index = 0
        while not all(done(k) for k in keys):
            for key in _round_order(keys, round_index):
                spent[key] += _timed(runners[key], feeds[key])
                count[key] += 1
            round_index += 1
    else:
        for key in keys:
            while not done(key):
                spent[key] += _timed(runners[key], feeds[key])
                count[key] += 1
    return {k: {"iters": count[k], "s": spent[k]} for k in keys}


def _measure(
    runners: Mapping[str, Runner],
    keys: list[str],
    feeds: dict[str, Feed],
    config: BenchmarkConfig,
    order: list[str],
) -> dict[str, list[float]]:
    """Time inferences per :class:`BenchmarkConfig`; appends each timed runner key to ``order``."""
    samples: dict[str, list[float]] = {k: [] for k in keys}
    if config.interleave:
        start = _now()
        round_index = 0
        while True:
            done_iters = min(len(v) for v in samples.values())
            if config.iters is not None:
                if done_iters >= config.iters:
                    break
            elif done_iters >= config.min_iters and _now() - start >= config.duration_s:
                break
            for key in _round_order(keys, round_index):
                if config.turn_pause_s > 0 and len(keys) > 1:
                    time.sleep(config.turn_pause_s)
                for _ in range(config.block_warmup):
                    runners[key].infer(feeds[key])
                for _ in range(config.block):
                    if config.iters is not None and len(samples[key]) >= config.iters:
                        break
                    samples[key].append(_timed(runners[key], feeds[key]))
                    order.append(key)
            round_index += 1
    else:
        budget = config.duration_s / len(keys)
        for key in keys:
            start = _now()
            while True:
                done_iters = len(samples[key])
                if config.iters is not None:
                    if done_iters >= config.iters:
                        break
                elif done_iters >= config.min_iters and _now() - start >= budget:
                    break
                samples[key].append(_timed(runners[key], feeds[key]))
                order.append(key)
    return samples
