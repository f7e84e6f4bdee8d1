"""Multiple-choice knapsack by Lagrangian bisection: one choice per group, least total error within a budget.

Each group (a layer) has options ``(cost, error)``; pick one per group minimising ``Σ error`` subject to
``Σ cost ≤ budget``. For a multiplier ``λ ≥ 0`` every group independently takes ``argmin error + λ·cost``; the
total cost falls as ``λ`` grows, so ``λ`` is bisected to the smallest value whose choice fits. A choice
made this way is optimal among all choices costing no more than it does (the Lagrangian sufficiency
theorem); the slack it may leave below the budget is then spent greedily on the upgrades that buy the most
error per unit of cost (still within the budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lowrank_core.errors import UserInputError

__all__ = ["Option", "Solution", "lagrangian_choice", "solve_mckp"]


@dataclass(frozen=True)
class Option:
    """One option of a group: its cost (ms, params or MACs) and its error."""

    cost: float
    error: float


@dataclass(frozen=True)
class Solution:
    """The chosen option index of every group, with the totals and the multiplier that chose them."""

    choice: tuple[int, ...]
    cost: float
    error: float
    lam: float


def lagrangian_choice(groups: Sequence[Sequence[Option]], lam: float) -> tuple[int, ...]:
    """Per group, ``argmin error + λ·cost`` (ties to the cheaper option)."""
    return tuple(min(range(len(g)), key=lambda j, g=g: (g[j].error + lam * g[j].cost, g[j].cost)) for g in groups)


def _totals(groups: Sequence[Sequence[Option]], choice: Sequence[int]) -> tuple[float, float]:
    return (
        sum(g[j].cost for g, j in zip(groups, choice, strict=True)),
        sum(g[j].error for g, j in zip(groups, choice, strict=True)),
    )


def solve_mckp(groups: Sequence[Sequence[Option]], budget: float, *, iters: int = 100) -> Solution:
    """Least total error with total cost ≤ ``budget``, one option per group.

    Raises:
        UserInputError: a group has no option, or even the cheapest choice of every group exceeds the budget
            (the message gives that cheapest total).
    """
    if any(len(g) == 0 for g in groups):
        raise UserInputError("every layer needs at least one option (keep)")
    cheapest = tuple(min(range(len(g)), key=lambda j, g=g: (g[j].cost, g[j].error)) for g in groups)
    min_cost, _ = _totals(groups, cheapest)
    if min_cost > budget * (1 + 1e-12) + 1e-12:
        raise UserInputError(f"budget {budget:.6g} is below the cheapest choice's {min_cost:.6g}")
    best = lagrangian_choice(groups, 0.0)
    if _totals(groups, best)[0] > budget:
        lo, hi = 0.0, 1.0
        while _totals(groups, lagrangian_choice(groups, hi))[0] > budget:
            hi *= 2.0
            if hi > 1e300:
                best = cheapest
                break
        else:
            for _ in range(iters):
                mid = math.sqrt(lo * hi) if lo > 0 else hi / 2.0
                if _totals(groups, lagrangian_choice(groups, mid))[0] > budget:
                    lo = mid
                else:
                    hi = mid
                if hi - lo <= 1e-12 * hi:
                    break
            best = lagrangian_choice(groups, hi)
        best = _fill(groups, list(best), budget)
        lam = hi
    else:
        lam = 0.0
    cost, error = _totals(groups, best)
    return Solution(choice=tuple(best), cost=cost, error=error, lam=lam)


def _fill(groups: Sequence[Sequence[Option]], choice: list[int], budget: float) -> tuple[int, ...]:
    """Spend the slack on the upgrades with the best error saved per extra cost that still fit."""
    cost, _ = _totals(groups, choice)
    while True:
        best, best_rate = None, 0.0
        for i, g in enumerate(groups):
            now = g[choice[i]]
            for j, o in enumerate(g):
                gain, extra = now.error - o.error, o.cost - now.cost
                if gain <= 0 or cost + extra > budget:
                    continue
                rate = math.inf if extra <= 0 else gain / extra
                if rate > best_rate:
                    best, best_rate = (i, j, extra), rate
        if best is None:
            return tuple(choice)
        i, j, extra = best
        choice[i] = j
        cost += extra
