"""Solving and applying LRSD plans: per-layer solves on calibration statistics, in forward order.

:func:`lrsd_compress_` plans (or takes a saved plan), gathers each layer's statistics — asymmetric: from the
partly compressed model paired with the dense one; symmetric: from the dense model in Gram-size-bounded
groups —, solves, records the facts in the plan and installs :class:`LowRankSparse` modules.
:func:`apply_lrsd` is the data-free applier (``empty`` shapes, or the weight-only fit);
:func:`sensitivity_sweep` measures per-layer error versus ratio.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from compress.factorizations import LayerGeometry
from compress.methods.lrsd.budget import card_for, card_limit, matrix_dims
from compress.methods.lrsd.module import LowRankSparse
from compress.methods.lrsd.planner import (
    METHOD,
    WEIGHT_ONLY_WARNING,
    LowRankSparseConfig,
    layer_entry,
    plan_lrsd,
    retotal,
)
from compress.methods.lrsd.solver import solve_lrsd
from compress.methods.lrsd.statistics import LayerStats, collect_stats, data_problem, response_error, weight_matrix
from compress.metrics import count_macs, count_params, trace_geometry
from compress.planning import layer_progress, planned_module, relative_error, set_submodule
from compress.reuse import fingerprint, memoized
from lowrank_core.errors import UserInputError

if TYPE_CHECKING:
    from torch import nn

    from compress.plan import LayerPlan, Plan
    from compress.planning import FilterFn

__all__ = ["MAX_STATS_BYTES", "apply_lrsd", "lrsd_compress_", "sensitivity_sweep"]


def _solver_options(cfg: LowRankSparseConfig) -> dict[str, Any]:
    return {
        "s_step": cfg.s_step,
        "structured": cfg.structured,
        "tol": cfg.tol,
        "power": cfg.power,
        "godec_iters": cfg.godec_iters,
        "cg_iters": cfg.cg_iters,
        "seed": cfg.seed,
    }


def _solve_layer(
    module: nn.Module,
    entry: LayerPlan,
    stats: LayerStats | None,
    cfg: LowRankSparseConfig,
    *,
    search: bool,
    note: Callable[[str], None] | None = None,
) -> LowRankSparse:
    """Solve one layer (optionally searching the r/c split), record the facts in ``entry``, build the module.

    ``note(text)`` is told each split trial and the final solve (progress of a long layer).
    """
    say = note or (lambda _text: None)
    W = weight_matrix(module).to(torch.float64)
    target, metric = data_problem(W, stats, cfg.lam)
    m, k, _, taps = matrix_dims(module)
    opts = _solver_options(cfg)
    rank = int(entry.ranks[0]) if entry.ranks else 0
    card = int(entry.info["cardinality"])
    budget = int(entry.info["budget"])
    max_card = card_limit(module, cfg.structured)
    trials: list[dict[str, Any]] = []
    if search:
        r_max = min(budget // (m + k), m, k)
        grid = sorted({round(i * r_max / (cfg.split_grid - 1)) for i in range(cfg.split_grid)})
        best = None
        for r in grid:
            c = card_for(m, k, budget, r, charge_index=cfg.charge_index, max_card=max_card)
            if r == 0 and c == 0:
                continue
            say(f"{entry.path}: split trial r={r}, c={c}")
            res = solve_lrsd(target, r, c, metric=metric, taps=taps, iters=cfg.split_iters, **opts)
            err = response_error(W, res.approx, stats)
            trials.append({"rank": r, "cardinality": c, "response_error": err})
            if best is None or err < best[0]:
                best = (err, r, c)
        if best is not None:
            rank, card = best[1], best[2]
    say(f"{entry.path}: final solve r={rank}, c={card}")
    result = solve_lrsd(target, rank, card, metric=metric, taps=taps, iters=cfg.iters, **opts)
    card = int((result.S != 0).sum()) if card else 0
    if search or card != int(entry.info["cardinality"]):
        geom = LayerGeometry(
            in_hw=tuple(entry.in_hw) if entry.in_hw else None,  # type: ignore[arg-type]
            out_hw=tuple(entry.out_hw) if entry.out_hw else None,  # type: ignore[arg-type]
        )
        new = layer_entry(entry.path, module, geom, rank, card, entry.info["layer_ratio"], budget, cfg.structured)
        entry.ranks, entry.params_after, entry.macs_after, entry.info = (
            new.ranks,
            new.params_after,
            new.macs_after,
            new.info,
        )
    approx = result.approx
    entry.rel_error = relative_error(W, approx)
    entry.info.update(
        response_error=response_error(W, approx, stats),
        objective=[result.history[0], result.history[-1]],
        iterations=result.iterations,
        converged=result.converged,
        weight_only=stats is None,
    )
    if trials:
        entry.info["split_trials"] = trials
    replacement = LowRankSparse.from_factors(module, result.U, result.V, result.S)
    replacement.train(module.training)
    return replacement


def apply_lrsd(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Applier for ``lrsd`` plans: ``empty`` builds the shapes; ``decompose`` solves the weight-only problem.

    The data-aware fit needs calibration statistics: :func:`lrsd_compress_` (or the method's ``apply_`` /
    ``rebuild_`` with ``data``) does it. ``decompose`` here appends the weight-only warning to ``plan.warnings``.
    """
    cfg = LowRankSparseConfig.from_dict(plan.config)
    if init == "decompose" and plan.factorized_layers and WEIGHT_ONLY_WARNING not in plan.warnings:
        plan.warnings.append(WEIGHT_ONLY_WARNING)
    for entry in plan.factorized_layers:
        module = planned_module(model, entry, plan)
        if init == "empty":
            rank = int(entry.ranks[0]) if entry.ranks else 0
            new = LowRankSparse.build(module, rank, int(entry.info.get("cardinality", 0)))
            new.train(module.training)
        else:
            new = _solve_layer(module, entry, None, cfg, search=False)
        set_submodule(model, entry.path, new)
    return model


MAX_STATS_BYTES = 2 * 2**30
"""Largest total size of the float64 Gram matrices held at once in symmetric mode (more → several passes)."""


def _stat_groups(model: nn.Module, paths: list[str]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for path in paths:
        k = matrix_dims(model.get_submodule(path))[1]
        need = 8 * k * k
        if groups[-1] and size + need > MAX_STATS_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += need
    return [g for g in groups if g]


def _stats(
    model: nn.Module,
    paths: list[str],
    batches: list[torch.Tensor],
    reference: nn.Module | None,
    config: LowRankSparseConfig,
    progress: bool | None = None,
) -> dict[str, LayerStats]:
    """:func:`collect_stats`, kept across the knob values of a latency solve for the same weights and images.

    Symmetric statistics (dense model only) are computed once per solve; asymmetric ones are found again
    only where the compressed prefix is the same (the first compressed layer always).
    """
    return memoized(
        "lrsd statistics",
        lambda: (fingerprint(model, reference, batches), tuple(paths), config.positions_per_image, config.seed),
        lambda: collect_stats(
            model,
            paths,
            batches,
            reference=reference,
            positions_per_image=config.positions_per_image,
            seed=config.seed,
            progress=progress,
        ),
    )


def lrsd_compress_(
    model: nn.Module,
    config: LowRankSparseConfig,
    example_input: torch.Tensor,
    calibration_batches: Iterable[torch.Tensor] | None,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
    plan: Plan | None = None,
    progress: bool | None = None,
) -> Plan:
    """Plan, calibrate, solve and apply LRSD in place; return the plan with per-layer facts.

    Layers are processed in forward order. In ``asymmetric`` mode each layer's statistics come from the
    model whose earlier layers are already compressed (paired with the dense model's inputs at the same
    images and positions); in ``symmetric`` mode all statistics come from the dense model in one pass.
    With ``config.split == "search"`` each layer's r/c split is chosen on the calibration objective and
    the plan entries are updated (so the saved plan rebuilds the same shapes with ``init="empty"``).

    Args:
        model: The dense model; modified in place.
        config: The method config.
        example_input: One input batch (shapes and MACs).
        calibration_batches: Input batches of the calibration sample (materialised once; e.g.
            :func:`calibration_batches`), or ``None`` for the weight-only fallback.
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; False leaves the layer dense.
        plan: Re-solve this (saved) plan's layers instead of planning anew: its ranks and cardinalities
            are kept unless ``config.split == "search"``. ``config`` must be the plan's config
            (``LowRankSparseConfig.from_dict(plan.config)``).
        progress: Per-layer progress with ETA on stderr (``None``: a bar on a terminal, lines in a log; ``False``: off).

    Raises:
        UserInputError: empty ``calibration_batches``.
        CompressionError: the plan does not match the model, or the ratio is unreachable.
    """
    if plan is None:
        plan = plan_lrsd(model, config, example_input, model_name=model_name, filter_fn=filter_fn)
    elif plan.method != METHOD:
        raise UserInputError(f"lrsd_compress_ needs an lrsd plan, got method {plan.method!r}")
    total_params, total_macs = int(plan.totals["params_before"]), int(plan.totals["macs_before"])
    batches = None if calibration_batches is None else list(calibration_batches)
    if batches is not None and not batches:
        raise UserInputError("calibration_batches is empty; pass at least one batch or None for the weight-only fit")
    search = config.searches
    if batches is None:
        plan.warnings.append(WEIGHT_ONLY_WARNING)
        with layer_progress(len(plan.factorized_layers), "lrsd solve", enabled=progress) as bar:
            for entry in plan.factorized_layers:
                module = planned_module(model, entry, plan)
                set_submodule(
                    model, entry.path, _solve_layer(module, entry, None, config, search=search, note=bar.note)
                )
                bar.update(1)
    else:
        _, order, _ = trace_geometry(model, example_input)
        todo = [p for p in order if p in {e.path for e in plan.factorized_layers}]
        bar = layer_progress(len(todo), f"lrsd solve ({config.mode})", enabled=progress)
        if config.mode == "asymmetric":
            reference = copy.deepcopy(model)
            for path in todo:
                stats = _stats(model, [path], batches, reference, config, progress)[path]
                module = planned_module(model, plan.layer(path), plan)
                set_submodule(
                    model, path, _solve_layer(module, plan.layer(path), stats, config, search=search, note=bar.note)
                )
                bar.update(1)
        else:
            # symmetric: every layer sees dense inputs, so replacements are installed only at the end;
            # statistics are collected in groups whose float64 Grams fit in MAX_STATS_BYTES
            pending: dict[str, LowRankSparse] = {}
            for group in _stat_groups(model, todo):
                group_stats = dict(
                    _stats(model, group, batches, None, config, progress)
                )  # a copy: the entries are popped
                for path in group:
                    module = planned_module(model, plan.layer(path), plan)
                    pending[path] = _solve_layer(
                        module, plan.layer(path), group_stats.pop(path), config, search=search, note=bar.note
                    )
                    bar.update(1)
            for path, new in pending.items():
                set_submodule(model, path, new)
        bar.close()
        plan.target["calibration"] = {
            "images": sum(int(b.shape[0]) for b in batches),
            "mode": config.mode,
            "positions_per_image": config.positions_per_image,
        }
    retotal(plan, total_params, total_macs)
    plan.totals["params_after_measured"] = count_params(model)
    plan.totals["macs_after_measured"] = count_macs(model, example_input)
    return plan


def sensitivity_sweep(
    model: nn.Module,
    paths: Sequence[str],
    ratios: Sequence[float],
    calibration_batches: Iterable[torch.Tensor],
    config: LowRankSparseConfig | None = None,
    *,
    output_error: bool = False,
) -> dict[str, dict[float, dict[str, float]]]:
    """Per-layer error versus ratio, one layer compressed at a time (symmetric statistics of the dense model).

    Args:
        model: The dense model (not modified).
        paths: Conv2d/Linear layers to sweep.
        ratios: Layer compression ratios to try (each > 1).
        calibration_batches: Calibration input batches.
        config: Solver options (split rule, S-step, ...); defaults to :class:`LowRankSparseConfig`.
        output_error: Also measure the network's relative output error on the first calibration batch
            with only that layer replaced.

    Returns:
        ``{path: {ratio: {"response_error", "rank", "cardinality"[, "output_error"]}}}``; feed the chosen
        ratios back as ``LowRankSparseConfig(layer_ratios=...)``.
    """
    cfg = config or LowRankSparseConfig()
    batches = list(calibration_batches)
    stats = collect_stats(model, list(paths), batches, positions_per_image=cfg.positions_per_image, seed=cfg.seed)
    out: dict[str, dict[float, dict[str, float]]] = {}
    if output_error:
        with torch.no_grad():
            ref = model.eval()(batches[0]).double()
    for path in paths:
        module = model.get_submodule(path)
        m, k, _, _ = matrix_dims(module)
        out[path] = {}
        for ratio in ratios:
            if not ratio > 1.0:
                raise UserInputError(f"sensitivity ratios must be > 1, got {ratio}")
            budget = math.floor(m * k / ratio)
            rank, card = cfg.layer_split(module, budget)
            geom = LayerGeometry()
            entry = layer_entry(path, module, geom, rank, card, ratio, budget, cfg.structured)
            new = _solve_layer(module, entry, stats[path], cfg, search=cfg.searches)
            row = {
                "response_error": float(entry.info["response_error"]),
                "rank": float(entry.ranks[0]),  # type: ignore[index]
                "cardinality": float(entry.info["cardinality"]),
            }
            if output_error:
                set_submodule(model, path, new)
                try:
                    with torch.no_grad():
                        y = model(batches[0]).double()
                finally:
                    set_submodule(model, path, module)
                row["output_error"] = float((y - ref).norm() / ref.norm().clamp_min(1e-300))
            out[path][float(ratio)] = row
    return out
