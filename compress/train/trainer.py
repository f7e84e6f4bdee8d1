"""The :class:`Trainer`: one loop for dense training and post-compression fine-tuning (see :mod:`compress.train`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from compress.train.checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, LOG_FILE, load_checkpoint, save_checkpoint
from compress.train.config import TrainConfig
from compress.train.distributed import distributed_context, resolve_device
from compress.train.evaluation import Accuracy, evaluate
from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_write_json
from lowrank_core.progress import Progress, heartbeat

if TYPE_CHECKING:
    from compress.data import Split

__all__ = ["Regularizer", "TrainResult", "Trainer", "parameter_groups"]


class Regularizer(Protocol):
    """An extra loss term added to the task loss (e.g. soft orthogonality); its value is logged."""

    name: str

    def __call__(self, model: nn.Module, progress: float) -> torch.Tensor:
        """Weighted penalty for ``model`` at ``progress`` ∈ [0, 1] of the run (for weight schedules)."""
        ...


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
        progress: Progress on stderr, rank 0 (:class:`lowrank_core.progress.Progress`: ``None`` = a bar on a
            terminal, throttled lines with epoch, batch, loss and ETA in a log; ``False``: off).
        log: Where the per-epoch lines go (default: stderr).
        label: What the progress lines call the run (``train``, ``finetune``).
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
        label: str = "train",
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
        self.label = label
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
                with heartbeat(f"{self.label} epoch {epoch + 1}/{c.epochs}: evaluating", enabled=self._enabled):
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

    @property
    def _enabled(self) -> bool | None:
        """The ``enabled`` of this rank's progress: off on other ranks and when ``progress=False``."""
        return False if not self.dist.is_main else self.progress

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.set_epoch(epoch)
        self._bar = Progress(
            len(self.loader),
            f"{self.label} epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            enabled=self._enabled,
        )
        yield from self.loader

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
            self._bar.update(1, f"loss {sums[0] / sums[2]:.3f}, train top-1 {100 * sums[1] / sums[2]:.1f}%")
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
