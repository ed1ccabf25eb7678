"""Detection datasets as users have them: a COCO JSON + image folder, or the PASCAL VOC layout.

Both become one :class:`DetectionSplit` — a checked COCO ``instances`` dict and the folder its
``file_name`` entries are relative to — so one loader (:class:`DetectionDataset`) feeds the
detector and one evaluator (pycocotools' ``COCOeval``) scores it.

Layouts :func:`detection_splits` accepts for ``--data DATASET``:

* **scenes / per-split COCO**: ``DATASET/train/annotations.json`` + ``DATASET/train/images/``
  and the same under ``test/`` (or ``val/``) — what ``mocolab data scenes`` writes;
* **COCO 2017**: ``DATASET/annotations/instances_train2017.json`` + ``DATASET/train2017/`` and
  ``instances_val2017.json`` + ``val2017/`` (any ``instances_train*`` / ``instances_val*`` pair);
* **PASCAL VOC**: ``DATASET/Annotations/*.xml``, ``DATASET/JPEGImages/*.jpg`` and
  ``DATASET/ImageSets/Main/{trainval|train}.txt`` for training, ``{test|val}.txt`` for testing.
  Boxes are converted as detectron2's VOC loader does (``xmin − 1, ymin − 1, xmax, ymax``);
  ``difficult`` objects become ``iscrowd: 1``, which COCOeval ignores, as VOC's evaluation
  ignores them, and which are left out of training.

Bad input gets a one-line :class:`DatasetError` (nothing usable left, a malformed file) or one
:class:`DetectionDataWarning` per kind of problem with its count, the file and the fix: unknown
category ids, boxes of zero area or outside the image (clipped, or dropped when nothing is
left), images listed but missing or of another size than declared, annotations of no listed
image, masks of another size than their image.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import DatasetError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class DetectionDataWarning(UserWarning):
    """Some images or annotations of a detection dataset were fixed or left out."""


@dataclass
class DetectionSplit:
    """One split: a checked COCO ``instances`` dict and the folder of its images.

    Attributes:
        coco: ``{"images", "annotations", "categories"}``; every annotation has a valid
            ``bbox`` inside its image, ``area`` and ``iscrowd``; every image file exists.
        image_dir: the folder ``file_name`` is relative to.
        source: the annotation file (or VOC folder) it came from, for messages.
    """

    coco: dict[str, Any]
    image_dir: Path
    source: str

    def __len__(self) -> int:
        return len(self.coco["images"])

    @property
    def category_ids(self) -> list[int]:
        """The category ids in order; the detector's label ``k`` (1-based) is ``ids[k − 1]``."""
        return sorted(c["id"] for c in self.coco["categories"])

    @property
    def category_names(self) -> dict[int, str]:
        return {c["id"]: str(c.get("name", c["id"])) for c in self.coco["categories"]}


# --- checks --------------------------------------------------------------------------------


def _warn(source: str, count: int, total: int, what: str, fix: str) -> None:
    warnings.warn(DetectionDataWarning(f"{source}: {count} of {total} {what}; {fix}"), stacklevel=3)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def check_coco(
    coco: Any, source: str, image_dir: Path, *, masks: bool = False, check_files: bool = True
) -> DetectionSplit:
    """Check and clean a COCO ``instances`` dict (see the module docstring for what is fixed,
    what is left out with a warning and what is an error).

    Args:
        coco: the parsed JSON.
        source: its file name, for messages.
        image_dir: the folder ``file_name`` is relative to.
        masks: the annotations' ``segmentation`` will be used (instance segmentation).
        check_files: look for every image file and read its size from its header.

    Raises:
        DatasetError: not a COCO instances dict, no categories, no images, no image found,
            duplicate ids, or no usable annotation left.
    """
    fix_json = "fix the JSON or point --data at another dataset"
    if not isinstance(coco, dict) or not all(
        isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"{source} is not a COCO instances file: it needs the lists "
            f"'images', 'annotations' and 'categories'; {fix_json}"
        )
    try:
        cats = {int(c["id"]): c for c in coco["categories"]}
        images = {int(im["id"]): im for im in coco["images"]}
        for im in images.values():
            str(im["file_name"]), int(im["width"]), int(im["height"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(
            f"{source}: a category or image entry lacks a field or has a bad value "
            f"({type(e).__name__}: {e}); every image needs id, file_name, width "
            f"and height, every category id and name; {fix_json}"
        ) from None
    if len(cats) != len(coco["categories"]) or len(images) != len(coco["images"]):
        raise DatasetError(f"{source}: duplicate category or image ids; {fix_json}")
    if not cats:
        raise DatasetError(f"{source} lists no categories; {fix_json}")
    if not images:
        raise DatasetError(f"{source} lists no images: the dataset is empty; {fix_json}")

    missing: set[int] = set()
    resized: set[int] = set()
    if check_files:
        for iid, im in images.items():
            size = _image_size(image_dir / im["file_name"])
            if size is None:
                missing.add(iid)
            elif size != (int(im["width"]), int(im["height"])):
                resized.add(iid)
        if len(missing) == len(images):
            example = images[next(iter(images))]["file_name"]
            raise DatasetError(
                f"{source}: none of the {len(images)} images it lists is in "
                f"{image_dir} (e.g. {example}); pass the folder that holds them"
            )
        if missing:
            _warn(
                source,
                len(missing),
                len(images),
                f"images listed are missing from {image_dir} or unreadable; they were left out",
                "add the files or remove them from 'images'",
            )
        if resized:
            _warn(
                source,
                len(resized),
                len(images),
                "image files have another size than the "
                "width/height the JSON declares; they were left out",
                "fix width and height",
            )
    dropped = missing | resized

    n: Counter[str] = Counter()
    examples: dict[str, Any] = {}
    anns = []
    for a in coco["annotations"]:
        if not isinstance(a, dict):
            n["malformed"] += 1
            continue
        image_id = a.get("image_id")
        if image_id not in images:
            n["orphan"] += 1
            examples.setdefault("orphan", image_id)
            continue
        if image_id in dropped:
            continue
        if a.get("category_id") not in cats:
            n["category"] += 1
            examples.setdefault("category", a.get("category_id"))
            continue
        box = a.get("bbox")
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            n["malformed"] += 1
            continue
        im = images[image_id]
        w_img, h_img = int(im["width"]), int(im["height"])
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            n["zero"] += 1
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, w_img), min(y + h, h_img)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            n["outside"] += 1
            if x1 <= x0 or y1 <= y0:
                n["outside_dropped"] += 1
                continue
        seg = a.get("segmentation")
        if isinstance(seg, dict) and [int(v) for v in seg.get("size", [])] != [h_img, w_img]:
            n["mask_size"] += 1
            examples.setdefault("mask_size", (seg.get("size"), [h_img, w_img]))
            if masks:
                continue
            seg = None
        if masks and not seg:
            n["no_mask"] += 1
            continue
        clean = {
            **a,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": int(a.get("iscrowd", 0)),
            "area": float(a.get("area") or (x1 - x0) * (y1 - y0)),
        }
        if seg is None:
            clean.pop("segmentation", None)
        anns.append(clean)
    total = len(coco["annotations"])
    if n["malformed"]:
        _warn(
            source,
            n["malformed"],
            total,
            "annotations have no bbox of 4 finite numbers "
            "[x, y, width, height]; they were left out",
            "fix their bbox",
        )
    if n["orphan"]:
        _warn(
            source,
            n["orphan"],
            total,
            f"annotations belong to no listed image (e.g. image_id "
            f"{examples['orphan']!r}); they were left out",
            "add the image or fix image_id",
        )
    if n["category"]:
        _warn(
            source,
            n["category"],
            total,
            f"annotations have a category id missing from "
            f"'categories' (e.g. {examples['category']!r}); they were left out",
            "add the category or fix category_id",
        )
    if n["zero"]:
        _warn(
            source,
            n["zero"],
            total,
            "boxes have zero or negative width or height; they were left out",
            "fix their bbox [x, y, width, height]",
        )
    if n["outside"]:
        _warn(
            source,
            n["outside"],
            total,
            f"boxes reach outside their image: clipped to it "
            f"({n['outside_dropped']} wholly outside were left out)",
            "fix their bbox or the image's width/height",
        )
    if n["mask_size"]:
        size, want = examples["mask_size"]
        _warn(
            source,
            n["mask_size"],
            total,
            f"masks have another size than their image (e.g. "
            f"{size} for a {want[1]}×{want[0]} image, as [height, width]); "
            f"{'they were left out' if masks else 'their masks are ignored'}",
            "re-encode the masks at the image size",
        )
    if n["no_mask"]:
        _warn(
            source,
            n["no_mask"],
            total,
            "annotations have no segmentation, needed by --masks; they were left out",
            "add masks or evaluate boxes only (without --masks)",
        )
    if not any(not a["iscrowd"] for a in anns):
        raise DatasetError(
            f"{source}: no usable annotation left (of {total}); the dataset is "
            f"empty for detection; {fix_json}"
        )
    kept = [im for iid, im in images.items() if iid not in dropped]
    return DetectionSplit(
        {
            "images": kept,
            "annotations": anns,
            "categories": sorted(cats.values(), key=lambda c: c["id"]),
        },
        image_dir,
        source,
    )


def read_coco(
    json_path: str | Path, image_dir: str | Path, *, masks: bool = False, check_files: bool = True
) -> DetectionSplit:
    """A COCO ``instances`` JSON and its image folder, checked by :func:`check_coco`."""
    json_path = Path(json_path)
    try:
        coco = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(
            f"cannot read {json_path} as JSON ({type(e).__name__}: {e}); pass a COCO instances file"
        ) from None
    return check_coco(coco, str(json_path), Path(image_dir), masks=masks, check_files=check_files)


def _voc_object(obj: ET.Element) -> tuple[str, list[float], int]:
    name = (obj.findtext("name") or "").strip()
    bb = obj.find("bndbox")
    if not name or bb is None:
        raise ValueError("an object without name or bndbox")
    xmin, ymin, xmax, ymax = (
        float(bb.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")
    )
    # detectron2's VOC loader: 1-based inclusive pixel indices -> xmin - 1, ymin - 1, xmax, ymax
    box = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
    return name, box, int(obj.findtext("difficult") or 0)


def read_voc(
    root: str | Path, split: str, classes: list[str] | None = None, *, check_files: bool = True
) -> DetectionSplit:
    """A PASCAL VOC split (``ImageSets/Main/<split>.txt``) as a checked COCO dict.

    Args:
        root: the folder holding ``Annotations``, ``JPEGImages`` and ``ImageSets``.
        split: ``train``, ``val``, ``trainval`` or ``test``.
        classes: the category names in order (ids 1..K); default VOC's 20 when every object's
            name is one of them, else the sorted names found.
    """
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [s.split()[0] for s in listing.read_text().splitlines() if s.strip()]
    except OSError as e:
        raise DatasetError(
            f"cannot read the VOC split list {listing} ({e.strerror or e}); a VOC "
            f"folder holds ImageSets/Main/<split>.txt"
        ) from None
    images, objects, bad = [], [], []
    for i, stem in enumerate(ids, start=1):
        xml = root / "Annotations" / f"{stem}.xml"
        try:
            tree = ET.parse(xml).getroot()
            size = tree.find("size")
            if size is None:
                raise ValueError("no <size>")
            width, height = int(size.findtext("width", "")), int(size.findtext("height", ""))
            objs = [_voc_object(o) for o in tree.iter("object")]
        except (OSError, ET.ParseError, AttributeError, TypeError, ValueError):
            bad.append(stem)
            continue
        images.append(
            {"id": i, "file_name": f"JPEGImages/{stem}.jpg", "width": width, "height": height}
        )
        objects += [(i, *o) for o in objs]
    if bad:
        _warn(
            str(listing),
            len(bad),
            len(ids),
            f"images have a missing or unreadable "
            f"Annotations/<id>.xml (e.g. {bad[0]}); they were left out",
            "add the XML files or remove the ids from the list",
        )
    names = sorted({o[1] for o in objects})
    if classes is None:
        classes = list(VOC_CLASSES) if set(names) <= set(VOC_CLASSES) else names
    index = {c: k + 1 for k, c in enumerate(classes)}
    anns = [
        {
            "id": j + 1,
            "image_id": iid,
            "category_id": index.get(name, -1),
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": difficult,
        }
        for j, (iid, name, box, difficult) in enumerate(objects)
    ]
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
    }
    return check_coco(coco, str(listing), root, check_files=check_files)


def detection_splits(
    spec: str | Path, *, masks: bool = False
) -> tuple[DetectionSplit, DetectionSplit]:
    """The (train, test) splits of a detection dataset folder (layouts: module docstring).

    Raises:
        DatasetError: the folder matches no layout, or a split fails :func:`check_coco`.
    """
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"--data {spec}: no such folder; pass a detection dataset folder (COCO "
            f"JSON + images, PASCAL VOC, or one written by mocolab data scenes)"
        )
    if (root / "train" / "annotations.json").is_file():
        test = next(
            (root / s for s in ("test", "val") if (root / s / "annotations.json").is_file()), None
        )
        if test is None:
            raise DatasetError(
                f"{root} has train/annotations.json but no test/ or val/ with an "
                f"annotations.json to evaluate on; add one"
            )
        return (
            read_coco(root / "train" / "annotations.json", root / "train" / "images", masks=masks),
            read_coco(test / "annotations.json", test / "images", masks=masks),
        )
    ann = root / "annotations"
    trains = sorted(ann.glob("instances_train*.json")) if ann.is_dir() else []
    vals = sorted(ann.glob("instances_val*.json")) if ann.is_dir() else []
    if trains and vals:
        train_json, test_json = trains[-1], vals[-1]
        return (
            read_coco(train_json, root / train_json.stem.removeprefix("instances_"), masks=masks),
            read_coco(test_json, root / test_json.stem.removeprefix("instances_"), masks=masks),
        )
    main = root / "ImageSets" / "Main"
    if (root / "Annotations").is_dir() and main.is_dir():
        if masks:
            raise DatasetError(
                f"{root} is a PASCAL VOC detection folder: it has boxes but no "
                f"instance masks; drop --masks"
            )
        train_split = next(
            (s for s in ("trainval", "train") if (main / f"{s}.txt").is_file()), None
        )
        test_split = next((s for s in ("test", "val") if (main / f"{s}.txt").is_file()), None)
        if train_split is None or test_split is None:
            raise DatasetError(
                f"{main} needs trainval.txt (or train.txt) and test.txt (or "
                f"val.txt) listing the image ids of each split"
            )
        train = read_voc(root, train_split)
        names = [c["name"] for c in train.coco["categories"]]
        return train, read_voc(root, test_split, classes=names)
    raise DatasetError(
        f"{root} is not a detection dataset mocolab reads; expected one of: train/annotations.json"
        f" + train/images/ and test/ (mocolab data scenes), annotations/instances_train*.json + "
        f"annotations/instances_val*.json with their image folders (COCO), or Annotations/ + "
        f"JPEGImages/ + ImageSets/Main/ (PASCAL VOC)"
    )


# --- loading -------------------------------------------------------------------------------


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as an
    ``H×W`` uint8 mask, as pycocotools' ``COCO.annToMask`` decodes it."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class DetectionDataset(torch.utils.data.Dataset):
    """A :class:`DetectionSplit` as torchvision's detectors take it: ``(image, target)`` with
    ``image`` float ``C×H×W`` in 0–1 and ``target`` holding ``boxes`` (``N×4`` x1 y1 x2 y2),
    ``labels`` (1..K, the index of the category id in ``split.category_ids`` + 1), ``masks``
    (``N×H×W`` uint8, with ``masks=True``) and ``image_id``. Crowd annotations are left out.

    Args:
        split: the checked split.
        channels: 1 (grayscale) or 3 (RGB), the backbone's input channels.
        masks: decode instance masks.
        flip: flip each image horizontally with probability 1/2 (training; detectron2's
            default augmentation), drawn from ``generator``.
    """

    def __init__(
        self,
        split: DetectionSplit,
        channels: int,
        masks: bool = False,
        flip: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.split = split
        self.mode = "L" if channels == 1 else "RGB"
        self.masks = masks
        self.flip = flip
        self.generator = generator
        label = {cid: k + 1 for k, cid in enumerate(split.category_ids)}
        self.by_image: dict[int, list[dict[str, Any]]] = {
            im["id"]: [] for im in split.coco["images"]
        }
        for a in split.coco["annotations"]:
            if not a["iscrowd"]:
                self.by_image[a["image_id"]].append({**a, "label": label[a["category_id"]]})

    def __len__(self) -> int:
        return len(self.split)

    def image(self, index: int) -> Tensor:
        """Image ``index`` as uint8 ``C×H×W``."""
        info = self.split.coco["images"][index]
        path = self.split.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert(self.mode))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(
                f"{path} cannot be decoded ({type(e).__name__}: {e}); replace the "
                f"file or remove it from {self.split.source}"
            ) from None
        return torch.from_numpy(a.copy()).view(a.shape[0], a.shape[1], -1).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        info = self.split.coco["images"][index]
        image = self.image(index).float().div_(255.0)
        anns = self.by_image[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).view(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x y w h -> x1 y1 x2 y2
        target = {
            "boxes": boxes,
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(info["id"]),
        }
        h, w = image.shape[-2:]
        if self.masks:
            target["masks"] = torch.from_numpy(
                np.stack([annotation_mask(a["segmentation"], h, w) for a in anns])
                if anns
                else np.zeros((0, h, w), np.uint8)
            )
        if self.flip and torch.rand((), generator=self.generator) < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack(
                [w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1
            )
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target
