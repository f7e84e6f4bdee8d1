"""Counter-based seeding: splitmix64 hashes and the per-sample augmentation parameters derived from them.

Every random choice of the data layer (epoch order, per-sample augmentation, calibration samples) is a pure
function of integers hashed here, so a batch is the same on any number of ranks and worker processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MASK64", "augment_params", "crop_flip", "mix", "splitmix64", "splitmix64_int"]

MASK64 = (1 << 64) - 1


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of every int64 element (two's complement wrap-around stands for uint64 arithmetic)."""
    z = x.to(torch.int64) + _signed(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def splitmix64_int(x: int) -> int:
    """splitmix64 of one Python integer (the scalar twin of :func:`splitmix64`)."""
    z = (x + _GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def mix(*values: int) -> int:
    """A 64-bit seed from a tuple of integers (order-sensitive)."""
    h = 0
    for value in values:
        h = splitmix64_int(h ^ (int(value) & MASK64))
    return h


def augment_params(seeds: torch.Tensor, pad: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``dy, dx`` in ``[0, 2*pad]`` and flip bits, each a function of its seed only."""
    h = splitmix64(seeds)
    span = 2 * pad + 1
    dy = ((h >> 8) & 0xFFFF) % span
    dx = ((h >> 24) & 0xFFFF) % span
    flips = ((h >> 40) & 1).bool() if flip else torch.zeros(h.shape, dtype=torch.bool)
    return dy, dx, flips


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop every image of ``images`` (B,C,H,W), zero-padded by ``pad``, at ``(dy, dx)`` and flip where asked.

    One ``gather`` over the flattened padded images does all crops and flips of the batch.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + dx[:, None]
    rows = (dy[:, None] + torch.arange(h)) * (w + 2 * pad)
    flat = (rows[:, :, None] + cols[:, None, :]).view(b, 1, h * w)
    return padded.reshape(b, c, (h + 2 * pad) * (w + 2 * pad)).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)
