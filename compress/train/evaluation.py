"""Top-1/top-5 accuracy with its Wilson interval, evaluated over (sharded) splits of the data layer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.train.distributed import DistributedContext
from lowrank_core.errors import UserInputError

if TYPE_CHECKING:
    from compress.data import Split

__all__ = ["Accuracy", "eval_subset", "evaluate", "wilson_interval"]


@dataclass(frozen=True)
class Accuracy:
    """Top-1 (and top-5 where there are more than 10 classes) with its 95 % Wilson interval."""

    top1: float
    n: int
    ci95: tuple[float, float]
    loss: float
    top5: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d

    def __str__(self) -> str:
        lo, hi = self.ci95
        top5 = "" if self.top5 is None else f", top-5 {100 * self.top5:.2f}%"
        return f"top-1 {100 * self.top1:.2f}% (95% CI {100 * lo:.1f}–{100 * hi:.1f}, n={self.n}){top5}"


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (good near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def eval_subset(split: Split, max_samples: int | None, seed: int = 0) -> Split:
    """``split`` itself, or a fixed seeded subset of ``max_samples`` images (the fast mode)."""
    if max_samples is None or max_samples >= len(split):
        return split
    from compress.data import calibration_subset

    return calibration_subset(split, max_samples, seed=seed)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int = 512,
    max_samples: int | None = None,
    device: str | torch.device = "cpu",
    dist: DistributedContext | None = None,
    channels_last: bool = False,
) -> Accuracy:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` (eval mode) on ``split``.

    Under DDP every rank evaluates its slice and the counts are summed, so the result is the same as
    one process evaluating everything.
    """
    from compress.data import BatchLoader

    split = eval_subset(split, max_samples)
    dist = dist or DistributedContext()
    num_classes = int(split.info.num_classes)
    loader = BatchLoader(split, batch_size * dist.world_size, shuffle=False, rank=dist.rank, world_size=dist.world_size)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss sum, n
    try:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            totals[2] += float(F.cross_entropy(logits, labels, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == labels[:, None]
            totals[0] += float(hit[:, 0].sum())
            totals[1] += float(hit.any(dim=1).sum())
            totals[3] += len(labels)
    finally:
        model.train(was_training)
    totals = dist.all_reduce_sum(totals)
    n = int(totals[3])
    if n == 0:
        raise UserInputError("evaluation split is empty; check DATA and its test folder")
    c1 = round(float(totals[0]))
    return Accuracy(
        top1=c1 / n,
        n=n,
        ci95=wilson_interval(c1, n),
        loss=float(totals[2]) / n,
        top5=float(totals[1]) / n if num_classes > 10 else None,
    )
