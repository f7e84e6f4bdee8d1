"""The inference module of an LRSD layer: a low-rank chain in parallel with a masked dense layer, summed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_core.errors import CompressionError

__all__ = ["LowRankSparse"]


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
