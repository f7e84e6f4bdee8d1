"""IDX files (MNIST-style data), Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` among them."""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.data.base import CACHE_SIZE, Dataset, file_stamp, one_line, tensor_dataset
from lowrank_core.errors import UserInputError

__all__ = [
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_STD",
    "fashion_root",
    "find_idx_files",
    "load_idx",
    "read_idx",
]

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _gzip_size(raw: Any) -> int:
    """Uncompressed size modulo 2**32 from a gzip file's trailer (``raw`` is rewound)."""
    raw.seek(-4, os.SEEK_END)
    size = struct.unpack("<I", raw.read(4))[0]
    raw.seek(0)
    return size


def _read_idx_stream(stream: Any, file: Path, stored: int, compressed: bool) -> np.ndarray:
    header = stream.read(4)
    if len(header) < 4 or header[0] or header[1]:
        raise UserInputError(
            f"{file} is not an IDX file (magic number {header.hex() or 'missing'} should start with 0000); "
            "point at MNIST-style *-idx?-ubyte[.gz] files"
        )
    code, ndim = header[2], header[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise UserInputError(
            f"{file} has an invalid IDX header (type 0x{code:02x}, {ndim} dims); the file is corrupt, reinstall it"
        )
    dtype = _IDX_DTYPES[code]
    dims_raw = stream.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise UserInputError(f"{file} is truncated (it ends inside its header); reinstall or re-download it")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    count = math.prod(dims)
    total = 4 + 4 * ndim + count * dtype.itemsize
    if (total % (1 << 32) if compressed else total) != stored:
        raise UserInputError(
            f"{file} is truncated or corrupt: its header promises {'×'.join(map(str, dims))} values ({total} bytes) "
            f"but it holds {stored}{' (mod 2^32, gzip)' if compressed else ''} bytes; reinstall or re-download it"
        )
    array = np.empty(count, dtype)
    buffer = memoryview(array.view(np.uint8).data)
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(buffer[filled:])
        if not got:
            raise UserInputError(
                f"{file} is truncated ({filled} of {len(buffer)} data bytes); reinstall or re-download it"
            )
        filled += got
    if stream.read(1):
        raise UserInputError(
            f"{file} has data after its {len(buffer)} payload bytes; the file is corrupt, reinstall it"
        )
    array = array.reshape(dims)
    return array.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else array


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a numpy array of its dtype and dimensions.

    Raises:
        UserInputError: if the file is missing, has a bad magic number, type or dimensions, or its payload
            is truncated, too long or (gzip) corrupt.
    """
    file = Path(path)
    try:
        with open(file, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if not compressed:
                return _read_idx_stream(raw, file, os.fstat(raw.fileno()).st_size, False)
            if os.fstat(raw.fileno()).st_size < 18:
                raise EOFError("shorter than a gzip header and trailer")
            stored = _gzip_size(raw)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _read_idx_stream(stream, file, stored, True)
    except FileNotFoundError:
        raise UserInputError(f"IDX file {file} not found; check the data folder") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserInputError(f"{file} is truncated or corrupt ({one_line(exc)}); reinstall or re-download it") from None
    except OSError as exc:
        raise UserInputError(
            f"cannot read {file} ({exc.strerror or one_line(exc)}); check the path and its permissions"
        ) from None


def find_idx_files(root: Path) -> dict[str, Path]:
    """The IDX files in ``root`` by role (``train_images``, ...); ``.gz`` wins over a raw file."""
    found = {}
    for key, stem in _IDX_FILES.items():
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                found[key] = root / name
                break
    return found


@functools.lru_cache(maxsize=CACHE_SIZE)
def _idx_arrays(stamp: tuple[tuple[str, int, int], ...]) -> tuple[torch.Tensor, ...]:
    """Decoded IDX tensors (train images, train labels, test images, test labels) and per-pixel stats."""
    arrays = [read_idx(entry[0]) for entry in stamp]
    tensors: list[torch.Tensor] = []
    for (file, _, _), images, labels in ((stamp[0], arrays[0], arrays[1]), (stamp[2], arrays[2], arrays[3])):
        if images.ndim == 3 and len(images) == 0:
            raise UserInputError(f"{file} holds no images; use a complete dataset")
        if images.ndim != 3 or images.dtype != np.uint8:
            raise UserInputError(
                f"{file} holds {images.dtype} data of shape {images.shape}; image IDX files must be uint8 N×H×W"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            raise UserInputError(
                f"the labels beside {file} are {labels.dtype} of shape {labels.shape}; they must be {len(images)} integers"
            )
        if len(labels) and int(labels.min()) < 0:
            raise UserInputError(f"the labels beside {file} include negative values; labels must be 0 .. classes-1")
        tensors += [torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    if tensors[0].shape[2:] != tensors[2].shape[2:]:
        raise UserInputError(f"train and test images in {Path(stamp[0][0]).parent} differ in size; use matching files")
    counts = torch.bincount(tensors[0].reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = float((counts * values).sum() / counts.sum())
    std = math.sqrt(max(float((counts * values**2).sum() / counts.sum()) - mean**2, 1e-12))
    return (*tensors, torch.tensor([mean, std], dtype=torch.float64))


def fashion_root() -> Path:
    """Folder of the Debian package's Fashion-MNIST files (``$FASHION_MNIST_DIR`` overrides it).

    Raises:
        UserInputError: if any of the four files is missing there.
    """
    env = os.environ.get("FASHION_MNIST_DIR")
    root = Path(env) if env else Path(FASHION_MNIST_DEFAULT_DIR)
    found = find_idx_files(root)
    if len(found) < len(_IDX_FILES):
        source = " (FASHION_MNIST_DIR)" if env else ""
        missing = ", ".join(stem for key, stem in _IDX_FILES.items() if key not in found)
        raise UserInputError(
            f"Fashion-MNIST not found in {root}{source} (missing {missing}[.gz]); install it with "
            f"`apt-get install {FASHION_MNIST_PACKAGE}` (make targets do this) or set FASHION_MNIST_DIR"
        )
    return root


def _is_fashion_folder(root: Path) -> bool:
    if root.name.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist"):
        return True
    env = os.environ.get("FASHION_MNIST_DIR")
    return root.resolve() == Path(env or FASHION_MNIST_DEFAULT_DIR).resolve()


def load_idx(root: Path, fashion: bool | None, image_size: int | None, channels: int | None) -> Dataset:
    """IDX data in ``root``; ``fashion``: True must be Fashion-MNIST, None: Fashion-MNIST if it looks like it.

    Raises:
        UserInputError: if a file is missing or corrupt, or ``fashion`` is True and the data is not Fashion-MNIST.
    """
    found = find_idx_files(root)
    if len(found) < len(_IDX_FILES):
        missing = ", ".join(stem for key, stem in _IDX_FILES.items() if key not in found)
        raise UserInputError(
            f"IDX folder {root} lacks {missing} (.gz or raw); it needs all of {', '.join(_IDX_FILES.values())}"
        )
    train_x, train_y, test_x, test_y, stats = _idx_arrays(file_stamp([found[key] for key in _IDX_FILES]))
    num_classes = max(int(train_y.max()) if len(train_y) else 0, int(test_y.max()) if len(test_y) else 0) + 1
    fashion_shaped = num_classes <= 10 and tuple(train_x.shape[1:]) == (1, 28, 28)
    if fashion and not fashion_shaped:
        raise UserInputError(
            f"{root} is not Fashion-MNIST ({num_classes} classes of {'×'.join(map(str, train_x.shape[2:]))} images); "
            "set FASHION_MNIST_DIR to the real files"
        )
    classes: tuple[str, ...]
    if fashion or (fashion is None and fashion_shaped and _is_fashion_folder(root)):
        name, mean, std, classes, flip = (
            FASHION_MNIST,
            FASHION_MNIST_MEAN,
            FASHION_MNIST_STD,
            FASHION_MNIST_CLASSES,
            True,
        )
    else:  # unknown IDX data (digits?): flipping could change the class, so crop only
        name, mean, std = root.resolve().name, round(float(stats[0]), 4), round(float(stats[1]), 4)
        classes, flip = tuple(str(i) for i in range(num_classes)), False
    return tensor_dataset(
        name, "idx", root, (train_x, train_y, test_x, test_y), classes, (mean,), (std,), 2, flip, image_size, channels
    )
