"""The layers a joint-SVD plan builds: Tai's F1×1 → 1×F2 pair of stock convs, and Bi-JSVD's parallel sum."""

from __future__ import annotations

import torch
from torch import nn

from compress.planning import pair

__all__ = ["ParallelSum", "pair_convs"]


class ParallelSum(nn.Module):
    """Bi-JSVD layer: two chains of stock convs on the same input, summed (``Add`` in ONNX)."""

    def __init__(self, right: nn.Module, left: nn.Module) -> None:
        """Hold both branches.

        Args:
            right: The RJSVD term, private F1×1 conv → shared 1×F2 conv.
            left: The LJSVD term, shared F1×1 conv → private 1×F2 conv.
        """
        super().__init__()
        self.right = right
        self.left = left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``right(x) + left(x)``."""
        return self.right(x) + self.left(x)


def pair_convs(module: nn.Conv2d, rank: int, *, bias: bool) -> nn.Sequential:
    """Empty F1×1 (vertical stride/pad) → 1×F2 (horizontal stride/pad) chain with ``module``'s geometry."""
    o, i, f1, f2 = (int(v) for v in module.weight.shape)
    (sh, sw), (ph, pw), (dh, dw) = pair(module.stride), pair(module.padding), pair(module.dilation)
    kw = {"device": "meta" if module.weight.is_meta else module.weight.device, "dtype": module.weight.dtype}
    return nn.Sequential(
        nn.Conv2d(i, rank, (f1, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False, **kw),
        nn.Conv2d(rank, o, (1, f2), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=bias, **kw),
    )
