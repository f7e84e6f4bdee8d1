"""CC's rate allocation: the global solver (spec §5) and the per-layer multi-step heuristic (spec §6)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compress.methods.cc.config import WEIGHTING
from compress.methods.cc.modules import ConvShape, layer_cost
from compress.methods.cc.scores import candidate_scores, channel_sum, unfold
from compress.reuse import fingerprint, memoized
from lowrank_core.errors import CompressionError, UserInputError

__all__ = [
    "HeuristicRun",
    "LayerDecision",
    "Trajectory",
    "allocate_reductions",
    "heuristic_trajectory",
    "layer_trajectory",
]


# ================================================================================================ global solver
def allocate_reductions(
    log_a: Sequence[float],
    b: Sequence[float],
    macs: Sequence[float],
    caps: Sequence[float],
    target: float,
    *,
    weighting: str = "slope",
    iterations: int = 200,
) -> tuple[np.ndarray, float]:
    """Per-layer MACs reductions ``f_l`` with ``Σ f_l = target`` (spec §5), by bisection on ``log x``.

    Equal slope: ``a_l b_l e^{b_l c_l} = x`` ⇒ ``c_l(x) = ln(x / (a_l b_l)) / b_l``; ``lagrangian``:
    ``= λ·F_l``. ``f_l = F_l · clip(c_l, 0, cap_l)`` is continuous and non-decreasing in ``log x``, so
    bisection meets the target to machine precision.

    Args:
        log_a: ``log a_l`` of each layer's fit.
        b: ``b_l > 0``.
        macs: ``F_l``, each layer's original MACs.
        caps: Largest rate of each layer (0.95, or less where the layer cannot reach it).
        target: ``T`` in MACs, ``0 ≤ T ≤ Σ cap_l F_l``.
        weighting: ``slope`` or ``lagrangian``.
        iterations: Bisection steps at most.

    Returns:
        ``(f, log x)``.

    Raises:
        CompressionError: ``target`` exceeds ``Σ cap_l F_l``.
    """
    la, bb = np.asarray(log_a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    Fl, cap = np.asarray(macs, dtype=np.float64), np.asarray(caps, dtype=np.float64)
    if weighting not in WEIGHTING:
        raise UserInputError(f"weighting must be one of {', '.join(WEIGHTING)}, got {weighting!r}")
    if la.size == 0 or not np.all(bb > 0):
        raise CompressionError("the rate optimisation needs at least one layer with a fitted slope b > 0")
    offset = la + np.log(bb)
    if weighting == "lagrangian":
        offset = offset - np.log(Fl)
    most = float(np.sum(Fl * cap))
    if target > most * (1 + 1e-12):
        raise CompressionError(f"the layers can remove at most {most:.6g} MACs, asked for {target:.6g}")

    def f(log_x: float) -> np.ndarray:
        return Fl * np.clip((log_x - offset) / bb, 0.0, cap)

    lo, hi = float(offset.min()), float((offset + cap * bb).max())
    if target <= 0:
        return np.zeros_like(Fl), lo
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        total = float(f(mid).sum())
        if abs(total - target) <= 1e-13 * target:
            lo = hi = mid
            break
        if total < target:
            lo = mid
        else:
            hi = mid
    return f(hi), hi


# ================================================================================================ heuristic
@dataclass(frozen=True)
class LayerDecision:
    """What the heuristic decided for one layer.

    Attributes:
        pruned: Removed input channels, in removal order.
        rank: Kept singular values ``r`` when decomposed, else ``None`` (single conv).
        reduction: Own-MACs reduction ``F₀ − F`` (all ``O`` outputs, §2 cost).
        removals: Units removed before the stop (0 = untouched).
        switched: The pruning-only stop discarded the decomposition.
        reached: The reduction meets the target.
    """

    pruned: tuple[int, ...] = ()
    rank: int | None = None
    reduction: int = 0
    removals: int = 0
    switched: bool = False
    reached: bool = True


@dataclass
class Trajectory:
    """The heuristic's removal sequence of one layer (independent of the target except where it stops).

    Every array has one entry per single removal; a target ``f`` stops at the first removal where the
    reduction reaches ``f`` or the pruning-only stop applies, so one trajectory (run to the largest
    target needed) answers every smaller target exactly (:meth:`decide`).
    """

    shape: ConvShape
    order: list[int]
    n_pruned: np.ndarray
    rank: np.ndarray
    decomposed: np.ndarray
    reduction: np.ndarray
    prune_only_reduction: np.ndarray
    interval: int
    steps: int
    channel_scores: np.ndarray

    def stop_index(self, target: float) -> int | None:
        """Index of the removal at which ``target`` stops the heuristic (``None``: never within the trajectory)."""
        if target <= 0 or self.reduction.size == 0:
            return None
        switch = (self.n_pruned > 0) & self.decomposed & (self.prune_only_reduction >= target)
        hit = (self.reduction >= target) | switch
        return int(np.argmax(hit)) if hit.any() else None

    def decide(self, target: float, round_to: int = 1) -> LayerDecision:
        """The layer after the heuristic with target ``target`` MACs (then rounded down to ``round_to``).

        When both stops apply at once, the pruning-only layer is chosen: same kept channels, no truncated
        spectrum, target met.
        """
        if target <= 0:
            return LayerDecision()
        t = self.stop_index(target)
        reached = t is not None
        if t is None:
            t = self.reduction.size - 1
            if t < 0:
                return LayerDecision(reached=False)
        npr = int(self.n_pruned[t])
        switched = bool(npr > 0 and self.decomposed[t] and self.prune_only_reduction[t] >= target)
        rank = int(self.rank[t]) if self.decomposed[t] and not switched else None
        pruned = list(self.order[:npr])
        if round_to > 1:
            pruned, rank = self._round(pruned, rank, round_to)
        kept = self.shape.in_channels - len(pruned)
        reduction = self.shape.dense_macs - self.shape.macs(kept, rank)
        return LayerDecision(
            pruned=tuple(pruned),
            rank=rank,
            reduction=int(reduction),
            removals=t + 1,
            switched=switched,
            reached=reached and reduction >= target,
        )

    def _round(self, pruned: list[int], rank: int | None, m: int) -> tuple[list[int], int | None]:
        n_in = self.shape.in_channels
        kept = n_in - len(pruned)
        if pruned and kept >= m and kept % m:
            extra = kept % m
            gone = set(pruned)
            rest = sorted((float(self.channel_scores[j]), j) for j in range(n_in) if j not in gone)
            pruned = pruned + [j for _, j in rest[:extra]]
            kept -= extra
        if rank is not None:
            rank = min(rank, kept * self.shape.taps, self.shape.out_channels)
            if rank >= m:
                rank -= rank % m
        return pruned, rank


class HeuristicRun:
    """The multi-step heuristic of one layer (spec §6), run only as far as asked and resumable.

    The removal sequence does not depend on the target: a target only decides where it stops. So one
    run, extended to the largest target asked so far (:meth:`extend`), answers every target with exactly
    the :class:`Trajectory` a fresh run to that target gives (:meth:`trajectory`). The latency solver keeps
    one run per layer across its knob values (:func:`layer_trajectory`).

    Args:
        weight: Original conv weight.
        grad: ``dL/dW`` (``None``: ``G ≡ 1``).
        shape: The layer's cost model (its output positions).
        gamma: Weight of the forward term.
        prune: Channel units take part.
        decompose: Singular-value units take part.
        exact_forward: Re-decompose each channel candidate for its forward term.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        grad: torch.Tensor | None,
        shape: ConvShape,
        *,
        gamma: float = 0.9,
        prune: bool = True,
        decompose: bool = True,
        exact_forward: bool = False,
    ) -> None:
        self.W = unfold(weight)
        self.G2 = torch.ones_like(self.W) if grad is None else unfold(grad) ** 2
        self.shape = shape
        self.options = {"gamma": gamma, "prune": prune, "decompose": decompose, "exact_forward": exact_forward}
        units = (shape.in_channels if prune else 0) + (shape.full_rank if decompose else 0)
        self.interval = max(1, math.floor(0.01 * units))
        self.mask = torch.ones(shape.in_channels, dtype=torch.bool)
        self.kept, self.rank, self.decomposed = shape.in_channels, shape.full_rank, False
        self.order: list[int] = []
        self.rows: list[tuple[int, int, bool, int, int]] = []
        self.row_step: list[int] = []
        self.steps = 0
        self.pending: list[int] = []  # units of the current step not removed yet
        self.exhausted = False  # no candidate left: every larger target ends here too
        self.channel_scores = channel_sum(self.G2 * self.W * self.W, shape.in_channels).numpy()

    def _stops(self, row: tuple[int, int, bool, int, int], target: float) -> bool:
        n_pruned, _, decomposed, red, pred = row
        return red >= target or (n_pruned > 0 and decomposed and pred >= target)

    def extend(self, target: float, on_step: Callable[[int, float], None] | None = None) -> None:
        """Run on until a removal meets ``target`` (or no candidate is left).

        ``on_step(steps, reached)`` is called after each scoring step with the share of ``target`` removed.
        """
        if target <= 0 or self.exhausted or any(self._stops(row, target) for row in self.rows):
            return
        shape, n_in, taps, n_out = self.shape, self.shape.in_channels, self.shape.taps, self.shape.out_channels
        F0 = shape.dense_macs
        while True:
            if not self.pending:
                chan, sv = candidate_scores(
                    self.W, self.G2, self.mask, self.rank, self.decomposed, taps=taps, **self.options
                )
                scores = torch.cat([chan, sv])
                ranked = torch.argsort(scores, stable=True)[: self.interval]
                self.pending = [int(u) for u in ranked if math.isfinite(float(scores[u]))]
                if not self.pending:
                    self.exhausted = True
                    return
                self.steps += 1
                if on_step is not None and self.rows:
                    on_step(self.steps, self.rows[-1][3] / target)
            while self.pending:
                u = self.pending.pop(0)
                if u < n_in:
                    if self.kept == 1:
                        continue
                    self.mask[u] = False
                    self.kept -= 1
                    self.order.append(u)
                    self.rank = min(self.rank, self.kept * taps, n_out)
                else:
                    if self.rank == 1:
                        continue
                    self.rank -= 1
                    self.decomposed = True
                red = F0 - layer_cost(shape, self.kept, self.rank, self.decomposed)
                pred = F0 - shape.macs(self.kept)
                row = (n_in - self.kept, self.rank, self.decomposed, red, pred)
                self.rows.append(row)
                self.row_step.append(self.steps)
                if self._stops(row, target):
                    return

    def trajectory(self, target: float, on_step: Callable[[int, float], None] | None = None) -> Trajectory:
        """The trajectory a fresh run of the heuristic to ``target`` gives (extending this run as needed)."""
        self.extend(target, on_step)
        end, steps = 0, 0
        if target > 0:
            hit = next((i for i, row in enumerate(self.rows) if self._stops(row, target)), None)
            end = len(self.rows) if hit is None else hit + 1
            steps = self.steps if hit is None else self.row_step[hit]
        arr = np.asarray(self.rows[:end], dtype=np.int64).reshape(-1, 5)
        n_pruned = int(arr[-1, 0]) if end else 0
        return Trajectory(
            shape=self.shape,
            order=list(self.order[:n_pruned]),
            n_pruned=arr[:, 0],
            rank=arr[:, 1],
            decomposed=arr[:, 2].astype(bool),
            reduction=arr[:, 3],
            prune_only_reduction=arr[:, 4],
            interval=self.interval,
            steps=steps,
            channel_scores=self.channel_scores,
        )


def heuristic_trajectory(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    shape: ConvShape,
    target: float,
    *,
    gamma: float = 0.9,
    prune: bool = True,
    decompose: bool = True,
    exact_forward: bool = False,
) -> Trajectory:
    """Run the multi-step heuristic of one layer until ``target`` MACs are removed (spec §6).

    Each step scores every remaining unit on the current state (:func:`unit_scores`) and removes the
    ``interval = max(1, ⌊0.01·(I + R)⌋)`` lowest-scoring ones one by one without re-scoring (channels:
    deleted; singular values: the smallest kept σ goes, B3); one channel and one singular value always
    stay. After each single removal the stop rules are checked: reduction ≥ target, or pruning-only
    (decomposition discarded) meets the target while channels are pruned and σ's removed.

    Args:
        weight: Original conv weight.
        grad: ``dL/dW`` (``None``: ``G ≡ 1``).
        shape: The layer's cost model (its output positions).
        target: Largest MACs reduction this trajectory must answer (e.g. the cap, to answer every target).
        gamma: Weight of the forward term.
        prune: Channel units take part.
        decompose: Singular-value units take part.
        exact_forward: Re-decompose each channel candidate for its forward term.
    """
    run = HeuristicRun(weight, grad, shape, gamma=gamma, prune=prune, decompose=decompose, exact_forward=exact_forward)
    return run.trajectory(target)


def layer_trajectory(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    shape: ConvShape,
    target: float,
    on_step: Callable[[int, float], None] | None = None,
    **options: Any,
) -> Trajectory:
    """:func:`heuristic_trajectory`, resuming the layer's kept :class:`HeuristicRun` inside a reuse scope.

    ``on_step`` as in :meth:`HeuristicRun.extend` (progress of a long layer).
    """
    run = memoized(
        "cc heuristic",
        lambda: (fingerprint(weight, grad), repr(shape), tuple(sorted(options.items()))),
        lambda: HeuristicRun(weight, grad, shape, **options),
    )
    return run.trajectory(target, on_step)
