"""CC's per-layer sensitivity (spec §4): the loss-against-rate curve and its weighted exponential fit."""

from __future__ import annotations

import math

import numpy as np
import torch

from compress.methods.cc.modules import ConvShape, layer_cost
from compress.methods.cc.scores import channel_sum, spectral_terms, spectrum, unfold

__all__ = ["fit_exponential", "sensitivity_curve"]


def sensitivity_curve(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    shape: ConvShape,
    *,
    prune: bool = True,
    decompose: bool = True,
    points: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Information loss against FLOPs compression rate along the fixed removal order (spec §4).

    All units are sorted once by their first-order score on the original weights (channel ``j``:
    ``Σ(G[:, j]⊙W[:, j])²``; singular value ``j``: ``σ_j² (u_j²)ᵀ G² (v_j²)`` = ``Σ(G⊙(W^(−j) − W))²``) and
    removed cumulatively in that order (one channel and one singular value always stay). After ``t``
    removals the weight is the rank-``r_t`` truncation of ``W`` without the pruned columns (B3), its loss
    ``ℓ_t = Σ(G⊙(W_t − W))²`` and its rate ``c_t = (F₀ − F_t)/F₀``.

    Args:
        weight: Original conv weight.
        grad: ``dL/dW`` (``None``: ``G ≡ 1``).
        shape: The layer's cost model.
        prune: Channel units take part.
        decompose: Singular-value units take part.
        points: Evaluate ``ℓ`` at this many evenly spaced removal counts with ``c_t > 0`` (0 = all).

    Returns:
        ``(c, ℓ)`` over the evaluated points with ``c > 0``, sorted by ``c`` (ℓ not normalised).
    """
    W = unfold(weight)
    G2 = torch.ones_like(W) if grad is None else unfold(grad) ** 2
    n_in, taps, n_out = shape.in_channels, shape.taps, shape.out_channels
    units: list[tuple[float, int, int]] = []  # (score, kind 0 = channel / 1 = singular value, index)
    if prune:
        units += [(float(s), 0, j) for j, s in enumerate(channel_sum(G2 * W * W, n_in))]
    if decompose:
        L, Rf = spectrum(W)
        units += [(float(s), 1, j) for j, s in enumerate(spectral_terms(L, Rf, G2).sum(1))]
    units.sort(key=lambda u: u[0])  # stable: ties keep channels first, then by index
    order: list[int] = []
    states: list[tuple[int, int, bool]] = []  # (channels pruned, rank, decomposed) after each removal
    kept, rank, decomposed = n_in, shape.full_rank, False
    for _, kind, idx in units:
        if kind == 0:
            if kept == 1:
                continue
            kept -= 1
            order.append(idx)
            rank = min(rank, kept * taps, n_out)
        else:
            if rank == 1:
                continue
            rank -= 1
            decomposed = True
        states.append((n_in - kept, rank, decomposed))
    F0 = shape.dense_macs
    valid = [t for t, (npr, r, dec) in enumerate(states) if F0 - layer_cost(shape, n_in - npr, r, dec) > 0]
    if points and len(valid) > points:
        picks = np.unique(np.round(np.linspace(0, len(valid) - 1, points)).astype(int))
        valid = [valid[i] for i in picks]
    rates, losses = [], []
    cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
    for t in valid:
        npr, r, dec = states[t]
        mask = torch.ones(n_in, dtype=torch.bool)
        mask[order[:npr]] = False
        cols = mask.repeat_interleave(taps)
        Wp = W * cols
        if dec:
            if cache is None or cache[0] != npr:
                cache = (npr, *spectrum(Wp, cols))
            Wt = cache[1][:, :r] @ cache[2][:, :r].T
        else:
            Wt = Wp
        losses.append(float((G2 * (Wt - W) ** 2).sum()))
        rates.append((F0 - layer_cost(shape, n_in - npr, r, dec)) / F0)
    c, loss = np.asarray(rates, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    idx = np.argsort(c, kind="stable")
    return c[idx], loss[idx]


def fit_exponential(rates: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """``(log a, b)`` of ``ℓ/max ℓ ≈ a·e^{b·c}`` (spec §4 step 6).

    Weighted least squares of ``log(ℓ + 1e-10)`` on ``c`` with weights ``√ℓ`` (ℓ normalised by its
    maximum), as ``LinearRegression(sample_weight=√ℓ)`` in the code. ``log a`` is returned instead of
    ``a`` because ``a`` under- or overflows for steep curves. ``(nan, nan)`` when there is nothing to fit
    (fewer than two distinct rates, or no loss at all).
    """
    c = np.asarray(rates, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    keep = c > 0
    c, loss = c[keep], loss[keep]
    if c.size < 2 or not np.isfinite(loss).all() or loss.max() <= 0 or np.ptp(c) == 0:
        return math.nan, math.nan
    loss = loss / loss.max()
    y = np.log(loss + 1e-10)
    w = np.sqrt(loss)
    cm, ym = np.average(c, weights=w), np.average(y, weights=w)
    var = float(np.sum(w * (c - cm) ** 2))
    if var <= 0:
        return math.nan, math.nan
    b = float(np.sum(w * (c - cm) * (y - ym)) / var)
    return float(ym - b * cm), b
