"""Backbones: torchvision ResNets with a stem sized for the images, returning pooled features,
and Vision Transformers (:mod:`mocolab.vit`) returning the [CLS] token.

The state-dict keys are torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``...), so a
pretrained backbone loads into ``torchvision.models.resnet18()`` with the same stem change;
the ViTs' are timm's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from .errors import ConfigError
from .vit import VIT_SIZES, default_patch_size, vit

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
ARCHS = RESNETS + tuple(VIT_SIZES)
STEMS = ("imagenet", "cifar", "compact")


if TYPE_CHECKING:  # what the mixin finds in the nn.BatchNorm*d it is mixed into
    _BatchNormBase = nn.modules.batchnorm._BatchNorm
else:
    _BatchNormBase = object


class _SplitBatchNorm(_BatchNormBase):
    """Training-mode statistics over ``num_splits`` contiguous sub-batches (shared by
    :class:`SplitBatchNorm2d` and :class:`SplitBatchNorm1d`; mixed into an ``nn.BatchNorm*d``).
    Sample ``n`` of a batch of ``N`` belongs to sub-batch ``n // (N / num_splits)`` — the rank
    it would sit on with ``num_splits`` processes — so one process with ``num_splits = W``
    computes what W ranks with plain BN compute. In eval mode it is the plain BatchNorm, with
    the same parameters, buffers and state-dict keys (checkpoints load either way)."""

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[call-arg]
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        s = self.num_splits
        if s == 1 or not self.training:
            return super().forward(x)  # type: ignore[misc]
        n, c, *rest = x.shape
        if n % s:
            raise ValueError(f"{type(self).__name__}: batch {n} is not divisible by {s} splits")
        # (N, C, ...) → (N/s, s·C, ...) with sub-batch j's channels at [j·C, (j+1)·C): one
        # fused batch_norm computes every sub-batch's statistics.
        xs = x.view(s, n // s, c, *rest).transpose(0, 1).reshape(n // s, s * c, *rest)
        running_mean, running_var = self.running_mean, self.running_var
        tracked = running_mean is not None and running_var is not None
        mean_split = running_mean.repeat(s) if running_mean is not None else None
        var_split = running_var.repeat(s) if running_var is not None else None
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        out = F.batch_norm(
            xs,
            mean_split,
            var_split,
            weight,
            bias,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        if running_mean is not None and mean_split is not None:
            with torch.no_grad():
                running_mean.copy_(mean_split.view(s, c).mean(dim=0))
        if running_var is not None and var_split is not None:
            with torch.no_grad():
                running_var.copy_(var_split.view(s, c).mean(dim=0))
        if tracked and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
        return out.view(n // s, s, c, *rest).transpose(0, 1).reshape(n, c, *rest)


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are computed over ``num_splits`` contiguous
    sub-batches, emulating on one device the per-GPU BN of MoCo's multi-GPU training (the
    official MoCo CIFAR demo does the same); see :class:`_SplitBatchNorm`.
    """


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d of the projection and prediction heads with statistics over ``num_splits``
    sub-batches, as :class:`SplitBatchNorm2d` in the backbone: with ``--bn-splits`` the heads'
    BN too sees one sub-batch per (emulated) process, so SimCLR, BYOL, SimSiam and MoCo v3 on
    one process with ``bn_splits = W`` compute what W processes compute."""


def split_batch_norm_1d(module: nn.Module, num_splits: int) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d`` replaced in place by a
    :class:`SplitBatchNorm1d` of ``num_splits`` sub-batches that shares its parameters and
    buffers (so state-dict keys, optimiser entries and EMA copies are unchanged); a no-op
    for ``num_splits <= 1``."""
    if num_splits <= 1:
        return module
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm1d:
                split = SplitBatchNorm1d(
                    child.num_features,
                    num_splits,
                    eps=child.eps,
                    momentum=child.momentum,
                    affine=child.affine,
                    track_running_stats=child.track_running_stats,
                )
                for key, value in [
                    *child.named_parameters(recurse=False),
                    *child.named_buffers(recurse=False),
                ]:
                    setattr(split, key, value)  # the same tensors: shared, not copied
                split.train(child.training)
                setattr(parent, name, split)
    return module


def norm_layer(bn_splits: int = 1) -> Callable[[int], nn.Module]:
    """The BN constructor for a backbone: plain BN, or split BN for shuffle-BN emulation."""
    if bn_splits <= 1:
        return nn.BatchNorm2d
    return partial(SplitBatchNorm2d, num_splits=bn_splits)


def resnet(
    arch: str = "resnet18",
    in_channels: int = 3,
    stem: str = "imagenet",
    bn_splits: int = 1,
    width: int = 64,
) -> nn.Module:
    """A torchvision ResNet without its classifier (``fc = Identity``): ``N×C×H×W → N×D``.

    Args:
        arch: one of :data:`ARCHS`.
        in_channels: 1 for grayscale images, 3 for RGB.
        stem: ``"imagenet"`` keeps torchvision's 7×7/2 conv and 3×3/2 max-pool (for ≥ 96 px);
            ``"cifar"`` uses a 3×3/1 conv and no max-pool (the SimCLR / MoCo CIFAR variant,
            for 32 px); ``"compact"`` a 3×3/2 conv and no max-pool (half the resolution of
            ``cifar``, four times cheaper; the CPU default for 28 px Fashion-MNIST).
        bn_splits: >1 makes every BN a :class:`SplitBatchNorm2d` (shuffle-BN on one device).
        width: channels of the first stage (64 in torchvision; the stages have width × 1, 2,
            4, 8). Narrower networks keep the structure and key names and are much cheaper on
            a CPU (32 quarters the FLOPs).

    The model has attribute ``num_features`` (D: 8·width for resnet18/34, 32·width for
    resnet50/101; 512 and 2048 at the standard width).
    """
    if arch not in RESNETS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(RESNETS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    model = getattr(models, arch)(weights=None, norm_layer=norm_layer(bn_splits))
    if width != 64:  # rebuild the stages narrower with torchvision's own _make_layer
        block = type(model.layer1[0])
        depths = [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)]
        model.inplanes = width
        model.bn1 = norm_layer(bn_splits)(width)
        for i, depth in enumerate(depths):
            layer = model._make_layer(block, width * 2**i, depth, stride=1 if i == 0 else 2)
            setattr(model, f"layer{i + 1}", layer)
        model.fc = nn.Linear(width * 8 * block.expansion, 1000)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if stem == "imagenet":
        model.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    else:
        stride = 1 if stem == "cifar" else 2
        model.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


def default_stem(image_size: int) -> str:
    """The stem that suits an image side: imagenet for ≥ 96 px, cifar for 32–95, compact below."""
    if image_size >= 96:
        return "imagenet"
    if image_size >= 32:
        return "cifar"
    return "compact"


def is_vit(arch: str) -> bool:
    """Whether ``--arch`` names a Vision Transformer."""
    return arch in VIT_SIZES


def vit_backbone(
    arch: str,
    *,
    in_channels: int,
    image_size: int | None,
    patch_size: int | None = None,
    pos_embed: str = "sincos",
    freeze_patch_embed: bool = False,
    depth: int | None = None,
    heads: int | None = None,
    global_pool: str = "token",
    layer_scale: float = 0.0,
) -> nn.Module:
    """The :func:`~mocolab.vit.vit` named ``arch`` for ``image_size`` px images, its patch size
    by default chosen by :func:`~mocolab.vit.default_patch_size`, its features the [CLS] token
    or the mean of the patch tokens (``global_pool``), with LayerScale in every block when
    ``layer_scale`` > 0 (DINOv2).

    Raises:
        ConfigError: the image side is not a multiple of the patch size.
    """
    if image_size is None:
        raise ValueError(f"{arch} needs the image side (image_size) for its position embedding")
    patch = patch_size or default_patch_size(image_size)
    if image_size % patch:
        raise ConfigError(
            f"--patch-size {patch} does not divide the {image_size} px images "
            f"({arch}); pick a divisor of {image_size} with --patch-size, or a "
            f"--crop-size that is a multiple of {patch}"
        )
    return vit(
        arch,
        image_size=image_size,
        patch_size=patch,
        in_channels=in_channels,
        pos_embed=pos_embed,
        freeze_patch_embed=freeze_patch_embed,
        depth=depth,
        heads=heads,
        global_pool=global_pool,
        layer_scale=layer_scale,
    )


# -- the stages of a ResNet, for methods and evaluations that look inside it ----------------
STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM = ("conv1", "bn1", "relu", "maxpool")


def check_resnet(backbone: nn.Module, what: str) -> None:
    """A clear error when ``backbone`` is not a plain ResNet with ``layer1`` … ``layer4``.

    Raises:
        ConfigError: naming ``what`` (the protocol or flag) and what is supported.
    """
    if not all(isinstance(getattr(backbone, name, None), nn.Module) for name in STEM + STAGES):
        raise ConfigError(
            f"{what} needs a ResNet backbone (stem + layer1..layer4); this run's is a "
            f"{type(backbone).__name__}: evaluate a run with --arch resnet18/34/50/101"
        )


def stage_maps(backbone: nn.Module, x: Tensor, stages: Sequence[str] = STAGES) -> dict[str, Tensor]:
    """The feature maps ``N×C_s×H_s×W_s`` that the stages named in ``stages`` output for the
    normalised batch ``x``; the network runs only as far as the last stage asked for."""
    last = max(STAGES.index(s) for s in stages)
    h = x
    for name in STEM:
        h = getattr(backbone, name)(h)
    out = {}
    for name in STAGES[: last + 1]:
        h = getattr(backbone, name)(h)
        if name in stages:
            out[name] = h
    return out


def stage_stride(backbone: nn.Module, stage: str) -> int:
    """How many input pixels one step of stage ``stage``'s feature map spans (its total
    stride): the stem's conv and max-pool, then each stage's first block, read from the modules
    (4 · 2^k for torchvision's ResNets: 4, 8, 16, 32; ``compact`` stem 2, 4, 8, 16)."""
    check_resnet(backbone, f"stage_stride({stage!r})")

    def step(module: object) -> int:
        s = getattr(module, "stride", 1)
        return int(s[0] if isinstance(s, tuple) else s)

    stride = step(backbone.conv1) * step(backbone.maxpool)
    for name in STAGES[: STAGES.index(stage) + 1]:
        first = getattr(backbone, name)[0]
        if first.downsample is not None:
            stride *= step(first.downsample[0])
    return stride


def stage_channels(backbone: nn.Module, stage: str) -> int:
    """Channels of stage ``stage``'s feature map (its last block's output: ``width · 2^k``,
    times 4 for the bottleneck ResNets)."""
    check_resnet(backbone, f"stage_channels({stage!r})")
    last = getattr(backbone, stage)[-1]
    return int((getattr(last, "bn3", None) or last.bn2).num_features)
