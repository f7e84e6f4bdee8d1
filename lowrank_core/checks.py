"""Input checks shared by the stages: bounded numbers, memory budgets, usable weights.

Each check raises a one-line :class:`~lowrank_core.errors.UserInputError` naming the offending value,
before anything is allocated or written. ``argparse`` types (:func:`duration_arg`, :func:`count_arg`)
wrap the same checks. torch is imported only by the weight checks.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lowrank_core.errors import UserInputError

__all__ = [
    "MAX_BATCH",
    "MAX_DURATION_S",
    "MAX_ITERS",
    "check_count",
    "check_duration",
    "check_finite_module",
    "check_memory",
    "check_path_length",
    "check_state_dict",
    "count_arg",
    "duration_arg",
]

MAX_DURATION_S = 86_400.0
"""Longest accepted measurement or warm-up budget (one day)."""
MAX_ITERS = 10_000_000
"""Most timed iterations accepted per model."""
MAX_BATCH = 65_536


def check_duration(value: Any, name: str = "DURATION", *, allow_zero: bool = False) -> float:
    """A finite number of seconds in (0, :data:`MAX_DURATION_S`] (``[0, …]`` with ``allow_zero``)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    low_ok = seconds >= 0 if allow_zero else seconds > 0
    if isinstance(value, bool) or not math.isfinite(seconds) or not low_ok or seconds > MAX_DURATION_S:
        low = ">= 0" if allow_zero else "> 0"
        raise UserInputError(f"{name} must be a number of seconds {low} and <= {MAX_DURATION_S:g}, got {value!r}")
    return seconds


def check_count(value: Any, name: str, *, low: int = 1, high: int = MAX_ITERS) -> int:
    """A whole number in ``[low, high]`` (``"abc"``, ``3.5``, ``True`` refused)."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        number = int(value)
    if number is None or not low <= number <= high:
        raise UserInputError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return number


def duration_arg(name: str, *, allow_zero: bool = False) -> Any:
    """An ``argparse`` type for :func:`check_duration`."""

    def parse(text: str) -> float:
        try:
            return check_duration(text, name, allow_zero=allow_zero)
        except UserInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


def count_arg(name: str, *, low: int = 1, high: int = MAX_ITERS) -> Any:
    """An ``argparse`` type for :func:`check_count`."""

    def parse(text: str) -> int:
        try:
            return check_count(text, name, low=low, high=high)
        except UserInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


FILE_NAME_ROOM = 64
"""Bytes kept free for the longest file name a stage writes in a folder (``.model.int8.trt.<8>.lrd-tmp.onnx``)."""


def check_path_length(path: str | os.PathLike[str], name: str = "OUT") -> None:
    """Refuse a folder whose names the file system cannot hold (``File name too long``), before anything is written.

    Each component must fit the file system's ``NAME_MAX`` (255 bytes on Linux) and the whole absolute path,
    plus room for the files written in it, its ``PATH_MAX`` (4096).

    Raises:
        UserInputError: naming the too-long component (shortened) and its length.
    """
    folder = os.path.abspath(os.fspath(path))
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    name_max, path_max = _pathconf(probe, "PC_NAME_MAX", 255), _pathconf(probe, "PC_PATH_MAX", 4096)
    for part in folder.split(os.sep):
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 40 else f"{part[:20]}…{part[-12:]}"
            raise UserInputError(
                f"{name} has a folder name of {size} bytes ({shown!r}); the file system allows {name_max}: "
                f"choose a shorter {name}"
            )
    size = len(os.fsencode(folder)) + 1 + FILE_NAME_ROOM
    if size > path_max:
        raise UserInputError(
            f"{name} {os.fspath(path)[:40]!r}… makes paths of {size} bytes; the file system allows {path_max}: "
            f"choose a shorter {name}"
        )


def _pathconf(path: str, key: str, default: int) -> int:
    try:
        return int(os.pathconf(path, key))
    except (OSError, ValueError):
        return default


def check_memory(shape: Sequence[int], what: str, *, bytes_per_element: int = 4, factor: float = 8.0) -> int:
    """Refuse a tensor of ``shape`` whose estimated working memory exceeds the machine's available memory.

    ``factor`` scales the tensor's size to the activations a network keeps while running on it (a CNN's
    early feature maps are several times its input).

    Returns:
        The tensor's size in bytes.

    Raises:
        UserInputError: naming the shape and the memory it would need.
    """
    elements = 1
    for d in shape:
        elements *= int(d)
    size = elements * bytes_per_element
    need = size * factor
    available = _available_memory()
    if need > available:
        raise UserInputError(
            f"{what} of shape {'x'.join(str(int(d)) for d in shape)} would need about {need / 1e9:.1f} GB "
            f"(available {available / 1e9:.1f} GB); use a smaller input size or batch"
        )
    return size


def _available_memory() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unreadable /proc: assume a generous machine, still bounded
        return 64e9


def check_state_dict(state: Mapping[str, Any], own: Mapping[str, Any], source: str) -> None:
    """Refuse weights that cannot be a model: non-finite values, integer tensors for float parameters, all zeros.

    Half-precision tensors for float32 parameters are accepted with a warning on stderr (they are
    converted when loaded).

    Args:
        state: The tensors read from the file.
        own: The model's own state_dict (the dtypes it expects).
        source: The file, for messages.

    Raises:
        UserInputError: naming the file and the first offending tensor.
    """
    import torch

    converted, nonzero, float_weights = [], False, 0
    for key, tensor in state.items():
        mine = own.get(key)
        if mine is None or not isinstance(tensor, torch.Tensor) or not mine.is_floating_point():
            continue
        if not tensor.is_floating_point():
            raise UserInputError(
                f"weights file {source!r} stores {key} as {str(tensor.dtype).removeprefix('torch.')}, not floating "
                "point; re-save the model's float weights"
            )
        if tensor.dtype != mine.dtype:
            converted.append(key)
        if not bool(torch.isfinite(tensor).all()):
            raise UserInputError(
                f"weights file {source!r} holds NaN or infinite values in {key}; re-train or re-save the model"
            )
        if tensor.dim() >= 2:
            float_weights += 1
            nonzero = nonzero or bool(tensor.any())
    if float_weights and not nonzero:
        raise UserInputError(
            f"weights file {source!r} holds only zeros in every weight tensor ({float_weights}); it is not a "
            "trained model"
        )
    if converted:
        dtype = str(state[converted[0]].dtype).removeprefix("torch.")
        print(
            f"WARNING: weights file {source!r} stores {len(converted)} tensors as {dtype} (e.g. {converted[0]}); "
            "converted to the model's float32",
            file=sys.stderr,
        )


def check_finite_module(model: Any, source: str) -> None:
    """Refuse a module whose parameters or float buffers hold NaN or infinite values (one line naming one)."""
    import torch

    for key, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserInputError(
                f"the weights of {source} hold NaN or infinite values in {key}; they cannot be compressed"
            )
