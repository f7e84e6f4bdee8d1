"""Offline image datasets for training, fine-tuning, evaluation and calibration of CNNs.

Three on-disk formats, all read locally (nothing is ever downloaded):

* ``idx``: the four (optionally gzipped) IDX files of MNIST-style data. The built-in name ``fashion-mnist``
  reads them from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, or
  ``$FASHION_MNIST_DIR``).
* ``cifar10`` / ``cifar100``: the python pickle layout of CIFAR (``cifar-10-batches-py`` /
  ``cifar-100-python``), read with a restricted unpickler that only rebuilds numpy arrays.
* ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test``) image trees.

:func:`load_data` returns a :class:`Dataset` of two :class:`Split` objects. ``Split.batch(indices, seeds)``
returns normalised float32 NCHW images; with ``seeds`` each sample's augmentation depends on its seed only,
so :class:`BatchLoader` can shard every global batch over DDP ranks (and worker processes) and the union of
the ranks' batches equals the single-process batch exactly.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import importlib
import math
import operator
import os
import pickle
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from lowrank_deploy.errors import UserInputError

__all__ = [
    "FASHION_MNIST",
    "FORMATS",
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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGEFOLDER_SIZE = 224
FORMATS = ("idx", "cifar10", "cifar100", "imagefolder")

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
_MASK64 = (1 << 64) - 1
_CACHE_SIZE = 4


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset, as the batches deliver it.

    ``channels``, ``image_size``, ``mean`` and ``std`` describe the images :meth:`Split.batch` returns
    (after any channel replication or resizing asked for in :func:`load_data`).
    """

    name: str
    format: str
    root: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    train_size: int
    test_size: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, image_size, image_size)`` of one image."""
        return (self.channels, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


# ------------------------------------------------------------------------------------------- hashing


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of every int64 element (two's complement wrap-around stands for uint64 arithmetic)."""
    z = x.to(torch.int64) + _signed(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def _splitmix64_int(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix(*values: int) -> int:
    """A 64-bit seed from a tuple of integers (order-sensitive)."""
    h = 0
    for value in values:
        h = _splitmix64_int(h ^ (int(value) & _MASK64))
    return h


def _augment_params(seeds: torch.Tensor, pad: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``dy, dx`` in ``[0, 2*pad]`` and flip bits, each a function of its seed only."""
    h = _splitmix64(seeds)
    span = 2 * pad + 1
    dy = ((h >> 8) & 0xFFFF) % span
    dx = ((h >> 24) & 0xFFFF) % span
    flips = ((h >> 40) & 1).bool() if flip else torch.zeros(h.shape, dtype=torch.bool)
    return dy, dx, flips


def _crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop every image of ``images`` (B,C,H,W), zero-padded by ``pad``, at ``(dy, dx)`` and flip where asked.

    One ``gather`` over the flattened padded images does all crops and flips of the batch.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + dx[:, None]
    rows = (dy[:, None] + torch.arange(h)) * (w + 2 * pad)
    flat = (rows[:, :, None] + cols[:, None, :]).view(b, 1, h * w)
    return padded.reshape(b, c, (h + 2 * pad) * (w + 2 * pad)).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


# ---------------------------------------------------------------------------------------------- splits


class Split(ABC):
    """One split (train or test) of a dataset: a view on shared storage, indexed ``0 .. len-1``.

    Attributes:
        info: The dataset's :class:`DataInfo`.
        name: ``"train"`` or ``"test"``.
        augment: Whether :meth:`batch` augments when it is given seeds (train True, test False).
        indices: Positions in the full split that this view covers (``None``: all of them, in order).
    """

    def __init__(self, info: DataInfo, name: str, augment: bool, indices: torch.Tensor | None = None) -> None:
        self.info = info
        self.name = name
        self.augment = augment
        self.indices = indices

    @property
    @abstractmethod
    def _full_size(self) -> int: ...

    @abstractmethod
    def _full_labels(self) -> torch.Tensor: ...

    @abstractmethod
    def _batch(self, positions: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor: ...

    def __len__(self) -> int:
        return self._full_size if self.indices is None else len(self.indices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name} {self.name}, {len(self)} images, augment={self.augment})"

    @property
    def labels(self) -> torch.Tensor:
        """All labels of this split (int64; shared with the storage when the view is the full split)."""
        labels = self._full_labels()
        return labels if self.indices is None else labels[self.indices]

    @property
    def indices_sha256(self) -> str:
        """SHA-256 of this view's positions (int64 little-endian), to record a subset in a report."""
        positions = torch.arange(self._full_size) if self.indices is None else self.indices
        return hashlib.sha256(positions.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()

    def _positions(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} images")
        return index if self.indices is None else self.indices[index]

    def batch(
        self, indices: torch.Tensor | Sequence[int], seeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 NCHW images and int64 labels of the samples at ``indices``.

        Args:
            indices: Positions in this split.
            seeds: One int64 per sample; when given and :attr:`augment` is set, each sample is augmented
                as a deterministic function of its seed alone. ``None``: no augmentation.
        """
        positions = self._positions(indices)
        if seeds is not None:
            seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
            if seeds.shape != positions.shape:
                raise ValueError(f"got {len(seeds)} seeds for {len(positions)} samples")
        images = self._batch(positions, seeds if self.augment else None)
        return images, self._full_labels()[positions]

    def subset(self, indices: torch.Tensor | Sequence[int], *, augment: bool | None = None) -> Split:
        """A view on ``indices`` (positions in this split) sharing the storage; ``augment`` can be switched."""
        view = copy.copy(self)
        view.indices = self._positions(indices)
        view.augment = self.augment if augment is None else augment
        return view


class TensorSplit(Split):
    """A split held in memory as uint8 ``N×C×H×W`` images (IDX and CIFAR data).

    Augmentation (train): random crop of the original size from the image zero-padded by ``pad`` pixels,
    then a random horizontal flip when ``flip`` is set; vectorised over the batch. Images are then
    normalised, resized (bilinear) to ``info.image_size`` if it differs, and replicated to ``info.channels``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        info: DataInfo,
        name: str,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int,
        flip: bool,
    ) -> None:
        super().__init__(info, name, augment)
        self._images = images
        self._labels = labels
        self.pad = pad
        self.flip = flip
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t

    @property
    def _full_size(self) -> int:
        return len(self._images)

    def _full_labels(self) -> torch.Tensor:
        return self._labels

    @property
    def images(self) -> torch.Tensor:
        """The uint8 images of this view as stored (native channels and size, no augmentation)."""
        return self._images if self.indices is None else self._images[self.indices]

    def _batch(self, positions: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
        images = self._images[positions]
        if seeds is not None and (self.pad or self.flip):
            images = _crop_flip(images, *_augment_params(seeds, self.pad, self.flip), self.pad)
        x = images.float().mul_(self._scale).add_(self._shift)
        size = self.info.image_size
        if x.shape[-2:] != (size, size) and len(x):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] != self.info.channels:
            x = x.expand(-1, self.info.channels, -1, -1).contiguous()
        return x


class ImageFolderSplit(Split):
    """A split of image files decoded per batch (ImageFolder trees).

    Train: ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip``, run per sample under a CPU RNG seeded
    with the sample's seed (the caller's RNG state is restored). Eval: ``Resize(size*256/224)`` +
    ``CenterCrop(size)``. Then ImageNet normalisation.
    """

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, *, info: DataInfo, name: str, augment: bool) -> None:
        super().__init__(info, name, augment)
        from torchvision import transforms

        size = info.image_size
        self._paths = list(paths)
        self._labels = labels
        self.train_transform = transforms.Compose(
            [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        )
        self.eval_transform = transforms.Compose(
            [transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size)]
        )
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def _full_size(self) -> int:
        return len(self._paths)

    def _full_labels(self) -> torch.Tensor:
        return self._labels

    @property
    def paths(self) -> list[str]:
        """Image files of this view."""
        return self._paths if self.indices is None else [self._paths[i] for i in self.indices.tolist()]

    def _load(self, path: str) -> Any:
        from torchvision.datasets.folder import default_loader

        try:
            return default_loader(path)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise UserInputError(f"cannot read image {path} ({_one_line(exc)}); remove or replace the file") from None

    def _batch(self, positions: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        size = self.info.image_size
        images = []
        for i, position in enumerate(positions.tolist()):
            image = self._load(self._paths[position])
            if seeds is None:
                image = self.eval_transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(int(seeds[i]) & _MASK64)  # CPU only: CUDA RNG untouched
                    image = self.train_transform(image)
            images.append(pil_to_tensor(image))
        if not images:
            return torch.empty(0, 3, size, size)
        return torch.stack(images).float().div_(255).sub_(self._mean).div_(self._std)


def calibration_subset(split: Split, n: int, seed: int = 0) -> Split:
    """A fixed, seeded sample of ``n`` distinct images of ``split``, without augmentation.

    The same ``n`` and ``seed`` always give the same images (a smaller ``n`` gives a prefix of a larger
    one). The result's ``indices`` (and ``indices_sha256``) record which images were chosen.

    Raises:
        UserInputError: if ``n`` is not in ``1 .. len(split)``.
    """
    try:
        n = operator.index(n)
    except TypeError:
        raise UserInputError(f"the number of calibration images must be an integer, not {n!r}") from None
    if n < 1 or n > len(split):
        raise UserInputError(
            f"cannot pick {n} images from the {split.info.name} {split.name} split of {len(split)} images; "
            f"ask for 1 to {len(split)}"
        )
    generator = torch.Generator().manual_seed(_mix(0x43414C49, seed))
    order = torch.randperm(len(split), generator=generator)[:n]
    return split.subset(order, augment=False)


@dataclass
class Dataset:
    """A loaded dataset: its description and its two splits."""

    info: DataInfo
    train: Split
    test: Split


# ---------------------------------------------------------------------------------------------- loader


class _StepDataset(torch.utils.data.Dataset):
    """One item per step: ``split.batch(indices, seeds)`` (for DataLoader workers)."""

    def __init__(self, split: Split, plan: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.split = split
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor] | UserInputError:
        indices, seeds = self.plan[item]
        try:
            return self.split.batch(indices, seeds)
        except UserInputError as exc:  # handed back as a value: DataLoader would re-raise it with a traceback
            return exc


class BatchLoader:
    """Batches of a split for one rank, identical on every rank count and worker count.

    Each step takes the next ``batch_size`` (global) positions of the epoch's order (a permutation seeded
    from ``(seed, epoch)``, or ``0..n-1`` without shuffling) and one seed per sample drawn from a generator
    seeded from ``(seed, epoch, step)``; rank ``r`` gets the contiguous slice ``r*b .. (r+1)*b`` of both
    (``b = batch_size // world_size``). The concatenation of the ranks' batches of a step is therefore the
    single-process batch. A short last batch (``drop_last=False``) is split as evenly as possible (first
    ranks get one more); a rank whose slice of it is empty yields nothing for that step, so use
    ``drop_last=True`` for DDP training (evaluation that sums counts after the loop is fine either way).

    Args:
        split: The split to batch.
        batch_size: Global batch size (all ranks together).
        shuffle: Shuffle every epoch (training) or go in order (evaluation).
        seed: Seed of the order and of the augmentation seeds.
        drop_last: Drop a last batch smaller than ``batch_size``.
        rank: This process's rank.
        world_size: Number of processes.
        num_workers: Worker processes decoding batches (``torch.utils.data.DataLoader``); 0: in-process.

    Raises:
        UserInputError: if ``batch_size`` is not a positive multiple of ``world_size``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserInputError(f"rank {rank} is not in 0..{world_size - 1}; check the launcher's RANK/WORLD_SIZE")
        if batch_size < 1 or batch_size % world_size:
            raise UserInputError(
                f"batch size {batch_size} does not split over {world_size} processes; use a positive multiple of {world_size}"
            )
        if num_workers < 0:
            raise UserInputError(f"num_workers must be 0 or more, not {num_workers}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation seeds the next iteration uses."""
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _rank_slice(self, size: int) -> tuple[int, int]:
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (``steps_per_epoch`` unless its slice of the last is empty)."""
        steps = self.steps_per_epoch
        last = len(self.split) - (steps - 1) * self.batch_size if steps else 0
        if steps and last < self.batch_size:
            start, stop = self._rank_slice(last)
            return steps - (stop == start)
        return steps

    def plan(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``(indices, seeds)`` for every step of the current epoch that gives it samples."""
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(0x5045524D, self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        steps = []
        for step in range(self.steps_per_epoch):
            indices = order[step * self.batch_size : (step + 1) * self.batch_size]
            generator = torch.Generator().manual_seed(_mix(0x53454544, self.seed, self.epoch, step))
            seeds = torch.randint(0, (1 << 63) - 1, (self.batch_size,), generator=generator)[: len(indices)]
            start, stop = self._rank_slice(len(indices))
            if stop > start:
                steps.append((indices[start:stop], seeds[start:stop]))
        return steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan()
        if self.num_workers == 0:
            for indices, seeds in plan:
                yield self.split.batch(indices, seeds)
            return
        loader = torch.utils.data.DataLoader(
            _StepDataset(self.split, plan), batch_size=None, shuffle=False, num_workers=self.num_workers
        )
        for item in loader:
            if isinstance(item, UserInputError):
                raise item
            yield item


# ------------------------------------------------------------------------------------------------- IDX


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
        raise UserInputError(
            f"{file} is truncated or corrupt ({_one_line(exc)}); reinstall or re-download it"
        ) from None
    except OSError as exc:
        raise UserInputError(
            f"cannot read {file} ({exc.strerror or _one_line(exc)}); check the path and its permissions"
        ) from None


def _find_idx_files(root: Path) -> dict[str, Path]:
    found = {}
    for key, stem in _IDX_FILES.items():
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                found[key] = root / name
                break
    return found


def _stamp(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    stats = [path.stat() for path in paths]
    return tuple((str(path), st.st_mtime_ns, st.st_size) for path, st in zip(paths, stats, strict=True))


@functools.lru_cache(maxsize=_CACHE_SIZE)
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


def _fashion_root() -> Path:
    env = os.environ.get("FASHION_MNIST_DIR")
    root = Path(env) if env else Path(FASHION_MNIST_DEFAULT_DIR)
    found = _find_idx_files(root)
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


def _load_idx(root: Path, fashion: bool | None, image_size: int | None, channels: int | None) -> Dataset:
    """IDX data in ``root``; ``fashion``: True must be Fashion-MNIST, None: Fashion-MNIST if it looks like it."""
    found = _find_idx_files(root)
    if len(found) < len(_IDX_FILES):
        missing = ", ".join(stem for key, stem in _IDX_FILES.items() if key not in found)
        raise UserInputError(
            f"IDX folder {root} lacks {missing} (.gz or raw); it needs all of {', '.join(_IDX_FILES.values())}"
        )
    train_x, train_y, test_x, test_y, stats = _idx_arrays(_stamp([found[key] for key in _IDX_FILES]))
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
    return _tensor_dataset(
        name, "idx", root, (train_x, train_y, test_x, test_y), classes, (mean,), (std,), 2, flip, image_size, channels
    )


def _tensor_dataset(
    name: str,
    fmt: str,
    root: Path,
    tensors: tuple[torch.Tensor, ...],
    classes: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pad: int,
    flip: bool,
    image_size: int | None,
    channels: int | None,
) -> Dataset:
    train_x, train_y, test_x, test_y = tensors
    native_c, h, w = train_x.shape[1:]
    if image_size is None and h != w:
        raise UserInputError(f"{name} images are {h}×{w}, not square; pass an image size to resize them")
    out_c = _out_channels(name, native_c, channels)
    info = DataInfo(
        name=name,
        format=fmt,
        root=str(root),
        num_classes=len(classes),
        channels=out_c,
        image_size=image_size or h,
        mean=tuple(mean) * (out_c // native_c),
        std=tuple(std) * (out_c // native_c),
        classes=classes,
        train_size=len(train_x),
        test_size=len(test_x),
    )

    def split(images: torch.Tensor, labels: torch.Tensor, name: str, augment: bool) -> TensorSplit:
        return TensorSplit(
            images, labels, info=info, name=name, augment=augment, mean=mean, std=std, pad=pad, flip=flip
        )

    return Dataset(info=info, train=split(train_x, train_y, "train", True), test=split(test_x, test_y, "test", False))


def _out_channels(name: str, native: int, wanted: int | None) -> int:
    if wanted is None or wanted == native:
        return native
    if native == 1 and wanted == 3:
        return 3
    raise UserInputError(
        f"{name} has {native}-channel images but the model wants {wanted}; use a model with {native} input channels"
    )


# ----------------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
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
        return (*self.train, self.test, self.meta)


_CIFAR = {
    "cifar10": _CifarLayout(
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
    "cifar100": _CifarLayout(
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


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array reconstruction; any other global is refused unexecuted."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _read_cifar_pickle(path: Path, layout: _CifarLayout) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            obj = _CifarUnpickler(file, encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise UserInputError(
            f"{path} is not a CIFAR python batch (it asks for {_one_line(exc)}); only numpy arrays are allowed, re-extract {layout.archive}"
        ) from None
    except OSError as exc:
        raise UserInputError(
            f"cannot read {path} ({exc.strerror or _one_line(exc)}); re-extract {layout.archive}"
        ) from None
    except Exception as exc:  # any parse failure of a user file (truncated, garbage) is bad input
        raise UserInputError(
            f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {_one_line(exc)}); re-extract {layout.archive}"
        ) from None
    if not isinstance(obj, dict):
        raise UserInputError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict; re-extract {layout.archive}")
    return {key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _cifar_batch(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
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


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cifar_arrays(kind: str, stamp: tuple[tuple[str, int, int], ...]) -> tuple[Any, ...]:
    layout = _CIFAR[kind]
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


def _load_cifar(kind: str, root: Path, image_size: int | None, channels: int | None) -> Dataset:
    layout = _CIFAR[kind]
    missing = [name for name in layout.files if not (root / name).is_file()]
    if missing:
        raise UserInputError(
            f"{layout.title} folder {root} lacks {', '.join(missing)}; re-extract {layout.archive} (python version)"
        )
    train_x, train_y, test_x, test_y, classes = _cifar_arrays(kind, _stamp([root / name for name in layout.files]))
    return _tensor_dataset(
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


# ----------------------------------------------------------------------------------------- ImageFolder


def _load_imagefolder(root: Path, image_size: int | None, channels: int | None) -> Dataset:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    train_dir = root / "train"
    eval_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise UserInputError(
            f"ImageFolder {root} needs both train/<class>/ and val/<class>/ (or test/<class>/) folders; "
            f"it lacks {' and '.join(n for n, ok in (('train/', train_dir.is_dir()), ('val/', eval_dir)) if not ok)}"
        )
    try:
        classes, class_to_idx = find_classes(str(train_dir))
    except FileNotFoundError:
        raise UserInputError(f"{train_dir} has no class folders; put the images in train/<class>/") from None
    try:
        eval_classes, _ = find_classes(str(eval_dir))
    except FileNotFoundError:
        raise UserInputError(
            f"{eval_dir} has no class folders; put the images in {eval_dir.name}/<class>/ (a flat ImageNet val/ must be sorted into class folders)"
        ) from None
    unknown = sorted(set(eval_classes) - set(classes))
    if unknown:
        raise UserInputError(
            f"{eval_dir} has classes missing from train/: {', '.join(unknown[:5])}; both must use the same class folders"
        )
    try:
        train_samples = make_dataset(str(train_dir), class_to_idx, extensions=IMG_EXTENSIONS)
        eval_samples = make_dataset(str(eval_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as exc:
        raise UserInputError(f"{root}: {_one_line(exc, 300)}; every train/<class>/ needs images") from None
    if not eval_samples:
        raise UserInputError(f"{eval_dir} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); add the test images")
    size = image_size or DEFAULT_IMAGEFOLDER_SIZE
    info = DataInfo(
        name=root.resolve().name,
        format="imagefolder",
        root=str(root),
        num_classes=len(classes),
        channels=_out_channels(root.resolve().name, 3, channels),
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=tuple(classes),
        train_size=len(train_samples),
        test_size=len(eval_samples),
    )

    def split(samples: list[tuple[str, int]], name: str, augment: bool) -> ImageFolderSplit:
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return ImageFolderSplit([path for path, _ in samples], labels, info=info, name=name, augment=augment)

    return Dataset(info=info, train=split(train_samples, "train", True), test=split(eval_samples, "test", False))


# ---------------------------------------------------------------------------------------------- entry


def _describe(root: Path) -> str:
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in root.iterdir())
    if not entries:
        return "it is empty"
    return f"it holds {', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}"


def _detect(root: Path) -> tuple[str, Path]:
    if _find_idx_files(root):
        return "idx", root
    nested = [(kind, root / layout.folder) for kind, layout in _CIFAR.items() if (root / layout.folder).is_dir()]
    if len(nested) > 1:
        raise UserInputError(
            f"{root} holds both CIFAR-10 and CIFAR-100; point at one of their folders or pass the format"
        )
    if nested:
        return nested[0]
    if any((root / name).is_file() for name in _CIFAR["cifar10"].files):
        return "cifar10", root
    if any((root / name).is_file() for name in _CIFAR["cifar100"].files):
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
        return _load_idx(_fashion_root(), True, image_size, channels)
    root = Path(text).expanduser()
    if not root.exists():
        raise UserInputError(
            f"data {text!r} is neither a built-in dataset ({FASHION_MNIST}) nor an existing folder; check the path"
        )
    if not root.is_dir():
        raise UserInputError(f"data {text!r} is a file; point at the folder that holds the dataset")
    if format is None:
        format, root = _detect(root)
    elif format in _CIFAR and (root / _CIFAR[format].folder).is_dir():
        root = root / _CIFAR[format].folder
    if format == "idx":
        return _load_idx(root, None, image_size, channels)
    if format in _CIFAR:
        return _load_cifar(format, root, image_size, channels)
    return _load_imagefolder(root, image_size, channels)
