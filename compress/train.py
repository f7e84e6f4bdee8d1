"""Training, fine-tuning and evaluation of (compressed) CNNs on the data layer's splits.

One :class:`Trainer` serves dense training and post-compression fine-tuning:

* SGD (momentum, Nesterov) or AdamW; weight decay on every parameter except normalisation layers';
* a per-step learning-rate schedule (cosine or step, optional linear warm-up) computed from the global
  step, so a resumed run continues on exactly the same curve without a pickled scheduler;
* label smoothing, knowledge distillation from a dense teacher (Hinton's T²-scaled KL term), gradient
  clipping, extra loss terms (:class:`Regularizer`, e.g. orthogonality) logged per epoch;
* AMP on CUDA (bfloat16 where supported, else float16 with a gradient scaler), channels-last;
* deterministic seeds: the batch order and augmentation come from the loader's (seed, epoch, step)
  generators, so the same seed gives the same run, and a resumed run the same losses;
* checkpoints (``checkpoint.pt``: weights, optimizer, step, history, plan) written atomically after
  every epoch and read back with ``torch.load(weights_only=True)``; a killed run resumes from the last
  completed epoch;
* data-parallel training under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA): every rank takes its slice
  of the same global batch, so N processes train the same model as one process with that batch
  (exactly so for models without BatchNorm; BN statistics are per process, as in any DDP run
  without SyncBatchNorm, which PyTorch supports only on accelerators — ``sync_bn`` converts on CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_deploy.errors import UserInputError
from lowrank_deploy.io import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from compress.data import Split

__all__ = [
    "Accuracy",
    "DistributedContext",
    "Regularizer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "distributed_context",
    "evaluate",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "lowrank-deploy-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.json"

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


class Regularizer(Protocol):
    """An extra loss term added to the task loss (e.g. soft orthogonality); its value is logged."""

    name: str

    def __call__(self, model: nn.Module, progress: float) -> torch.Tensor:
        """Weighted penalty for ``model`` at ``progress`` ∈ [0, 1] of the run (for weight schedules)."""
        ...


# --------------------------------------------------------------------------------------------- evaluation
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


# --------------------------------------------------------------------------------------------- distributed
@dataclass
class DistributedContext:
    """Rank and world size of this process; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (a copy; CPU tensors for gloo, moved as needed for NCCL)."""
        if not self.enabled:
            return tensor
        import torch.distributed as tdist

        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        out = tensor.detach().to(device).clone()
        tdist.all_reduce(out)
        return out.cpu()

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()


def distributed_context(device: str) -> DistributedContext:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), if any.

    gloo on CPU, NCCL on CUDA. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) needs no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as tdist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def resolve_device(device: str, dist: DistributedContext | None = None) -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; under DDP on CUDA each rank takes its local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda: no CUDA device is visible to torch; use --device cpu")
        if dist is not None and dist.enabled and device == "cuda":
            device = f"cuda:{dist.local_rank}"
    elif device != "cpu":
        raise UserInputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary name and rename: a kill never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``.

    Raises:
        UserInputError: missing, empty, corrupt or foreign file.
    """
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"checkpoint {str(p)!r} does not exist; start without --resume or pass the right --out")
    if p.stat().st_size == 0:
        raise UserInputError(f"checkpoint {str(p)!r} is empty; delete it and start again")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt zip files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserInputError(
            f"checkpoint {str(p)!r} is corrupt or not a weights-only checkpoint ({first}); delete it and start again"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{str(p)!r} is not a lowrank-deploy training checkpoint (format {CHECKPOINT_FORMAT})")
    return obj


# --------------------------------------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run reports."""

    history: list[dict[str, Any]]
    final: Accuracy | None
    steps: int
    wall_s: float
    resumed_from_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "epochs": len(self.history),
            "steps": self.steps,
            "wall_s": self.wall_s,
            "resumed_from_epoch": self.resumed_from_epoch,
            "final": None if self.final is None else self.final.to_dict(),
            "history": self.history,
            **self.extra,
        }


def _norm_param_ids(model: nn.Module) -> set[int]:
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: decayed (conv/linear weights and biases) and normalisation parameters (no decay)."""
    norm_ids = _norm_param_ids(model)
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in norm_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Trainer:
    """Train ``model`` on ``train`` (a :class:`compress.data.Split`), evaluating on ``test`` every epoch.

    Args:
        model: The model to train in place (dense or compressed).
        config: Hyper-parameters.
        train: Training split (augmented).
        test: Evaluation split, or ``None``.
        out_dir: Where ``checkpoint.pt`` and ``train_log.json`` go; ``None`` keeps nothing on disk.
        teacher: Dense model for knowledge distillation when ``config.kd_alpha > 0``.
        regularizers: Extra loss terms, each logged per epoch under its ``name``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        meta: Facts stored in the checkpoint (model spec, plan, data) so it can be rebuilt.
        progress: Show a progress bar (tqdm, rank 0, only on a terminal unless forced True).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train: Split,
        test: Split | None = None,
        *,
        out_dir: str | os.PathLike[str] | None = None,
        teacher: nn.Module | None = None,
        regularizers: Sequence[Regularizer] = (),
        device: str = "auto",
        meta: dict[str, Any] | None = None,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if config.kd_alpha > 0 and teacher is None:
            raise UserInputError("knowledge distillation (kd_alpha > 0) needs a teacher model; pass the dense model")
        self.config = config
        self.dist = distributed_context("cuda" if device.startswith("cuda") else device)
        self.device = resolve_device(device, self.dist)
        for module in model.modules():  # layers whose sparsity pattern is part of the compression (LRSD)
            freeze = getattr(module, "freeze_support_", None)
            if callable(freeze):
                freeze()
        self.model = model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_split, self.test_split = train, test
        self.teacher = None if teacher is None or config.kd_alpha == 0 else teacher.to(self.device).eval()
        self.regularizers = list(regularizers)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.meta = dict(meta or {})
        self.progress = progress
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.start_epoch = 0

        if config.batch_size % self.dist.world_size:
            raise UserInputError(
                f"batch size {config.batch_size} does not split over {self.dist.world_size} processes; "
                "use a multiple of the process count"
            )
        from compress.data import BatchLoader

        self.loader = BatchLoader(
            train,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=config.num_workers,
        )
        if len(self.loader) == 0:
            raise UserInputError(
                f"the training split has {len(train)} images, fewer than one batch of {config.batch_size}; "
                "lower the batch size"
            )
        self.net: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if config.sync_bn and self.device.startswith("cuda"):
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = self._make_optimizer()
        self.amp_dtype = self._amp_dtype()
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 and self.device.startswith("cuda") else None
        )

    # ---------------------------------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = parameter_groups(self.model, c.weight_decay)
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.base_lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)
        return torch.optim.AdamW(groups, lr=c.base_lr)

    def _amp_dtype(self) -> torch.dtype | None:
        if not (self.config.amp and self.device.startswith("cuda")):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (``max_steps`` caps it)."""
        total = self.config.epochs * self.steps_per_epoch
        return total if self.config.max_steps is None else min(total, self.config.max_steps)

    # ---------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt``."""
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_FILE

    def state(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer, counters, history, config, meta."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": len(self.history),
            "step": self.step,
            "history_json": json.dumps(self.history),
            "config_json": json.dumps(self.config.to_dict()),
            "meta_json": json.dumps(self.meta, default=str),
        }

    def resume(self, path: str | os.PathLike[str] | None = None) -> bool:
        """Load ``checkpoint.pt`` (or ``path``) if it exists; return whether a run was resumed.

        Raises:
            UserInputError: the checkpoint is corrupt or belongs to another model.
        """
        p = Path(path) if path is not None else self.checkpoint_path
        if p is None or not p.exists():
            return False
        ckpt = load_checkpoint(p)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise UserInputError(
                f"checkpoint {str(p)!r} does not fit this model ({first}); use another --out or delete it"
            ) from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.history = json.loads(ckpt.get("history_json", "[]"))
        self.step = int(ckpt["step"])
        self.start_epoch = int(ckpt["epoch"])
        return True

    def _save(self) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.out_dir / CHECKPOINT_FILE, self.state())
        atomic_write_json(
            self.out_dir / LOG_FILE, {"config": self.config.to_dict(), "meta": self.meta, "epochs": self.history}
        )

    # ---------------------------------------------------------------------------------------- training
    def _loss(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        autocast = (
            torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            logits = self.net(images)
            task = F.cross_entropy(logits.float(), labels, label_smoothing=c.label_smoothing)
            loss = task
            terms: dict[str, Any] = {"task": task.detach()}
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images).float()
                t = c.kd_temperature
                kd = F.kl_div(
                    F.log_softmax(logits.float() / t, dim=1),
                    F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean",
                    log_target=True,
                ) * (t * t)
                loss = (1 - c.kd_alpha) * task + c.kd_alpha * kd
                terms["kd"] = kd.detach()
        for reg in self.regularizers:
            value = reg(self.model, progress)
            loss = loss + value
            terms[reg.name] = value.detach()
        return loss, {"logits": logits.detach(), **terms}

    def fit(self) -> TrainResult:
        """Train for the remaining epochs (after :meth:`resume`), checkpointing after each one."""
        c = self.config
        t_start = time.perf_counter()
        resumed_from = self.start_epoch
        for epoch in range(self.start_epoch, c.epochs):
            if self.step >= self.total_steps:
                break
            record = self._train_epoch(epoch)
            if self.test_split is not None:
                acc = evaluate(
                    self.model,
                    self.test_split,
                    batch_size=c.eval_batch_size,
                    max_samples=c.eval_samples,
                    device=self.device,
                    dist=self.dist,
                    channels_last=c.channels_last,
                )
                record["test"] = acc.to_dict()
            self.history.append(record)
            self._save()
            if self.dist.is_main:
                test = f", test {record['test']['top1'] * 100:.2f}%" if "test" in record else ""
                extra = "".join(f", {k} {v:.4g}" for k, v in record["terms"].items() if k != "task")
                self._log(
                    f"epoch {epoch + 1}/{c.epochs}: loss {record['loss']:.4f}, train {record['train_top1'] * 100:.2f}%"
                    f"{test}{extra}, lr {record['lr_end']:.4g}, {record['wall_s']:.1f} s"
                )
        final = None
        if self.history and "test" in self.history[-1]:
            t = self.history[-1]["test"]
            final = Accuracy(top1=t["top1"], n=t["n"], ci95=tuple(t["ci95"]), loss=t["loss"], top5=t.get("top5"))
        return TrainResult(
            history=self.history,
            final=final,
            steps=self.step,
            wall_s=time.perf_counter() - t_start,
            resumed_from_epoch=resumed_from,
        )

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.set_epoch(epoch)
        it: Any = iter(self.loader)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if show and self.dist.is_main:
            from tqdm import tqdm

            it = tqdm(it, total=len(self.loader), desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False)
            self._bar = it
        else:
            self._bar = None
        yield from it

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        c = self.config
        self.net.train()
        if self.teacher is not None:
            self.teacher.eval()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss·n, correct, n
        term_sums: dict[str, float] = {}
        steps_this_epoch = 0
        lr = c.base_lr
        for images, labels in self._batches(epoch):
            if self.step >= self.total_steps:
                break
            lr = c.lr_at(self.step, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if c.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            progress = self.step / max(1, self.total_steps)
            loss, terms = self._loss(images, labels, progress)
            if not torch.isfinite(loss):
                raise UserInputError(
                    f"training diverged at step {self.step} (loss {float(loss)}); lower the learning rate (--lr)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if c.clip_grad is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            steps_this_epoch += 1
            n = len(labels)
            correct = float((terms["logits"].argmax(1) == labels).sum())
            sums += torch.tensor([float(terms["task"]) * n, correct, n], dtype=torch.float64)
            for k, v in terms.items():
                if k != "logits":
                    term_sums[k] = term_sums.get(k, 0.0) + float(v)
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}%")
        if self._bar is not None:
            self._bar.close()
        sums = self.dist.all_reduce_sum(sums)
        n = max(1.0, float(sums[2]))
        wall = time.perf_counter() - t0
        return {
            "epoch": epoch + 1,
            "steps": steps_this_epoch,
            "loss": float(sums[0]) / n,
            "train_top1": float(sums[1]) / n,
            "terms": {k: v / max(1, steps_this_epoch) for k, v in term_sums.items()},
            "lr_end": lr,
            "wall_s": wall,
            "images_per_s": n / wall if wall > 0 else None,
            "world_size": self.dist.world_size,
        }
