"""The data layer's core types: :class:`DataInfo`, the :class:`Split` ABC, in-memory :class:`TensorSplit`.

A format module (:mod:`compress.data.idx`, :mod:`compress.data.cifar`, :mod:`compress.data.imagefolder`)
reads its files and returns a :class:`Dataset` of two splits; in-memory formats share :func:`tensor_dataset`.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compress.data.seeding import augment_params, crop_flip
from lowrank_core.errors import UserInputError

__all__ = [
    "CACHE_SIZE",
    "DataInfo",
    "Dataset",
    "Split",
    "TensorSplit",
    "file_stamp",
    "one_line",
    "out_channels",
    "tensor_dataset",
]

# Decoded datasets kept in memory per format (keyed by the files' paths, mtimes and sizes).
CACHE_SIZE = 4


def one_line(exc: BaseException, limit: int = 160) -> str:
    """``exc``'s message on one line of at most ``limit`` characters (for error messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def file_stamp(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """``(path, mtime_ns, size)`` of every file: the key of the decoded-array caches (a changed file misses)."""
    stats = [path.stat() for path in paths]
    return tuple((str(path), st.st_mtime_ns, st.st_size) for path, st in zip(paths, stats, strict=True))


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
            images = crop_flip(images, *augment_params(seeds, self.pad, self.flip), self.pad)
        x = images.float().mul_(self._scale).add_(self._shift)
        size = self.info.image_size
        if x.shape[-2:] != (size, size) and len(x):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] != self.info.channels:
            x = x.expand(-1, self.info.channels, -1, -1).contiguous()
        return x


@dataclass
class Dataset:
    """A loaded dataset: its description and its two splits."""

    info: DataInfo
    train: Split
    test: Split


def tensor_dataset(
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
    """A :class:`Dataset` of two :class:`TensorSplit` views on uint8 ``N×C×H×W`` tensors (IDX and CIFAR data).

    Raises:
        UserInputError: if the images are not square and no ``image_size`` is given, or ``channels`` cannot
            be given.
    """
    train_x, train_y, test_x, test_y = tensors
    native_c, h, w = train_x.shape[1:]
    if image_size is None and h != w:
        raise UserInputError(f"{name} images are {h}×{w}, not square; pass an image size to resize them")
    out_c = out_channels(name, native_c, channels)
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


def out_channels(name: str, native: int, wanted: int | None) -> int:
    """Channels of the batches: ``native``, or 3 for 1-channel data when the model wants 3.

    Raises:
        UserInputError: for any other channel count the data cannot give.
    """
    if wanted is None or wanted == native:
        return native
    if native == 1 and wanted == 3:
        return 3
    raise UserInputError(
        f"{name} has {native}-channel images but the model wants {wanted}; use a model with {native} input channels"
    )
