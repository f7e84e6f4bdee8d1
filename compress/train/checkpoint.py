"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_path

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "LOG_FILE", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "lowrank-deploy-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.json"


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
