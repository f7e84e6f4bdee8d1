"""The factor math of joint SVD: right-/left-shared joint SVD, Bi-JSVD and the kernels of Tai's conv pair.

Spec: ``docs/method-jsvd.md`` §2–§4. Every function works on unfolded weight matrices
(:func:`compress.decompose.unfold_spatial`), ``W_mat[kh·I + i, kw·O + o] = w[o, i, kh, kw]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BiFactors", "bi_jsvd", "ljsvd", "rjsvd", "thin_svd", "u_kernel", "v_kernel"]


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, computed on the tall orientation (LAPACK's gesdd is ~2× faster there for wide stacks)."""
    if matrix.shape[0] < matrix.shape[1]:
        g_t, s, vh_t = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh_t.T, s, g_t.T
    return torch.linalg.svd(matrix, full_matrices=False)


def _top_r(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``G_r Σ_r V_r`` with Σ folded into the left factor (spec §2)."""
    g, s, vh = thin_svd(matrix)
    return g[:, :rank] * s[:rank], vh[:rank]


def rjsvd(mats: Sequence[torch.Tensor], rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Right-shared joint SVD: ``W^n ≈ U^n V`` from the vertical stack (members may differ in row count).

    Returns:
        ``(private left factors U^n (rows_n × r), shared right factor V (r × cols))``.
    """
    left, right = _top_r(torch.cat(list(mats), dim=0), rank)
    return list(torch.split(left, [m.shape[0] for m in mats], dim=0)), right


def ljsvd(mats: Sequence[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Left-shared joint SVD: ``W^n ≈ U V^n`` from the horizontal stack.

    Returns:
        ``(shared left factor U (rows × r), private right factors V^n (r × cols_n))``.
    """
    left, right = _top_r(torch.cat(list(mats), dim=1), rank)
    return left, list(torch.split(right, [m.shape[1] for m in mats], dim=1))


@dataclass
class BiFactors:
    """Bi-JSVD factors: ``W^n ≈ u_r[n] @ v_r + u_l @ v_l[n]``; ``fit_errors[k]`` after iteration k."""

    u_r: list[torch.Tensor]
    v_r: torch.Tensor
    u_l: torch.Tensor
    v_l: list[torch.Tensor]
    fit_errors: list[float]


def _svd_r(
    matrix: torch.Tensor, rank: int, warm: torch.Tensor | None = None, *, power: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD ``matrix ≈ g·diag(s)·hᵀ`` (``g``, ``h`` orthonormal columns).

    Without ``warm`` it is the exact truncated SVD. With ``warm`` (n × r, the previous right factor) it is a
    Rayleigh–Ritz projection onto a subspace-iteration basis that contains ``span(warm)``: cheap for small
    ranks, and never worse than ``warm`` itself (the best rank-r fit inside a subspace holding it).
    """
    m, n = matrix.shape
    q = min(rank + 10, n)
    if warm is None or 2 * q >= min(m, n):
        g, s, vh = thin_svd(matrix)
        return g[:, :rank], s[:rank], vh[:rank].T
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    noise = torch.randn(n, q - warm.shape[1], generator=gen, dtype=matrix.dtype, device=matrix.device)
    basis = torch.linalg.qr(torch.cat([warm, noise], dim=1)).Q
    for _ in range(power):
        basis = torch.linalg.qr(matrix.T @ (matrix @ basis)).Q
    basis = torch.linalg.qr(torch.cat([basis, warm], dim=1)).Q
    g, s, vh = torch.linalg.svd(matrix @ basis, full_matrices=False)
    return g[:, :rank], s[:rank], basis @ vh[:rank].T


def bi_jsvd(
    mats: Sequence[torch.Tensor], rank_l: int, rank_r: int, iters: int = 30, *, exact: bool = False
) -> BiFactors:
    """Bi-JSVD by block-alternating SVDs (paper Algorithm 3: L = 0, then R-step, L-step, K times).

    Each step minimises the fit ``(1/N) Σ‖W^n − U^n V_r − U_l V^n‖²_F`` over one term given the other, so
    ``fit_errors`` never increases. The first iteration uses exact SVDs; later ones (unless ``exact``) use
    warm-started subspace iteration (:func:`_svd_r`), which keeps the monotone fit and costs a few
    matrix products instead of a full SVD. A zero rank drops that term (p = 0 is RJSVD, p = 1 is LJSVD).
    """
    mats = list(mats)
    n = len(mats)
    rows, cols = mats[0].shape
    u_r = [m.new_zeros(rows, 0) for m in mats]
    v_r, u_l = mats[0].new_zeros(0, cols), mats[0].new_zeros(rows, 0)
    v_l = [m.new_zeros(0, cols) for m in mats]
    left_term = right_term = [torch.zeros_like(m) for m in mats]
    errors: list[float] = []
    for k in range(iters if rank_l and rank_r else 1):
        if rank_r:
            stacked = torch.cat([w - lt for w, lt in zip(mats, left_term, strict=True)], dim=0)
            g, s, h = _svd_r(stacked, rank_r, None if exact or k == 0 else v_r.T)
            u_r, v_r = list(torch.split(g * s, rows, dim=0)), h.T
            right_term = [u @ v_r for u in u_r]
        if rank_l:
            stacked = torch.cat([w - rt for w, rt in zip(mats, right_term, strict=True)], dim=1)
            g, s, h = _svd_r(stacked.T, rank_l, None if exact or k == 0 else u_l)
            u_l, v_l = h * s, list(torch.split(g.T, cols, dim=1))
            left_term = [u_l @ v for v in v_l]
        fit = sum(
            float(torch.linalg.matrix_norm(w - rt - lt) ** 2)
            for w, rt, lt in zip(mats, right_term, left_term, strict=True)
        )
        errors.append(fit / n)
    return BiFactors(u_r=u_r, v_r=v_r, u_l=u_l, v_l=v_l, fit_errors=errors)


def u_kernel(left: torch.Tensor, f1: int, in_ch: int) -> torch.Tensor:
    """(F1·I × r) left factor → (r, I, F1, 1) kernel of the vertical conv (spec §3)."""
    return left.reshape(f1, in_ch, -1).permute(2, 1, 0).unsqueeze(-1).contiguous()


def v_kernel(right: torch.Tensor, f2: int, out_ch: int) -> torch.Tensor:
    """(r × F2·O) right factor → (O, r, 1, F2) kernel of the horizontal conv (spec §3)."""
    return right.reshape(-1, f2, out_ch).permute(2, 0, 1).unsqueeze(2).contiguous()
