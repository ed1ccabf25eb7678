"""Datasets: the built-ins (Fashion-MNIST, CIFAR-10/100, STL-10, a synthetic set) and folders
of images, all loaded into one :class:`ImageDataset` (a uint8 tensor ``N×C×H×W`` + labels).

>>> train = load_dataset("synthetic", "train")
>>> train.images.shape, train.num_classes
(torch.Size([512, 3, 32, 32]), 10)

``spec`` is a built-in name or the path of a folder of images (see :mod:`mocolab.data.folder`
for the layout rules). A folder that happens to be called like a built-in is reached with an
explicit path (``./synthetic``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import cifar, fashion_mnist, folder, shards, stl10, synthetic, whole
from .base import DatasetError, ImageDataset, default_data_root
from .folder import SkippedImagesWarning
from .synthetic import make_synthetic

BUILTIN_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "synthetic")

_SPLITS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "synthetic": ("train", "test"),
    "folder": ("train", "test"),
    "shards": ("train",),
}
__all__ = [
    "BUILTIN_DATASETS",
    "DatasetError",
    "ImageDataset",
    "SkippedImagesWarning",
    "default_data_root",
    "evaluation_splits",
    "absolute_data",
    "data_fingerprint",
    "has_split",
    "load_dataset",
    "load_train_set",
    "whole_crops",
    "make_synthetic",
]


def _resolve(spec: str) -> tuple[str, Path | None]:
    """``(kind, folder)``: kind is a built-in name or ``"folder"``; raises for anything else."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DatasetError(
            f"dataset spec {spec!r} is empty or not a string; pass one of "
            f"{', '.join(BUILTIN_DATASETS)} or the path of a folder of images (--data)"
        )
    text = os.fspath(spec)
    if text.lower() in BUILTIN_DATASETS:
        return text.lower(), None
    if shards.is_shards(text):
        return "shards", None
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.exists():
        raise DatasetError(
            f"dataset {text!r} is a file, not a folder; pass the folder that holds the images "
            f"(or one of the built-ins: {', '.join(BUILTIN_DATASETS)})"
        )
    raise DatasetError(
        f"unknown dataset {text!r}: it is not a built-in ({', '.join(BUILTIN_DATASETS)}) and "
        f"the path {path.absolute()} does not exist; check the spelling or the path (--data)"
    )


def _check_split(kind: str, split: str, spec: str) -> None:
    if split not in _SPLITS[kind]:
        raise DatasetError(
            f"dataset {spec!r} has no split {split!r}; choose one of {', '.join(_SPLITS[kind])}"
        )


def _resize_square(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a batch of square uint8 images to ``size×size`` (bilinear, antialiased)."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        y = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = True,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageDataset:
    """Load a built-in dataset or a folder of images as an :class:`ImageDataset`.

    Args:
        spec: one of :data:`BUILTIN_DATASETS` or the path of a folder of images.
        split: ``"train"`` or ``"test"``; STL-10 also ``"unlabeled"`` and ``"train+unlabeled"``.
        root: where a built-in dataset is looked for / downloaded to (default
            :func:`default_data_root` ``/<name>``). Ignored for folders.
        image_size: side of the images. Folders are decoded to it (default 64); built-ins keep
            their native size unless it is given (then resized, bilinear with antialiasing);
            the synthetic set is generated at it.
        download: fetch a missing built-in through torchvision (needs internet once).
        cache_dir: where decoded folders are cached (default ``default_data_root()/folder-cache``).
        num_workers: processes decoding a folder (0 decodes in this process).
        progress: show the progress bar of a large folder's decoding.

    Raises:
        DatasetError: the spec, split or files are wrong; the message says how to fix it.
    """
    kind, path = _resolve(spec)
    _check_split(kind, split, os.fspath(spec))
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DatasetError(
            f"image_size must be a positive integer, got {image_size!r} (--image-size)"
        )
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DatasetError(
            f"num_workers must be an integer >= 0, got {num_workers!r} (--num-workers)"
        )

    if kind == "shards":
        raise DatasetError(
            f"{spec} is packed shards, which are streamed for pretraining only; evaluate on "
            f"the folder they were packed from (--data FOLDER) or a built-in"
        )
    if kind == "folder":
        assert path is not None
        return folder.load_folder(
            path,
            split,
            image_size=image_size or folder.DEFAULT_IMAGE_SIZE,
            cache_dir=cache_dir,
            num_workers=num_workers,
            progress=progress,
        )
    if kind == "synthetic":
        return synthetic.load_synthetic(split, image_size=image_size or synthetic.DEFAULT_SIZE)
    if kind == "fashion-mnist":
        ds = fashion_mnist.load_fashion_mnist(split, root=root, download=download)
    elif kind in ("cifar10", "cifar100"):
        ds = cifar.load_cifar(kind, split, root=root, download=download)
    else:
        ds = stl10.load_stl10(split, root=root, download=download)
    if image_size is not None and ds.image_size != (image_size, image_size):
        ds = ImageDataset(
            _resize_square(ds.images, image_size), ds.labels, ds.classes, f"{ds.name}@{image_size}"
        )
    return ds


def has_split(spec: str, split: str, root: str | Path | None = None) -> bool:
    """Whether ``load_dataset(spec, split)`` can be asked for, without loading anything.

    Built-ins have their fixed splits; a folder has a ``"test"`` split only when it holds
    ``train/`` and ``test/`` (or ``val/``) subfolders. ``root`` is accepted for symmetry with
    :func:`load_dataset`; the answer does not depend on it.

    Raises:
        DatasetError: ``spec`` is neither a built-in nor an existing folder.
    """
    kind, path = _resolve(spec)
    if split not in _SPLITS[kind]:
        return False
    if kind == "folder":
        assert path is not None
        return folder.has_folder_split(path, split)
    return kind != "shards"


#: the most images of labelled shards that evaluation decodes (spread over all of them)
SHARD_EVAL_IMAGES = 10_000


def evaluation_splits(
    cfg: Any, *, origin: str | None = None
) -> tuple[ImageDataset, ImageDataset] | None:
    """The labelled (train, test) pair that kNN and linear evaluation use: the dataset's own
    test split when it has one; for a labelled folder without one, a fixed 90/10 split of it
    (for labelled shards, of up to :data:`SHARD_EVAL_IMAGES` of their images, spread over all
    shards, at ``image_size``); ``None`` for unlabelled data.

    ``cfg`` is a run's options, as a dict or a config dataclass (``data``, ``data_root``,
    ``image_size``, ``num_workers`` and, when present, ``progress`` are read). ``origin`` says
    where ``data`` was read from (a checkpoint) when the user did not type it: a ``pipe:``
    command is then refused.

    >>> train, test = evaluation_splits({"data": "synthetic", "data_root": None,
    ...                                  "image_size": None, "num_workers": 0})
    >>> len(train), len(test)
    (512, 256)
    """
    c = cfg if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
    if shards.is_shards(c["data"]):
        index = shards.ShardIndex.load(c["data"], origin=origin)
        if index.classes is None:
            return None
        side = c["image_size"] or shards.DEFAULT_SIDE
        train = shards.labelled_images(index, side, SHARD_EVAL_IMAGES)
    else:
        kw = dict(
            root=c["data_root"],
            image_size=c["image_size"],
            num_workers=c["num_workers"],
            progress=c.get("progress", True),
        )
        train = load_dataset(c["data"], "train", **kw)
        if train.labels is None:
            return None
        if has_split(c["data"], "test", root=c["data_root"]):
            return train, load_dataset(c["data"], "test", **kw)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    n_test = max(1, len(train) // 10)
    return train.subset(perm[n_test:]), train.subset(perm[:n_test])


#: --image-size from which ``--crops auto`` draws crops from whole folder images
WHOLE_CROPS_FROM = 128


def whole_crops(spec: str, crops: str, image_size: int | None) -> bool:
    """Whether training draws RandomResizedCrop from whole images (``--crops``).

    ``whole``: for folders and shards, each image with its true size and aspect
    (:mod:`mocolab.data.whole`); ``square``: the centre square cached at ``image_size``
    (folders) — shards are always whole; ``auto``: whole for shards and for folders decoded at
    ``image_size ≥ 128`` (the papers' ImageNet scale, where photos are rarely square), square
    for smaller ones (thumbnails, where the square cache is the evaluation's too). The
    built-in datasets are square images either way."""
    kind, _ = _resolve(spec)
    if kind == "shards":
        return True
    if kind != "folder" or crops == "square":
        return False
    return crops == "whole" or (image_size or folder.DEFAULT_IMAGE_SIZE) >= WHOLE_CROPS_FROM


def load_train_set(
    spec: str,
    *,
    crops: str = "auto",
    root: str | Path | None = None,
    image_size: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageDataset:
    """The training images of ``spec``: :func:`load_dataset`'s split "train", or for
    :func:`whole_crops` folders the whole images with their true sizes (``image_size`` is
    then the longer side, default 256). Shards are streamed (:mod:`mocolab.data.shards`),
    not loaded here."""
    if not whole_crops(spec, crops, image_size):
        return load_dataset(
            spec,
            "train",
            root=root,
            image_size=image_size,
            num_workers=num_workers,
            progress=progress,
        )
    kind, path = _resolve(spec)
    if kind == "shards":
        raise DatasetError(f"{spec} is packed shards: stream them with mocolab.data.shards")
    assert path is not None
    return whole.load_folder_whole(
        path,
        "train",
        side=image_size or whole.DEFAULT_SIDE,
        num_workers=num_workers,
        progress=progress,
    )


def absolute_data(spec: str) -> str:
    """``spec`` with a relative path made absolute (against the current directory), so that a
    run's config names its data wherever it is read from; built-in names, URLs and ``pipe:``
    commands are returned as they are.

    >>> absolute_data("synthetic"), absolute_data("https://example.com/index.json")
    ('synthetic', 'https://example.com/index.json')
    """
    if (
        not isinstance(spec, str)
        or spec.lower() in BUILTIN_DATASETS
        or shards.is_pipe(spec)
        or shards.is_url(spec)
    ):
        return spec
    path = Path(spec).expanduser()
    return str(path.absolute()) if path.exists() else spec


def data_fingerprint(spec: str, index: shards.ShardIndex | None = None) -> str | None:
    """A short hash of the training images of ``spec`` (a folder: its image files' names and
    sizes; shards: ``index``'s names, counts and classes) that changes when images are added,
    removed or replaced; ``None`` for the built-in datasets (fixed)."""
    if index is not None:
        return index.fingerprint
    kind, path = _resolve(spec)
    if kind != "folder":
        return None
    assert path is not None
    return folder.folder_fingerprint(path, "train")
