"""Rank selection: per-layer rank rules driven by one global knob, bisected to hit a target ratio.

A :class:`RankRule` maps ``(candidate layer, knob)`` to continuous ranks; a larger knob always means
fewer parameters. :func:`select_ranks` rounds the ranks (to a multiple of ``round_to``, at least
``min_rank``), keeps a layer dense where factorizing it would not save parameters, and bisects the
knob so the *whole model* (every parameter, layers left alone included) lands on the target ratio.

Rules:
    * ``uniform`` — every candidate layer is compressed by the same factor ρ (the knob).
    * ``evbmf`` — MUSCO's weakened EVBMF rank ``R_full − ω (R_full − R_vbmf)`` (knob ω; method-vbmf-tucker.md §3.1).
    * ``energy`` — the smallest rank keeping a fraction ``e`` of the spectrum's energy (knob ``1 − e``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compress.evbmf import evbmf_from_singular_values
from compress.factorizations import Factorization, LayerGeometry
from lowrank_core.errors import CompressionError, UserInputError

__all__ = [
    "RANK_RULES",
    "Candidate",
    "RankRule",
    "RankSelection",
    "rank_rule",
    "round_ranks",
    "select_ranks",
]


@dataclass
class Candidate:
    """A layer that may be factorized, with what the rules need to know about it."""

    path: str
    module: nn.Module
    factorization: Factorization
    geometry: LayerGeometry
    params_dense: int
    macs_dense: int
    _spectra: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def max_ranks(self) -> tuple[int, ...]:
        """The factorization's exact ranks for this layer."""
        return self.factorization.max_ranks(self.module)

    def spectra(self) -> list[torch.Tensor]:
        """Singular values (descending, float64) of each rank-deciding matrix, computed once."""
        if self._spectra is None:
            values = []
            for mat in self.factorization.rank_matrices(self.module):
                m = mat.to(dtype=torch.float64, device="cpu")
                gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
                eig = torch.linalg.eigvalsh(gram).clamp_min(0).flip(0)
                values.append(eig.sqrt())
            self._spectra = values
        return self._spectra

    def matrix_shapes(self) -> list[tuple[int, int]]:
        """Shapes of the rank-deciding matrices."""
        return [tuple(m.shape) for m in self.factorization.rank_matrices(self.module)]  # type: ignore[misc]

    def cost(self, ranks: Sequence[int]) -> tuple[int, int]:
        """(params, MACs) of the factorized layer at integer ``ranks``."""
        r = tuple(int(v) for v in ranks)
        return self.factorization.params(self.module, r), self.factorization.macs(self.module, r, self.geometry)


class RankRule(ABC):
    """Continuous ranks for a candidate at a knob value; a larger knob means fewer parameters."""

    name: ClassVar[str]
    knob_name: ClassVar[str]

    @abstractmethod
    def knob_bounds(self, candidates: Sequence[Candidate]) -> tuple[float, float]:
        """The knob's range: ``lo`` compresses least, ``hi`` most."""

    @abstractmethod
    def continuous_ranks(self, candidate: Candidate, knob: float) -> tuple[float, ...]:
        """Ranks before rounding (they are clamped to ``[min_rank, max_rank]`` afterwards)."""

    def describe(self, candidate: Candidate) -> dict[str, object]:
        """Rule-specific facts recorded in the plan for this layer."""
        return {}

    def log_scale(self) -> bool:
        """Whether to bisect the knob on a log scale."""
        return False


RANK_RULES: dict[str, type[RankRule]] = {}


def _register(cls: type[RankRule]) -> type[RankRule]:
    RANK_RULES[cls.name] = cls
    return cls


@_register
class UniformRule(RankRule):
    """Every candidate keeps ``1/ρ`` of its parameters (before rounding); the knob is ρ."""

    name = "uniform"
    knob_name = "layer_ratio"

    def knob_bounds(self, candidates: Sequence[Candidate]) -> tuple[float, float]:
        return 1.0, 1e4

    def log_scale(self) -> bool:
        return True

    def continuous_ranks(self, candidate: Candidate, knob: float) -> tuple[float, ...]:
        fact, module = candidate.factorization, candidate.module
        budget = candidate.params_dense / knob
        full = candidate.max_ranks

        def params_at(frac: float) -> float:
            ranks = fact.ranks_at(module, frac)
            return _interp_params(fact, module, ranks)

        lo, hi = 0.0, 1.0
        if params_at(hi) <= budget:
            return tuple(float(v) for v in full)
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if params_at(mid) > budget:
                hi = mid
            else:
                lo = mid
        return fact.ranks_at(module, lo)


@_register
class ParamReductionRule(UniformRule):
    """MUSCO's direct rule for a layer ratio ρ (``estimate_rank_for_compression_rate``, spec §3.2–§3.3).

    Tucker-2: with aspect ``β = max(0.8·T/S, 1)`` solve ``kh·kw·β·R² + (S + β·T)·R − kh·kw·S·T/ρ = 0``,
    ``R_S = R``, ``R_T = β·R_S`` (MUSCO floors; here the caller rounds to the rank multiple). Other
    factorizations: ``R = params_dense / (params_at_rank_1 · ρ)``. The knob is ρ, as for ``uniform``.
    """

    name = "param-reduction"
    knob_name = "layer_ratio"

    def continuous_ranks(self, candidate: Candidate, knob: float) -> tuple[float, ...]:
        module, fact = candidate.module, candidate.factorization
        full = candidate.max_ranks
        if fact.name == "tucker2":
            t, s, kh, kw = module.weight.shape
            beta = max(0.8 * t / s, 1.0)
            a, b, c = kh * kw * beta, s + beta * t, -kh * kw * s * t / knob
            r_s = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
            return (min(beta * r_s, full[0]), min(r_s, full[1]))
        if len(full) == 1:
            per_rank = fact.weight_params(module, (1,))
            return (min(module.weight.numel() / (per_rank * knob), full[0]),)
        return super().continuous_ranks(candidate, knob)


@_register
class EnergyRule(RankRule):
    """The smallest rank keeping a fraction ``e`` of Σσ²; the knob is ``1 − e``."""

    name = "energy"
    knob_name = "discarded_energy"

    def knob_bounds(self, candidates: Sequence[Candidate]) -> tuple[float, float]:
        return 0.0, 1.0

    def continuous_ranks(self, candidate: Candidate, knob: float) -> tuple[float, ...]:
        keep = 1.0 - knob
        ranks = []
        for s in candidate.spectra():
            energy = (s**2).cumsum(0)
            total = float(energy[-1]) if energy.numel() else 0.0
            if total <= 0.0:
                ranks.append(1.0)
                continue
            idx = int(torch.searchsorted(energy / total, torch.tensor(keep - 1e-12, dtype=energy.dtype)))
            ranks.append(float(min(idx + 1, s.numel())))
        return tuple(ranks)


@_register
class EVBMFRule(RankRule):
    """MUSCO weakened EVBMF: ``R = R_full − ω (R_full − R_vbmf)``; the knob is ω (1 = plain EVBMF)."""

    name = "evbmf"
    knob_name = "omega"

    def __init__(self) -> None:
        self._vbmf: dict[str, tuple[int, ...]] = {}

    def vbmf_ranks(self, candidate: Candidate) -> tuple[int, ...]:
        """Raw EVBMF ranks of each rank-deciding matrix (0 = nothing above the noise level)."""
        if candidate.path not in self._vbmf:
            ranks = []
            for s, shape in zip(candidate.spectra(), candidate.matrix_shapes(), strict=True):
                ranks.append(evbmf_from_singular_values(s.numpy(), shape).rank)
            self._vbmf[candidate.path] = tuple(ranks)
        return self._vbmf[candidate.path]

    def knob_bounds(self, candidates: Sequence[Candidate]) -> tuple[float, float]:
        hi = 1.0
        for cand in candidates:
            for full, vb in zip(cand.max_ranks, self.vbmf_ranks(cand), strict=True):
                if 0 < vb < full:
                    hi = max(hi, full / (full - vb))
        return 0.0, hi

    def continuous_ranks(self, candidate: Candidate, knob: float) -> tuple[float, ...]:
        out = []
        for full, vb in zip(candidate.max_ranks, self.vbmf_ranks(candidate), strict=True):
            out.append(float(full) if vb == 0 else full - knob * (full - vb))
        return tuple(out)

    def describe(self, candidate: Candidate) -> dict[str, object]:
        return {"evbmf_ranks": list(self.vbmf_ranks(candidate))}

    def has_structure(self, candidates: Sequence[Candidate]) -> bool:
        """Whether EVBMF found anything above the noise level in at least one layer."""
        return any(any(v > 0 for v in self.vbmf_ranks(c)) for c in candidates)


def rank_rule(name: str) -> RankRule:
    """Instantiate a rank rule by name; unknown names list the known ones."""
    try:
        return RANK_RULES[name]()
    except KeyError:
        raise UserInputError(f"unknown rank rule {name!r}; known: {', '.join(sorted(RANK_RULES))}") from None


def round_ranks(ranks: Sequence[float], max_ranks: Sequence[int], *, round_to: int, min_rank: int) -> tuple[int, ...]:
    """Round each rank to the nearest multiple of ``round_to``, at least ``min_rank``, at most the max."""
    out = []
    for r, limit in zip(ranks, max_ranks, strict=True):
        q = max(1, round_to)
        value = round(r / q) * q
        value = max(value, min_rank, q)
        out.append(int(min(value, limit)))
    return tuple(out)


@dataclass
class RankSelection:
    """The outcome of :func:`select_ranks`."""

    ranks: dict[str, tuple[int, ...] | None]
    knob: float
    params_after: int
    target_params: float | None
    min_params: int
    info: dict[str, dict[str, object]]
    warnings: list[str]


def select_ranks(
    candidates: Sequence[Candidate],
    rule: RankRule,
    *,
    total_params: int,
    ratio: float | None,
    knob: float | None = None,
    round_to: int = 8,
    min_rank: int = 8,
    total_macs: int | None = None,
    flops: float | None = None,
) -> RankSelection:
    """Choose ranks for every candidate.

    Args:
        candidates: Layers that may be factorized.
        rule: The rank rule.
        total_params: Parameters of the whole dense model.
        ratio: Target whole-model parameter ratio (dense / compressed); ``None`` uses ``knob`` as given.
        knob: Fixed knob value when neither ``ratio`` nor ``flops`` is given.
        round_to: Ranks are rounded to a multiple of this.
        min_rank: Smallest rank allowed.
        total_macs: MACs of the whole dense model (needed with ``flops``).
        flops: Instead of ``ratio``: the fraction of the whole model's MACs to remove (0.5 = half). A layer
            is then kept dense where factorizing would not lower its MACs.

    Returns:
        The ranks (``None`` = keep dense), the knob used and the resulting parameter count.

    Raises:
        CompressionError: if ``ratio`` / ``flops`` exceeds what the model can reach with these candidates.
    """
    warnings: list[str] = []
    by_macs = flops is not None
    if by_macs and total_macs is None:
        raise ValueError("select_ranks(flops=...) needs total_macs")
    fixed_params = total_params - sum(c.params_dense for c in candidates)
    fixed_macs = (total_macs or 0) - sum(c.macs_dense for c in candidates)

    def choose(k: float) -> tuple[dict[str, tuple[int, ...] | None], int, int]:
        chosen: dict[str, tuple[int, ...] | None] = {}
        params_total, macs_total = fixed_params, fixed_macs
        for c in candidates:
            ranks = round_ranks(rule.continuous_ranks(c, k), c.max_ranks, round_to=round_to, min_rank=min_rank)
            params, macs = c.cost(ranks)
            if (macs >= c.macs_dense) if by_macs else (params >= c.params_dense):
                chosen[c.path] = None
                params_total += c.params_dense
                macs_total += c.macs_dense
            else:
                chosen[c.path] = ranks
                params_total += params
                macs_total += macs
        return chosen, params_total, macs_total

    def measure(k: float) -> int:
        _, params, macs = choose(k)
        return macs if by_macs else params

    lo, hi = rule.knob_bounds(candidates)
    _, min_params, min_macs = choose(hi)
    if ratio is None and not by_macs:
        if knob is None:
            raise UserInputError("give a target ratio or a knob value for the rank rule")
        chosen, params, _ = choose(knob)
        return RankSelection(chosen, knob, params, None, min_params, _info(rule, candidates), warnings)

    if by_macs:
        assert flops is not None
        assert total_macs is not None
        target = _reachable_flops_target(flops, total_macs, min_macs)
    else:
        assert ratio is not None
        target = _reachable_ratio_target(ratio, total_params, min_params)
    a, b = _bisect_knob(measure, lo, hi, target, log_scale=rule.log_scale())
    best_knob = b
    chosen, params, macs = choose(b)
    above, p_above, m_above = choose(a)
    got, got_above = (macs, m_above) if by_macs else (params, p_above)
    if abs(got_above - target) < abs(got - target):
        best_knob, chosen, params, got = a, above, p_above, got_above
    if by_macs:
        assert total_macs is not None
        assert flops is not None
        achieved_cut = 1.0 - got / total_macs
        if abs(got / target - 1.0) > 0.03:
            warnings.append(
                f"achieved FLOPs reduction {100 * achieved_cut:.1f}% misses the requested {100 * flops:g}% by more "
                f"than 3% of the remaining FLOPs: rank steps of {round_to} are too coarse; lower ROUND_TO"
            )
        return RankSelection(chosen, best_knob, params, None, min_params, _info(rule, candidates), warnings)
    achieved = total_params / params
    assert ratio is not None
    if abs(achieved / ratio - 1.0) > 0.03:
        warnings.append(
            f"achieved ratio ×{achieved:.3f} is more than 3% from the requested ×{ratio:g}: rank steps of "
            f"{round_to} are too coarse for this model; lower ROUND_TO to get closer"
        )
    return RankSelection(chosen, best_knob, params, target, min_params, _info(rule, candidates), warnings)


def _reachable_flops_target(flops: float, total_macs: int, min_macs: int) -> float:
    """The MACs to reach for ``FLOPS=flops``; raises when the smallest ranks cannot get within 3% of it."""
    target = total_macs * (1.0 - flops)
    if min_macs > target * 1.03:
        reachable = 1.0 - min_macs / total_macs
        raise CompressionError(
            f"FLOPS={flops:g} is not reachable: with the layers this method may compress (the rest kept dense) "
            f"the model keeps at least {min_macs:,} of {total_macs:,} MACs, i.e. at most "
            f"{100 * reachable:.1f}% fewer; ask for FLOPS≤{math.floor(reachable * 100) / 100:g} or include more layers"
        )
    return target


def _reachable_ratio_target(ratio: float, total_params: int, min_params: int) -> float:
    """The parameters to reach for ``RATIO=ratio``; raises when the smallest ranks cannot get within 3% of it."""
    target = total_params / ratio
    if min_params > target * 1.03:
        reachable = total_params / min_params
        raise CompressionError(
            f"ratio {ratio:g} is not reachable: with the layers this method may compress (the rest kept dense) "
            f"the model keeps at least {min_params:,} of {total_params:,} parameters, i.e. at most "
            f"×{reachable:.2f}; ask for RATIO≤{math.floor(reachable * 100) / 100:g} or include more layers"
        )
    return target


def _bisect_knob(
    measure: Callable[[float], int], lo: float, hi: float, target: float, *, log_scale: bool
) -> tuple[float, float]:
    """The knob values ``(a, b)`` bracketing ``target``: ``measure(a) > target >= measure(b)`` (or ``a == b``).

    Params and MACs are non-increasing in the knob; the bisection runs on ``log(knob)`` when ``log_scale``.
    """
    scale: Callable[[float], float]
    unscale: Callable[[float], float]
    if log_scale:
        scale, unscale = math.log, math.exp
    else:

        def scale(x: float) -> float:
            return x

        unscale = scale
    a, b = scale(lo), scale(hi)
    if measure(unscale(a)) <= target:
        b = a
    for _ in range(60):
        if b - a < 1e-9 * max(1.0, abs(b)):
            break
        mid = 0.5 * (a + b)
        if measure(unscale(mid)) > target:
            a = mid
        else:
            b = mid
    return unscale(a), unscale(b)


def _info(rule: RankRule, candidates: Sequence[Candidate]) -> dict[str, dict[str, object]]:
    return {c.path: rule.describe(c) for c in candidates}


def _interp_params(fact: Factorization, module: nn.Module, ranks: Sequence[float]) -> float:
    """Parameters at non-integer ranks (the cost formulas are polynomials, so evaluate them at floats)."""
    return float(fact.params(module, tuple(ranks)))  # type: ignore[arg-type]
