"""Calibration statistics of the LRSD layer problem: input second moments, ``(W*, C_λ)`` and response errors.

:func:`collect_stats` accumulates ``X Xᵀ`` of a layer's unfolded input patches batch by batch in float64
(forward pre-hooks capture the inputs; the forward stops once every wanted layer has been reached), either
symmetric (dense inputs only) or paired with the dense model's inputs for the asymmetric mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_core.errors import CompressionError
from lowrank_core.progress import Progress

__all__ = ["LayerStats", "calibration_batches", "collect_stats", "data_problem", "response_error", "weight_matrix"]


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
    progress: bool | None = None,
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
        progress: Progress per batch on stderr (:class:`lowrank_core.progress.Progress`; ``False``: off).
    """
    modules = {p: model.get_submodule(p) for p in paths}
    stats: dict[str, LayerStats] = {}
    gen = torch.Generator().manual_seed(seed)
    was = model.training, reference.training if reference is not None else False
    model.eval()
    if reference is not None:
        reference.eval()
    bar = Progress(
        len(batches) if isinstance(batches, Sized) else None,
        f"calibration statistics of {len(paths)} layer{'s' if len(paths) != 1 else ''}",
        unit="batch",
        enabled=progress,
    )
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
            bar.update(1)
    finally:
        bar.close()
        model.train(was[0])
        if reference is not None:
            reference.train(was[1])
    if len(stats) != len(paths):
        missing = sorted(set(paths) - set(stats))
        raise CompressionError(f"no calibration inputs reached {missing}: empty batches or unused layers")
    return stats
