"""The LRSD solver: ``min ½ tr((W* − L − S) C (W* − L − S)ᵀ)`` with ``rank(L) ≤ r`` and ``‖S‖₀ ≤ c``.

GoDec warm start, SVD-free bilateral L-step, GraSP or iterative hard-thresholding S-step with a
conjugate-gradient refit on the support, optional 2:4 structure, monotone objective (``docs/method-lrsd.md``).

No maintained library implements GoDec/GreBdec or a data-weighted low-rank + sparse solver in PyTorch
(tensorly's ``robust_pca`` is the nuclear/ℓ1-norm relaxation, not the rank/cardinality-constrained
problem, and has no data metric), so the solver is written here on top of ``torch.linalg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank_core.errors import CompressionError, UserInputError

__all__ = ["LRSDResult", "project_sparse", "solve_lrsd"]


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
