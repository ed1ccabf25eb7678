"""A tiny segmentation dataset in the PASCAL VOC layout, for the segmentation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _square_scenes(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Gray images: a bright square (class 1) and a mid-gray disc-free square (class 2) on a
    dark background (class 0); a 255 border ring around the bright square."""
    g = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        img = g.integers(0, 40, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for cls, value in ((1, 230), (2, 130)):
            s = int(g.integers(size // 4, size // 2))
            y, x = g.integers(0, size - s, 2)
            img[y:y + s, x:x + s] = value + g.integers(0, 20, (s, s))
            mask[y:y + s, x:x + s] = cls
        images.append(img)
        masks.append(mask)
    return images, masks


def write_voc(root: Path, splits: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """A tiny PASCAL VOC style segmentation dataset of :func:`_square_scenes`."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(splits.items()):
        images, masks = _square_scenes(n, size, seed + k)
        ids = [f"{split}_{i:03d}" for i in range(n)]
        for i, img, mask in zip(ids, images, masks):
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.png")
            Image.fromarray(mask).save(root / "SegmentationClass" / f"{i}.png")
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
