"""CC's layers and cost model: the ``Gather`` module, the per-conv cost of spec §2, and the plan actions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.factorizations import LayerGeometry

__all__ = ["DECOMP", "PRUNE", "ChannelSelect", "ConvShape", "layer_cost"]

PRUNE = "cc-prune"
"""Action of a layer that stays one conv (input channels deleted and/or output channels thinned)."""
DECOMP = "cc-decomp"
"""Action of a layer that becomes Conv k×k (I'→r) → Conv 1×1 (r→O')."""


# ================================================================================================ module
class ChannelSelect(nn.Module):
    """Keep the input channels ``index`` (``x.index_select(1, index)``; exported as an ONNX ``Gather``).

    The index is a registered buffer (saved with the weights, never a parameter), so parameter counts
    ignore it, as the spec asks for the code's ``keep_index``.
    """

    index: torch.Tensor

    def __init__(self, index: Sequence[int] | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The kept channels of ``x`` (N, C, H, W), in index order."""
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        """Number of kept channels."""
        return f"{self.index.numel()} channels"


# ================================================================================================ cost model
@dataclass(frozen=True)
class ConvShape:
    """What a conv's cost depends on (spec §2): channels, kernel taps, output positions, bias."""

    out_channels: int
    in_channels: int
    taps: int
    pixels: int
    bias: bool = False

    @classmethod
    def of(cls, conv: nn.Conv2d, geometry: LayerGeometry) -> ConvShape:
        """Shape of ``conv`` at the spatial size seen in ``geometry``."""
        kh, kw = conv.kernel_size
        return cls(conv.out_channels, conv.in_channels, kh * kw, geometry.out_pixels, conv.bias is not None)

    @property
    def full_rank(self) -> int:
        """``R = min(O, I·k²)``: the rank bound of the unfolding (B2, the fixed code)."""
        return min(self.out_channels, self.in_channels * self.taps)

    @property
    def dense_macs(self) -> int:
        """MACs of the original layer, ``F₀ = O·I·k²·H'W'``."""
        return self.out_channels * self.in_channels * self.taps * self.pixels

    def weights(self, in_kept: int, rank: int | None = None, out_kept: int | None = None) -> int:
        """Weights (no bias) of the compressed layer: ``O'·I'·k²`` or ``I'·k²·r + r·O'``."""
        out = self.out_channels if out_kept is None else out_kept
        if rank is None:
            return out * in_kept * self.taps
        return in_kept * self.taps * rank + rank * out

    def macs(self, in_kept: int, rank: int | None = None, out_kept: int | None = None) -> int:
        """MACs of the compressed layer (weights × output positions; bias not counted)."""
        return self.weights(in_kept, rank, out_kept) * self.pixels

    def params(self, in_kept: int, rank: int | None = None, out_kept: int | None = None) -> int:
        """Parameters of the compressed layer (weights + bias)."""
        out = self.out_channels if out_kept is None else out_kept
        return self.weights(in_kept, rank, out_kept) + (out if self.bias else 0)

    def max_reduction(self, *, prune: bool, decompose: bool) -> int:
        """Largest own-MACs reduction the arm can reach (one channel and/or rank 1 left)."""
        i_min = 1 if prune else self.in_channels
        best = self.macs(i_min) if prune else self.dense_macs
        if decompose:
            best = min(best, self.macs(i_min, 1))
        return self.dense_macs - best


def layer_cost(shape: ConvShape, in_kept: int, rank: int | None, decomposed: bool) -> int:
    """MACs of a layer with ``in_kept`` inputs, decomposed at ``rank`` or a single conv (spec §2)."""
    return shape.macs(in_kept, rank if decomposed else None)
