"""CIFAR-10 / CIFAR-100 python batches, read with a restricted unpickler that only rebuilds numpy arrays."""

from __future__ import annotations

import functools
import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.data.base import CACHE_SIZE, Dataset, file_stamp, one_line, tensor_dataset
from lowrank_core.errors import UserInputError

__all__ = ["CIFAR_LAYOUTS", "CifarLayout", "load_cifar"]


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant keeps its files and labels, and its normalisation statistics."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    archive: str

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the layout needs: the train batches, the test batch, the metadata file."""
        return (*self.train, self.test, self.meta)


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        "cifar-10-python.tar.gz",
    ),
    "cifar100": CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "cifar-100-python.tar.gz",
    ),
}


def _numpy_reconstruct() -> Any:
    try:
        module = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        module = importlib.import_module("numpy.core.multiarray")
    return module._reconstruct


# Everything a CIFAR python batch may ask for: numpy's array reconstruction (numpy 1 and 2 module names).
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array reconstruction; any other global is refused unexecuted."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _read_cifar_pickle(path: Path, layout: CifarLayout) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            obj = CifarUnpickler(file, encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise UserInputError(
            f"{path} is not a CIFAR python batch (it asks for {one_line(exc)}); only numpy arrays are allowed, re-extract {layout.archive}"
        ) from None
    except OSError as exc:
        raise UserInputError(
            f"cannot read {path} ({exc.strerror or one_line(exc)}); re-extract {layout.archive}"
        ) from None
    except Exception as exc:  # any parse failure of a user file (truncated, garbage) is bad input
        raise UserInputError(
            f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {one_line(exc)}); re-extract {layout.archive}"
        ) from None
    if not isinstance(obj, dict):
        raise UserInputError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict; re-extract {layout.archive}")
    return {key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _cifar_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path, layout)
    data, labels = batch.get("data"), batch.get(layout.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserInputError(
            f"{path} has no uint8 N×3072 'data' array (found {described}); re-extract {layout.archive}"
        )
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError):
        labels = np.asarray([])
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise UserInputError(
            f"{path} has no list of {len(data)} integer '{layout.label_key}'; is it a {layout.title} file? re-extract {layout.archive}"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= layout.num_classes):
        raise UserInputError(
            f"{path} has labels outside 0..{layout.num_classes - 1}; is it a {layout.title} file? re-extract {layout.archive}"
        )
    return data, labels.astype(np.int64)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cifar_arrays(kind: str, stamp: tuple[tuple[str, int, int], ...]) -> tuple[Any, ...]:
    layout = CIFAR_LAYOUTS[kind]
    paths = [Path(entry[0]) for entry in stamp]
    meta = _read_cifar_pickle(paths[-1], layout)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise UserInputError(
            f"{paths[-1]} has no list of {layout.num_classes} '{layout.names_key}'; re-extract {layout.archive}"
        )
    classes = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)
    splits = []
    for files in (paths[: len(layout.train)], paths[len(layout.train) : -1]):
        batches = [_cifar_batch(path, layout) for path in files]
        data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)  # a fresh, writable copy
        splits += [torch.from_numpy(data), torch.from_numpy(np.concatenate([b[1] for b in batches]))]
    return (*splits, classes)


def load_cifar(kind: str, root: Path, image_size: int | None, channels: int | None) -> Dataset:
    """CIFAR-10 (``kind="cifar10"``) or CIFAR-100 python batches in ``root``.

    Raises:
        UserInputError: if a file is missing, is not a CIFAR python batch, or asks for a forbidden global.
    """
    layout = CIFAR_LAYOUTS[kind]
    missing = [name for name in layout.files if not (root / name).is_file()]
    if missing:
        raise UserInputError(
            f"{layout.title} folder {root} lacks {', '.join(missing)}; re-extract {layout.archive} (python version)"
        )
    train_x, train_y, test_x, test_y, classes = _cifar_arrays(kind, file_stamp([root / name for name in layout.files]))
    return tensor_dataset(
        kind,
        kind,
        root,
        (train_x, train_y, test_x, test_y),
        classes,
        layout.mean,
        layout.std,
        4,
        True,
        image_size,
        channels,
    )
