"""Scenes: an offline detection / segmentation benchmark made of real images.

COCO and PASCAL VOC cannot be downloaded everywhere, so ``mocolab data scenes`` builds a small
dataset with their structure from Fashion-MNIST: garments pasted at random scales and
positions onto black canvases, 1 to ``max_objects`` per image, each keeping most of its pixels
visible. Train scenes draw garments from the train split only and test scenes from the test
split only, so a detector evaluated on them never saw a test garment. The output is
deterministic: the same options write the same bytes.

Layout (read by :mod:`mocolab.evaluate.detection` and by the segmentation loader)::

    OUT/
      scenes.json                   the options, counts and the class names
      train/
        annotations.json            COCO instances: images, annotations, categories
        images/000000.png ...       8-bit grayscale canvases, size × size
        masks/000000.png ...        VOC-style label maps (same stem as the image)
      test/
        annotations.json
        images/ ...
        masks/ ...

COCO annotations: ``category_id`` is the Fashion-MNIST class + 1 (1..10; 0 is background in
torchvision's detectors), ``bbox`` is ``[x, y, w, h]`` in pixels of the garment's *visible*
pixels, ``segmentation`` its visible pixels as an uncompressed-size RLE of pycocotools
(``{"size": [h, w], "counts": str}``), ``area`` their count, ``iscrowd`` 0. Image ids and
annotation ids start at 1; ``file_name`` is relative to ``images/``.

Label maps (PNG, mode ``L``): 0 = background, c + 1 = Fashion-MNIST class c, 255 = ignore. As
in VOC, whose label maps mark object boundaries 255, a pixel is ignored when the garment on top
of it only partly covers it (its antialiased coverage α is in [0.25, 0.75): the pixel mixes two
things); it gets the top garment's class when α ≥ 0.75 and is background when no garment covers
a quarter of it.

How a scene is drawn (numbers are the defaults): a garment's foreground is its non-zero pixels
(Fashion-MNIST backgrounds are exactly 0). Its side is uniform in [size/5, size/2] px; it is
resized (bilinear, antialiased) together with its foreground, giving coverage α; it is
composited over the canvas (``canvas·(1 − α) + garment``; the garment is already premultiplied
by its black background). Its instance mask is α ≥ 0.5. A placement is rejected (and redrawn, up
to 30 times) when it would leave an earlier garment with less than 70 % of its pixels visible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint import require
from ..safeio import staged_folder
from .base import DatasetError, ImageDataset
from .fashion_mnist import load_fashion_mnist

SOURCES = ("fashion-mnist",)
IGNORE = 255
_ATTEMPTS = 30


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn (the defaults are the module docstring's numbers).

    Attributes:
        size: side of the square canvas in px.
        max_objects: garments per scene are uniform in 1..max_objects.
        min_scale, max_scale: a garment's side as a fraction of ``size``.
        min_visible: the share of each garment's pixels that must stay visible.
    """

    size: int = 128
    max_objects: int = 6
    min_scale: float = 0.2
    max_scale: float = 0.5
    min_visible: float = 0.7

    def check(self) -> None:
        """Raise :class:`DatasetError` naming the flag when an option is out of range."""
        if self.size < 16:
            raise DatasetError(f"--size must be at least 16 px, got {self.size}")
        if self.max_objects < 1:
            raise DatasetError(f"--max-objects must be at least 1, got {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise DatasetError(
                f"scales must satisfy 0 < min {self.min_scale} <= max {self.max_scale} <= 1"
            )
        if round(self.min_scale * self.size) < 4:
            raise DatasetError(
                f"garments of {self.min_scale:g} × {self.size} px are too small; raise --size"
            )


def _garment(image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A 28×28 uint8 garment resized to ``side``: (premultiplied intensity, coverage α) floats."""
    x = torch.from_numpy(image).float().div(255.0)
    stack = torch.stack([x, (x > 0).float()]).unsqueeze(0)  # 1×2×28×28
    y = F.interpolate(
        stack, size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )[0].clamp_(0, 1)
    return y[0].numpy(), y[1].numpy()


def draw_scene(
    rng: np.random.Generator, garments: np.ndarray, labels: np.ndarray, opts: SceneOptions
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One scene: ``(image H×W uint8, label map H×W uint8, instances)``.

    Each instance is ``{"class": c, "mask": H×W bool (visible pixels)}``; instances are in
    paste order (later ones on top).
    """
    s = opts.size
    canvas = np.zeros((s, s), np.float32)
    owner = np.full((s, s), -1, np.int64)  # topmost instance whose mask covers the pixel
    top = np.full((s, s), -1, np.int64)  # topmost instance with α ≥ 0.25
    top_alpha = np.zeros((s, s), np.float32)
    full_area: list[int] = []
    classes: list[int] = []
    lo, hi = max(4, round(opts.min_scale * s)), max(4, round(opts.max_scale * s))
    for _ in range(int(rng.integers(1, opts.max_objects + 1))):
        index = int(rng.integers(len(garments)))
        for _attempt in range(_ATTEMPTS):
            side = int(rng.integers(lo, hi + 1))
            y0, x0 = (int(v) for v in rng.integers(0, s - side + 1, size=2))
            value, alpha = _garment(garments[index], side)
            mask = alpha >= 0.5
            if not mask.any():
                break  # an empty garment at this size: draw no object for this slot
            window = owner[y0 : y0 + side, x0 : x0 + side]
            covered = np.bincount(window[mask] + 1, minlength=len(classes) + 1)[1:]
            visible = np.bincount(owner.ravel() + 1, minlength=len(classes) + 1)[1:]
            if all(
                visible[j] - covered[j] >= opts.min_visible * full_area[j]
                for j in range(len(classes))
            ):
                break
        else:
            continue  # no room for this garment
        if not mask.any():
            continue
        j = len(classes)
        region = (slice(y0, y0 + side), slice(x0, x0 + side))
        canvas[region] = canvas[region] * (1 - alpha) + value
        owner[region][mask] = j
        touch = alpha >= 0.25
        top[region][touch] = j
        top_alpha[region][touch] = alpha[touch]
        full_area.append(int(mask.sum()))
        classes.append(int(labels[index]))
    image = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    label_map = np.zeros((s, s), np.uint8)
    cls = np.asarray([*classes, 0], np.int64)[top]  # top == -1 indexes the dummy last entry
    label_map[top >= 0] = IGNORE
    solid = (top >= 0) & (top_alpha >= 0.75)
    label_map[solid] = (cls[solid] + 1).astype(np.uint8)
    instances = [{"class": c, "mask": owner == j} for j, c in enumerate(classes)]
    return image, label_map, [i for i in instances if i["mask"].any()]


def _annotation(mask: np.ndarray, category: int, image_id: int, ann_id: int) -> dict[str, Any]:

    mask_utils = require("pycocotools.mask", "pycocotools", "mocolab data scenes (RLE masks)")
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {
            "size": [int(v) for v in rle["size"]],
            "counts": rle["counts"].decode("ascii"),
        },
    }


def write_split(
    out: Path,
    source: ImageDataset,
    count: int,
    seed: int,
    split_id: int,
    opts: SceneOptions,
    progress: bool = False,
) -> dict[str, int]:
    """Draw ``count`` scenes from ``source`` into ``out`` (``annotations.json``, ``images/``,
    ``masks/``); returns the numbers of images and instances."""
    assert source.labels is not None and source.classes is not None
    rng = np.random.default_rng([seed, split_id])
    garments = source.images[:, 0].numpy()
    labels = source.labels.numpy()
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in tqdm(range(count), desc=f"{out.name} scenes", disable=not progress, leave=False):
        image, label_map, instances = draw_scene(rng, garments, labels, opts)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(out / "images" / name)
        Image.fromarray(label_map).save(out / "masks" / name)
        images.append({"id": i + 1, "file_name": name, "height": opts.size, "width": opts.size})
        for inst in instances:
            annotations.append(
                _annotation(inst["mask"], inst["class"] + 1, i + 1, len(annotations) + 1)
            )
    coco = {
        "info": {"description": f"mocolab scenes of {source.name}", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c + 1, "name": n, "supercategory": "garment"}
            for c, n in enumerate(source.classes)
        ],
    }
    (out / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return {"images": len(images), "instances": len(annotations)}


def make_scenes(
    out: str | Path,
    *,
    source: str = "fashion-mnist",
    train: int = 5000,
    test: int = 1000,
    seed: int = 0,
    opts: SceneOptions = SceneOptions(),
    data_root: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a scenes dataset to ``out`` (layout in the module docstring); atomic: the files
    are written into a temporary folder beside ``out`` that is swapped in at the end
    (:func:`mocolab.safeio.staged_folder`), so a failure or a kill leaves ``out`` as it was.

    Args:
        out: the dataset folder to create.
        source: where the garments come from (only ``"fashion-mnist"``).
        train, test: number of scenes of each split (test scenes from the test split only).
        seed: the scenes are a function of the seed and the options.
        opts: canvas size and drawing options.
        data_root: where Fashion-MNIST is looked for.
        overwrite: replace an existing ``out``.

    Returns:
        The contents of ``out/scenes.json`` (options, counts and class names).

    Raises:
        DatasetError: bad options, an existing ``out`` without ``overwrite``, a missing source.
    """

    if source not in SOURCES:
        raise DatasetError(
            f"--from {source!r}: scenes are drawn from {', '.join(SOURCES)} "
            f"(garments on a black background)"
        )
    if train < 1 or test < 0:
        raise DatasetError(f"--train must be >= 1 and --test >= 0, got {train} and {test}")
    opts.check()
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(
            f"{out} already exists; pass --overwrite to replace it or choose another folder"
        )
    with staged_folder(out) as tmp:
        counts = {}
        for split_id, (split, count) in enumerate((("train", train), ("test", test))):
            ds = load_fashion_mnist(split, root=data_root)
            counts[split] = write_split(tmp / split, ds, count, seed, split_id, opts, progress)
        meta = {
            "source": source,
            "seed": seed,
            "options": opts.__dict__,
            "splits": counts,
            "classes": list(ds.classes or []),
            "label_map": {"background": 0, "ignore": IGNORE},
        }
        (tmp / "scenes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
