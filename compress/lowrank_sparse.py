"""Low-rank + sparse decomposition (LRSD) of Conv2d/Linear layers, fitted to the layer's responses.

Yu, Liu, Wang, Tao, "On Compressing Deep Models by Low Rank and Sparse Decomposition" (CVPR 2017), as
specified in ``docs/method-lrsd.md``. Each planned layer's weight matrix ``W`` (``m × k``, the im2col view
``W.reshape(T, S·kh·kw)`` for convs) becomes ``L + S`` with ``rank(L) ≤ r`` and ``‖S‖₀ ≤ c``, minimising

    F(L, S) = ½ ‖Y − (L+S) X‖² + ½ λ ‖W − L − S‖²  =  ½ tr((W* − L − S) C_λ (W* − L − S)ᵀ) + const

with ``C_λ = X Xᵀ + λ I`` accumulated in float64 from a calibration sample and ``W* = (Y Xᵀ + λ W) C_λ⁻¹``
(``W* = W`` in symmetric mode). Without calibration data ``C = I``: the weight-only problem (plain GoDec).

Pieces, in file order:

* solver: :func:`solve_lrsd` (GoDec warm start, SVD-free bilateral L-step, GraSP or iterative
  hard-thresholding S-step with a conjugate-gradient refit, optional 2:4 structure, monotone objective);
* budget: :func:`layer_storage`, :func:`split_budget` (rank vs cardinality under a parameter budget);
* calibration: :class:`LayerStats`, :func:`collect_stats` (hooks accumulating ``X Xᵀ`` of unfolded
  patches batch by batch; symmetric, or paired dense/compressed inputs for the asymmetric mode);
* inference module: :class:`LowRankSparse` (``lowrank(x) + sparse(x)`` from stock Conv2d/Linear);
* method: :class:`LowRankSparseConfig`, its planner and applier, :func:`allocate_ratios`,
  :func:`sensitivity_sweep` and the one-call :func:`lrsd_compress_`.

No maintained library implements GoDec/GreBdec or a data-weighted low-rank + sparse solver in PyTorch
(tensorly's ``robust_pca`` is the nuclear/ℓ1-norm relaxation, not the rank/cardinality-constrained
problem, and has no data metric), so the solver is written here on top of ``torch.linalg``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.api import (
    FilterFn,
    _find_stem,
    _hw,
    _keep_entry,
    _layer_params,
    _set_submodule,
    check_flops,
    plan_compression,
    planned_module,
    register_applier,
    register_method,
    register_planner,
)
from compress.lowrank import LayerGeometry, dense_macs
from compress.metrics import count_macs, count_params, trace_geometry
from compress.plan import LayerPlan, Plan
from lowrank_deploy.errors import CompressionError, UserInputError

__all__ = [
    "MAX_STATS_BYTES",
    "WEIGHT_ONLY_WARNING",
    "LRSDResult",
    "LayerStats",
    "LowRankSparse",
    "LowRankSparseConfig",
    "allocate_ratios",
    "calibration_batches",
    "collect_stats",
    "data_problem",
    "layer_storage",
    "lrsd_compress_",
    "project_sparse",
    "response_error",
    "sensitivity_sweep",
    "solve_lrsd",
    "split_budget",
    "weight_matrix",
]

METHOD = "lrsd"
WEIGHT_ONLY_WARNING = (
    "no calibration data: solved the weight-only problem (C = I, plain GoDec + refinement) instead of "
    "reconstructing layer responses; pass calibration batches to lrsd_compress_ for the data-aware fit"
)


# ================================================================================================ solver
@dataclass
class LRSDResult:
    """Output of :func:`solve_lrsd`.

    Attributes:
        U: ``m × r`` factor with orthonormal columns (``m × 0`` when ``r = 0``).
        V: ``r × k`` factor; ``L = U @ V``.
        S: ``m × k`` sparse part stored densely (exact zeros off the support).
        history: Objective ``F`` after the warm start and after each outer iteration (non-increasing).
        iterations: Outer refinement iterations run.
        converged: Whether the relative-decrease test stopped the loop (not the iteration cap).
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    history: list[float]
    iterations: int
    converged: bool

    @property
    def L(self) -> torch.Tensor:
        """The low-rank part ``U V``."""
        return self.U @ self.V

    @property
    def approx(self) -> torch.Tensor:
        """``L + S``."""
        return self.U @ self.V + self.S


def project_sparse(
    A: torch.Tensor,
    card: int,
    *,
    structured: str = "none",
    taps: int = 1,
) -> torch.Tensor:
    """Support (bool mask) of the best ``card``-sparse approximation of ``A`` (largest ``|A|``).

    With ``structured="2:4"`` at most two entries of every group of four consecutive *input channels*
    are kept (columns ``s·taps + p`` with ``s = 4g..4g+3`` at a fixed kernel tap ``p``; for Linear,
    ``taps = 1`` and the groups are four consecutive input features). Top-2 per group followed by the
    global top-``card`` among those candidates is the exact projection (greedy is optimal on this
    laminar matroid).
    """
    m, k = A.shape
    mag = A.abs()
    if structured == "2:4":
        channels = k // taps
        grouped = mag.reshape(m, channels // 4, 4, taps)
        top2 = grouped.topk(2, dim=2).indices
        cand = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, top2, True).reshape(m, k)
        card = min(card, int(cand.sum()))
        mag = torch.where(cand, mag, torch.full_like(mag, -1.0))
    mask = torch.zeros(m * k, dtype=torch.bool, device=A.device)
    card = max(0, min(int(card), m * k))
    if card:
        mask[mag.reshape(-1).topk(card).indices] = True
    return mask.reshape(m, k)


class _Metric:
    """Right multiplication by the SPD data metric ``C`` (``None`` = identity) and the quadratic form."""

    def __init__(self, C: torch.Tensor | None) -> None:
        self.C = C

    def right(self, E: torch.Tensor) -> torch.Tensor:
        return E if self.C is None else E @ self.C

    def value(self, E: torch.Tensor) -> float:
        return 0.5 * float((self.right(E) * E).sum())

    def lam_max(self) -> float:
        if self.C is None:
            return 1.0
        return float(torch.linalg.eigvalsh(self.C)[-1])


def _orth(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(A, mode="reduced").Q


def _godec(
    target: torch.Tensor,
    rank: int,
    card: int,
    *,
    iters: int,
    power: int,
    eps: float,
    structured: str,
    taps: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GoDec (Zhou & Tao 2011, practical form of the reference ``GoDec.m``): returns ``(U, L, S)``.

    The bilateral random projection is warm-started from the previous iteration's right basis (a
    subspace iteration across GoDec iterations), which converges faster than fresh Gaussians.
    """
    m, k = target.shape
    norm = float(target.norm()) or 1.0
    Z = target.clone()
    Y2 = torch.randn(k, rank, generator=gen, dtype=target.dtype, device="cpu").to(target.device)
    L = torch.zeros_like(target)
    S = torch.zeros_like(target)
    U = target.new_zeros(m, 0)
    for _ in range(max(1, iters)):
        if rank:
            for _ in range(power + 1):  # re-orthonormalised each pass: stable over many GoDec iterations
                Y2 = _orth(Z.T @ _orth(Z @ Y2))
            Q = Y2
            ZQ = Z @ Q
            L = ZQ @ Q.T
            U = _orth(ZQ)
        T = target - L
        mask = project_sparse(T, card, structured=structured, taps=taps) if card else None
        S = T * mask if mask is not None else torch.zeros_like(T)
        E = T - S
        if float(E.norm()) / norm < eps or not rank:
            break
        Z = L + E
    return U, L, S


def _masked_cg(
    rhs_target: torch.Tensor,
    x0: torch.Tensor,
    mask: torch.Tensor,
    metric: _Metric,
    iters: int,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Minimise ``½ tr((R − P) C (R − P)ᵀ)`` over ``P`` supported on ``mask``, from ``x0`` (row-wise CG).

    Rows decouple: row ``i`` solves ``C[T_i, T_i] p = (C r_i)[T_i]``. All rows run batched with their own
    step sizes. CG started at a feasible point never increases the quadratic.
    """
    maskf = mask.to(rhs_target.dtype)
    x = x0 * maskf
    b = metric.right(rhs_target) * maskf
    res = b - metric.right(x) * maskf
    p = res.clone()
    rs = (res * res).sum(1)
    rs0 = float(rs.max())
    if rs0 == 0.0:
        return x
    for _ in range(iters):
        Ap = metric.right(p) * maskf
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > 0, rs / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
        x = x + alpha[:, None] * p
        res = res - alpha[:, None] * Ap
        rs_new = (res * res).sum(1)
        if float(rs_new.max()) <= tol * tol * rs0:
            break
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = res + beta[:, None] * p
        rs = rs_new
    return x


def _restricted_ls(
    R: torch.Tensor,
    x0: torch.Tensor,
    mask: torch.Tensor,
    metric: _Metric,
    cg_iters: int,
    max_elems: int = 2**24,
) -> torch.Tensor:
    """Exact minimiser of ``½ tr((R − P) C (R − P)ᵀ)`` over ``P`` supported on ``mask``.

    Row ``i`` solves ``C[T_i, T_i] p = (R C)[i, T_i]``. When the supports are small (``t³ ≤ cg_iters·k²``
    for the largest row support ``t``) the rows are solved directly as a batch of padded ``t × t``
    systems (in row chunks bounded by ``max_elems``); otherwise by row-wise CG from ``x0``.
    """
    m, k = R.shape
    counts = mask.sum(1)
    t = int(counts.max()) if m else 0
    if t == 0:
        return torch.zeros_like(R)
    if metric.C is None:
        return R * mask
    if t**3 > cg_iters * k * k:
        return _masked_cg(R, x0, mask, metric, cg_iters)
    C = metric.C
    rc = metric.right(R)
    out = torch.zeros_like(R)
    idx_all = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :t]
    chunk = max(1, max_elems // (t * t))
    eye = torch.eye(t, dtype=R.dtype, device=R.device)
    for lo in range(0, m, chunk):
        idx = idx_all[lo : lo + chunk]
        valid = torch.arange(t, device=R.device)[None, :] < counts[lo : lo + chunk, None]
        pair = valid[:, :, None] & valid[:, None, :]
        sub = torch.where(pair, C[idx[:, :, None], idx[:, None, :]], eye)
        rhs = torch.where(valid, rc[lo : lo + chunk].gather(1, idx), torch.zeros((), dtype=R.dtype, device=R.device))
        sol = torch.linalg.solve(sub, rhs.unsqueeze(-1)).squeeze(-1)
        out[lo : lo + chunk].scatter_(1, idx, torch.where(valid, sol, torch.zeros_like(sol)))
    return out


def _s_step(
    R: torch.Tensor,
    S: torch.Tensor,
    card: int,
    metric: _Metric,
    *,
    method: str,
    structured: str,
    taps: int,
    cg_iters: int,
    eta: float,
) -> torch.Tensor:
    """One S-update for ``min_S ½ tr((R − S) C (R − S)ᵀ)``, ``‖S‖₀ ≤ c`` (``R = W* − L``)."""
    if metric.C is None:  # identity metric: hard thresholding is the exact minimiser
        return R * project_sparse(R, card, structured=structured, taps=taps)
    if method == "grasp":
        # GraSP (Bahmani, Raj, Boufounos 2013): merge the 2c largest gradient entries with the support,
        # solve restricted least squares, prune to c, then refit on the final support.
        grad = metric.right(R - S)
        merged = project_sparse(grad, 2 * card) | (S != 0)
        B = _restricted_ls(R, S, merged, metric, cg_iters)
        keep = project_sparse(B, card, structured=structured, taps=taps)
        return _restricted_ls(R, B * keep, keep, metric, cg_iters)
    # Iterative hard thresholding with step 1/λ_max(C), then the same refit on the support.
    new = S
    for _ in range(5):
        step = new + eta * metric.right(R - new)
        new = step * project_sparse(step, card, structured=structured, taps=taps)
    return _restricted_ls(R, new, new != 0, metric, cg_iters)


def solve_lrsd(
    target: torch.Tensor,
    rank: int,
    card: int,
    *,
    metric: torch.Tensor | None = None,
    s_step: str = "grasp",
    structured: str = "none",
    taps: int = 1,
    iters: int = 30,
    tol: float = 1e-5,
    power: int = 1,
    godec_iters: int = 30,
    godec_eps: float = 1e-3,
    cg_iters: int = 30,
    seed: int = 0,
) -> LRSDResult:
    """Fit ``target ≈ U V + S`` under the metric ``C``: ``min ½ tr((W* − L − S) C (W* − L − S)ᵀ)``.

    Stage 0 is GoDec on ``target`` (unweighted). Stage 1 alternates, per outer iteration, the SVD-free
    bilateral L-step (``U ← qr(R C Rᵀ U)`` repeated ``power + 1`` times, then the exact ``V = Uᵀ R``
    with ``R = W* − S``) and one S-step (GraSP or iterative hard thresholding, both followed by a
    conjugate-gradient refit on the support). Every step is accepted only if ``F`` does not rise, so
    ``history`` is non-increasing. The loop stops when ``F`` falls by less than ``tol·F`` or after
    ``iters`` iterations.

    Args:
        target: ``W*`` (``m × k``); any float dtype, computed in float64.
        rank: ``r ≥ 0``.
        card: ``c ≥ 0`` non-zeros of ``S``.
        metric: ``C_λ`` (``k × k``, SPD); ``None`` = identity (weight-only problem).
        s_step: ``grasp`` or ``hard``.
        structured: ``none`` or ``2:4`` (≤ 2 non-zeros in every 4 input channels; see :func:`project_sparse`).
        taps: Kernel taps ``kh·kw`` of the matrix view (1 for Linear); only used by the 2:4 structure.
        iters: Outer refinement iterations at most (0 = GoDec only).
        tol: Relative-decrease stopping tolerance.
        power: Power (subspace) iterations per L-step minus one.
        godec_iters: GoDec iterations at most.
        godec_eps: GoDec's relative residual stopping test.
        cg_iters: Conjugate-gradient iterations of each restricted least-squares refit.
        seed: Seed of the random projections.
    """
    if s_step not in ("grasp", "hard"):
        raise UserInputError(f"unknown S-step {s_step!r}; choose grasp or hard")
    if structured not in ("none", "2:4"):
        raise UserInputError(f"unknown sparsity structure {structured!r}; choose none or 2:4")
    W = target.detach().to(torch.float64)
    m, k = W.shape
    rank = int(min(max(rank, 0), m, k))
    card = int(min(max(card, 0), m * k))
    if structured == "2:4" and (k % taps or (k // taps) % 4):
        raise CompressionError(f"2:4 structured sparsity needs input channels divisible by 4 (matrix {m}×{k})")
    C = None if metric is None else metric.detach().to(device=W.device, dtype=torch.float64)
    met = _Metric(C)
    gen = torch.Generator().manual_seed(seed)
    U, L, S = _godec(
        W, rank, card, iters=godec_iters, power=power, eps=godec_eps, structured=structured, taps=taps, gen=gen
    )
    V = U.T @ (W - S)
    L = U @ V
    f = met.value(W - L - S)
    history = [f]
    eta = 1.0 / max(met.lam_max(), 1e-300) if s_step == "hard" and card else 0.0
    converged = False
    it = 0
    while it < iters:
        it += 1
        f_prev = f
        R = W - S
        if rank:
            V_fix = U.T @ R  # exact V-step for the current U
            f_fix = met.value(R - U @ V_fix)
            U_new = U
            for _ in range(power + 1):
                U_new = _orth(R @ met.right(U_new.T @ R).T)
            V_new = U_new.T @ R
            f_new = met.value(R - U_new @ V_new)
            cand = (U_new, V_new, f_new) if f_new <= f_fix else (U, V_fix, f_fix)
            if cand[2] <= f:
                U, V, f = cand
                L = U @ V
        if card:
            S_new = _s_step(
                W - L, S, card, met, method=s_step, structured=structured, taps=taps, cg_iters=cg_iters, eta=eta
            )
            f_new = met.value(W - L - S_new)
            if f_new <= f:
                S, f = S_new, f_new
        history.append(f)
        if f_prev - f <= tol * f_prev:
            converged = True
            break
    return LRSDResult(U=U, V=V, S=S, history=history, iterations=it, converged=converged)


# ================================================================================================ data problem
@dataclass
class LayerStats:
    """Calibration statistics of one layer, accumulated in float64.

    Attributes:
        gram: ``X Xᵀ`` of the layer's inputs (``k × k``; in asymmetric mode, inputs from the compressed prefix).
        cross: ``X_dense X_compᵀ`` (asymmetric mode only, ``None`` in symmetric mode).
        gram_dense: ``X_dense X_denseᵀ`` (asymmetric mode only).
        columns: Number of accumulated columns ``n``.
    """

    gram: torch.Tensor
    cross: torch.Tensor | None = None
    gram_dense: torch.Tensor | None = None
    columns: int = 0

    @property
    def symmetric(self) -> bool:
        """Whether inputs and targets come from the same (dense) network."""
        return self.cross is None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``m × k`` matrix view of a Conv2d (``W.reshape(T, S·kh·kw)``, im2col order) or Linear weight."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def data_problem(
    weight: torch.Tensor,
    stats: LayerStats | None,
    lam: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W*, C_λ)`` of the layer problem; ``(W, None)`` (identity metric) when ``stats`` is ``None``.

    ``λ = lam · tr(X Xᵀ)/k`` (spec §1.2). Symmetric mode: ``W* = W``. Asymmetric mode:
    ``W* = (W X_dense X_compᵀ + λ W) C_λ⁻¹`` by a Cholesky solve.
    """
    W = weight.detach().to(torch.float64)
    if stats is None:
        return W, None
    G = stats.gram.to(device=W.device, dtype=torch.float64)
    k = G.shape[0]
    ridge = lam * float(torch.diagonal(G).sum()) / k
    if ridge <= 0.0:
        ridge = 1e-12
    C = G + ridge * torch.eye(k, dtype=G.dtype, device=G.device)
    if stats.cross is None:
        return W, C
    rhs = W @ stats.cross.to(device=W.device, dtype=torch.float64) + ridge * W
    chol = torch.linalg.cholesky(C)
    target = torch.cholesky_solve(rhs.T, chol).T  # C symmetric: (rhs C⁻¹)ᵀ = C⁻¹ rhsᵀ
    return target, C


def response_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats | None) -> float:
    """Relative response error ``‖Y − Â X‖ / ‖Y‖`` on the calibration sample (weight error if no stats)."""
    W = weight.detach().to(torch.float64)
    A = approx.detach().to(device=W.device, dtype=torch.float64)
    if stats is None:
        return float((W - A).norm() / W.norm().clamp_min(1e-300))
    G = stats.gram.to(W.device, torch.float64)
    if stats.cross is None:
        E = W - A
        num, den = float(((E @ G) * E).sum()), float(((W @ G) * W).sum())
    else:
        Gd = stats.gram_dense.to(W.device, torch.float64)  # type: ignore[union-attr]
        Cx = stats.cross.to(W.device, torch.float64)
        den = float(((W @ Gd) * W).sum())
        num = den - 2.0 * float(((W @ Cx) * A).sum()) + float(((A @ G) * A).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.sqrt(max(num, 0.0))


# ================================================================================================ budget
def _matrix_dims(module: nn.Module) -> tuple[int, int, int, int]:
    """``(m, k, channels, taps)`` of the matrix view."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        t, s, kh, kw = (int(v) for v in w.shape)
        return t, s * kh * kw, s, kh * kw
    return int(w.shape[0]), int(w.shape[1]), int(w.shape[1]), 1


def layer_storage(m: int, k: int, rank: int, card: int, *, structured: str = "none") -> dict[str, int]:
    """Stored weights of ``L + S`` (bias excluded), counted several honest ways.

    Returns:
        ``values`` = r(m+k) + c (the paper's count, index not charged); ``index`` = CSR index entries
        (c column indices + m+1 row pointers, 0 when c = 0); ``values_plus_index``; ``dense_storage`` =
        r(m+k) + m·k (the exported dense-with-zeros sparse branch); with ``structured="2:4"`` also
        ``values_2to4`` = r(m+k) + m·k/2 (what a 2:4 sparse tensor-core kernel stores, plus 2-bit metadata
        per kept value, ``metadata_bits_2to4``).
    """
    lowrank = rank * (m + k)
    index = card + m + 1 if card else 0
    out = {
        "values": lowrank + card,
        "index": index,
        "values_plus_index": lowrank + card + index,
        "dense_storage": lowrank + (m * k if card else 0),
    }
    if structured == "2:4":
        out["values_2to4"] = lowrank + (m * k // 2 if card else 0)
        out["metadata_bits_2to4"] = 2 * (m * k // 2) if card else 0
    return out


def split_budget(
    m: int,
    k: int,
    budget: int,
    rank_fraction: float,
    *,
    charge_index: bool = False,
    max_card: int | None = None,
) -> tuple[int, int]:
    """Split a per-layer weight budget between rank and cardinality (spec §1.5).

    ``r = round(rank_fraction · floor(B/(m+k)))`` and ``c = B − r(m+k)`` (values only); with
    ``charge_index`` each non-zero also pays one index entry and the row pointers: ``c = ⌊(B − r(m+k) − (m+1))/2⌋``.
    ``c`` is capped at ``max_card`` (default m·k; m·k/2 for 2:4).
    """
    if budget < 0 or not 0.0 <= rank_fraction <= 1.0:
        raise UserInputError(f"need budget ≥ 0 and rank_fraction in [0, 1], got {budget}, {rank_fraction}")
    r_max = min(budget // (m + k), m, k)
    rank = round(rank_fraction * r_max)
    return rank, _card_for(m, k, budget, rank, charge_index=charge_index, max_card=max_card)


def _card_for(m: int, k: int, budget: int, rank: int, *, charge_index: bool, max_card: int | None) -> int:
    left = budget - rank * (m + k)
    card = (left - (m + 1)) // 2 if charge_index else left
    return int(max(0, min(card, m * k if max_card is None else max_card)))


# ================================================================================================ calibration
def calibration_batches(split: Any, n: int, batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Images of a seeded calibration sample (:func:`compress.data.calibration_subset`) in batches."""
    from compress.data import calibration_subset

    sub = calibration_subset(split, n, seed=seed)
    return [sub.batch(range(i, min(i + batch_size, n)))[0] for i in range(0, n, batch_size)]


def _columns(module: nn.Module, x: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """Input columns of a layer as an ``n × k`` float64 matrix (im2col patches for a conv)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(
            x.detach(), module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # N × k × P, column order s·kh·kw + i·kw + j
        if select is not None:
            cols = cols.gather(2, select.unsqueeze(1).expand(-1, cols.shape[1], -1))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.float64)
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def _positions(module: nn.Module, x: torch.Tensor, per_image: int, gen: torch.Generator) -> torch.Tensor | None:
    if not isinstance(module, nn.Conv2d) or per_image <= 0:
        return None
    h, w = x.shape[-2:]
    kh, kw = module.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = module.stride, module.padding, module.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if per_image >= oh * ow:
        return None
    order = torch.rand(x.shape[0], oh * ow, generator=gen).argsort(dim=1)[:, :per_image]
    return order.to(x.device)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed inputs are captured."""


def _capture(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of the modules at ``paths`` for one batch (the forward stops after the last one)."""
    got: dict[str, torch.Tensor] = {}
    want = set(paths)
    handles = []

    def hook(path: str):
        def pre(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            got.setdefault(path, inputs[0])
            if want.issubset(got):
                raise _Stop

        return pre

    for path in paths:
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook(path)))
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def collect_stats(
    model: nn.Module,
    paths: Sequence[str],
    batches: Iterable[torch.Tensor],
    *,
    reference: nn.Module | None = None,
    positions_per_image: int = 10,
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Accumulate each layer's input second moments over ``batches`` (float64, never storing all patches).

    Args:
        model: Model whose layers' inputs are ``X`` (the compressed prefix in asymmetric mode).
        paths: Module paths of Conv2d/Linear layers.
        batches: Calibration input batches (iterated once).
        reference: The dense model, for the asymmetric mode: its layer inputs ``X_dense`` at the same
            images and positions give ``cross = X_dense X_compᵀ`` and ``gram_dense``.
        positions_per_image: Random output positions sampled per image for convs (0 = all positions).
        seed: Seed of the position sampling (the same positions are used in both models).
    """
    modules = {p: model.get_submodule(p) for p in paths}
    stats: dict[str, LayerStats] = {}
    gen = torch.Generator().manual_seed(seed)
    was = model.training, reference.training if reference is not None else False
    model.eval()
    if reference is not None:
        reference.eval()
    try:
        for x in batches:
            comp = _capture(model, paths, x)
            dense = _capture(reference, paths, x) if reference is not None else None
            for path in paths:
                module = modules[path]
                xc = comp[path]
                select = _positions(module, xc, positions_per_image, gen)
                Xc = _columns(module, xc, select)
                st = stats.get(path)
                if st is None:
                    k = Xc.shape[1]
                    zeros = Xc.new_zeros(k, k)
                    st = stats[path] = LayerStats(
                        gram=zeros.clone(),
                        cross=None if dense is None else zeros.clone(),
                        gram_dense=None if dense is None else zeros.clone(),
                    )
                st.gram += Xc.T @ Xc
                st.columns += Xc.shape[0]
                if dense is not None:
                    Xd = _columns(module, dense[path], select)
                    st.cross += Xd.T @ Xc  # type: ignore[operator]
                    st.gram_dense += Xd.T @ Xd  # type: ignore[operator]
    finally:
        model.train(was[0])
        if reference is not None:
            reference.train(was[1])
    if len(stats) != len(paths):
        missing = sorted(set(paths) - set(stats))
        raise CompressionError(f"no calibration inputs reached {missing}: empty batches or unused layers")
    return stats


# ================================================================================================ module
class LowRankSparse(nn.Module):
    """``lowrank(x) + sparse(x)``: a rank-r chain in parallel with a masked dense layer holding ``S``.

    Conv: ``lowrank`` = Conv k×k S→r (original stride/padding/dilation, no bias) → Conv 1×1 r→T (bias);
    ``sparse`` = Conv k×k S→T (same geometry, no bias, mostly zeros). Linear: Linear in→r → Linear r→out
    (bias) and Linear in→out. With ``r = 0`` there is no low-rank branch and the sparse layer carries the
    bias; with ``c = 0`` there is no sparse branch. Only stock modules: export sees Conv/Gemm and one Add.
    """

    def __init__(self, lowrank: nn.Sequential | None, sparse: nn.Module | None) -> None:
        super().__init__()
        if lowrank is None and sparse is None:
            raise ValueError("LowRankSparse needs at least one branch")
        self.lowrank = lowrank
        self.sparse = sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the branches."""
        if self.lowrank is None:
            return self.sparse(x)  # type: ignore[misc]
        if self.sparse is None:
            return self.lowrank(x)
        return self.lowrank(x) + self.sparse(x)

    @classmethod
    def build(cls, module: nn.Module, rank: int, card: int) -> LowRankSparse:
        """The structure for ``module`` at ``(rank, card)`` with uninitialised weights."""
        kw: dict[str, Any] = {"device": "meta" if module.weight.is_meta else None, "dtype": module.weight.dtype}
        has_bias = module.bias is not None
        lowrank: nn.Sequential | None = None
        sparse: nn.Module | None = None
        if isinstance(module, nn.Conv2d):
            geo = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
            t, s = module.out_channels, module.in_channels
            if rank:
                lowrank = nn.Sequential(
                    nn.Conv2d(s, rank, module.kernel_size, bias=False, **geo, **kw),
                    nn.Conv2d(rank, t, 1, bias=has_bias, **kw),
                )
            if card or not rank:
                sparse = nn.Conv2d(s, t, module.kernel_size, bias=has_bias and not rank, **geo, **kw)
        elif isinstance(module, nn.Linear):
            i, o = module.in_features, module.out_features
            if rank:
                lowrank = nn.Sequential(nn.Linear(i, rank, bias=False, **kw), nn.Linear(rank, o, bias=has_bias, **kw))
            if card or not rank:
                sparse = nn.Linear(i, o, bias=has_bias and not rank, **kw)
        else:
            raise CompressionError(f"LRSD handles Conv2d and Linear, not {type(module).__name__}")
        out = cls(lowrank, sparse)
        if not module.weight.is_meta:
            out.to(device=module.weight.device)
        return out

    @classmethod
    def from_factors(cls, module: nn.Module, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> LowRankSparse:
        """Materialise ``W ≈ U V + S`` for ``module`` (bias copied unchanged)."""
        rank, card = int(U.shape[1]), int((S != 0).sum())
        out = cls.build(module, rank, card)
        w = module.weight
        with torch.no_grad():
            if out.lowrank is not None:
                first, second = out.lowrank[0], out.lowrank[1]
                first.weight.copy_(V.reshape(first.weight.shape).to(w.dtype))
                second.weight.copy_(U.reshape(second.weight.shape).to(w.dtype))
                if module.bias is not None:
                    second.bias.copy_(module.bias.detach())
            if out.sparse is not None:
                out.sparse.weight.copy_(S.reshape(w.shape).to(w.dtype))
                if out.lowrank is None and module.bias is not None:
                    out.sparse.bias.copy_(module.bias.detach())
        return out

    def dense_weight(self) -> torch.Tensor:
        """The equivalent single weight ``U V + S`` (for checks)."""
        parts = []
        if self.lowrank is not None:
            first, second = self.lowrank[0], self.lowrank[1]
            u = second.weight.reshape(second.weight.shape[0], -1)
            v = first.weight.reshape(first.weight.shape[0], -1)
            parts.append((u @ v).reshape(self._weight_shape()))
        if self.sparse is not None:
            parts.append(self.sparse.weight)
        return sum(parts[1:], parts[0])

    def _weight_shape(self) -> torch.Size:
        if self.sparse is not None:
            return self.sparse.weight.shape
        first, second = self.lowrank[0], self.lowrank[1]  # type: ignore[index]
        return torch.Size([second.weight.shape[0], *first.weight.shape[1:]])

    def freeze_support_(self) -> LowRankSparse:
        """Keep the sparse support fixed while training: gradients off the support are zeroed.

        Zero weights with zero gradients stay exactly zero under SGD (momentum, weight decay) and AdamW, so
        fine-tuning keeps S's cardinality (and a 2:4 pattern). The mask is a non-persistent buffer (it
        follows ``.to(device)`` and is not part of the state dict); calling this twice is harmless.
        """
        if self.sparse is None or getattr(self, "_support_frozen", False):
            return self
        self.register_buffer("support_mask", (self.sparse.weight.detach() != 0).to(self.sparse.weight.dtype), False)
        self.sparse.weight.register_hook(lambda g, owner=self: g * owner.support_mask)
        self._support_frozen = True
        return self


# ================================================================================================ config
@dataclass(frozen=True)
class LowRankSparseConfig:
    """Low-rank + sparse decomposition (Yu et al. 2017), spec ``docs/method-lrsd.md``.

    Attributes:
        method: Always ``lrsd``.
        ratio: Target parameter compression of the whole model, dense / compressed, counting stored
            values (r(m+k) + c per layer, index not charged, as in the paper). > 1.
        flops: Instead of ``ratio``: the fraction of the whole model's MACs to remove, counted as a sparse
            kernel would execute them (r(m+k)·P + c·P per layer; with ``structured="2:4"`` the S branch at
            half its dense cost). The exported ONNX graph runs S as a dense conv, so its own MACs do not
            drop; the plan records both and warns. When given, ``ratio`` is set to ``None``.
        parts: ``both`` (L + S), or the equal-budget ablations ``lowrank`` (c = 0: the whole budget buys rank,
            data-aware low-rank only) and ``sparse`` (r = 0: data-aware pruning). Only ``both`` searches a split.
        split: ``search`` (grid over r on the calibration objective, spec §1.5) or ``fixed`` (``rank_fraction``).
        rank_fraction: Share of the largest affordable rank given to L when ``split="fixed"`` (and the
            plan's starting split before the search).
        split_grid: Number of r values tried by the search.
        split_iters: Outer iterations per trial of the search.
        s_step: ``grasp`` (default) or ``hard`` (iterative hard thresholding).
        structured: ``none`` or ``2:4`` (at most 2 non-zeros per 4 input channels; the whole S branch then
            runs on 2:4 sparse tensor cores at half its dense cost).
        mode: ``asymmetric`` (X from the compressed prefix, Y from the dense model; spec default) or ``symmetric``.
        calibration_samples: Images in the calibration sample (taken by the caller; recorded here).
        positions_per_image: Output positions sampled per image for convs (0 = all).
        lam: Ridge λ relative to ``tr(X Xᵀ)/k``.
        iters: Outer refinement iterations at most.
        tol: Relative-decrease stopping tolerance.
        power: Extra subspace iterations per L-step.
        godec_iters: GoDec warm-start iterations at most.
        cg_iters: CG iterations of each restricted least-squares refit.
        allocation: ``uniform`` (one ratio for all compressed layers) or ``conv_fc`` (FC layers get
            ``fc_factor`` × the conv ratio unless ``conv_ratio``/``fc_ratio`` fix one of them).
        conv_ratio: Fixed ratio of conv layers (``conv_fc`` only).
        fc_ratio: Fixed ratio of Linear layers (``conv_fc`` only).
        fc_factor: FC ratio / conv ratio when neither is fixed.
        layer_ratios: ``(pattern, ratio)`` overrides (fnmatch on module paths), e.g. from a sensitivity sweep.
        charge_index: Let each layer's budget also pay for S's CSR index (c indices + m+1 row pointers).
        compress_linear: Decompose Linear layers.
        keep_stem: Leave the image-input conv dense.
        exclude: fnmatch patterns of module paths to leave dense.
        seed: Seed of the random projections and of the position sampling.
    """

    method: str = METHOD
    ratio: float | None = 4.0
    flops: float | None = None
    parts: str = "both"
    split: str = "search"
    rank_fraction: float = 0.5
    split_grid: int = 6
    split_iters: int = 3
    s_step: str = "grasp"
    structured: str = "none"
    mode: str = "asymmetric"
    calibration_samples: int = 256
    positions_per_image: int = 10
    lam: float = 1e-3
    iters: int = 30
    tol: float = 1e-5
    power: int = 1
    godec_iters: int = 30
    cg_iters: int = 30
    allocation: str = "uniform"
    conv_ratio: float | None = None
    fc_ratio: float | None = None
    fc_factor: float = 4.0
    layer_ratios: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    charge_index: bool = False
    compress_linear: bool = True
    keep_stem: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != METHOD:
            raise UserInputError(f"LowRankSparseConfig is method 'lrsd', got {self.method!r}")
        if self.flops is not None:
            check_flops(self.flops)
            object.__setattr__(self, "ratio", None)  # the FLOPs target replaces the (default) ratio
        elif self.ratio is None or not isinstance(self.ratio, (int, float)) or not self.ratio > 1.0:
            raise UserInputError(f"METHOD=lrsd needs RATIO > 1 (parameter compression factor), got {self.ratio!r}")
        choices = {
            "split": ("search", "fixed"),
            "s_step": ("grasp", "hard"),
            "structured": ("none", "2:4"),
            "mode": ("asymmetric", "symmetric"),
            "parts": ("both", "lowrank", "sparse"),
            "allocation": ("uniform", "conv_fc"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"lrsd {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.rank_fraction <= 1.0:
            raise UserInputError(f"rank_fraction must be in [0, 1], got {self.rank_fraction}")
        if self.calibration_samples < 1 or self.positions_per_image < 0 or self.lam < 0:
            raise UserInputError("calibration_samples must be ≥ 1, positions_per_image ≥ 0 and lam ≥ 0")
        if self.split_grid < 2 or self.iters < 0 or self.godec_iters < 1 or self.cg_iters < 1 or self.power < 0:
            raise UserInputError("split_grid ≥ 2, iters ≥ 0, godec_iters ≥ 1, cg_iters ≥ 1 and power ≥ 0 are required")
        for name in ("conv_ratio", "fc_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 1.0:
                raise UserInputError(f"{name} must be ≥ 1, got {value}")
        if self.conv_ratio is not None and self.fc_ratio is not None:
            raise UserInputError("give conv_ratio or fc_ratio, not both: the other one is solved to reach RATIO")
        if self.fc_factor <= 0:
            raise UserInputError(f"fc_factor must be > 0, got {self.fc_factor}")
        for item in self.layer_ratios:
            if len(item) != 2 or not float(item[1]) >= 1.0:
                raise UserInputError(f"layer_ratios entries are (pattern, ratio ≥ 1), got {item!r}")

    @property
    def searches(self) -> bool:
        """Whether each layer's r/c split is searched on the calibration objective."""
        return self.split == "search" and self.parts == "both"

    def layer_split(self, module: nn.Module, budget: int) -> tuple[int, int]:
        """The planned ``(rank, cardinality)`` of ``module`` for a weight budget (before any search)."""
        m, k, _, _ = _matrix_dims(module)
        max_card = _max_card(module, self.structured)
        if self.parts == "lowrank":
            return max(1, min(budget // (m + k), m, k)), 0
        if self.parts == "sparse":
            return 0, _card_for(m, k, budget, 0, charge_index=self.charge_index, max_card=max_card)
        return split_budget(m, k, budget, self.rank_fraction, charge_index=self.charge_index, max_card=max_card)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["layer_ratios"] = [[p, float(r)] for p, r in self.layer_ratios]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowRankSparseConfig:
        """Inverse of :meth:`to_dict` (e.g. from ``plan.config``)."""
        d = dict(data)
        d["exclude"] = tuple(d.get("exclude", ()))
        d["layer_ratios"] = tuple((str(p), float(r)) for p, r in d.get("layer_ratios", ()))
        return cls(**d)


register_method(METHOD, LowRankSparseConfig)


# ================================================================================================ allocation
def allocate_ratios(
    weights: dict[str, int],
    is_fc: dict[str, bool],
    fixed_params: int,
    target_params: float,
    config: LowRankSparseConfig,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer ratios so that the compressed layers plus everything else meet ``target_params``.

    Args:
        weights: Weight count ``m·k`` of each candidate layer.
        is_fc: Whether each candidate is a Linear layer.
        fixed_params: Parameters that stay (dense layers, biases, norms).
        target_params: Whole-model parameter target (``total / ratio``).
        config: Allocation options (``allocation``, ``conv_ratio``, ``fc_ratio``, ``fc_factor``, ``layer_ratios``).

    Returns:
        ``(ratio per layer, summary)``; a layer whose ratio comes out ≤ 1 should stay dense.

    Raises:
        CompressionError: when even infinite compression of the free layers misses the target.
    """
    ratios: dict[str, float] = {}
    free: dict[str, int] = {}
    budget = float(target_params) - fixed_params
    for path, w in weights.items():
        override = next((float(r) for pat, r in config.layer_ratios if fnmatch.fnmatchcase(path, pat)), None)
        if override is not None:
            ratios[path] = override
            budget -= w / override
        else:
            free[path] = w
    conv_w = sum(w for p, w in free.items() if not is_fc[p])
    fc_w = sum(w for p, w in free.items() if is_fc[p])
    summary: dict[str, Any] = {"allocation": config.allocation}
    if not free:
        return ratios, summary
    if budget <= 0:
        raise CompressionError(
            f"RATIO unreachable: the layers left dense (and fixed ratios) already hold {target_params - budget:.0f} "
            f"of the {target_params:.0f} allowed parameters; lower RATIO or compress more layers"
        )
    if config.allocation == "uniform" or fc_w == 0 or conv_w == 0:
        rc = rf = (conv_w + fc_w) / budget
    elif config.conv_ratio is not None:
        rc = config.conv_ratio
        left = budget - conv_w / rc
        if left <= 0:
            raise CompressionError(
                f"conv_ratio {rc} alone exceeds the budget of RATIO; raise conv_ratio or lower RATIO"
            )
        rf = fc_w / left
    elif config.fc_ratio is not None:
        rf = config.fc_ratio
        left = budget - fc_w / rf
        if left <= 0:
            raise CompressionError(f"fc_ratio {rf} alone exceeds the budget of RATIO; raise fc_ratio or lower RATIO")
        rc = conv_w / left
    else:
        rc = (conv_w + fc_w / config.fc_factor) / budget
        rf = config.fc_factor * rc
    for path in free:
        ratios[path] = rf if is_fc[path] else rc
    summary.update(conv_ratio=rc if conv_w else None, fc_ratio=rf if fc_w else None)
    return ratios, summary


# ================================================================================================ planner
def _skip_reason(
    module: nn.Module,
    path: str,
    geom: LayerGeometry | None,
    stem: str | None,
    config: LowRankSparseConfig,
    filter_fn: FilterFn | None,
) -> str | None:
    if geom is None:
        return "not reached by the forward pass (unused or conditional layer)"
    if config.keep_stem and path == stem:
        return "stem (image-input conv) is left dense by rule: few parameters, most sensitive layer"
    if any(fnmatch.fnmatchcase(path, pat) for pat in config.exclude):
        return "excluded by pattern"
    if filter_fn is not None and not filter_fn(module, path):
        return "excluded by filter_fn"
    if isinstance(module, nn.Linear) and not config.compress_linear:
        return "Linear layers are left dense by config"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped/depthwise conv (groups={module.groups}) is left dense by rule"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "only explicit zero padding is supported by the two-branch conv"
    if config.structured == "2:4":
        _, _, channels, _ = _matrix_dims(module)
        if channels % 4:
            return f"2:4 structured sparsity needs input channels divisible by 4, this layer has {channels}"
    return None


def _layer_entry(
    path: str, module: nn.Module, geom: LayerGeometry, rank: int, card: int, ratio: float, budget: int, structured: str
) -> LayerPlan:
    m, k, _, _ = _matrix_dims(module)
    bias = int(module.bias.numel()) if module.bias is not None else 0
    store = layer_storage(m, k, rank, card, structured=structured)
    pixels = geom.out_pixels
    macs_lowrank = rank * (k + m) * pixels
    macs_sparse_dense = m * k * pixels if card or not rank else 0
    info: dict[str, Any] = {
        "cardinality": card,
        "layer_ratio": ratio,
        "budget": budget,
        "m": m,
        "k": k,
        "storage": store,
        "index_overhead": store["index"],
        "params_with_index": store["values_plus_index"] + bias,
        "params_dense_storage": store["dense_storage"] + bias + (m * k if not rank and not card else 0),
        "macs_lowrank": macs_lowrank,
        "macs_sparse_dense": macs_sparse_dense,
        "macs_sparse_kernel": macs_lowrank + card * pixels,
    }
    if structured == "2:4":
        info["macs_2to4"] = macs_lowrank + macs_sparse_dense // 2
    return LayerPlan(
        path=path,
        type=type(module).__name__,
        shape=list(module.weight.shape),
        action=METHOD,
        ranks=[rank],
        reason=None,
        params_before=_layer_params(module),
        params_after=store["values"] + bias,
        macs_before=dense_macs(module, geom),
        macs_after=macs_lowrank + macs_sparse_dense,
        in_hw=_hw(geom.in_hw),
        out_hw=_hw(geom.out_hw),
        info=info,
    )


def _max_card(module: nn.Module, structured: str) -> int:
    m, k, _, _ = _matrix_dims(module)
    return m * k // 2 if structured == "2:4" else m * k


@register_planner(LowRankSparseConfig)
def _plan_lrsd(
    model: nn.Module,
    config: LowRankSparseConfig,
    example_input: torch.Tensor,
    *,
    model_name: str,
    filter_fn: FilterFn | None,
) -> Plan:
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = _find_stem(model, order, int(example_input.shape[1]))
    total_params = count_params(model)
    entries: dict[str, LayerPlan] = {}
    cands: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        reason = _skip_reason(module, path, geom, stem, config, filter_fn)
        if reason is not None:
            entries[path] = _keep_entry(path, module, geom, reason)
        else:
            cands[path] = module
    if not cands:
        raise CompressionError(f"nothing to compress in {model_name}: every Conv2d/Linear is excluded by rule")
    weights = {p: int(m.weight.numel()) for p, m in cands.items()}
    fixed = total_params - sum(weights.values())
    is_fc = {p: isinstance(m, nn.Linear) for p, m in cands.items()}

    def layer_entries(target_params: float) -> tuple[dict[str, LayerPlan], dict[str, Any]]:
        ratios, summary = allocate_ratios(weights, is_fc, fixed, target_params, config)
        out: dict[str, LayerPlan] = {}
        for path, module in cands.items():
            geom = geometry[path]
            ratio = ratios[path]
            m, k, _, _ = _matrix_dims(module)
            budget = math.floor(m * k / ratio)
            if ratio <= 1.0 or budget >= m * k:
                out[path] = _keep_entry(path, module, geom, f"allocated ratio {ratio:.3g} ≤ 1: nothing to gain")
                continue
            rank, card = config.layer_split(module, budget)
            out[path] = _layer_entry(path, module, geom, rank, card, ratio, budget, config.structured)
        return out, summary

    warnings: list[str] = []
    if config.flops is None:
        assert config.ratio is not None
        chosen, summary = layer_entries(total_params / config.ratio)
    else:
        chosen, summary = _entries_for_flops(layer_entries, total_params, total_macs, config, warnings)
    entries.update(chosen)
    layers = [entries[p] for p, m in model.named_modules() if p in entries]
    plan = Plan(
        model=model_name,
        method=METHOD,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=layers,
        target={"ratio": config.ratio, "flops": config.flops, **summary},
        warnings=warnings,
    )
    _retotal(plan, total_params, total_macs)
    return plan


def _kernel_macs(entries: dict[str, LayerPlan], total_macs: int, structured: str) -> int:
    """Whole-model MACs with every LRSD layer run by a sparse kernel (2:4 tensor cores if ``structured``)."""
    key = "macs_2to4" if structured == "2:4" else "macs_sparse_kernel"
    return total_macs - sum(e.macs_before - e.info.get(key, e.macs_after) for e in entries.values())


def _entries_for_flops(
    layer_entries: Callable[[float], tuple[dict[str, LayerPlan], dict[str, Any]]],
    total_params: int,
    total_macs: int,
    config: LowRankSparseConfig,
    warnings: list[str],
) -> tuple[dict[str, LayerPlan], dict[str, Any]]:
    """Bisect the parameter target until the sparse-kernel MACs meet ``config.flops`` (they fall with it)."""
    assert config.flops is not None
    target = total_macs * (1.0 - config.flops)

    def macs_at(ratio: float) -> int:
        try:
            return _kernel_macs(layer_entries(total_params / ratio)[0], total_macs, config.structured)
        except CompressionError:  # past the reachable parameter budget
            return -1

    lo, hi = 1.0 + 1e-6, 1e4
    while hi > lo * 1.01 and macs_at(hi) < 0:  # the largest parameter ratio the layers can still reach
        hi = math.sqrt(lo * hi)
    floor_macs = macs_at(hi)
    if floor_macs < 0 or floor_macs > target * 1.03:
        raise CompressionError(
            f"FLOPS={config.flops:g} is not reachable for lrsd: even at the highest compression the sparse-kernel "
            f"MACs stay at {100 * floor_macs / total_macs:.1f}% of dense; lower FLOPS or compress more layers"
        )
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        got = macs_at(mid)
        if got < 0 or got <= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    chosen, summary = layer_entries(total_params / hi)
    exported = total_macs - sum(e.macs_before - e.macs_after for e in chosen.values())
    warnings.append(
        f"FLOPS={config.flops:g} counts the MACs a sparse kernel executes"
        f"{' (2:4 tensor cores run S at half cost)' if config.structured == '2:4' else ''}; the exported ONNX graph "
        f"runs the sparse branch as a dense conv, so it executes {100 * exported / total_macs:.0f}% of the dense MACs"
    )
    summary = {**summary, "flops_measure": "2:4 sparse tensor cores" if config.structured == "2:4" else "sparse kernel"}
    return chosen, summary


def _retotal(plan: Plan, total_params: int, total_macs: int) -> None:
    """Recompute the plan's totals from its entries (after a split search changed ranks)."""
    lay = plan.layers
    fact = plan.factorized_layers
    params_after = total_params - sum(e.params_before - e.params_after for e in lay)
    gained_index = sum(e.info.get("params_with_index", e.params_after) - e.params_after for e in fact)
    dense_storage = sum(e.info.get("params_dense_storage", e.params_after) - e.params_after for e in fact)
    macs_after = total_macs - sum(e.macs_before - e.macs_after for e in lay)
    kernel = sum(e.macs_after - e.info.get("macs_sparse_kernel", e.macs_after) for e in fact)
    plan.totals.update(
        params_before=total_params,
        params_after=params_after,
        params_after_with_index=params_after + gained_index,
        params_after_dense_storage=params_after + dense_storage,
        macs_before=total_macs,
        macs_after=macs_after,
        macs_after_sparse_kernel=macs_after - kernel,
    )
    if any("macs_2to4" in e.info for e in fact):
        half = sum(e.macs_after - e.info["macs_2to4"] for e in fact)
        plan.totals["macs_after_2to4"] = macs_after - half
    plan.target.update(
        achieved_ratio=total_params / params_after,
        achieved_ratio_with_index=total_params / plan.totals["params_after_with_index"],
        achieved_ratio_dense_storage=total_params / plan.totals["params_after_dense_storage"],
    )


# ================================================================================================ applying
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
) -> LowRankSparse:
    """Solve one layer (optionally searching the r/c split), record the facts in ``entry``, build the module."""
    W = weight_matrix(module).to(torch.float64)
    target, metric = data_problem(W, stats, cfg.lam)
    m, k, _, taps = _matrix_dims(module)
    opts = _solver_options(cfg)
    rank = int(entry.ranks[0]) if entry.ranks else 0
    card = int(entry.info["cardinality"])
    budget = int(entry.info["budget"])
    max_card = _max_card(module, cfg.structured)
    trials: list[dict[str, Any]] = []
    if search:
        r_max = min(budget // (m + k), m, k)
        grid = sorted({round(i * r_max / (cfg.split_grid - 1)) for i in range(cfg.split_grid)})
        best = None
        for r in grid:
            c = _card_for(m, k, budget, r, charge_index=cfg.charge_index, max_card=max_card)
            if r == 0 and c == 0:
                continue
            res = solve_lrsd(target, r, c, metric=metric, taps=taps, iters=cfg.split_iters, **opts)
            err = response_error(W, res.approx, stats)
            trials.append({"rank": r, "cardinality": c, "response_error": err})
            if best is None or err < best[0]:
                best = (err, r, c)
        if best is not None:
            rank, card = best[1], best[2]
    result = solve_lrsd(target, rank, card, metric=metric, taps=taps, iters=cfg.iters, **opts)
    card = int((result.S != 0).sum()) if card else 0
    if search or card != int(entry.info["cardinality"]):
        geom = LayerGeometry(
            in_hw=tuple(entry.in_hw) if entry.in_hw else None,  # type: ignore[arg-type]
            out_hw=tuple(entry.out_hw) if entry.out_hw else None,  # type: ignore[arg-type]
        )
        new = _layer_entry(entry.path, module, geom, rank, card, entry.info["layer_ratio"], budget, cfg.structured)
        entry.ranks, entry.params_after, entry.macs_after, entry.info = (
            new.ranks,
            new.params_after,
            new.macs_after,
            new.info,
        )
    approx = result.approx
    entry.rel_error = float((W - approx).norm() / W.norm().clamp_min(1e-300))
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


@register_applier(METHOD)
def _apply_lrsd(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Applier for ``lrsd`` plans: ``empty`` builds the shapes; ``decompose`` solves the weight-only problem.

    The data-aware fit needs calibration statistics, which this signature cannot carry: use
    :func:`lrsd_compress_` for it. ``decompose`` here appends the weight-only warning to ``plan.warnings``.
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
        _set_submodule(model, entry.path, new)
    return model


MAX_STATS_BYTES = 2 * 2**30
"""Largest total size of the float64 Gram matrices held at once in symmetric mode (more → several passes)."""


def _stat_groups(model: nn.Module, paths: list[str]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for path in paths:
        k = _matrix_dims(model.get_submodule(path))[1]
        need = 8 * k * k
        if groups[-1] and size + need > MAX_STATS_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += need
    return [g for g in groups if g]


def lrsd_compress_(
    model: nn.Module,
    config: LowRankSparseConfig,
    example_input: torch.Tensor,
    calibration_batches: Iterable[torch.Tensor] | None,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
    plan: Plan | None = None,
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

    Raises:
        UserInputError: empty ``calibration_batches``.
        CompressionError: the plan does not match the model, or the ratio is unreachable.
    """
    if plan is None:
        plan = plan_compression(model, config, example_input, model_name=model_name, filter_fn=filter_fn)
    elif plan.method != METHOD:
        raise UserInputError(f"lrsd_compress_ needs an lrsd plan, got method {plan.method!r}")
    total_params, total_macs = int(plan.totals["params_before"]), int(plan.totals["macs_before"])
    batches = None if calibration_batches is None else list(calibration_batches)
    if batches is not None and not batches:
        raise UserInputError("calibration_batches is empty; pass at least one batch or None for the weight-only fit")
    search = config.searches
    if batches is None:
        plan.warnings.append(WEIGHT_ONLY_WARNING)
        for entry in plan.factorized_layers:
            module = planned_module(model, entry, plan)
            _set_submodule(model, entry.path, _solve_layer(module, entry, None, config, search=search))
    else:
        _, order, _ = trace_geometry(model, example_input)
        todo = [p for p in order if p in {e.path for e in plan.factorized_layers}]
        if config.mode == "asymmetric":
            reference = copy.deepcopy(model)
            for path in todo:
                stats = collect_stats(
                    model,
                    [path],
                    batches,
                    reference=reference,
                    positions_per_image=config.positions_per_image,
                    seed=config.seed,
                )[path]
                module = planned_module(model, plan.layer(path), plan)
                _set_submodule(model, path, _solve_layer(module, plan.layer(path), stats, config, search=search))
        else:
            # symmetric: every layer sees dense inputs, so replacements are installed only at the end;
            # statistics are collected in groups whose float64 Grams fit in MAX_STATS_BYTES
            pending: dict[str, LowRankSparse] = {}
            for group in _stat_groups(model, todo):
                group_stats = collect_stats(
                    model, group, batches, positions_per_image=config.positions_per_image, seed=config.seed
                )
                for path in group:
                    module = planned_module(model, plan.layer(path), plan)
                    pending[path] = _solve_layer(module, plan.layer(path), group_stats.pop(path), config, search=search)
            for path, new in pending.items():
                _set_submodule(model, path, new)
        plan.target["calibration"] = {
            "images": sum(int(b.shape[0]) for b in batches),
            "mode": config.mode,
            "positions_per_image": config.positions_per_image,
        }
    _retotal(plan, total_params, total_macs)
    plan.totals["params_after_measured"] = count_params(model)
    plan.totals["macs_after_measured"] = count_macs(model, example_input)
    return plan


# ================================================================================================ sensitivity
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
        m, k, _, _ = _matrix_dims(module)
        out[path] = {}
        for ratio in ratios:
            if not ratio > 1.0:
                raise UserInputError(f"sensitivity ratios must be > 1, got {ratio}")
            budget = math.floor(m * k / ratio)
            rank, card = cfg.layer_split(module, budget)
            geom = LayerGeometry()
            entry = _layer_entry(path, module, geom, rank, card, ratio, budget, cfg.structured)
            new = _solve_layer(module, entry, stats[path], cfg, search=cfg.searches)
            row = {
                "response_error": float(entry.info["response_error"]),
                "rank": float(entry.ranks[0]),  # type: ignore[index]
                "cardinality": float(entry.info["cardinality"]),
            }
            if output_error:
                _set_submodule(model, path, new)
                try:
                    with torch.no_grad():
                        y = model(batches[0]).double()
                finally:
                    _set_submodule(model, path, module)
                row["output_error"] = float((y - ref).norm() / ref.norm().clamp_min(1e-300))
            out[path][float(ratio)] = row
    return out
