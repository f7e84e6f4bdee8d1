"""``SPEEDUP=`` / ``LATENCY_MS=`` for every registered method: bisect its knob on predicted latency, then measure.

A method that plans for latency itself (``auto``: ``"speedup" in method.target_fields``) gets the target
directly. Any other method is driven through its own target knob — ``RATIO`` (or ``FLOPS`` when that is
its default target, as for CC) — bisected until the plan's *predicted* latency (:class:`LatencyModel`)
meets the goal. The result is then exported and timed end to end beside the dense model (interleaved);
when the measurement misses, the goal given to the predictor is corrected by the observed
measured/predicted factor and the plan re-solved (at most ``rounds`` times). An unreachable target is a
one-line :class:`UserInputError` stating the best speedup found.

The whole solve runs in one :func:`compress.reuse.reuse_scope`: what a method computes that does not
depend on its knob (CC's gradient statistics, sensitivity curves and heuristic runs, LRSD's calibration
images and dense statistics, ``auto``'s candidate errors) is computed at the first knob value and reused
at the others, giving the same plans. Each bisection step writes a progress line
(:class:`lowrank_core.progress.Progress`), also into a log.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.latency import current_latency_model, use_latency_model
from compress.latency.model import DenseProfile, LatencyModel
from compress.plan import Plan
from compress.reuse import reuse_scope
from compress.targets import Target
from lowrank_core.errors import CompressionError, UserInputError
from lowrank_core.progress import Progress, heartbeat, say

__all__ = ["LatencyOutcome", "compress_to_latency_", "knob_kind"]

BISECTION_STEPS = 8
MAX_REMOVED = 0.99  # the knob's upper end: RATIO=100 or FLOPS=0.99


@dataclass
class LatencyOutcome:
    """One candidate: the knob value, its plan, the compressed model and its predicted ms."""

    value: float | None
    plan: Plan
    model: nn.Module
    predicted_ms: float


def knob_kind(method: Any) -> str:
    """The target kind bisected for a method that cannot plan for latency: its default's, else ratio/flops."""
    default = getattr(method.default_target, "kind", None)
    if default in ("ratio", "flops") and default in method.target_fields:
        return default
    for kind in ("ratio", "flops"):
        if kind in method.target_fields:
            return kind
    raise UserInputError(f"method {method.name!r} has no RATIO or FLOPS knob to reach a latency target with")


def _options(method: Any, config: Any) -> dict[str, Any]:
    """The config's fields other than its targets, to rebuild it with another target."""
    skip = set(method.target_fields) | set(method.fixed)
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in skip and f.name in method.fields
    }


def _compress_copy(
    method: Any, dense: nn.Module, config: Any, example: torch.Tensor, data: Any, model_name: str
) -> tuple[Plan, nn.Module]:
    """Plan and apply on a copy of ``dense``; factors are left unfilled (``init="empty"``) when planning is apart."""
    from compress.methods.base import Method

    model = copy.deepcopy(dense)
    if type(method).compress_ is Method.compress_:
        plan = method.plan(dense, config, example, data=data, model_name=model_name)
        method.apply_(model, plan, init="empty", data=data)
    else:
        plan = method.compress_(model, config, example, data=data, model_name=model_name)
    return plan, model.eval()


def _speedup_text(dense_ms: float, ms: float) -> str:
    return f"{dense_ms / ms:.2f}× ({ms:.2f} ms vs dense {dense_ms:.2f} ms)"


def compress_to_latency_(
    method: Any,
    dense: nn.Module,
    compressed: nn.Module,
    config: Any,
    target: Target,
    example_input: torch.Tensor,
    *,
    data: Any = None,
    model_name: str = "model",
    latency: LatencyModel | None = None,
    rounds: int = 3,
    repeats: int = 20,
) -> Plan:
    """Compress ``compressed`` (a copy of ``dense``) in place to a measured ``SPEEDUP`` / ``LATENCY_MS`` target.

    Args:
        method: The registered method.
        dense: The dense model (not changed).
        compressed: A copy of ``dense``; replaced in place by the chosen compressed model.
        config: The method's config (its options; its target is replaced).
        target: A latency target (``speedup`` or ``latency_ms``).
        example_input: Example input, batch first.
        data: Calibration batches for data-aware methods.
        model_name: For the plan and messages.
        latency: The latency model (default :func:`compress.latency.current_latency_model`).
        rounds: Measure-and-correct rounds at most.
        repeats: Interleaved end-to-end timing rounds per measurement.

    Returns:
        The plan, with ``plan.target["latency_target"]`` (goal, predicted and measured ms, rounds) and
        ``plan.target["latency_model"]``.

    Raises:
        UserInputError: the target is out of reach (the message states the best speedup found).
    """
    if not target.is_latency:
        raise UserInputError(f"{target.text()} is not a latency target")
    latency = latency or current_latency_model(batch=int(example_input.shape[0]))
    with use_latency_model(latency), reuse_scope():
        with heartbeat(f"{method.name} latency solve: timing the dense model's layers"):
            profile = latency.profile_dense(dense, example_input)
        native = target.kind in method.target_fields
        options = _options(method, config)
        dense_ms = profile.total_ms
        goal = dense_ms / target.value if target.kind == "speedup" else target.value
        aim, history, chosen = goal, [], None
        for round_ in range(1, rounds + 1):
            try:
                if native:
                    scaled = Target(target.kind, dense_ms / aim if target.kind == "speedup" else aim)
                    outcome = _native(method, dense, scaled, options, example_input, data, model_name, latency, profile)
                else:
                    outcome = _bisect(
                        method, dense, target, aim, options, example_input, data, model_name, latency, profile, round_
                    )
            except UserInputError as exc:
                if chosen is None:  # the target itself is out of reach
                    raise
                # the aim corrected by a measured miss is beyond the method: keep the closest measured round
                history.append({"round": round_, "aim_ms": aim, "refused": str(exc)})
                break
            with heartbeat(f"{method.name} latency solve: round {round_}, timing dense and compressed end to end"):
                dense_meas, comp_meas = latency.timer.measure(
                    [dense, outcome.model], latency.shape(example_input.shape), repeats=repeats
                )
            goal_now = dense_meas / target.value if target.kind == "speedup" else target.value
            history.append(
                {
                    "round": round_,
                    "knob": outcome.value,
                    "aim_ms": aim,
                    "predicted_ms": outcome.predicted_ms,
                    "dense_measured_ms": dense_meas,
                    "measured_ms": comp_meas,
                    "goal_ms": goal_now,
                }
            )
            say(
                f"{method.name} latency solve, round {round_}: measured {_speedup_text(dense_meas, comp_meas)}, goal {goal_now:.2f} ms"
                f"{'' if comp_meas <= goal_now else '; missed, re-solving with the aim corrected'}"
            )
            if comp_meas <= goal_now:
                chosen = (outcome, dense_meas, comp_meas)
                break
            if chosen is None or comp_meas / dense_meas < chosen[2] / chosen[1]:
                chosen = (outcome, dense_meas, comp_meas)  # the closest miss so far
            aim = aim * goal_now / comp_meas  # aim lower by the observed miss
        assert chosen is not None
        outcome, dense_meas, comp_meas = chosen
        plan = _finish_(method, compressed, outcome, options, target, example_input, data, model_name)
    knob = None if native else knob_kind(method)
    _record_target(plan, target, knob, outcome, (dense_meas, comp_meas), history)
    plan.target["latency_model"] = latency.to_dict()
    return plan


def _record_target(
    plan: Plan,
    target: Target,
    knob: str | None,
    outcome: Any,
    measured: tuple[float, float],
    history: list[dict[str, Any]],
) -> None:
    """``plan.target["latency_target"]``: goal, achieved, measured and predicted ms; a warning when it was missed."""
    dense_meas, comp_meas = measured
    achieved = dense_meas / comp_meas if target.kind == "speedup" else comp_meas
    met = comp_meas <= (dense_meas / target.value if target.kind == "speedup" else target.value)
    plan.target["latency_target"] = {
        "kind": target.kind,
        "value": target.value,
        "achieved": achieved,
        "met": met,
        "knob": None if knob is None else {knob: outcome.value},
        "dense_ms": dense_meas,
        "measured_ms": comp_meas,
        "predicted_ms": outcome.predicted_ms,
        "relative_error": (outcome.predicted_ms - comp_meas) / comp_meas,
        "rounds": history,
    }
    if not met:
        plan.warnings.append(
            f"{target.text()} missed as measured after {len(history)} rounds: {_speedup_text(dense_meas, comp_meas)}; "
            "the timing is noisy or the target is at the edge of what the method reaches"
        )


def _finish_(
    method: Any,
    compressed: nn.Module,
    outcome: LatencyOutcome,
    options: dict[str, Any],
    target: Target,
    example: torch.Tensor,
    data: Any,
    model_name: str,
) -> Plan:
    """Apply the chosen outcome to ``compressed`` for real (factors filled from its weights)."""
    from compress.methods.base import Method

    if type(method).compress_ is Method.compress_:
        method.apply_(compressed, outcome.plan, data=data)
        return outcome.plan
    value = outcome.plan.target.get("value", target.value) if outcome.value is None else outcome.value
    kind = target.kind if outcome.value is None else knob_kind(method)
    config = method.make_config(Target(kind, value), **options)
    return method.compress_(compressed, config, example, data=data, model_name=model_name)


def _native(
    method: Any,
    dense: nn.Module,
    target: Target,
    options: dict[str, Any],
    example: torch.Tensor,
    data: Any,
    model_name: str,
    latency: LatencyModel,
    profile: DenseProfile,
) -> LatencyOutcome:
    config = method.make_config(target, **options)
    plan, model = _compress_copy(method, dense, config, example, data, model_name)
    predicted, _ = latency.predict(model, example, profile)
    return LatencyOutcome(None, plan, model, predicted)


def _bisect(
    method: Any,
    dense: nn.Module,
    target: Target,
    aim: float,
    options: dict[str, Any],
    example: torch.Tensor,
    data: Any,
    model_name: str,
    latency: LatencyModel,
    profile: DenseProfile,
    round_: int = 1,
) -> LatencyOutcome:
    """The gentlest knob value whose predicted latency is ≤ ``aim`` (the knob's removed fraction bisected)."""
    kind = knob_kind(method)
    steps = Progress(BISECTION_STEPS + 1, f"{method.name} latency solve, round {round_}", unit="bisection step")

    def value_of(x: float) -> float:
        return x if kind == "flops" else 1.0 / (1.0 - x)

    def evaluate(x: float) -> LatencyOutcome | None:
        value = value_of(x)
        knob = f"{kind.upper()}={value:.4g}"
        try:
            config = method.make_config(Target(kind, value), **options)
            plan, model = _compress_copy(method, dense, config, example, data, model_name)
        except (CompressionError, UserInputError):
            steps.update(1, f"{knob}: beyond what {method.name} can plan (too far)", force=True)
            return None  # beyond what the method can plan: treated as too far
        predicted, _ = latency.predict(model, example, profile)
        verdict = "meets" if predicted <= aim else "misses"
        steps.update(1, f"{knob}, predicted {predicted:.2f} ms, {verdict} the aim {aim:.2f} ms", force=True)
        return LatencyOutcome(value, plan, model, predicted)

    lo, hi, best, fastest = 0.0, MAX_REMOVED, None, None
    top = evaluate(hi)
    if top is not None and top.predicted_ms <= aim:
        best = top
    # the knob's far end is its fastest plan: when even that misses the aim, no step in between meets it
    # (LRSD's dense S branch, for one, keeps every plan near the dense latency), so no full plans are spent
    far_end_misses = top is not None and top.predicted_ms > aim
    for _ in range(0 if far_end_misses else BISECTION_STEPS):
        mid = (lo + hi) / 2.0
        outcome = evaluate(mid)
        if outcome is not None and (fastest is None or outcome.predicted_ms < fastest.predicted_ms):
            fastest = outcome
        if outcome is not None and outcome.predicted_ms <= aim:
            best, hi = outcome, mid
        elif outcome is None:
            hi = mid
        else:
            lo = mid
    steps.close()
    if top is not None and (fastest is None or top.predicted_ms < fastest.predicted_ms):
        fastest = top
    if best is None:
        dense_ms = profile.total_ms
        if fastest is None:
            raise UserInputError(
                f"{target.text()} is out of reach for {method.name} on {model_name}: no {kind.upper()} plan could be made"
            )
        best_value = f"{kind.upper()}={fastest.value:.4g}"
        raise UserInputError(
            f"{target.text()} is out of reach for {method.name} on {model_name}: the best speedup found is "
            f"{_speedup_text(dense_ms, fastest.predicted_ms)} predicted at {best_value}; lower the target or try METHOD=auto"
        )
    assert math.isfinite(best.predicted_ms)
    return best
