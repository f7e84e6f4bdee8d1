"""The hyper-parameters of a training run: :class:`TrainConfig` (recorded in every checkpoint and log)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from lowrank_core.errors import UserInputError

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (recorded in every checkpoint and log).

    ``lr=None`` takes the optimizer's default (0.1 for SGD, 1e-3 for AdamW); ``milestones`` are epochs
    (default: 50 % and 75 % of the run) for the ``step`` schedule; ``max_steps`` stops early (tests,
    smoke runs); ``eval_samples`` evaluates on a fixed seeded subset of the test split (fast mode).
    """

    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    kd_alpha: float = 0.0
    kd_temperature: float = 4.0
    clip_grad: float | None = None
    amp: bool = True
    channels_last: bool = False
    sync_bn: bool = True
    seed: int = 0
    max_steps: int | None = None
    eval_samples: int | None = None
    eval_batch_size: int = 512
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UserInputError(f"epochs must be ≥ 0, got {self.epochs}")
        if self.batch_size < 1:
            raise UserInputError(f"batch size must be ≥ 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise UserInputError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.lr is not None and not self.lr > 0:
            raise UserInputError(f"learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserInputError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise UserInputError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserInputError(f"gradient clipping norm must be > 0, got {self.clip_grad}")

    @property
    def base_lr(self) -> float:
        """The peak learning rate."""
        if self.lr is not None:
            return self.lr
        return 0.1 if self.optimizer == "sgd" else 1e-3

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate of global step ``step`` (0-based)."""
        total = max(1, self.epochs * steps_per_epoch)
        warm = self.warmup_epochs * steps_per_epoch
        if warm > 0 and step < warm:
            return self.base_lr * (step + 1) / warm
        floor = self.base_lr * self.min_lr_ratio
        if self.schedule == "constant":
            return self.base_lr
        if self.schedule == "cosine":
            t = (step - warm) / max(1.0, total - warm)
            return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        milestones = self.milestones or (0.5 * self.epochs, 0.75 * self.epochs)
        epoch = step / steps_per_epoch
        return max(floor, self.base_lr * self.gamma ** sum(epoch >= m for m in milestones))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (older checkpoints)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "milestones" in kw:
            kw["milestones"] = tuple(kw["milestones"])
        return cls(**kw)
