"""Empirical variational Bayesian matrix factorization (EVBMF) rank selection.

Implements the global analytic EVB solution of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 14, 2013) as
specified in ``docs/method-vbmf-tucker.md`` §1: the exact threshold constant τ̄ (§1.2), the noise variance σ²
by minimizing the free energy Ω(σ²) over [σ²_lb, σ²_ub] (§1.3), the threshold γ_EVB = σ·sqrt(M·x̄) and the
singular-value shrinkage. Also the per-mode ranks of a conv kernel (§2.1) and MUSCO's weakened rank (§3.1).

Only singular values are ever computed (never U or V), so a 4096 × 25088 FC matrix costs O(L²M) time and
O(LM) memory. Everything is computed in float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from lowrank_core.errors import CompressionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EVBMFResult",
    "conv_evbmf_ranks",
    "evbmf",
    "evbmf_from_singular_values",
    "evbmf_tau_bar",
    "weakened_rank",
]

_TAU_BAR_APPROX = 2.5129  # reference-code constant: τ̄ ≈ 2.5129·√α (§1.2)
_TAU_BAR_UPPER = 1e3  # right end of the Brent bracket for Ψ (§1.2)
_GRID_POINTS = 200  # log-spaced Ω evaluations before the bounded Brent refinement (§1.3)
_LB_FLOOR = 1e-14  # σ²_lb is floored at this fraction of σ²_ub (exactly rank-deficient inputs give lb = 0)
_LOG_XATOL = 1e-10  # Brent tolerance on ln σ², i.e. a relative tolerance on σ²


@dataclass(frozen=True)
class EVBMFResult:
    """Outcome of EVBMF on one matrix (§1.2–§1.4).

    Attributes:
        rank: Number of singular values strictly above ``threshold``.
        sigma2: Estimated (or given) noise variance σ².
        threshold: γ_EVB = σ·sqrt(M·x̄).
        singular_values: γ_h in descending order (read-only).
        shrunk: EVB estimates γ̂_h, zero beyond ``rank`` (read-only).
        tau_bar: τ̄ used for the threshold.
        shape: (L, M) after transposition, L ≤ M.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray
    shrunk: np.ndarray
    tau_bar: float
    shape: tuple[int, int]


def _phi(z: float) -> float:
    """Φ(z) = ln(1+z)/z − 1/2 (§1.2)."""
    return math.log1p(z) / z - 0.5


def _psi(tau: float, alpha: float) -> float:
    """Ψ(τ) = Φ(τ) + Φ(τ/α); its zero above √α is τ̄ (§1.2)."""
    return _phi(tau) + _phi(tau / alpha)


@functools.lru_cache(maxsize=256)
def _tau_bar_exact(alpha: float) -> float:
    """Exact τ̄ by Brent's method on Ψ over (√α, 1e3) (§1.2)."""
    return float(brentq(_psi, math.sqrt(alpha), _TAU_BAR_UPPER, args=(alpha,), xtol=1e-15, maxiter=500))


def evbmf_tau_bar(alpha: float, *, exact: bool = True) -> float:
    """Return τ̄, the EVB threshold constant for aspect ratio α = L/M (§1.2).

    Args:
        alpha: Aspect ratio L/M in (0, 1].
        exact: Solve Ψ(τ̄) = 0 exactly; if False return the reference code's 2.5129·√α bit for bit.

    Returns:
        τ̄ > √α.

    Raises:
        CompressionError: If ``alpha`` is not in (0, 1].
    """
    alpha = float(alpha)
    if not (0.0 < alpha <= 1.0):
        raise CompressionError(f"EVBMF aspect ratio alpha must be in (0, 1], got {alpha!r}")
    if not exact:
        return _TAU_BAR_APPROX * math.sqrt(alpha)
    return _tau_bar_exact(alpha)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """τ(x) = ½[x − (1+α) + sqrt((x − (1+α))² − 4α)], the inverse of x = (1+τ)(1+α/τ) (§1.2)."""
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _omega(log_sigma2: float, gamma2: np.ndarray, big_l: int, big_m: int, resid: float, x_bar: float) -> float:
    """EVB free energy Ω(σ²) of §1.3 as a function of ln σ², up to the constant Σ_h ln γ_h².

    Writing x_h − ln x_h = x_h + ln(Mσ²) − ln γ_h² and dropping the σ²-free −ln γ_h² keeps the minimizer and
    stays finite for zero singular values.
    """
    sigma2 = math.exp(log_sigma2)
    alpha = big_l / big_m
    h = gamma2.size
    x = gamma2 / (big_m * sigma2)
    obj = float(x.sum()) + h * math.log(big_m * sigma2)
    kept = x[x > x_bar]
    if kept.size:
        t = _tau(kept, alpha)
        obj += float(np.sum(np.log1p(t) + alpha * np.log1p(t / alpha) - t))
    return obj + resid / (big_m * sigma2) + (big_l - h) * log_sigma2


def _estimate_sigma2(gamma: np.ndarray, big_l: int, big_m: int, resid: float, x_bar: float) -> float:
    """σ² = argmin Ω over [σ²_lb, σ²_ub]: 200-point log grid, then bounded Brent around the best (§1.3).

    The search runs on ln σ², so the optimizer tolerance is relative and the estimate scale-equivariant.
    """
    h = gamma.size
    gamma2 = gamma * gamma
    upper = (float(gamma2.sum()) + resid) / (big_l * big_m)
    if upper <= 0.0:
        return 0.0
    h_bar = min(-(-(big_l * big_m) // (big_l + big_m)) - 1, h)  # ceil(L/(1+α)) − 1, exact in integers
    idx = min(h_bar, h - 1)
    lower = max(float(gamma2[idx]) / (big_m * x_bar), float(gamma2[idx:].mean()) / big_m)
    lower = max(lower, upper * _LB_FLOOR)
    if lower >= upper:  # degenerate tiny matrices: lb > ub → lb = ub
        return upper

    args = (gamma2, big_l, big_m, resid, x_bar)
    grid = np.linspace(math.log(lower), math.log(upper), _GRID_POINTS)
    values = np.array([_omega(t, *args) for t in grid])
    best = int(np.argmin(values))
    lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, _GRID_POINTS - 1)])
    res = minimize_scalar(_omega, bounds=(lo, hi), args=args, method="bounded", options={"xatol": _LOG_XATOL})
    log_sigma2 = float(res.x) if float(res.fun) <= values[best] else float(grid[best])
    return math.exp(log_sigma2)


def _shrink(gamma: np.ndarray, sigma2: float, big_l: int, big_m: int) -> np.ndarray:
    """EVB shrinkage γ̂_h of the retained singular values (§1.2)."""
    r = 1.0 - (big_l + big_m) * sigma2 / gamma**2
    disc = np.maximum(r * r - 4.0 * big_l * big_m * sigma2**2 / gamma**4, 0.0)
    return 0.5 * gamma * (r + np.sqrt(disc))


def _check_sigma2(sigma2: float | None) -> float | None:
    if sigma2 is None:
        return None
    value = float(sigma2)
    if not (math.isfinite(value) and value > 0.0):
        raise CompressionError(f"EVBMF noise variance sigma2 must be a positive finite number, got {sigma2!r}")
    return value


def evbmf_from_singular_values(
    singular_values: np.ndarray,
    shape: tuple[int, int],
    *,
    sigma2: float | None = None,
    exact_tau: bool = True,
    residual_energy: float = 0.0,
) -> EVBMFResult:
    """Run EVBMF (§1.2–§1.4) on the singular values of a matrix of the given shape.

    Args:
        singular_values: The H ≤ min(shape) largest singular values γ_h (any order; sorted here).
        shape: Matrix shape in either orientation; it is reordered to (L, M) with L ≤ M.
        sigma2: Noise variance; estimated by minimizing Ω(σ²) (§1.3) when None.
        exact_tau: Use the exact τ̄ root; False uses the reference approximation 2.5129·√α.
        residual_energy: ||Y||_F² − Σ_h γ_h², the energy of the singular values left out (0 when H = L).

    Returns:
        The EVBMF rank, noise variance, threshold and shrunk singular values.

    Raises:
        CompressionError: On an invalid shape, empty/non-finite/negative singular values, more singular values
            than min(shape), a negative residual or a non-positive ``sigma2``.
    """
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise CompressionError(f"EVBMF shape must be a pair of positive integers, got {shape!r}") from None
    if len(dims) != 2 or min(dims) <= 0:
        raise CompressionError(f"EVBMF shape must be a pair of positive integers, got {shape!r}")
    big_l, big_m = min(dims), max(dims)

    gamma = np.asarray(singular_values, dtype=np.float64)
    if gamma.ndim != 1 or gamma.size == 0:
        raise CompressionError(f"EVBMF needs a non-empty 1-D array of singular values, got shape {gamma.shape}")
    if gamma.size > big_l:
        raise CompressionError(f"EVBMF got {gamma.size} singular values for a matrix of shape {dims}")
    if not np.all(np.isfinite(gamma)) or np.any(gamma < 0.0):
        raise CompressionError("EVBMF singular values must be finite and non-negative")
    resid = float(residual_energy)
    if math.isfinite(resid) and resid < 0.0 and -resid <= 1e-9 * float(np.sum(gamma * gamma)):
        resid = 0.0  # round-off of ||Y||_F² − Σγ² when (almost) all energy is in the given values
    if not (math.isfinite(resid) and resid >= 0.0):
        raise CompressionError(f"EVBMF residual_energy must be finite and non-negative, got {residual_energy!r}")
    sigma2_given = _check_sigma2(sigma2)

    gamma = np.sort(gamma)[::-1].copy()
    alpha = big_l / big_m
    tau_bar = evbmf_tau_bar(alpha, exact=exact_tau)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    noise = _estimate_sigma2(gamma, big_l, big_m, resid, x_bar) if sigma2_given is None else sigma2_given

    threshold = math.sqrt(big_m * noise * x_bar)
    rank = int(np.count_nonzero(gamma > threshold))
    shrunk = np.zeros_like(gamma)
    if rank:
        shrunk[:rank] = _shrink(gamma[:rank], noise, big_l, big_m)
    gamma.setflags(write=False)
    shrunk.setflags(write=False)
    return EVBMFResult(
        rank=rank,
        sigma2=float(noise),
        threshold=float(threshold),
        singular_values=gamma,
        shrunk=shrunk,
        tau_bar=float(tau_bar),
        shape=(big_l, big_m),
    )


def _as_float64(array: Any) -> np.ndarray:
    """Return a float64 NumPy copy/view of a NumPy array or torch tensor (detached, on CPU)."""
    if hasattr(array, "detach"):  # torch.Tensor, duck-typed so torch is not imported here
        array = array.detach().to(device="cpu").double().numpy()
    try:
        return np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CompressionError(f"EVBMF input cannot be converted to a float64 array: {exc}") from None


def evbmf(
    matrix: np.ndarray | torch.Tensor,
    *,
    sigma2: float | None = None,
    exact_tau: bool = True,
) -> EVBMFResult:
    """Run EVBMF on a matrix: transpose so L ≤ M, take its singular values, select the rank (§1.4).

    Args:
        matrix: 2-D NumPy array or torch tensor.
        sigma2: Noise variance; estimated (§1.3) when None.
        exact_tau: Use the exact τ̄ root; False uses the reference approximation 2.5129·√α.

    Returns:
        The EVBMF result; ``shape`` is (L, M) after transposition.

    Raises:
        CompressionError: If the matrix is not 2-D, empty or non-finite, or ``sigma2`` is invalid.
    """
    y = _as_float64(matrix)
    if y.ndim != 2:
        raise CompressionError(f"EVBMF needs a 2-D matrix, got an array of shape {y.shape}")
    if y.size == 0:
        raise CompressionError(f"EVBMF needs a non-empty matrix, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise CompressionError("EVBMF input matrix has non-finite entries")
    _check_sigma2(sigma2)
    if y.shape[0] > y.shape[1]:
        y = y.T
    gamma = np.linalg.svd(y, compute_uv=False)
    return evbmf_from_singular_values(gamma, y.shape, sigma2=sigma2, exact_tau=exact_tau)


def conv_evbmf_ranks(weight: torch.Tensor | np.ndarray, *, exact_tau: bool = True) -> tuple[int, int]:
    """(R_T, R_S) = EVBMF ranks of the mode-0 (T × S·kh·kw) and mode-1 (S × T·kh·kw) unfoldings (§0, §2.1).

    Args:
        weight: Conv kernel of shape (T, S, kh, kw), NumPy array or torch tensor.
        exact_tau: Use the exact τ̄ root; False uses the reference approximation 2.5129·√α.

    Returns:
        (R_T, R_S). A rank of 0 means nothing is above the noise level; callers keep the full dimension then.

    Raises:
        CompressionError: If the kernel is not 4-D, is empty or has non-finite entries.
    """
    w = _as_float64(weight)
    if w.ndim != 4:
        raise CompressionError(f"conv kernel must be 4-D (T, S, kh, kw), got shape {w.shape}")
    if w.size == 0:
        raise CompressionError(f"conv kernel must be non-empty, got shape {w.shape}")
    t, s = w.shape[:2]
    mode0 = w.reshape(t, -1)
    mode1 = np.transpose(w, (1, 0, 2, 3)).reshape(s, -1)
    return evbmf(mode0, exact_tau=exact_tau).rank, evbmf(mode1, exact_tau=exact_tau).rank


def weakened_rank(full_rank: int, vbmf_rank: int, omega: float, *, min_rank: int = 8) -> int:
    """MUSCO weakened rank R = int(R_full − ω·(R_full − R_vbmf)) with the reference rules (§3.1).

    Keeps ``full_rank`` if it is ≤ ``min_rank`` or if ``vbmf_rank`` is 0; otherwise clamps the result below at
    ``min_rank``. ω = 0 gives no compression, ω = 1 the EVBMF rank; ω > 1 is allowed (§3.3).

    Args:
        full_rank: Full dimension of the mode (T, S, or min(out, in) for SVD layers).
        vbmf_rank: EVBMF rank of the mode, in [0, full_rank].
        omega: Weakening factor ω ≥ 0.
        min_rank: Lower clamp r_min.

    Returns:
        The weakened rank.

    Raises:
        CompressionError: On negative or inconsistent ranks or a negative/non-finite ω.
    """
    if full_rank < 0 or min_rank < 0:
        raise CompressionError(f"ranks must be non-negative, got full_rank={full_rank}, min_rank={min_rank}")
    if not (0 <= vbmf_rank <= full_rank):
        raise CompressionError(f"vbmf_rank must be in [0, {full_rank}], got {vbmf_rank}")
    if not (math.isfinite(omega) and omega >= 0.0):
        raise CompressionError(f"weakening factor omega must be finite and >= 0, got {omega!r}")
    if full_rank <= min_rank or vbmf_rank == 0:
        return int(full_rank)
    rank = int(full_rank - omega * (full_rank - vbmf_rank))
    return max(rank, int(min_rank))
