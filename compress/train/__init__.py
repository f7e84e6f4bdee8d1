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

Modules: :mod:`~compress.train.config` (:class:`TrainConfig`), :mod:`~compress.train.trainer`
(:class:`Trainer`), :mod:`~compress.train.evaluation` (:func:`evaluate`), :mod:`~compress.train.checkpoint`,
:mod:`~compress.train.distributed`.
"""

from __future__ import annotations

from compress.train.checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, LOG_FILE, load_checkpoint, save_checkpoint
from compress.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from compress.train.distributed import DistributedContext, distributed_context, resolve_device
from compress.train.evaluation import Accuracy, eval_subset, evaluate, wilson_interval
from compress.train.trainer import Regularizer, Trainer, TrainResult, parameter_groups

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "LOG_FILE",
    "OPTIMIZERS",
    "SCHEDULES",
    "Accuracy",
    "DistributedContext",
    "Regularizer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "distributed_context",
    "eval_subset",
    "evaluate",
    "load_checkpoint",
    "parameter_groups",
    "resolve_device",
    "save_checkpoint",
    "wilson_interval",
]
