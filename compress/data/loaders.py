"""Seeded sampling of a split: :class:`BatchLoader` (sharded over DDP ranks and workers), :func:`calibration_subset`."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator

import torch
import torch.utils.data

from compress.data.base import Split
from compress.data.seeding import mix
from lowrank_core.errors import UserInputError

__all__ = ["BatchLoader", "calibration_subset"]


def calibration_subset(split: Split, n: int, seed: int = 0) -> Split:
    """A fixed, seeded sample of ``n`` distinct images of ``split``, without augmentation.

    The same ``n`` and ``seed`` always give the same images (a smaller ``n`` gives a prefix of a larger
    one). The result's ``indices`` (and ``indices_sha256``) record which images were chosen.

    Raises:
        UserInputError: if ``n`` is not in ``1 .. len(split)``.
    """
    try:
        n = operator.index(n)
    except TypeError:
        raise UserInputError(f"the number of calibration images must be an integer, not {n!r}") from None
    if n < 1 or n > len(split):
        raise UserInputError(
            f"cannot pick {n} images from the {split.info.name} {split.name} split of {len(split)} images; "
            f"ask for 1 to {len(split)}"
        )
    generator = torch.Generator().manual_seed(mix(0x43414C49, seed))
    order = torch.randperm(len(split), generator=generator)[:n]
    return split.subset(order, augment=False)


class _StepDataset(torch.utils.data.Dataset):
    """One item per step: ``split.batch(indices, seeds)`` (for DataLoader workers)."""

    def __init__(self, split: Split, plan: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.split = split
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor] | UserInputError:
        indices, seeds = self.plan[item]
        try:
            return self.split.batch(indices, seeds)
        except UserInputError as exc:  # handed back as a value: DataLoader would re-raise it with a traceback
            return exc


class BatchLoader:
    """Batches of a split for one rank, identical on every rank count and worker count.

    Each step takes the next ``batch_size`` (global) positions of the epoch's order (a permutation seeded
    from ``(seed, epoch)``, or ``0..n-1`` without shuffling) and one seed per sample drawn from a generator
    seeded from ``(seed, epoch, step)``; rank ``r`` gets the contiguous slice ``r*b .. (r+1)*b`` of both
    (``b = batch_size // world_size``). The concatenation of the ranks' batches of a step is therefore the
    single-process batch. A short last batch (``drop_last=False``) is split as evenly as possible (first
    ranks get one more); a rank whose slice of it is empty yields nothing for that step, so use
    ``drop_last=True`` for DDP training (evaluation that sums counts after the loop is fine either way).

    Args:
        split: The split to batch.
        batch_size: Global batch size (all ranks together).
        shuffle: Shuffle every epoch (training) or go in order (evaluation).
        seed: Seed of the order and of the augmentation seeds.
        drop_last: Drop a last batch smaller than ``batch_size``.
        rank: This process's rank.
        world_size: Number of processes.
        num_workers: Worker processes decoding batches (``torch.utils.data.DataLoader``); 0: in-process.

    Raises:
        UserInputError: if ``batch_size`` is not a positive multiple of ``world_size``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserInputError(f"rank {rank} is not in 0..{world_size - 1}; check the launcher's RANK/WORLD_SIZE")
        if batch_size < 1 or batch_size % world_size:
            raise UserInputError(
                f"batch size {batch_size} does not split over {world_size} processes; use a positive multiple of {world_size}"
            )
        if num_workers < 0:
            raise UserInputError(f"num_workers must be 0 or more, not {num_workers}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation seeds the next iteration uses."""
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _rank_slice(self, size: int) -> tuple[int, int]:
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (``steps_per_epoch`` unless its slice of the last is empty)."""
        steps = self.steps_per_epoch
        last = len(self.split) - (steps - 1) * self.batch_size if steps else 0
        if steps and last < self.batch_size:
            start, stop = self._rank_slice(last)
            return steps - (stop == start)
        return steps

    def plan(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``(indices, seeds)`` for every step of the current epoch that gives it samples."""
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix(0x5045524D, self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        steps = []
        for step in range(self.steps_per_epoch):
            indices = order[step * self.batch_size : (step + 1) * self.batch_size]
            generator = torch.Generator().manual_seed(mix(0x53454544, self.seed, self.epoch, step))
            seeds = torch.randint(0, (1 << 63) - 1, (self.batch_size,), generator=generator)[: len(indices)]
            start, stop = self._rank_slice(len(indices))
            if stop > start:
                steps.append((indices[start:stop], seeds[start:stop]))
        return steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan()
        if self.num_workers == 0:
            for indices, seeds in plan:
                yield self.split.batch(indices, seeds)
            return
        loader = torch.utils.data.DataLoader(
            _StepDataset(self.split, plan), batch_size=None, shuffle=False, num_workers=self.num_workers
        )
        for item in loader:
            if isinstance(item, UserInputError):
                raise item
            yield item
