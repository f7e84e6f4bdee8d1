"""A loaded model and the weight-file helpers every model source shares (torchvision, the zoo, timm, a factory).

:mod:`compress.models` (torchvision, zoo, factory) and :mod:`compress.timm_models` both build on this module,
so neither imports the other's internals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_core.checks import check_state_dict
from lowrank_core.errors import UserInputError

__all__ = [
    "LoadedModel",
    "check_batchnorm_statistics",
    "input_channels",
    "load_into",
    "load_state_dict_file",
    "output_features",
    "task_classes",
]


@dataclass
class LoadedModel:
    """A model with the facts every report needs about where it came from."""

    model: nn.Module
    spec: str
    name: str
    weights: str
    weights_requested: str
    warning: str | None
    input_shape: tuple[int, int, int]
    num_classes: int | None
    task: str = "classification"
    output_names: tuple[str, ...] = ("output",)


# ------------------------------------------------------------------------------------------------ weight files
def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file with ``weights_only=True``.

    Accepts a bare state_dict or a checkpoint dict holding one under ``state_dict``, ``model`` or
    ``model_state_dict``; a ``module.`` prefix (DataParallel) is stripped.

    Raises:
        UserInputError: missing, empty or corrupt file, or no tensors in it.
    """
    p = Path(path)
    if not p.is_file():
        raise UserInputError(
            f"weights file {str(p)!r} does not exist; pass WEIGHTS=auto|imagenet|random or an existing file"
        )
    if p.stat().st_size == 0:
        raise UserInputError(f"weights file {str(p)!r} is empty; re-save the checkpoint")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for corrupt files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserInputError(
            f"weights file {str(p)!r} is corrupt or not a weights-only checkpoint ({first}); "
            "re-save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(f"weights file {str(p)!r} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """Load ``state`` into ``model`` strictly, or raise :class:`UserInputError` naming what does not match.

    A wrapped segmentation/detection model also takes the plain torchvision state_dict of the model it wraps.
    """
    inner = getattr(model, "model", None) or getattr(model, "detector", None)
    if getattr(model, "output_names", None) is not None and isinstance(inner, nn.Module):
        prefix = "model." if getattr(model, "model", None) is inner else "detector."
        if not any(k.startswith(prefix) for k in state):  # a plain torchvision state_dict of the wrapped model
            model = inner
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            detail.append(
                f"{len(mismatched)} with other shapes (e.g. {k}: {list(state[k].shape)} vs {list(own[k].shape)})"
            )
        raise UserInputError(
            f"weights file {str(source)!r} does not match the model: {'; '.join(detail)}; "
            "check MODEL and the number of classes"
        )
    check_state_dict(state, own, str(source))  # NaN/inf, integer or all-zero weights refused; fp16 converted
    model.load_state_dict(state)
    check_batchnorm_statistics(model, f"weights file {str(source)!r}")


def check_batchnorm_statistics(model: nn.Module, source: str) -> None:
    """Refuse a BatchNorm ``running_var`` below 0: no data gives one, and it turns the outputs into NaN.

    ``sqrt(running_var + eps)`` of a negative variance is NaN in PyTorch and ONNX Runtime alike, so the
    export would fail parity on NaN outputs with no hint of why; this names the tensor at load instead.
    (NaN/infinite values are refused by :func:`lowrank_core.checks.check_state_dict` and
    ``check_finite_module``.)

    Raises:
        UserInputError: one line naming the first offending tensor, its count of negative values and its minimum.
    """
    for name, module in model.named_modules():
        var = getattr(module, "running_var", None)
        if not isinstance(module, nn.modules.batchnorm._NormBase) or not isinstance(var, torch.Tensor):
            continue
        negative = var < 0
        if bool(negative.any()):
            raise UserInputError(
                f"{source} holds an impossible BatchNorm statistic: {name}.running_var has "
                f"{int(negative.sum())} of {var.numel()} values below 0 (min {float(var.min()):.3g}); a variance "
                "cannot be negative, and it would make every output NaN; re-train or re-save the model"
            )


def input_channels(model: nn.Module) -> int:
    """Input channels of the first Conv2d (3 when there is none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 3


def task_classes(model: nn.Module) -> int | None:
    """Classes of a wrapped segmentation model (its last conv's channels) or detector (its head's ``num_classes``)."""
    inner = getattr(model, "model", None)
    if inner is not None:  # segmentation: the classifier ends in a conv with one channel per class
        convs = [m for m in inner.classifier.modules() if isinstance(m, nn.Conv2d)]
        return int(convs[-1].out_channels) if convs else None
    detector = getattr(model, "detector", None)
    head = getattr(getattr(detector, "head", None), "classification_head", None)
    return int(head.num_classes) if head is not None and hasattr(head, "num_classes") else None


def output_features(model: nn.Module) -> int | None:
    """Output features of the last Linear (the classes of a classifier), ``None`` when there is none."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = int(module.out_features)
    return last
