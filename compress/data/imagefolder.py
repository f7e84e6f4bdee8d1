"""ImageFolder trees (``root/train/<class>/*``, ``root/val/<class>/*`` or ``test``), decoded per batch.

torchvision is imported only when such a dataset is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compress.data.base import DataInfo, Dataset, Split, one_line, out_channels
from compress.data.seeding import MASK64
from lowrank_core.errors import UserInputError

__all__ = ["DEFAULT_IMAGEFOLDER_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderSplit", "load_imagefolder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGEFOLDER_SIZE = 224


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
            raise UserInputError(f"cannot read image {path} ({one_line(exc)}); remove or replace the file") from None

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
                    torch.default_generator.manual_seed(int(seeds[i]) & MASK64)  # CPU only: CUDA RNG untouched
                    image = self.train_transform(image)
            images.append(pil_to_tensor(image))
        if not images:
            return torch.empty(0, 3, size, size)
        return torch.stack(images).float().div_(255).sub_(self._mean).div_(self._std)


def load_imagefolder(root: Path, image_size: int | None, channels: int | None) -> Dataset:
    """The ``train/`` and ``val/`` (or ``test/``) class trees of ``root`` (``image_size``: crop size, default 224).

    Raises:
        UserInputError: if a folder is missing or empty, or the eval split has classes train/ lacks.
    """
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
        raise UserInputError(f"{root}: {one_line(exc, 300)}; every train/<class>/ needs images") from None
    if not eval_samples:
        raise UserInputError(f"{eval_dir} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); add the test images")
    size = image_size or DEFAULT_IMAGEFOLDER_SIZE
    info = DataInfo(
        name=root.resolve().name,
        format="imagefolder",
        root=str(root),
        num_classes=len(classes),
        channels=out_channels(root.resolve().name, 3, channels),
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
