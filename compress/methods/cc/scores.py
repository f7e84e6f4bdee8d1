"""CC's unit scores (spec §3, §6 step 2): spectra of the unfolded weights, candidate scores, gradient statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence, Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_core.errors import UserInputError
from lowrank_core.progress import Progress

__all__ = [
    "GRADIENT_BATCH_SIZE",
    "candidate_scores",
    "channel_sum",
    "gradient_batches",
    "gradient_statistics",
    "spectral_terms",
    "spectrum",
    "unfold",
    "unit_scores",
]

GRADIENT_BATCH_SIZE = 128
"""Images per gradient batch: the code's CIFAR training batch size."""


# ================================================================================================ linear algebra
def unfold(weight: torch.Tensor) -> torch.Tensor:
    """``O × I·kh·kw`` unfolding of a conv weight, float64 on the CPU."""
    return weight.detach().reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float64)


def spectrum(M: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, Rf)`` with ``M = L Rfᵀ`` and ``L[:, j] Rf[:, j]ᵀ = σ_j u_j v_jᵀ``, σ descending.

    From the eigen-decomposition of the Gram matrix of the smaller side (float64), ~10× faster than an
    SVD on the shapes of a ResNet; σ is never divided by, so zero singular values are harmless. ``cols``
    (bool over M's columns) restricts the work to the columns that are not known to be zero (pruned
    channels): their exact-zero eigenvalue clusters can make LAPACK's ``syevd`` fail. Should it fail
    anyway, a full SVD is used.
    """
    sub = M if cols is None else M[:, cols]
    rows, n = sub.shape
    try:
        if rows <= n:
            _, U = torch.linalg.eigh(sub @ sub.T)
            U = U.flip(1)
            L, Rs = U, sub.T @ U
        else:
            _, V = torch.linalg.eigh(sub.T @ sub)
            V = V.flip(1)
            L, Rs = sub @ V, V
    except torch.linalg.LinAlgError:
        U, S, Vh = torch.linalg.svd(sub, full_matrices=False)
        L, Rs = U * S, Vh.T
    if cols is None:
        return L, Rs
    Rf = torch.zeros(M.shape[1], Rs.shape[1], dtype=Rs.dtype)
    Rf[cols] = Rs
    return L, Rf


def channel_sum(Y: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Per-input-channel sums of an ``O × I·k²`` matrix."""
    return Y.reshape(Y.shape[0], in_channels, -1).sum(dim=(0, 2))


def _current(
    W: torch.Tensor, mask: torch.Tensor, taps: int, rank: int, decomposed: bool, spectral: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """``(W_t, L_r, R_r, r)``: the current weight (B3: rank-r truncation of W with pruned columns zeroed)."""
    cols = mask.repeat_interleave(taps)
    Wp = W * cols
    if not spectral:
        return Wp, None, None, rank
    L, Rf = spectrum(Wp, cols)
    r = min(rank, int(mask.sum()) * taps, W.shape[0])
    L, Rf = L[:, :r], Rf[:, :r]
    return (L @ Rf.T if decomposed else Wp), L, Rf, r


def spectral_terms(L: torch.Tensor, Rf: torch.Tensor, G2: torch.Tensor) -> torch.Tensor:
    """``hcol[j, b] = σ_j² (u_j²)ᵀ G²[:, b] v_jb²``: row sums are the singular-value scores, all sums ``Σ G²⊙Ŵ``."""
    return ((L * L).T @ G2) * (Rf * Rf).T


def candidate_scores(
    W: torch.Tensor,
    G2: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    decomposed: bool,
    *,
    taps: int,
    gamma: float,
    prune: bool,
    decompose: bool,
    exact_forward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``B_u + γ·Fw_u`` of every candidate unit (spec §6 step 2), vectorised; ``inf`` = not a candidate.

    With ``A = W_u − W`` and ``m = n − 1`` the number of units left after ``u``, ``Fw_u`` is the expected
    loss after one more removal drawn uniformly from those ``m`` units:
    ``Σ(G⊙A)² + (2κ/m)·Σ G²⊙A⊙(−W_u) + (1/m)·[Σ(G⊙W_u)² (channels) + Σ G²⊙Ŵ_u (singular values)]``
    with κ the number of unit kinds in use (κ = 2 gives the code's ``4/(n−1)``).
    """
    n_in = mask.numel()
    Wt, L, Rf, r = _current(W, mask, taps, rank, decomposed, decompose)
    D = Wt - W
    G2D, G2Wt = G2 * D, G2 * Wt
    Bt = float((G2D * D).sum())
    Xt = -float((G2D * Wt).sum())  # Σ G²⊙A⊙(−W_u) at u = nothing removed
    Ct = float((G2Wt * Wt).sum())
    kept = int(mask.sum())
    n = (kept if prune else 0) + (r if decompose else 0)
    m = n - 1
    kinds = int(prune) + int(decompose)

    def total(B: torch.Tensor, X: torch.Tensor, C: torch.Tensor, Dh: torch.Tensor) -> torch.Tensor:
        if m <= 0:
            return B * (1.0 + gamma)
        rest = (C if prune else 0.0) + (Dh if decompose else 0.0)
        return B + gamma * (B + (2.0 * kinds / m) * X + rest / m)

    inf = torch.tensor(math.inf, dtype=torch.float64)
    chan = torch.full((n_in,), math.inf, dtype=torch.float64)
    sv = torch.full((r if decompose else 0,), math.inf, dtype=torch.float64)
    if decompose:
        assert L is not None
        assert Rf is not None
        hcol = spectral_terms(L, Rf, G2)
        h = hcol.sum(1)
        Dt = float(h.sum())
        if r > 1:
            p = ((L.T @ G2D) * Rf.T).sum(1)  # Σ G²⊙D⊙Δ_j, Δ_j = σ_j u_j v_jᵀ
            q = ((L.T @ G2Wt) * Rf.T).sum(1)  # Σ G²⊙W_t⊙Δ_j
            sv = total(Bt - 2 * p + h, Xt + p + q - h, Ct - 2 * q + h, Dt - h)
    if prune and kept > 1:
        Bc = Bt - channel_sum(G2D * D, n_in) + channel_sum(G2 * W * W, n_in)
        Xc = Xt + channel_sum(G2D * Wt, n_in)
        Cc = Ct - channel_sum(G2Wt * Wt, n_in)
        if not decompose:
            Dc = torch.zeros(n_in, dtype=torch.float64)
        elif exact_forward:
            Dc = torch.zeros(n_in, dtype=torch.float64)
            for c in torch.nonzero(mask).flatten().tolist():
                Wu = Wt.clone()
                Wu[:, c * taps : (c + 1) * taps] = 0.0
                keep = mask.clone()
                keep[c] = False
                Lu, Ru = spectrum(Wu, keep.repeat_interleave(taps))
                Dc[c] = spectral_terms(Lu, Ru, G2).sum()
        else:  # keep the current singular basis: Ŵ_u ≈ Ŵ_t with channel u's columns zeroed
            Dc = Dt - channel_sum(hcol, n_in)
        chan = torch.where(mask, total(Bc, Xc, Cc, Dc), inf)
    return chan, sv


def unit_scores(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    *,
    pruned: Sequence[int] = (),
    rank: int | None = None,
    gamma: float = 0.9,
    prune: bool = True,
    decompose: bool = True,
    exact_forward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the candidate units of one conv in a given state (spec §6 step 2).

    Args:
        weight: Original conv weight ``O×I×kh×kw``.
        grad: ``dL/dW`` of the same shape (``None``: ``G ≡ 1``).
        pruned: Input channels already removed.
        rank: Kept singular values ``r`` (``None``: none removed yet, the layer is not decomposed).
        gamma: Weight of the forward term.
        prune: Channel units are candidates.
        decompose: Singular-value units are candidates.
        exact_forward: Re-decompose each channel candidate for its forward term.

    Returns:
        ``(channel scores (I,), singular-value scores (r,))`` in float64, ``inf`` where a unit is not a
        candidate; singular values in descending order of σ.
    """
    W = unfold(weight)
    G = torch.ones_like(W) if grad is None else unfold(grad)
    taps = W.shape[1] // weight.shape[1]
    mask = torch.ones(weight.shape[1], dtype=torch.bool)
    mask[list(pruned)] = False
    full = min(W.shape[0], W.shape[1])
    return candidate_scores(
        W,
        G * G,
        mask,
        full if rank is None else int(rank),
        rank is not None,
        taps=taps,
        gamma=gamma,
        prune=prune,
        decompose=decompose,
        exact_forward=exact_forward,
    )


# ================================================================================================ gradients
def gradient_batches(
    split: Any, n: int, batch_size: int = GRADIENT_BATCH_SIZE, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of a seeded calibration subset (:func:`compress.data.calibration_subset`).

    The code averages over the whole training set with test-time transforms (B5); this takes ``n``
    un-augmented training images, in batches of the code's CIFAR training batch size.
    """
    from compress.data import calibration_subset

    sub = calibration_subset(split, n, seed=seed)
    return [sub.batch(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def gradient_statistics(
    model: nn.Module,
    paths: Sequence[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    progress: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``G = dL/dW`` of the convs ``paths``: mean over batches of the batch-mean cross-entropy gradient (§3).

    The model runs in eval mode (BN uses its running statistics); nothing in it changes (gradients are
    taken with :func:`torch.autograd.grad`, ``.grad`` fields are left alone).

    ``progress`` as :class:`lowrank_core.progress.Progress` (``None``: a bar on a terminal, lines in a log).

    Returns:
        ``(G per path in float64 on CPU, {"images", "batches"})``.

    Raises:
        UserInputError: ``batches`` is empty, or a batch is not ``(images, labels)``.
    """
    weights = [model.get_submodule(p).weight for p in paths]
    sums = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    flags = [w.requires_grad for w in weights]
    device = weights[0].device if weights else torch.device("cpu")
    was_training = model.training
    model.eval()
    n_batches = n_images = 0
    total = len(batches) if isinstance(batches, Sized) else None
    bar = Progress(total, "cc gradient statistics", unit="batch", enabled=progress)
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise UserInputError("cc calibration batches must be (images, labels) pairs; see gradient_batches")
                x, y = batch[0].to(device), batch[1].to(device)
                logits = model(x)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    got = f"a {logits.dim()}-D tensor" if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise UserInputError(
                        f"cc's data-driven sensitivities need a classifier's (N, classes) logits, but the model "
                        f"returns {got} (segmentation/detection); run cc without data (weight-only sensitivities)"
                    )
                loss = F.cross_entropy(logits, y)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for s, g in zip(sums, grads, strict=True):
                    if g is not None:
                        s += g.detach().to(device="cpu", dtype=torch.float64)
                n_batches += 1
                n_images += int(x.shape[0])
                bar.update(1, f"{n_images} images")
    finally:
        bar.close()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    if n_batches == 0:
        raise UserInputError("cc calibration batches are empty; pass at least one (images, labels) batch, or None")
    return {p: s / n_batches for p, s in zip(paths, sums, strict=True)}, {"images": n_images, "batches": n_batches}
