"""Offline image datasets for training, fine-tuning, evaluation and calibration of CNNs.

Three on-disk formats, all read locally (nothing is ever downloaded), one module each:

* ``idx`` (:mod:`compress.data.idx`): the four (optionally gzipped) IDX files of MNIST-style data. The
  built-in name ``fashion-mnist`` reads them from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, or ``$FASHION_MNIST_DIR``).
* ``cifar10`` / ``cifar100`` (:mod:`compress.data.cifar`): the python pickle layout of CIFAR
  (``cifar-10-batches-py`` / ``cifar-100-python``), read with a restricted unpickler that only rebuilds
  numpy arrays.
* ``imagefolder`` (:mod:`compress.data.imagefolder`): ``root/train/<class>/*`` and ``root/val/<class>/*``
  (or ``test``) image trees.

:func:`load_data` detects the format and returns a :class:`Dataset` of two :class:`Split` objects
(:mod:`compress.data.base`). ``Split.batch(indices, seeds)`` returns normalised float32 NCHW images; with
``seeds`` each sample's augmentation depends on its seed only (:mod:`compress.data.seeding`), so
:class:`BatchLoader` (:mod:`compress.data.loaders`) can shard every global batch over DDP ranks (and worker
processes) and the union of the ranks' batches equals the single-process batch exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.data.base import DataInfo, Dataset, Split, TensorSplit
from compress.data.cifar import CIFAR_LAYOUTS, load_cifar
from compress.data.idx import (
    FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_PACKAGE,
    FASHION_MNIST_STD,
    fashion_root,
    find_idx_files,
    load_idx,
    read_idx,
)
from compress.data.imagefolder import (
    DEFAULT_IMAGEFOLDER_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderSplit,
    load_imagefolder,
)
from compress.data.loaders import BatchLoader, calibration_subset
from lowrank_core.errors import UserInputError

__all__ = [
    "DEFAULT_IMAGEFOLDER_SIZE",
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_STD",
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchLoader",
    "DataInfo",
    "Dataset",
    "ImageFolderSplit",
    "Split",
    "TensorSplit",
    "calibration_subset",
    "load_data",
    "read_idx",
]

FORMATS = ("idx", "cifar10", "cifar100", "imagefolder")


def _describe(root: Path) -> str:
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in root.iterdir())
    if not entries:
        return "it is empty"
    return f"it holds {', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}"


def _detect(root: Path) -> tuple[str, Path]:
    if find_idx_files(root):
        return "idx", root
    nested = [(kind, root / layout.folder) for kind, layout in CIFAR_LAYOUTS.items() if (root / layout.folder).is_dir()]
    if len(nested) > 1:
        raise UserInputError(
            f"{root} holds both CIFAR-10 and CIFAR-100; point at one of their folders or pass the format"
        )
    if nested:
        return nested[0]
    if any((root / name).is_file() for name in CIFAR_LAYOUTS["cifar10"].files):
        return "cifar10", root
    if any((root / name).is_file() for name in CIFAR_LAYOUTS["cifar100"].files):
        return "cifar100", root
    if any((root / name).is_dir() for name in ("train", "val", "test")):
        return "imagefolder", root
    raise UserInputError(
        f"no dataset found in {root} ({_describe(root)}); looked for IDX files (train-images-idx3-ubyte[.gz], ...), "
        "CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta or cifar-10-batches-py/), "
        "CIFAR-100 python files (train, test, meta or cifar-100-python/) and an ImageFolder tree "
        "(train/<class>/, val/<class>/); point at one of these or pass the format"
    )


def load_data(
    data: str | os.PathLike[str],
    *,
    format: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load a dataset by built-in name (``fashion-mnist``) or folder.

    Args:
        data: ``fashion-mnist`` or a folder in one of :data:`FORMATS` (CIFAR also from its parent folder).
        format: Force a format instead of detecting it from the folder's contents.
        image_size: Image size the model wants: in-memory data is resized per batch (bilinear) when it
            differs; for ImageFolder it is the crop size (default 224).
        channels: Input channels the model wants: 1-channel data is replicated to 3 (mean/std too).

    Raises:
        UserInputError: unknown name or format, missing folder or files, unrecognised layout, corrupt
            files, or a channel count the data cannot give.
    """
    if format is not None and format not in FORMATS:
        raise UserInputError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserInputError(f"image size must be a positive integer, not {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise UserInputError(f"models with {channels} input channels are not supported; use 1 or 3")
    text = os.fspath(data)
    if text == FASHION_MNIST:
        if format not in (None, "idx"):
            raise UserInputError(f"{FASHION_MNIST} is IDX data, not {format}; drop the format")
        return load_idx(fashion_root(), True, image_size, channels)
    root = Path(text).expanduser()
    if not root.exists():
        raise UserInputError(
            f"data {text!r} is neither a built-in dataset ({FASHION_MNIST}) nor an existing folder; check the path"
        )
    if not root.is_dir():
        raise UserInputError(f"data {text!r} is a file; point at the folder that holds the dataset")
    if format is None:
        format, root = _detect(root)
    elif format in CIFAR_LAYOUTS and (root / CIFAR_LAYOUTS[format].folder).is_dir():
        root = root / CIFAR_LAYOUTS[format].folder
    if format == "idx":
        return load_idx(root, None, image_size, channels)
    if format in CIFAR_LAYOUTS:
        return load_cifar(format, root, image_size, channels)
    return load_imagefolder(root, image_size, channels)
