"""Whole images for RandomResizedCrop: each image kept with its true size and aspect.

The square cache of :mod:`mocolab.data.folder` keeps the centre square of every image, so a
4:3 photo loses a quarter of itself before any crop is drawn; MoCo, SimCLR, BYOL and DINO
draw ``RandomResizedCrop`` from the *whole* image. Here every image is decoded with its longer
side at ``side`` pixels — true size ``h×w`` — and stored **stretched** to ``side×side`` (one
resampling from the file, PIL bilinear with antialiasing, per axis), next to its true ``(h, w)``.
All images then share one uint8 buffer ``N×C×side×side`` and the batched on-device view path
stays as it is: the crop boxes are drawn on each true size (:func:`crop_params` with per-sample
sizes, torchvision's definition) and mapped onto the stretched pixels
(:func:`mocolab.augment.views.whole_image_boxes`), where their resized crop is the same picture
(the stretch is a separable linear map). Nothing is padded, and code that ignores ``sizes``
still sees every image whole (slightly squeezed).

JPEGs are decoded at reduced size when they are much larger than needed (PIL's ``draft``: the
DCT scaling of libjpeg by 1/2, 1/4 or 1/8, never below the size asked for), which is most of
the decoding time saved for large photos.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..errors import OutputError
from ..safeio import write_atomic, write_text_atomic
from .base import ImageDataset
from .folder import (
    _GRAY_MODES,
    _cache_key,
    _to_8bit,
    _warn_skipped,
    cache_folder,
    decode_files,
    split_files,
)

CACHE_VERSION = 1
DEFAULT_SIDE = 256  # the longer side of whole images (ImageNet presets: 224-px crops)


def true_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``(h, w)`` of a ``width×height`` image scaled so that its longer side is ``side``
    (the shorter one rounded, at least 1 pixel)."""
    if width >= height:
        return max(1, round(side * height / width)), side
    return side, max(1, round(side * width / height))


def decode_whole(
    source: str | Path | bytes | BinaryIO, side: int, draft: bool = True
) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """Decode one image whole, for :class:`~mocolab.data.base.ImageDataset` with ``sizes``.

    Args:
        source: a path, the encoded bytes, or an open binary file.
        side: the longer side of the true size and the side of the stored square.
        draft: let a JPEG decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the
            true size (PIL's ``draft``).

    Returns:
        ``(array C×side×side uint8, grayscale, (h, w))``: the image stretched to the square,
        whether the source is grayscale (C = 1, else 3), and its true size (longer side
        ``side``). EXIF orientation is applied.

    Raises:
        Exception: whatever PIL raises for an unreadable, truncated or corrupt image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as src:
        if draft and src.format == "JPEG":
            h, w = true_size(src.width, src.height, side)
            src.draft(src.mode if src.mode in ("L", "RGB") else None, (w, h))
        # EXIF orientation (a transposed copy only when the file asks for one)
        im = ImageOps.exif_transpose(src) if src.getexif().get(0x0112, 1) != 1 else src
        im.load()  # truncation surfaces here
        gray = im.mode in _GRAY_MODES
        if im.mode not in ("L", "RGB"):  # (converting to the same mode would copy)
            im = _to_8bit(im)
    h, w = true_size(im.width, im.height, side)
    if im.size != (side, side):
        im = im.resize((side, side), Image.Resampling.BILINEAR)  # antialiased per axis
    a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return np.ascontiguousarray(a), gray, (h, w)


class _WholeSet(Dataset):
    """Files to decode: item ``i`` is ``(i, array|None, gray, (h, w), error|None)``."""

    def __init__(self, paths: list[Path], side: int) -> None:
        self.paths, self.side = paths, side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(
        self, i: int
    ) -> tuple[int, np.ndarray | None, bool, tuple[int, int], str | None]:
        try:
            array, gray, size = decode_whole(self.paths[i], self.side)
        except Exception as e:  # any unreadable file is skipped, never a crash
            return i, None, False, (0, 0), f"{type(e).__name__}: {e}"
        return i, array, gray, size, None


def _read_cache(stem: Path, side: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
    paths = [stem.with_suffix(s) for s in (".npy", ".sizes.npy", ".json")]
    if not all(p.is_file() for p in paths):
        return None
    try:
        meta = json.loads(paths[2].read_text())
        images = np.load(paths[0], mmap_mode="c")  # copy-on-write: never changes the file
        sizes = np.load(paths[1])
        if (
            meta.get("version") != CACHE_VERSION
            or images.dtype != np.uint8
            or images.shape != (meta["n"], meta["channels"], side, side)
            or sizes.shape != (meta["n"], 2)
        ):
            return None
    except Exception:  # a damaged cache entry is simply rebuilt
        return None
    return images, sizes, meta


def _write_cache(stem: Path, images: np.ndarray, sizes: np.ndarray, meta: dict) -> None:
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(stem.with_suffix(".npy"), lambda f: np.save(f, images))
        write_atomic(stem.with_suffix(".sizes.npy"), lambda f: np.save(f, sizes))
        write_text_atomic(stem.with_suffix(".json"), json.dumps(meta))
    except (OSError, OutputError) as e:
        warnings.warn(
            f"could not write the whole-image cache {stem}.npy ({e}); the folder will "
            f"be decoded again next time (set $MOCOLAB_DATA to a writable place)",
            stacklevel=3,
        )


def load_folder_whole(
    folder: str | Path,
    split: str = "train",
    *,
    side: int = DEFAULT_SIDE,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageDataset:
    """Load ``split`` of an image folder as whole images: uint8 ``N×C×side×side`` (each image
    stretched) with ``sizes`` (true h, w; longer side ``side``).

    The folder's layout rules, labels, skipped files and caching are those of
    :func:`mocolab.data.folder.load_folder`; the cache is a separate entry (``.npy`` of the
    images, ``.sizes.npy``, ``.json``), memory-mapped on the next load.

    Raises:
        DatasetError: no image files in the split, none readable, or no such split.
    """

    folder, root, files, classes, name = split_files(folder, split)
    cache = cache_folder(cache_dir)
    key = _cache_key(folder, f"{split}:whole:v{CACHE_VERSION}", side, classes, root, files)
    stem = cache / f"{key}-whole"
    hit = _read_cache(stem, side)
    if hit is not None:
        cached, cached_sizes, info = hit
        if info["skipped"]:
            _warn_skipped(root, info["skipped"], len(files), info["skipped_examples"])
        return ImageDataset(
            torch.from_numpy(cached),
            None if info["labels"] is None else torch.tensor(info["labels"]),
            info["classes"],
            name,
            torch.from_numpy(cached_sizes),
        )

    out = np.empty((len(files), 3, side, side), dtype=np.uint8)
    sizes = np.zeros((len(files), 2), dtype=np.int64)

    def store(i: int, item: tuple) -> None:
        out[i], sizes[i] = item[1], item[3]  # 1×S×S broadcasts to the three channels

    decoded = decode_files(
        _WholeSet([root / f for f in files], side),
        files,
        root,
        classes,
        store,
        num_workers=num_workers,
        desc=f"decoding {root} (whole images)",
        progress=progress,
    )
    images = decoded.images(out)
    sizes = np.ascontiguousarray(sizes[decoded.kept])
    meta = {"version": CACHE_VERSION, **decoded.meta(folder, split, images, classes), "side": side}
    _write_cache(stem, images, sizes, meta)
    return decoded.dataset(images, classes, name, sizes)


__all__ = ["DEFAULT_SIDE", "decode_whole", "load_folder_whole", "true_size"]
