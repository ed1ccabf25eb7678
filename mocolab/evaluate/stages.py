"""The stages of a ResNet backbone, for evaluations that look inside it: per-stage feature maps
(per-layer probes, dense heads), freezing the stem and the first stages (partial fine-tuning)
and dilating the last stage (FCN-16s, as MoCo's segmentation transfer).

A mocolab ResNet keeps torchvision's children: ``conv1 → bn1 → relu → maxpool`` (the *stem*)
then ``layer1`` … ``layer4`` (the *stages*, ``res2`` … ``res5`` in detectron2's names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..augment import eval_view
from ..backbones import STAGES, STEM, check_resnet, stage_maps
from ..config import ConfigError
from .linear import linear_probe

if TYPE_CHECKING:
    from .context import EvalContext


def pool_grid(channels: int, height: int, dims: int) -> int:
    """The side ``s`` of the ``s×s`` average-pooling grid that brings a ``channels``-channel map
    to at most ``dims`` features: the largest ``s ≤ height`` with ``channels · s² ≤ dims``
    (at least 1). Goyal et al. 2019 (§4, "Scaling and Benchmarking Self-Supervised Visual
    Representation Learning") pool each ResNet-50 stage to about 9k dims this way.

    >>> pool_grid(64, 14, 4096), pool_grid(512, 2, 4096), pool_grid(2048, 7, 4096)
    (8, 2, 1)
    """
    return max(1, min(height, math.isqrt(max(dims // channels, 1))))


def pool_stage(h: Tensor, dims: int) -> Tensor:
    """``N×C×H×W`` → ``N×(C·s²)``: adaptive average pooling to the :func:`pool_grid` grid."""
    s = pool_grid(h.shape[1], min(h.shape[2], h.shape[3]), dims)
    return F.adaptive_avg_pool2d(h, s).flatten(1)


@torch.no_grad()
def extract_stage_features(
    backbone: nn.Module,
    images: Tensor,
    stages: Sequence[str],
    *,
    dims: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
) -> dict[str, Tensor]:
    """Frozen pooled features of each stage in ``stages`` for ``images`` (uint8 ``N×C×H×W``):
    ``{stage: N×D_s}`` float32 on the CPU, ``D_s ≤ dims`` (:func:`pool_stage`), on the
    deterministic evaluation view (as :func:`mocolab.evaluate.features.extract_features`)."""
    check_resnet(backbone, "per-layer features")
    was_training = backbone.training
    backbone.eval()
    out: dict[str, list[Tensor]] = {s: [] for s in stages}
    for start in tqdm(
        range(0, images.shape[0], batch_size), desc=desc, disable=not progress, leave=False
    ):
        x = eval_view(images[start : start + batch_size].to(device), size, mean, std)
        for name, h in stage_maps(backbone, x, stages).items():
            out[name].append(pool_stage(h, dims).float().cpu())
    backbone.train(was_training)
    return {s: torch.cat(v) for s, v in out.items()}


def frozen_parts(backbone: nn.Module, freeze_stages: int) -> list[nn.Module]:
    """The children frozen by ``freeze_stages`` (MMDetection's ``frozen_stages``): ``-1``
    none, ``0`` the stem, ``N ≥ 1`` the stem and ``layer1`` … ``layerN``.

    Raises:
        ConfigError: ``freeze_stages`` outside -1…4, or a backbone without stages.
    """
    if not -1 <= freeze_stages <= len(STAGES):
        raise ConfigError(
            f"--freeze-stages must be -1 (none), 0 (the stem) or 1..4 (the stem and "
            f"the first N stages), got {freeze_stages}"
        )
    if freeze_stages < 0:
        return []
    check_resnet(backbone, "--freeze-stages")
    return [getattr(backbone, n) for n in STEM + STAGES[:freeze_stages]]


def freeze(backbone: nn.Module, freeze_stages: int) -> list[nn.Module]:
    """Stop the gradients of :func:`frozen_parts` (``requires_grad = False``) and put them in
    eval mode (their BN keeps its running statistics); returns them, so that the caller puts
    them back in eval mode after every ``model.train()`` (:func:`keep_frozen`)."""
    parts = frozen_parts(backbone, freeze_stages)
    for part in parts:
        part.requires_grad_(False)
        part.eval()
    return parts


def keep_frozen(parts: Sequence[nn.Module]) -> None:
    """Eval mode again for frozen parts after ``model.train()`` switched everything to training:
    a frozen stage's BN normalises with its stored statistics and does not update them."""
    for part in parts:
        part.eval()


def dilate_last_stage(backbone: nn.Module, dilation: int = 2) -> nn.Module:
    """``layer4`` with stride 1 and dilation ``dilation`` in place, as torchvision builds it with
    ``replace_stride_with_dilation=[False, False, True]``: the first block keeps dilation 1 with
    stride 1, the later blocks' 3×3 convolutions use ``dilation`` (padding = dilation), the
    shortcut's 1×1 convolution has stride 1. The output stride halves (32 → 16 for the
    ImageNet stem): MoCo's FCN-16s for VOC / Cityscapes segmentation (App. A). The weights
    are unchanged. Returns ``backbone``."""
    check_resnet(backbone, "dilating layer4")
    layer4 = cast(nn.Module, backbone.layer4)
    for i, block in enumerate(layer4.children()):
        d = 1 if i == 0 else dilation
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (d, d), (d, d)
    return backbone


def probe_stages(
    ctx: EvalContext,
    stages: Sequence[str],
    *,
    dims: int = 4096,
    batch_size: int = 256,
    progress: bool = False,
    **linear_opts: Any,
) -> dict[str, dict[str, Any]]:
    """The linear protocol on each stage of a run's frozen ResNet: features pooled to at most
    ``dims`` (:func:`pool_stage`), then :func:`mocolab.evaluate.linear.linear_probe` with
    ``linear_opts`` (a recipe of :data:`~mocolab.evaluate.linear.LINEAR_RECIPES`).

    Returns:
        ``{stage: {"top1", "top5", "train_loss", "dims", "grid"}}`` in the order of ``stages``
        (``grid``: the pooling grid, e.g. ``"4x4"``).
    """

    check_resnet(ctx.backbone, "eval linear --layer")
    if ctx.test is None or ctx.train.labels is None or ctx.test.labels is None:
        raise ConfigError("eval linear --layer needs a labelled dataset with a test split")
    kw = {
        "dims": dims,
        "size": ctx.info["crop_size"],
        "mean": ctx.info["mean"],
        "std": ctx.info["std"],
        "batch_size": batch_size,
        "device": ctx.device,
        "progress": progress,
    }
    out = {}
    for stage in stages:  # one stage at a time: only one stage's features are held at once
        train = extract_stage_features(
            ctx.backbone, ctx.train.images, (stage,), desc=f"{stage} train", **kw
        )[stage]
        test = extract_stage_features(
            ctx.backbone, ctx.test.images, (stage,), desc=f"{stage} test", **kw
        )[stage]
        torch.manual_seed(0)
        acc = linear_probe(
            train, ctx.train.labels, test, ctx.test.labels, ctx.num_classes, **linear_opts
        )
        c = [m for m in getattr(ctx.backbone, stage).modules() if isinstance(m, nn.BatchNorm2d)][
            -1
        ].num_features  # the stage's output channels
        s = math.isqrt(train.shape[1] // c)
        out[stage] = {**acc.to_dict(), "dims": train.shape[1], "grid": f"{s}x{s}"}
    return out
