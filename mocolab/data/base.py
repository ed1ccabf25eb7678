"""The one in-memory representation of a dataset that every part of mocolab consumes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DatasetError  # re-exported: its home before errors.py


def default_data_root() -> Path:
    """Where built-in datasets are looked for and downloaded: ``$MOCOLAB_DATA`` if set, else
    ``~/.cache/mocolab/data``. Read on every call, so setting the variable takes effect at once."""
    env = os.environ.get("MOCOLAB_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mocolab" / "data"


@dataclass
class ImageDataset:
    """Images as one uint8 tensor ``N×C×H×W`` plus optional integer labels.

    Small datasets (Fashion-MNIST, CIFAR, STL-10) are held in memory; image folders are
    decoded once to a fixed size and memory-mapped from a cache file, so both look the same
    to the training loop: a batch is ``dataset.images[indices]``. Augmentation happens after
    that, batched, on the training device (see :mod:`mocolab.augment`).

    Attributes:
        images: uint8 tensor ``N×C×H×W`` (C is 1 for grayscale, 3 for colour).
        labels: int64 tensor ``N`` of class indices, or ``None`` for unlabeled data.
        classes: class names in label order, or ``None``.
        name: a short human-readable name ("fashion-mnist/train", a folder path...).
        sizes: for whole images (:mod:`mocolab.data.whole`), int64 ``N×2``: the true
            (height, width) of each image, which is stored stretched to ``H×W`` so that crops
            can be drawn on its true size and aspect; ``None`` when the images are what they
            show.
    """

    images: Tensor
    labels: Tensor | None = None
    classes: list[str] | None = None
    name: str = "dataset"
    sizes: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.name}: images must be a uint8 tensor N×C×H×W, got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetError(
                f"{self.name}: {len(self.labels)} labels for {len(self.images)} images"
            )
        if self.sizes is not None and tuple(self.sizes.shape) != (len(self.images), 2):
            raise DatasetError(
                f"{self.name}: sizes must be N×2 (height, width), got "
                f"{tuple(self.sizes.shape)} for {len(self.images)} images"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, indices: Tensor) -> ImageDataset:
        """A new dataset holding the images (and labels) at ``indices``."""
        return ImageDataset(
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            classes=self.classes,
            name=f"{self.name}[{len(indices)}]",
            sizes=None if self.sizes is None else self.sizes[indices],
        )
