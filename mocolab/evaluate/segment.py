"""Semantic segmentation transfer: an FCN head fine-tuned with the run's backbone, scored by
mean IoU and pixel accuracy (MoCo, He et al. 2020, §4.2 and App. A "PASCAL VOC / Cityscapes
semantic segmentation").

MoCo's recipe, followed here where it applies: the ResNet's last stage dilated (stride 1,
dilation 2: output stride 16 on the ImageNet stem, FCN-16s), then two 3×3 convolutions of 256
channels with dilation 6, BN and ReLU, and a 1×1 convolution per class; bilinear upsampling to
the input; training on random scales in [0.5, 2], crops and flips; SGD (momentum 0.9, weight
decay 1e-4, batch 16), learning rate × 0.1 at 70 % and 90 % of training; all layers fine-tuned
with BN (MoCo uses SyncBN across 8 GPUs: on one process that is plain BN). Inference on each
image at its original size.

Data: the PASCAL VOC layout — ``JPEGImages/ID.jpg``, ``SegmentationClass/ID.png`` (a label
map: the pixel value, or the palette index, is the class; 255 = ignore) and
``ImageSets/Segmentation/{train,val}.txt`` listing the IDs — or the layout of ``mocolab data
scenes`` (``{train,test}/images/`` + ``{train,test}/masks/``, the same label maps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import DatasetError
from ..encoder import match_channels
from ..visualize._mpl import pyplot, save, show
from .stages import check_resnet, dilate_last_stage, stage_maps

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --- data ----------------------------------------------------------------------------------


@dataclass
class SegmentationSet:
    """Images with per-pixel class labels.

    Attributes:
        name: where it was read from, for messages.
        images: uint8 ``C×H×W`` tensors (sizes may differ).
        masks: uint8 ``H×W`` label maps of the same sizes; 255 = ignore.
        ids: the image IDs.
        class_names: the classes' names when known (index = label), else empty.
    """

    name: str
    images: list[Tensor]
    masks: list[Tensor]
    ids: list[str]
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def max_label(self) -> int:
        """The largest label other than 255 (-1 when every pixel is ignored)."""
        return max(
            (int(m[m != IGNORE].max()) for m in self.masks if (m != IGNORE).any()), default=-1
        )


def _read_image(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I", "1") else "RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(
            f"{path}: cannot read the image ({e}); replace or remove it "
            f"(and its ID in the split list)"
        ) from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _read_mask(path: Path) -> Tensor:
    """A label map: a palette PNG's indices (VOC) or a gray PNG's values are the classes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(
                    f"{path}: a label map must be a palette or gray PNG (one class "
                    f"index per pixel), not mode {im.mode}; save the class indices "
                    f"as an 8-bit PNG"
                )
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot read the label map ({e}); replace it") from None
    return torch.from_numpy(arr.copy())


def load_voc_segmentation(
    root: str | Path,
    split: str,
    *,
    images_dir: str = "JPEGImages",
    masks_dir: str = "SegmentationClass",
    lists_dir: str = "ImageSets/Segmentation",
) -> SegmentationSet:
    """Read a split of a PASCAL VOC style segmentation dataset into memory.

    Raises:
        DatasetError: the split list is missing or empty, a listed image or label map is
            missing or unreadable, or a label map's size differs from its image's (one line
            naming the file and the fix).
    """
    root = Path(root)
    listing = root / lists_dir / f"{split}.txt"
    if not listing.is_file():
        found = (
            sorted(p.stem for p in (root / lists_dir).glob("*.txt"))
            if (root / lists_dir).is_dir()
            else []
        )
        raise DatasetError(
            f"{listing} does not exist: a segmentation dataset needs the VOC "
            f"layout {images_dir}/ + {masks_dir}/ + {lists_dir}/{{train,val}}.txt"
            f"{f' (lists found: {found})' if found else ''}"
        )
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{listing} lists no images; write one image ID per line")
    images, masks = [], []
    for i in ids:
        image = next(
            (
                root / images_dir / f"{i}{s}"
                for s in IMAGE_SUFFIXES
                if (root / images_dir / f"{i}{s}").is_file()
            ),
            None,
        )
        if image is None:
            raise DatasetError(
                f"{root / images_dir / i}.jpg (listed in {listing}) does not "
                f"exist; add the image or remove {i!r} from the list"
            )
        mask = root / masks_dir / f"{i}.png"
        if not mask.is_file():
            raise DatasetError(
                f"{mask} (the label map of {i!r} in {listing}) does not exist; add "
                f"it or remove {i!r} from the list"
            )
        x, m = _read_image(image), _read_mask(mask)
        if tuple(m.shape) != tuple(x.shape[1:]):
            raise DatasetError(
                f"{mask} is {m.shape[1]}×{m.shape[0]} but its image {image.name} is "
                f"{x.shape[2]}×{x.shape[1]}; a label map must have its image's size"
            )
        images.append(x)
        masks.append(m)
    names_file = root / "labels.txt"
    names = names_file.read_text().split("\n") if names_file.is_file() else []
    return SegmentationSet(
        f"{root} ({split})", images, masks, ids, [n.strip() for n in names if n.strip()]
    )


def load_paired_segmentation(folder: str | Path) -> SegmentationSet:
    """The split folder of ``mocolab data scenes``: ``images/NAME.png`` with the label map
    ``masks/NAME.png``; class names from ``../scenes.json`` (background first) when present.

    Raises:
        DatasetError: no images, an image without its label map (or the reverse), or sizes
            that differ (one line naming the file and the fix).
    """

    folder = Path(folder)
    files = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(
            f"{folder / 'images'} holds no images (.png / .jpg); write the scenes "
            f"again with mocolab data scenes"
        )
    masks = {p.stem: p for p in (folder / "masks").glob("*.png")}
    orphans = sorted(set(masks) - {p.stem for p in files})
    if orphans:
        raise DatasetError(
            f"{masks[orphans[0]]} (and {len(orphans) - 1} more) has no image in "
            f"{folder / 'images'}; remove it or add the image"
        )
    images, labels = [], []
    for path in files:
        mask = masks.get(path.stem)
        if mask is None:
            raise DatasetError(
                f"{folder / 'masks' / path.stem}.png (the label map of {path}) "
                f"does not exist; add it or remove the image"
            )
        x, m = _read_image(path), _read_mask(mask)
        if tuple(m.shape) != tuple(x.shape[1:]):
            raise DatasetError(
                f"{mask} is {m.shape[1]}×{m.shape[0]} but its image {path.name} is "
                f"{x.shape[2]}×{x.shape[1]}; a label map must have its image's size"
            )
        images.append(x)
        labels.append(m)
    meta = folder.parent / "scenes.json"
    names = (
        ["background", *json.loads(meta.read_text()).get("classes", [])] if meta.is_file() else []
    )
    return SegmentationSet(str(folder), images, labels, [p.stem for p in files], names)


def load_segmentation(root: str | Path, split: str) -> SegmentationSet:
    """A split of a segmentation dataset at ``root``: the PASCAL VOC layout, or the
    ``ROOT/SPLIT/images`` + ``ROOT/SPLIT/masks`` layout that ``mocolab data scenes`` writes.
    ``split`` is ``train`` or ``val`` (``test`` is used when there is no ``val``).

    Raises:
        DatasetError: no such folder, or the problems of :func:`load_voc_segmentation` /
            :func:`load_paired_segmentation`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"segmentation dataset {root} does not exist; pass a folder in the "
            f"PASCAL VOC layout (or one written by mocolab data scenes)"
        )
    if (root / "train" / "masks").is_dir():  # mocolab data scenes
        if split == "val" and not (root / "val").is_dir():
            split = "test"
        if not (root / split / "images").is_dir():
            raise DatasetError(
                f"{root / split / 'images'} does not exist; the scenes layout needs "
                f"{split}/images/ and {split}/masks/"
            )
        return load_paired_segmentation(root / split)
    lists = root / "ImageSets" / "Segmentation"
    if split == "val" and not (lists / "val.txt").is_file() and (lists / "test.txt").is_file():
        split = "test"
    return load_voc_segmentation(root, split)


# --- model ---------------------------------------------------------------------------------


class FCNHead(nn.Sequential):
    """MoCo's segmentation head (App. A, after DeepLab's large field of view): two 3×3
    convolutions of ``channels`` with dilation ``dilation``, BN and ReLU, then a 1×1
    convolution to ``num_classes`` logits."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, dilation: int = 6
    ) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, channels):
            layers += [
                nn.Conv2d(c_in, channels, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers, nn.Conv2d(channels, num_classes, 1))


class Segmenter(nn.Module):
    """``backbone`` (its ``layer4`` dilated) + :class:`FCNHead`, logits upsampled bilinearly to
    the input: normalised ``N×C×H×W`` → ``N×num_classes×H×W``."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int = 256,
        dilation: int = 6,
        dilate: bool = True,
    ) -> None:
        super().__init__()
        check_resnet(backbone, "eval segment")
        self.backbone = dilate_last_stage(backbone) if dilate else backbone
        layer4 = cast(nn.Module, backbone.layer4)
        out = [m for m in layer4.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        self.head = FCNHead(out.num_features, num_classes, channels, dilation)

    def forward(self, x: Tensor) -> Tensor:
        h = stage_maps(self.backbone, x, ("layer4",))["layer4"]
        return F.interpolate(self.head(h), size=x.shape[-2:], mode="bilinear", align_corners=False)


# --- metrics -------------------------------------------------------------------------------


def confusion_matrix(target: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """``C×C`` int64 counts: row = true class, column = predicted; pixels labelled 255 (or any
    label ≥ C) are left out."""
    valid = target < num_classes
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(cm: Tensor) -> dict[str, Any]:
    """Scores of a confusion matrix (row = truth): per-class IoU = TP / (TP + FP + FN), mIoU =
    their mean over the classes that occur in the truth or the predictions (a class absent
    from both has no IoU, as in the VOC devkit and mmsegmentation), pixel accuracy =
    Σ TP / Σ pixels, and mean class accuracy (the mean of TP / row sum over present classes).
    IoU values in percent; ``iou`` per class, ``None`` where undefined."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    rows = cm.sum(1)
    acc = torch.where(rows > 0, tp / rows.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~iou.isnan()
    return {
        "miou": 100 * float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": 100 * float(tp.sum() / cm.sum().clamp_min(1)),
        "mean_acc": 100 * float(acc[~acc.isnan()].mean()) if (~acc.isnan()).any() else 0.0,
        "iou": [None if math.isnan(v) else 100 * v for v in iou.tolist()],
    }


# --- training and evaluation ---------------------------------------------------------------


def _normalise(x: Tensor, channels: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``N×C×H×W`` → float, the backbone's channels, ``(x − mean) / std``."""
    x = match_channels(x.float().div(255.0), channels)
    m = torch.tensor(list(mean), device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _train_pair(
    image: Tensor, mask: Tensor, crop: int, scale: tuple[float, float], gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One training sample: random rescale (bilinear image, nearest mask), random ``crop×crop``
    crop — padded with 0 (the mean, after normalisation) and 255 (ignore) where the image is
    smaller — and a horizontal flip with probability 1/2. Image: normalised float."""
    s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen))
    h, w = image.shape[-2:]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    m = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
    ph, pw = max(crop - size[0], 0), max(crop - size[1], 0)
    x = F.pad(x, (0, pw, 0, ph), value=0.0)
    m = F.pad(m, (0, pw, 0, ph), value=IGNORE)
    top = int(torch.randint(x.shape[1] - crop + 1, (), generator=gen))
    left = int(torch.randint(x.shape[2] - crop + 1, (), generator=gen))
    x, m = x[:, top : top + crop, left : left + crop], m[top : top + crop, left : left + crop]
    if float(torch.rand((), generator=gen)) < 0.5:
        x, m = x.flip(-1), m.flip(-1)
    return x, m


def train_segmenter(
    model: Segmenter,
    data: SegmentationSet,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    iters: int = 1000,
    batch_size: int = 16,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    crop: int | None = None,
    scale: tuple[float, float] = (0.5, 2.0),
    milestones: Sequence[float] = (0.7, 0.9),
    norm: str = "bn",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> float:
    """Fine-tune ``model`` (backbone and head) on ``data`` for ``iters`` SGD steps of
    ``batch_size`` random crops (:func:`_train_pair`); per-pixel cross-entropy ignoring 255;
    learning rate × 0.1 at each milestone (fractions of ``iters``, MoCo's 70 % and 90 %).

    ``norm="bn"``: the backbone's BN trains (batch statistics, updated running statistics);
    ``"frozen"``: the backbone's BN keeps its statistics and affine parameters (detectron2's
    FrozenBN). ``crop`` defaults to the largest image side, at most 513 (MoCo's VOC crop).
    Returns the last step's loss.
    """
    if norm not in ("bn", "frozen"):
        raise ValueError(f"unknown norm {norm!r}; choose bn or frozen")
    device = torch.device(device)
    crop = crop or min(513, max(max(x.shape[-2:]) for x in data.images))
    frozen_bn = (
        [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        if norm == "frozen"
        else []
    )
    for m in frozen_bn:
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    for m in frozen_bn:
        m.eval()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(iters), desc="segmentation", disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = lr * 0.1 ** sum(step >= round(f * iters) for f in milestones)
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        pairs = [
            _train_pair(
                _normalise(data.images[i][None], channels, mean, std)[0],
                data.masks[i],
                crop,
                scale,
                gen,
            )
            for i in idx
        ]
        x = torch.stack([p[0] for p in pairs]).to(device)
        y = torch.stack([p[1] for p in pairs]).to(device).long()
        loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> list[Tensor]:
    """Per-pixel classes (uint8 ``H×W``, on the CPU) of each image at its own size; images of
    equal size run in batches."""
    model.eval()
    out: list[Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        by_size.setdefault(tuple(x.shape), []).append(i)
    for members in by_size.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            x = torch.stack([images[i] for i in chunk]).to(device)
            pred = model(_normalise(x, channels, mean, std)).argmax(1).to(torch.uint8).cpu()
            for i, p in zip(chunk, pred):
                out[i] = p
    return out  # type: ignore[return-value]


def evaluate_segmenter(
    model: nn.Module,
    data: SegmentationSet,
    num_classes: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    examples: int = 6,
    examples_to: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`segmentation_scores` of ``model`` on ``data``, each image at its original size;
    with ``examples_to``, the first ``examples`` images drawn there
    (:func:`segmentation_figure`)."""
    preds = predict(
        model,
        data.images,
        mean=mean,
        std=std,
        channels=channels,
        batch_size=batch_size,
        device=device,
    )
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for p, m in zip(preds, data.masks):
        cm += confusion_matrix(m, p, num_classes)
    if examples_to is not None and examples:
        k = min(examples, len(data))
        segmentation_figure(data.images[:k], data.masks[:k], preds[:k], examples_to)
    return {**segmentation_scores(cm), "confusion": cm.tolist()}


def segmentation_figure(
    images: Sequence[Tensor], masks: Sequence[Tensor], preds: Sequence[Tensor], path: str | Path
) -> Path:
    """Test images (top row), their label maps (middle) and the predictions (bottom): class
    colours of ``tab20`` (background black, ignored pixels white)."""

    plt = pyplot()
    colours = np.zeros((256, 3))
    colours[1:21] = np.asarray(plt.get_cmap("tab20").colors)
    colours[IGNORE] = 1.0
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 5.9), squeeze=False)
    for j in range(n):
        show(axes[0, j], images[j])
        for row, labels in ((1, masks[j]), (2, preds[j])):
            axes[row, j].imshow(colours[labels.long().numpy()], interpolation="nearest")
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
    for row, title in enumerate(("image", "truth", "prediction")):
        axes[row, 0].set_ylabel(title)
    return save(fig, path)
