"""Transfer to detection and instance segmentation (MoCo §4.2): fine-tune torchvision's Faster
R-CNN / Mask R-CNN with an FPN over a run's ResNet (or ViTDet's simple pyramid over a ViT), score
it with pycocotools' ``COCOeval``.

The MoCo paper's transfer choices, as options:

* **all layers fine-tuned**, from the run's weights, a random init (the control) or any
  checkpoint ``load_backbone_and_info`` reads (a supervised backbone saved like a run);
* **normalisation** (``--norm``): MoCo fine-tunes with BN synchronised across GPUs and adds
  SyncBN to the new layers ("we also add SyncBN to the newly initialized layers (e.g. FPN)",
  §4.2). ``syncbn`` does that with ``nn.SyncBatchNorm``: its statistics are those of the
  whole batch, which on one process (how ``eval detect`` runs) is what plain BN computes, so
  one process with batch B matches SyncBN over GPUs with B images in all; ``bn`` is per-process
  BN (differs only under a process group); ``frozen`` is standard Mask R-CNN:
  the backbone's BN turned into fixed affine maps (``FrozenBatchNorm2d``) and no norm in the
  FPN. The official MoCo code ships only R50-C4 configs (``Base-RCNN-C4-BN.yaml``: SyncBN in
  the backbone and the box head); here the FPN variant of the paper is built.
* **schedule**: detectron2's 1× (90k iterations of 16 images, about 12 COCO epochs, LR × 0.1
  at 60k and 80k) is ``--schedule 1x`` = 12 epochs of the train split with LR × 0.1 after 2/3
  and 8/9 of the iterations; ``2x`` = 24 epochs; ``--epochs`` sets another length with the
  same shape. LR 0.02 per 16 images (linear scaling), momentum 0.9, weight decay 1e-4 (none on
  norm layers, detectron2's default), linear warm-up from 0.001× over the first 1/90 of the
  iterations (detectron2: 1000 of 90k). The same recipe for every start, as in the paper.

ViTs (MoCo v3) get ViTDet's simple feature pyramid (:class:`SimpleFeaturePyramid`) instead of
an FPN over stages; ``--norm`` does not apply to them (LayerNorm throughout).

Sizes follow the backbone so the CPU-sized ResNets of mocolab work: the FPN has 4 × width
channels (256 at torchvision's width 64), the box head's MLP 16 × width (1024), the anchors
are 8 × the stride of each level (torchvision's 32…512 for strides 4…64; with the compact stem
16…256). Images keep their size unless ``--min-size`` is given.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoint import load_backbone_and_info, require
from ..config import ConfigError
from ..data import DatasetError
from ..data.detection import DetectionDataset, DetectionSplit, detection_splits
from ..device import select_device
from ..methods import build_backbone
from ..safeio import write_text_atomic
from ..visualize._mpl import pyplot, save, show
from ..vit import VisionTransformer

NORMS = ("frozen", "bn", "syncbn")
SCHEDULES = {"1x": 12, "2x": 24}  # epochs of the train split (detectron2: ~12 COCO epochs)
DECAY_AT = (2 / 3, 8 / 9)  # detectron2's 1x: steps at 60k and 80k of 90k iterations
BASE_LR, BASE_BATCH = 0.02, 16
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --- the detector --------------------------------------------------------------------------


def check_fpn_backbone(backbone: nn.Module, arch: str) -> None:
    """A clear error when a backbone cannot feed a feature pyramid: a torchvision ResNet (FPN
    over its stages) or a mocolab ViT with a power-of-two patch (ViTDet's simple pyramid)."""
    from torchvision.models import ResNet

    if isinstance(backbone, VisionTransformer):
        p = backbone.patch_size
        if p < 4 or p & (p - 1):
            raise ConfigError(
                f"eval detect builds ViTDet's pyramid at strides p/4 … 2p, which RoIAlign needs "
                f"to be powers of two; this run's {arch} has patch size {p}: use a ViT with "
                f"patch 4, 8, 16 or 32 (--patch-size), or a ResNet"
            )
        return
    if not isinstance(backbone, ResNet):
        raise ConfigError(
            f"eval detect needs a ResNet backbone (resnet18/34/50/101, whose stages layer1-4 feed "
            f"the FPN) or a ViT (ViTDet's simple feature pyramid); this run's backbone is {arch} "
            f"({type(backbone).__name__}): CMC's two-stream and CPC's patch backbones have no "
            f"single feature map to build a pyramid on"
        )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, §3): the last ViT block's patch map at
    stride p becomes maps at strides p/4, p/2, p and 2p (two 2×2 deconvolutions with LayerNorm
    and GELU between them, one deconvolution, identity, 2×2 max-pooling), each followed by a
    1×1 and a 3×3 convolution with LayerNorm, plus the max-pooled extra level ``pool`` of
    torchvision's FPN. As detectron2's ViTDet, the position embedding is interpolated
    (bicubic) to each input's grid and the final LayerNorm of the ViT is not applied; unlike
    it, every block keeps global attention (the pretrained ViT as it is, no window blocks).

    Args:
        vit: a :class:`mocolab.vit.VisionTransformer`.
        out_channels: channels of every level.
    """

    def __init__(self, vit: Any, out_channels: int) -> None:
        from torchvision.models.convnext import LayerNorm2d

        super().__init__()
        self.vit = vit
        d = int(vit.num_features)
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(d, d // 2, 2, 2),
                    LayerNorm2d(d // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(d // 2, d // 4, 2, 2),
                ),
                nn.ConvTranspose2d(d, d // 2, 2, 2),
                nn.Identity(),
                nn.MaxPool2d(2),
            ]
        )
        self.outputs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            )
            for c in (d // 4, d // 2, d, d)
        )
        self.out_channels = out_channels

    def patch_map(self, x: Tensor) -> Tensor:
        """``N×C×H×W`` (H, W multiples of p) → the last block's tokens ``N×D×H/p×W/p``."""
        v: Any = self.vit  # a VisionTransformer
        n, _, h, w = x.shape
        gh, gw = h // v.patch_size, w // v.patch_size
        tokens = v.patch_embed(x)  # N×(gh·gw)×D
        g = round((v.pos_embed.shape[1] - 1) ** 0.5)
        pos = v.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if (g, g) != (gh, gw):
            pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        cls = (v.cls_token + v.pos_embed[:, :1]).expand(n, -1, -1)
        out = v.blocks(torch.cat([cls, tokens], dim=1))[:, 1:]  # N×L×D
        return out.transpose(1, 2).reshape(n, -1, gh, gw)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.patch_map(x)
        maps = {
            str(i): out(scale(f)) for i, (scale, out) in enumerate(zip(self.scales, self.outputs))
        }
        maps["pool"] = F.max_pool2d(maps["3"], 1, 2, 0)
        return maps


def _freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` replaced by torchvision's ``FrozenBatchNorm2d`` with
    its statistics and affine parameters (standard Mask R-CNN fine-tuning)."""
    from torchvision.ops import FrozenBatchNorm2d

    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(parent, name, frozen)
    return module


def _strides(body: nn.Module, in_channels: int) -> list[int]:
    """The stride of each returned feature map, from one forward of a 64×64 input."""
    was = body.training
    body.eval()
    with torch.no_grad():
        feats = body(torch.zeros(1, in_channels, 64, 64))
    body.train(was)
    return [64 // f.shape[-1] for f in feats.values()]


def build_detector(
    backbone: nn.Module,
    *,
    num_classes: int,
    in_channels: int,
    mean: list[float],
    std: list[float],
    masks: bool = False,
    norm: str = "syncbn",
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int | None = None,
    rois_per_image: int = 512,
    proposals: int = 1000,
) -> nn.Module:
    """Faster R-CNN (or Mask R-CNN with ``masks``) with an FPN over a mocolab ResNet, or
    ViTDet's :class:`SimpleFeaturePyramid` over a mocolab ViT.

    Args:
        backbone: a torchvision ResNet (any width and stem; trained weights or not) or a
            :class:`mocolab.vit.VisionTransformer` whose patch size is a power of two.
        num_classes: K object categories (the detector adds the background class).
        in_channels, mean, std: the backbone's input (the run's normalisation, 0–1 units).
        masks: Mask R-CNN.
        norm: ``frozen | bn | syncbn`` (module docstring).
        min_size, max_size: torchvision's resizing of the inputs (short side, long side cap).
        fpn_channels: default 4 × the backbone's width (ViTs: D / 3, 256 for ViT-B).
        rois_per_image: proposals sampled per image to train the box (and mask) head
            (detectron2's ROI_HEADS.BATCH_SIZE_PER_IMAGE, 512; RoIAlign's backward dominates a
            CPU step, so smaller is much faster).
        proposals: the RPN's boxes kept per level before NMS and per image after it, in
            training and testing (detectron2's FPN: 2000/1000 in training, 1000/1000 in
            testing; small images need far fewer).

    Raises:
        ConfigError: a backbone that cannot feed an FPN, an unknown ``norm``.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    check_fpn_backbone(backbone, type(backbone).__name__)
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: choose one of {', '.join(NORMS)}")
    fpn: nn.Module
    if isinstance(backbone, VisionTransformer):  # LayerNorm throughout: --norm does not apply
        p = backbone.patch_size
        width = max(1, int(backbone.num_features) // 12)  # ViT-B (768) as ResNet width 64
        out = fpn_channels or 4 * width  # 256 for ViT-B, as ViTDet
        fpn = SimpleFeaturePyramid(backbone, out)
        strides = [p // 4, p // 2, p, 2 * p, 4 * p]
    else:
        stages = [getattr(backbone, f"layer{i}") for i in range(1, 5)]
        width = int(stages[0][0].conv1.in_channels)  # the stem's output = the first stage's input
        last = [stage[-1] for stage in stages]
        channels = [getattr(b, "bn3", b.bn2).num_features for b in last]  # each stage's output
        out = fpn_channels or 4 * width
        if norm == "frozen":
            backbone = _freeze_batch_norm(backbone)
        fpn = BackboneWithFPN(
            backbone,
            {f"layer{i}": str(i - 1) for i in range(1, 5)},
            channels,
            out,
            norm_layer=None if norm == "frozen" else nn.BatchNorm2d,
        )
        strides = _strides(fpn.body, in_channels)  # type: ignore[arg-type]
        strides.append(2 * strides[-1])  # the max-pooled extra level ("pool")
    anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    common: dict[str, Any] = {
        "num_classes": None,
        "min_size": min_size,
        "max_size": max_size,
        "image_mean": list(mean),
        "image_std": list(std),
        "rpn_anchor_generator": anchors,
        "box_head": TwoMLPHead(out * 7 * 7, 16 * width),
        "box_predictor": FastRCNNPredictor(16 * width, num_classes + 1),
        "box_batch_size_per_image": rois_per_image,
        "rpn_pre_nms_top_n_train": proposals,
        "rpn_post_nms_top_n_train": proposals,
        "rpn_pre_nms_top_n_test": proposals,
        "rpn_post_nms_top_n_test": proposals,
    }
    if masks:
        model: nn.Module = MaskRCNN(
            fpn,
            mask_head=MaskRCNNHeads(out, [out] * 4, 1),
            mask_predictor=MaskRCNNPredictor(out, out, num_classes + 1),
            **common,
        )
    else:
        model = FasterRCNN(fpn, **common)
    if isinstance(backbone, VisionTransformer):  # inputs padded to whole patches and levels
        transform: Any = model.transform
        transform.size_divisible = max(32, 4 * backbone.patch_size)
    if norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


# --- training ------------------------------------------------------------------------------


def lr_factor(it: int, total: int, warmup: int) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from 0.001, × 0.1 after each of
    :data:`DECAY_AT` of the ``total`` iterations."""
    decay = 0.1 ** sum(it >= round(f * total) for f in DECAY_AT)
    if it < warmup:
        alpha = it / warmup
        return decay * (0.001 * (1 - alpha) + alpha)
    return decay


def _collate(batch: list[Any]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    norm_types = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, norm_types)
        for p in m.parameters(recurse=False)
    }
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in norm_params], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in norm_params], "weight_decay": 0.0},
    ]


def train_detector(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    device: torch.device | str = "cpu",
    seed: int = 0,
    workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune every layer with SGD on detectron2's schedule (:func:`lr_factor`).

    Returns:
        ``iterations``, ``seconds`` and the last iteration's ``losses``.

    Raises:
        ConfigError: a non-finite loss (names the iteration and the fix).
    """
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=g,
        collate_fn=_collate,
        num_workers=workers,
        drop_last=len(dataset) >= batch_size,
    )
    total = epochs * len(loader)
    warmup = max(1, min(1000, round(total / 90)))
    opt = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=0.9)
    model.to(device).train()
    it, losses, start = 0, {}, time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune detector", disable=not progress, leave=False)
    for _ in range(epochs):
        for images, targets in loader:
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(it, total, warmup)
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            parts = model(images, targets)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"the detection loss became {loss.item()} at iteration {it} of "
                    f"{total}; lower --lr (now {lr:g}) or use --norm frozen"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses = {k: float(v.detach()) for k, v in parts.items()}
            it += 1
            bar.update()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    return {"iterations": it, "seconds": time.perf_counter() - start, "losses": losses}


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    masks: bool = False,
    progress: bool = False,
    keep: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Tensor]]]:
    """The model's detections on every image of ``dataset`` in COCO's results format
    (``image_id``, ``category_id``, ``bbox`` x y w h, ``score``, and ``segmentation`` RLE with
    ``masks``), and the raw outputs of the first ``keep`` images (for pictures)."""
    from pycocotools import mask as mask_utils

    ids = dataset.split.category_ids
    model.to(device).eval()
    results: list[dict[str, Any]] = []
    kept: list[dict[str, Tensor]] = []
    starts = range(0, len(dataset), batch_size)
    for s in tqdm(starts, desc="detect", disable=not progress, leave=False):
        batch = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
        outputs = model([b[0].to(device) for b in batch])
        for (_, target), out in zip(batch, outputs):
            out = {k: v.cpu() for k, v in out.items()}
            if len(kept) < keep:
                kept.append(out)
            image_id = int(target["image_id"])
            boxes = out["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]
            rles = []
            if masks:
                binary = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
                rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for j in range(len(boxes)):
                r: dict[str, Any] = {
                    "image_id": image_id,
                    "category_id": ids[int(out["labels"][j]) - 1],
                    "bbox": [round(float(v), 3) for v in boxes[j]],
                    "score": round(float(out["scores"][j]), 5),
                }
                if masks:
                    r["segmentation"] = {
                        "size": [int(v) for v in rles[j]["size"]],
                        "counts": rles[j]["counts"].decode("ascii"),
                    }
                results.append(r)
    return results, kept


def coco_ap(
    gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str = "bbox"
) -> dict[str, float]:
    """COCO AP of ``results`` against the ground truth ``gt`` by pycocotools' ``COCOeval``
    (101-point interpolated precision, averaged over IoU 0.50:0.05:0.95 for AP), in percent.

    For ``segm`` the results' ``bbox`` is dropped first, so that object sizes (APs/m/l) are
    mask areas (detectron2 does the same). No result at all scores 0.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl`` (−100 where COCOeval has no ground truth of a size).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be bbox or segm, got {iou_type!r}")
    if not results:
        return {m: 0.0 for m in METRICS}
    dets = [
        {k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")}
        for r in copy.deepcopy(results)
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: float(v) * 100 for m, v in zip(METRICS, ev.stats[:6])}


def detection_figure(
    images: list[Tensor],
    outputs: list[dict[str, Tensor]],
    path: str | Path,
    names: list[str],
    score: float = 0.5,
    fallback: int = 3,
) -> Path:
    """Test images with the predicted boxes (class and score) and masks above ``score``; an
    image without any gets its ``fallback`` best detections, drawn dashed (a weak detector
    still shows where it looks). Detections come sorted by score, as torchvision returns them."""

    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    for ax, image, out in zip(axes[0], images, outputs):
        show(ax, image)
        confident = torch.nonzero(out["scores"] >= score).flatten().tolist()
        style = "-" if confident else "--"
        for j in confident or list(range(min(fallback, len(out["scores"])))):
            label = int(out["labels"][j])
            color = cmap((label - 1) % 10)
            if "masks" in out:
                m = (out["masks"][j, 0] > 0.5).numpy()
                overlay = np.zeros((*m.shape, 4))
                overlay[m] = (*color[:3], 0.45)
                ax.imshow(overlay, interpolation="nearest")
            x1, y1, x2, y2 = out["boxes"][j].tolist()
            ax.add_patch(
                plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=1.5, ls=style)
            )
            ax.text(
                x1,
                y1,
                f"{names[label - 1]} {float(out['scores'][j]):.2f}",
                fontsize=6,
                color="white",
                va="bottom",
                bbox={"facecolor": color, "pad": 0.5, "lw": 0},
            )
    return save(fig, path)


# --- the protocol --------------------------------------------------------------------------


def _native_size(split: DetectionSplit) -> tuple[int, int]:
    """(median short side, largest long side) of a split's images: no resizing."""
    short = sorted(min(im["width"], im["height"]) for im in split.coco["images"])
    return int(short[len(short) // 2]), max(
        max(im["width"], im["height"]) for im in split.coco["images"]
    )


def evaluate_detection(
    run_dir: str | Path,
    data: str,
    *,
    masks: bool = False,
    norm: str = "syncbn",
    schedule: str = "1x",
    epochs: int | None = None,
    batch_size: int = 8,
    lr: float | None = None,
    init: str = "run",
    min_size: int | None = None,
    fpn_channels: int | None = None,
    rois_per_image: int = 512,
    proposals: int = 1000,
    device: str = "auto",
    seed: int = 0,
    workers: int = 0,
    examples: int = 6,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune a detector on ``data``'s train split from a run's backbone and score it on
    the test split; writes ``eval_detect.json`` and ``detect_examples.png`` into the run.

    Args:
        run_dir: a run directory or checkpoint (any checkpoint ``load_backbone_and_info`` reads).
        data: a detection dataset folder (:func:`mocolab.data.detection.detection_splits`).
        masks: Mask R-CNN, and mask AP beside box AP.
        norm, schedule, epochs, batch_size, lr: the fine-tuning recipe (module docstring);
            ``lr`` defaults to 0.02 × batch_size / 16.
        init: ``run`` (the run's weights) or ``random`` (the same network, random weights).
        min_size: resize the short side to it (default: the images' own size).
        fpn_channels, rois_per_image, proposals: as :func:`build_detector`.
        examples: test images drawn with their predictions (0: none).

    Returns:
        The contents of ``eval_detect.json``.
    """

    require("pycocotools.cocoeval", "pycocotools", "mocolab eval detect (COCO AP)")
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    for flag, value in (
        ("--batch-size", batch_size),
        ("--rois-per-image", rois_per_image),
        ("--proposals", proposals),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if init not in ("run", "random"):
        raise ConfigError(f"--init {init!r}: choose run or random")
    dev = select_device(device)
    backbone, info = load_backbone_and_info(run_dir)
    cfg = info["config"]
    check_fpn_backbone(backbone, str(cfg.get("arch")))
    if init == "random":
        torch.manual_seed(seed)
        backbone = build_backbone(
            cfg,
            info["in_channels"],
            info["stem"],
            info.get("width", 64),
            image_size=info.get("crop_size"),
        )
    train_split, test_split = detection_splits(data, masks=masks)
    if set(train_split.category_ids) != set(test_split.category_ids):
        raise DatasetError(
            f"{train_split.source} and {test_split.source} have different "
            f"categories; both splits need the same 'categories' list"
        )
    short, long = _native_size(train_split)
    if min_size is not None:
        short, long = min_size, math.ceil(min_size * 1333 / 800)
    torch.manual_seed(seed)
    model = build_detector(
        backbone,
        num_classes=len(train_split.category_ids),
        in_channels=info["in_channels"],
        mean=info["mean"],
        std=info["std"],
        masks=masks,
        norm=norm,
        min_size=short,
        max_size=long,
        fpn_channels=fpn_channels,
        rois_per_image=rois_per_image,
        proposals=proposals,
    )
    channels = info["in_channels"]
    g = torch.Generator().manual_seed(seed + 1)
    train_ds = DetectionDataset(
        train_split, channels, masks=masks, flip=True, generator=g if workers == 0 else None
    )
    test_ds = DetectionDataset(test_split, channels, masks=masks)
    n_epochs = epochs or SCHEDULES[schedule]
    lr = BASE_LR * batch_size / BASE_BATCH if lr is None else lr

    vit = isinstance(backbone, VisionTransformer)
    kind = (
        f"{'Mask' if masks else 'Faster'} R-CNN + "
        f"{'simple feature pyramid (ViTDet)' if vit else 'FPN'}"
    )
    norm = "layernorm (ViT)" if vit else norm
    net = cfg.get("arch") if vit else f"{cfg.get('arch')} width {info.get('width', 64)}"
    log(
        f"fine-tuning {kind} ({net}, "
        f"{'random init' if init == 'random' else 'step ' + str(info['step'])}, norm {norm}) "
        f"on {len(train_ds)} images of {data} for {n_epochs} epochs, batch {batch_size}, lr {lr:g}"
    )
    fit = train_detector(
        model,
        train_ds,
        epochs=n_epochs,
        batch_size=batch_size,
        lr=lr,
        device=dev,
        seed=seed,
        workers=workers,
        progress=progress,
    )
    results, shown = predict(
        model,
        test_ds,
        batch_size=batch_size,
        device=dev,
        masks=masks,
        progress=progress,
        keep=examples,
    )
    scores = {"bbox": coco_ap(test_split.coco, results, "bbox")}
    if masks:
        scores["segm"] = coco_ap(test_split.coco, results, "segm")
    out = {
        **scores,
        "detector": kind,
        "data": str(data),
        "norm": norm,
        "schedule": schedule if epochs is None else f"{n_epochs} epochs",
        "epochs": n_epochs,
        "iterations": fit["iterations"],
        "batch_size": batch_size,
        "lr": lr,
        "rois_per_image": rois_per_image,
        "proposals": proposals,
        "init": init,
        "train_images": len(train_ds),
        "test_images": len(test_ds),
        "detections": len(results),
        "train_seconds": round(fit["seconds"], 1),
        "step": info["step"],
        "arch": cfg.get("arch"),
        "method": cfg.get("method"),
    }
    path = Path(run_dir)
    run = path if path.is_dir() else path.parent
    if examples:
        names = [test_split.category_names[c] for c in test_split.category_ids]
        detection_figure(
            [test_ds.image(i) for i in range(len(shown))], shown, run / "detect_examples.png", names
        )
    write_text_atomic(run / "eval_detect.json", json.dumps(out, indent=2) + "\n")
    return out
