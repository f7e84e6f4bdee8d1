"""CC's planner: sensitivities, the global rate optimisation and the heuristic, into a :class:`~compress.plan.Plan`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.factorizations import LayerGeometry
from compress.methods.cc.allocation import LayerDecision, Trajectory, allocate_reductions, layer_trajectory
from compress.methods.cc.config import MAX_RATE, METHOD, THINNING_CONVENTION, WEIGHT_ONLY_WARNING, CollaborativeConfig
from compress.methods.cc.modules import DECOMP, PRUNE, ConvShape
from compress.methods.cc.routes import Route, input_routes
from compress.methods.cc.rules import skip_reason
from compress.methods.cc.scores import gradient_statistics
from compress.methods.cc.sensitivity import fit_exponential, sensitivity_curve
from compress.metrics import count_params, trace_geometry
from compress.plan import KEEP, LayerPlan, Plan
from compress.planning import (
    FilterFn,
    find_stem,
    hw_list,
    keep_entry,
    layer_params,
    one_thread,
)
from compress.reuse import fingerprint, memoized
from lowrank_core.errors import CompressionError
from lowrank_core.progress import Progress

__all__ = ["plan_cc"]


@dataclass
class _Layer:
    path: str
    module: nn.Conv2d
    geometry: LayerGeometry
    shape: ConvShape
    route: Route
    cap: float
    norm_params: int = 0
    frozen: str | None = None
    log_a: float = math.nan
    b: float = math.nan
    points: int = 0
    fallback: str | None = None
    f: float = 0.0
    trajectory: Trajectory | None = None
    decision: LayerDecision = field(default_factory=LayerDecision)


def _totals(
    layers: dict[str, _Layer], decisions: dict[str, LayerDecision], total_params: int, total_macs: int
) -> tuple[int, int, dict[str, int]]:
    """Whole-model params/MACs after compression, counting producer thinning; ``(params, macs, out kept)``."""
    out_kept: dict[str, int] = {}
    params, macs = total_params, total_macs
    for layer in layers.values():
        d = decisions[layer.path]
        if d.pruned and layer.route.kind == "thinned" and layer.route.producer:
            out_kept[layer.route.producer] = layer.shape.in_channels - len(d.pruned)
            params -= len(d.pruned) * layer.norm_params  # the thinned BNs' weight and bias
    for path, layer in layers.items():
        d, s = decisions[path], layer.shape
        kept, out = s.in_channels - len(d.pruned), out_kept.get(path)
        params -= s.params(s.in_channels) - s.params(kept, d.rank, out)
        macs -= s.dense_macs - s.macs(kept, d.rank, out)
    return params, macs, out_kept


def plan_cc(
    model: nn.Module,
    config: CollaborativeConfig,
    example_input: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> Plan:
    """Plan collaborative compression of ``model`` (not modified).

    Args:
        model: The dense model.
        config: The method config.
        example_input: One input batch (shapes and MACs are measured on it).
        batches: ``(images, labels)`` calibration batches for the gradients (e.g. :func:`gradient_batches`),
            or ``None`` for the weight-only fallback (``G ≡ 1``; the plan warns).
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; False leaves the layer untouched.
        progress: Progress on stderr over the gradients, sensitivity curves and heuristic (:class:`Progress`:
            ``None`` = a bar on a terminal, throttled lines in a log; ``False``: silent).

    Raises:
        CompressionError: nothing to compress, or the target is unreachable (the message gives the maximum).
        UserInputError: malformed calibration batches.
    """
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = find_stem(model, order, int(example_input.shape[1]))
    total_params = count_params(model)
    warnings: list[str] = []
    entries, layers, frozen = _collect_layers(model, geometry, stem, config, filter_fn, model_name)
    grads, calibration = _gradients(model, layers, batches, config, progress, warnings)
    _set_routes(model, example_input, layers, frozen, warnings)
    fitted = _fit_curves(layers, grads, config, progress, warnings, model_name)
    most = float(sum(layer.shape.dense_macs * layer.cap for layer in fitted))
    solve, everything = _solver(fitted, config), {**layers, **frozen}
    decide_all = _decider(everything, fitted, config)

    heuristic = Progress(len(fitted), "cc heuristic", unit="layer", enabled=progress)

    def run_heuristic(layer: _Layer, target: float) -> None:
        with one_thread():
            layer.trajectory = layer_trajectory(
                layer.module.weight,
                grads[layer.path],
                layer.shape,
                target,
                lambda steps, reached: heuristic.note(f"{layer.path}: step {steps}, {reached:.0%} of its target"),
                gamma=config.gamma,
                prune=config.prune,
                decompose=config.decompose,
                exact_forward=config.exact_forward,
            )
        heuristic.update(1, layer.path)

    # global rate optimisation (§5) and the heuristic (§6)
    if config.flops is not None:
        budget, f, log_x, decisions = _allocate_flops(
            config, fitted, everything, solve, decide_all, run_heuristic, heuristic, total_params, total_macs, most
        )
    else:
        budget, f, log_x, decisions = _allocate_ratio(
            config, fitted, everything, solve, decide_all, run_heuristic, total_params, total_macs, most, warnings
        )
    for layer, fl in zip(fitted, f, strict=True):
        layer.f = float(fl)
    heuristic.close()
    for path, d in decisions.items():
        everything[path].decision = d

    return _build_plan(
        model,
        config,
        example_input,
        model_name,
        entries,
        layers,
        everything,
        fitted,
        decisions,
        (total_params, total_macs, budget, log_x, most),
        calibration,
        warnings,
    )


def _solver(fitted: list[_Layer], config: CollaborativeConfig) -> Callable[[float], tuple[np.ndarray, float]]:
    """``solve(T) -> (f, log x)``: the per-layer MACs reductions for a budget T (§5)."""
    fit_args = (
        [layer.log_a for layer in fitted],
        [layer.b for layer in fitted],
        [layer.shape.dense_macs for layer in fitted],
        [layer.cap for layer in fitted],
    )

    def solve(budget: float) -> tuple[np.ndarray, float]:
        return allocate_reductions(*fit_args, budget, weighting=config.weighting)

    return solve


def _decider(
    everything: dict[str, _Layer], fitted: list[_Layer], config: CollaborativeConfig
) -> Callable[[np.ndarray], dict[str, LayerDecision]]:
    """``decide_all(f)``: each layer's decision on its trajectory at its reduction ``f_l`` (none where 0)."""

    def decide_all(f: np.ndarray) -> dict[str, LayerDecision]:
        out = {path: LayerDecision() for path in everything}
        for layer, fl in zip(fitted, f, strict=True):
            assert layer.trajectory is not None or fl <= 0
            if fl > 0 and layer.trajectory is not None:
                out[layer.path] = layer.trajectory.decide(float(fl), config.round_to)
        return out

    return decide_all


def _build_plan(
    model: nn.Module,
    config: CollaborativeConfig,
    example_input: torch.Tensor,
    model_name: str,
    entries: dict[str, LayerPlan],
    layers: dict[str, _Layer],
    everything: dict[str, _Layer],
    fitted: list[_Layer],
    decisions: dict[str, LayerDecision],
    numbers: tuple[int, int, float, float, float],
    calibration: dict[str, Any] | None,
    warnings: list[str],
) -> Plan:
    """Step 7: every layer's entry at its decision, the totals, the discreteness warnings and the plan's record.

    ``numbers`` is ``(total params, total MACs, budget T, log x, the largest reachable MACs reduction)``.
    """
    total_params, total_macs, budget, log_x, most = numbers
    params_after, macs_after, out_kept = _totals(everything, decisions, total_params, total_macs)
    if config.flops is not None and config.flops_measure == "model":
        cut = 1.0 - macs_after / total_macs
        if cut - config.flops > 0.03 * (1.0 - config.flops):
            warnings.append(
                f"cc: FLOPS={config.flops:g} met only as {100 * cut:.1f}% fewer FLOPs (more than 3% of the remaining "
                "FLOPs off): the per-layer decisions are discrete at this size"
            )
    for path, layer in everything.items():
        if layer.frozen is None or path in out_kept:
            entries[path] = _layer_entry(layer, everything, out_kept)
    for layer in fitted:
        if layer.f > 0 and not layer.decision.reached:
            warnings.append(
                f"cc: {layer.path} reached only {layer.decision.reduction} of its {layer.f:.0f} MACs target"
            )
    plan_layers = [entries[p] for p, _ in model.named_modules() if p in entries]
    sum_f = float(sum(layer.f for layer in fitted))
    own = sum(layer.decision.reduction for layer in layers.values())
    plan = Plan(
        model=model_name,
        method=METHOD,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=plan_layers,
        target={
            "control": config.control,
            "ratio": config.ratio,
            "flops": config.flops,
            "achieved_ratio": total_params / params_after,
            "achieved_flops_reduction": 1.0 - macs_after / total_macs,
            "achieved_params_reduction": 1.0 - params_after / total_params,
            "T": budget,
            "log_x": log_x,
            "x": math.exp(log_x) if log_x < 700 else math.inf,
            "sum_f": sum_f,
            "sum_f_rel_error": abs(sum_f - budget) / budget if budget > 0 else 0.0,
            "weighting": config.weighting,
            "flops_measure": config.flops_measure if config.flops is not None else None,
            "solver": "bisection on log x",
            "max_flops_reduction": most / total_macs,
            "flops_reduction_layers": own / total_macs,
            "thinning": THINNING_CONVENTION,
            "calibration": calibration,
            "fallback_layers": [layer.path for layer in layers.values() if layer.fallback],
            "layers": {
                "decomposed": sum(1 for e in plan_layers if e.action == DECOMP),
                "pruned": sum(1 for e in plan_layers if e.action == PRUNE),
                "gathered": sum(1 for e in plan_layers if e.info.get("input") == "gather"),
                "thinned_producers": len(out_kept),
            },
        },
        totals={
            "params_before": total_params,
            "params_after": params_after,
            "macs_before": total_macs,
            "macs_after": macs_after,
        },
        warnings=warnings,
    )
    return plan


def _collect_layers(
    model: nn.Module,
    geometry: dict[str, Any],
    stem: str | None,
    config: CollaborativeConfig,
    filter_fn: FilterFn | None,
    model_name: str,
) -> tuple[dict[str, LayerPlan], dict[str, _Layer], dict[str, _Layer]]:
    """Step 1: keep entries (with reasons), the convs cc compresses, and the kept plain convs it may thin (§7)."""
    entries: dict[str, LayerPlan] = {}
    layers: dict[str, _Layer] = {}  # the layers cc compresses
    frozen: dict[str, _Layer] = {}  # other plain convs: kept, but their outputs may be thinned
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        reason = skip_reason(module, path, geom, stem, config, filter_fn)
        if reason is not None:
            entries[path] = keep_entry(path, module, geom, reason)
            if isinstance(module, nn.Conv2d) and module.groups == 1 and geom is not None:
                # no unit of it is removed, but the channels its only consumer prunes can go (§7)
                shape = ConvShape.of(module, geom)
                frozen[path] = _Layer(path, module, geom, shape, Route("gather"), cap=0.0, frozen=reason)
            continue
        assert geom is not None
        assert isinstance(module, nn.Conv2d)
        shape = ConvShape.of(module, geom)
        reach = shape.max_reduction(prune=config.prune, decompose=config.decompose) / shape.dense_macs
        layers[path] = _Layer(path, module, geom, shape, Route("gather"), cap=min(MAX_RATE, reach))
    if not layers:
        raise CompressionError(f"nothing to compress in {model_name}: every conv is excluded (see the plan reasons)")

    return entries, layers, frozen


def _gradients(
    model: nn.Module,
    layers: dict[str, _Layer],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
    config: CollaborativeConfig,
    progress: bool | None,
    warnings: list[str],
) -> tuple[dict[str, torch.Tensor | None], dict[str, Any] | None]:
    """Step 2 (§3): each layer's weight gradients on the calibration batches (``None``: weight-only, with a warning)."""
    calibration: dict[str, Any] | None = None
    if batches is None:
        grads: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
        warnings.append(WEIGHT_ONLY_WARNING)
    else:
        paths, batch_list = list(layers), list(batches)
        stats, counts = memoized(
            "cc gradients",
            lambda: fingerprint(model, paths, batch_list),
            lambda: gradient_statistics(model, paths, batch_list, progress=progress),
        )
        grads = dict(stats)
        calibration = dict(counts)
        calibration.update(source="seeded subset of the training split (B5)", requested=config.calibration_samples)

    return grads, calibration


def _set_routes(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: dict[str, _Layer],
    frozen: dict[str, _Layer],
    warnings: list[str],
) -> None:
    """Step 3 (§7): how each layer's input channels are gathered or thinned at their producers."""
    consumers, producers = list(layers), [*layers, *frozen]
    routes, note = memoized(
        "cc routes",
        lambda: fingerprint(model, example_input, consumers, producers),
        lambda: input_routes(model, example_input, consumers, producers=producers),
    )
    if note:
        warnings.append(note)
    for path, route in routes.items():
        layers[path].route = route
        layers[path].norm_params = sum(2 for n in route.norms if model.get_submodule(n).affine)


def _fit_curves(
    layers: dict[str, _Layer],
    grads: dict[str, torch.Tensor | None],
    config: CollaborativeConfig,
    progress: bool | None,
    warnings: list[str],
    model_name: str,
) -> list[_Layer]:
    """Step 4 (§4): each layer's sensitivity curve and exponential fit; the layers with a usable fit (b > 0)."""
    bar = Progress(len(layers), "cc sensitivity curves", unit="layer", enabled=progress)
    for layer in layers.values():
        c, loss = _curve(layer, grads[layer.path], config)
        layer.points = int(c.size)
        layer.log_a, layer.b = fit_exponential(c, loss)
        if not (math.isfinite(layer.b) and layer.b > 0 and math.isfinite(layer.log_a)):
            layer.fallback = (
                f"sensitivity fit gave b = {layer.b:.3g} (needs b > 0; {layer.points} curve points): the loss does "
                "not grow with the compression rate, so the layer is left out of the rate optimisation (f_l = 0)"
            )
        bar.update(1)
    bar.close()
    fitted = [layer for layer in layers.values() if layer.fallback is None]
    for layer in layers.values():
        if layer.fallback is not None:
            warnings.append(f"cc: {layer.path}: {layer.fallback}")
    if not fitted:
        raise CompressionError(
            f"no layer of {model_name} has a usable sensitivity fit (b > 0); the weights (or gradients) are degenerate"
        )
    return fitted


def _allocate_flops(
    config: CollaborativeConfig,
    fitted: list[_Layer],
    everything: dict[str, _Layer],
    solve: Callable[[float], tuple[np.ndarray, float]],
    decide_all: Callable[[np.ndarray], dict[str, LayerDecision]],
    run_heuristic: Callable[[_Layer, float], None],
    heuristic: Progress,
    total_params: int,
    total_macs: int,
    most: float,
) -> tuple[float, np.ndarray, float, dict[str, LayerDecision]]:
    """Steps 5–6 for ``FLOPS``: the rates for the MACs budget, then each layer's heuristic (§5, §6).

    Returns:
        The budget T, the per-layer rates f, log x and the decisions.
    """
    budget = config.flops * total_macs
    if budget > most:
        raise CompressionError(
            f"FLOPS={config.flops:g} is not reachable for cc: the compressible convs can remove at most "
            f"{100 * most / total_macs:.1f}% of the model's MACs ({100 * MAX_RATE:g}% of each); lower FLOPS"
        )
    f, log_x = solve(budget)
    heuristic.total = int((f > 0).sum())
    for layer, fl in zip(fitted, f, strict=True):
        if fl > 0:  # f_l only falls with T: these trajectories answer every smaller budget too
            run_heuristic(layer, float(fl))
    decisions = decide_all(f)
    if config.flops_measure == "model":
        # producer thinning removes MACs the layers' own accounting (§2) does not see: the smallest
        # budget whose compressed model meets the target in count_macs terms
        goal = (1.0 - config.flops) * total_macs
        lo, hi = 0.0, budget
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            f_mid, log_mid = solve(mid)
            d_mid = decide_all(f_mid)
            if _totals(everything, d_mid, total_params, total_macs)[1] <= goal:
                hi, f, log_x, decisions = mid, f_mid, log_mid, d_mid
            else:
                lo = mid
            if hi - lo <= 1e-9 * budget:
                break
        budget = hi
    return budget, f, log_x, decisions


def _allocate_ratio(
    config: CollaborativeConfig,
    fitted: list[_Layer],
    everything: dict[str, _Layer],
    solve: Callable[[float], tuple[np.ndarray, float]],
    decide_all: Callable[[np.ndarray], dict[str, LayerDecision]],
    run_heuristic: Callable[[_Layer, float], None],
    total_params: int,
    total_macs: int,
    most: float,
    warnings: list[str],
) -> tuple[float, np.ndarray, float, dict[str, LayerDecision]]:
    """Steps 5–6 for ``RATIO``: every layer's full trajectory, then the smallest budget meeting the ratio.

    Returns:
        The budget T, the per-layer rates f, log x and the decisions.
    """
    assert config.ratio is not None
    for layer in fitted:
        run_heuristic(layer, layer.cap * layer.shape.dense_macs)
    goal = total_params / config.ratio

    def params_at(budget: float) -> tuple[int, np.ndarray, float, dict[str, LayerDecision]]:
        f, log_x = solve(budget)
        d = decide_all(f)
        return _totals(everything, d, total_params, total_macs)[0], f, log_x, d

    top = params_at(most)
    if top[0] > goal:
        raise CompressionError(
            f"RATIO={config.ratio:g} is not reachable for cc: at the largest FLOPs reduction "
            f"({100 * most / total_macs:.1f}%) the model keeps {top[0]:,} parameters (×{total_params / top[0]:.2f}); "
            "lower RATIO or use FLOPS="
        )
    lo, hi, best = 0.0, most, top
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        got = params_at(mid)
        if got[0] <= goal:
            hi, best = mid, got
        else:
            lo = mid
        if hi - lo <= 1e-9 * most:
            break
    budget = hi
    _, f, log_x, decisions = best
    achieved = total_params / best[0]
    if abs(achieved / config.ratio - 1) > 0.03:
        warnings.append(
            f"cc: RATIO={config.ratio:g} met only as ×{achieved:.3f} (more than 3% off): the per-layer "
            "decisions are discrete at this size"
        )
    return budget, f, log_x, decisions


def _curve(layer: _Layer, grad: torch.Tensor | None, config: CollaborativeConfig) -> tuple[np.ndarray, np.ndarray]:
    """The layer's sensitivity curve (kept across the knob values of a latency solve: it does not depend on them)."""
    weight = layer.module.weight

    def compute() -> tuple[np.ndarray, np.ndarray]:
        with one_thread():
            return sensitivity_curve(
                weight, grad, layer.shape, prune=config.prune, decompose=config.decompose, points=config.curve_points
            )

    return memoized(
        "cc sensitivity",
        lambda: (fingerprint(weight, grad), repr(layer.shape), config.prune, config.decompose, config.curve_points),
        compute,
    )


def _layer_entry(layer: _Layer, layers: dict[str, _Layer], out_kept: dict[str, int]) -> LayerPlan:
    d, s = layer.decision, layer.shape
    kept = s.in_channels - len(d.pruned)
    in_keep = sorted(set(range(s.in_channels)) - set(d.pruned)) if d.pruned else None
    consumer = next(
        (c for c in layers.values() if c.route.producer == layer.path and c.decision.pruned),
        None,
    )
    out_keep = sorted(set(range(s.out_channels)) - set(consumer.decision.pruned)) if consumer else None
    out = out_kept.get(layer.path)
    if d.rank is not None:
        action, reason = DECOMP, None
    elif d.pruned or out_keep is not None:
        action, reason = PRUNE, None
    else:
        action = KEEP
        reason = layer.fallback or (
            "cc target f_l = 0: untouched" if layer.f <= 0 else "cc: no unit removed (target below one unit)"
        )
    R = s.full_rank
    info: dict[str, Any] = {
        "R": R,
        "e": 0 if d.rank is None else R - d.rank,
        "in_keep": in_keep,
        "pruned": len(d.pruned),
        "pruned_order": list(d.pruned),
        "input": "full" if not d.pruned else layer.route.kind,
        "producer": layer.route.producer if d.pruned and layer.route.kind == "thinned" else None,
        "through": list(layer.route.norms) if d.pruned and layer.route.kind == "thinned" else [],
        "route": layer.route.kind,
        "out_keep": out_keep,
        "out_norms": list(consumer.route.norms) if consumer else [],
        "thinned_by": consumer.path if consumer else None,
        "f_target": layer.f,
        "f_target_rate": layer.f / s.dense_macs,
        "cap_rate": layer.cap,
        "reduction": d.reduction,
        "reduction_rate": d.reduction / s.dense_macs,
        "reached": d.reached,
        "fit": {
            "a": math.exp(layer.log_a) if math.isfinite(layer.log_a) and layer.log_a < 700 else None,
            "log_a": layer.log_a if math.isfinite(layer.log_a) else None,
            "b": layer.b if math.isfinite(layer.b) else None,
            "points": layer.points,
        },
        "fallback": layer.fallback,
        "frozen": layer.frozen,
        "pruning_only_switch": d.switched,
        "removals": d.removals,
        "interval": layer.trajectory.interval if layer.trajectory else None,
        "steps": layer.trajectory.steps if layer.trajectory else 0,
    }
    return LayerPlan(
        path=layer.path,
        type="Conv2d",
        shape=list(layer.module.weight.shape),
        action=action,
        ranks=None if d.rank is None else [int(d.rank)],
        reason=reason,
        params_before=layer_params(layer.module),
        params_after=s.params(kept, d.rank, out),
        macs_before=s.dense_macs,
        macs_after=s.macs(kept, d.rank, out),
        in_hw=hw_list(layer.geometry.in_hw),
        out_hw=hw_list(layer.geometry.out_hw),
        info=info,
    )
