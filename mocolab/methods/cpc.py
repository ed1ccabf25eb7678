"""CPC v2: predict the features of patches further down the image from a causal context.

van den Oord, Li & Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018
(§3 images: a 7×7 grid of overlapping 64 px patches, stride 32, a PixelCNN-style context
network, InfoNCE, Eq. 4); Hénaff et al., "Data-Efficient Image Recognition with Contrastive
Predictive Coding", ICML 2020 (v2: every patch augmented on its own, layer norm in the patch
encoder, predictions in several directions).

The image is cut into a G×G grid of overlapping patches; the patch encoder f (a mocolab ResNet
with layer norm) turns patch (i, j) into ``z_{i,j}``; the context network g (causal
convolutions: ``c_{i,j}`` sees the rows ≤ i only) gives ``c_{i,j}``; for k = 1..K a linear
``W_k`` predicts ``ẑ_{i+k,j} = W_k c_{i,j}``, scored by InfoNCE against every other patch of
the (global) batch. Other directions rotate the grid and use their own ``W_k``.

The evaluated backbone (:class:`PatchGrid`) takes a whole image and returns the mean of ``z``
over its grid of patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..augment import AugmentConfig, ViewGenerator
from ..backbones import resnet
from ..errors import ConfigError
from ..losses import contrastive_accuracy, info_nce
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder
from .tiles import augment_patches

if TYPE_CHECKING:
    from ..config import PretrainConfig

#: Quarter turns of the grid (``torch.rot90`` over its rows and columns) that make a direction
#: "down": after the turn, predicting the rows below predicts the original direction.
ROTATIONS = {"down": 0, "left": 1, "up": 2, "right": 3}

#: What each patch gets on its own during training (CPC v2, §4.1: spatial and colour
#: augmentation per patch; these strengths are ours): a resized crop of 50–100% of the
#: patch, a flip, colour jitter with p = 0.8 and grayscale with p = 0.2 (v2's colour dropping).
PATCH_AUGMENT = dict(scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2)


def patch_grid(images: Tensor, patch_size: int, stride: int) -> Tensor:
    """The G×G grid of overlapping ``patch_size`` patches, ``stride`` apart, of ``N×C×H×W``
    images: ``N×G×G×C×p×p`` with patch ``(i, j)`` = ``images[..., i·s : i·s+p, j·s : j·s+p]``,
    ``G = (side − p) // s + 1`` (pixels past the last whole patch are left out)."""
    n, c, h, w = images.shape
    if min(h, w) < patch_size:
        raise ValueError(f"patch_grid: {h}×{w} images are smaller than the {patch_size} px patches")
    grid = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # N×C×Gh×Gw×p×p
    return grid.permute(0, 2, 3, 1, 4, 5)


def layer_norm_(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by layer norm over (C, H, W) per sample
    (``GroupNorm(1, C)``, CPC v2 §4.1: batch norm would let the patches of an image talk)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            layer_norm_(child)
    return module


class PatchGrid(nn.Module):
    """The evaluated backbone of CPC: a whole image → the mean of its patches' features.

    ``N×C×H×W → N×D``; :meth:`grid` gives the unpooled ``N×D×G×G``. ``encoder`` is the patch
    encoder f (``M×C×p×p → M×D``, attribute ``num_features``).
    """

    def __init__(self, encoder: nn.Module, patch_size: int, patch_stride: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.num_features = encoder.num_features

    def encode(self, patches: Tensor) -> Tensor:
        """``N×G×G×C×p×p`` patches → ``N×D×G×G`` features z."""
        n, g, g2 = patches.shape[:3]
        z = self.encoder(patches.reshape(n * g * g2, *patches.shape[3:]))  # M×D
        return z.view(n, g, g2, -1).permute(0, 3, 1, 2)

    def grid(self, images: Tensor) -> Tensor:
        """``N×D×G×G``: z of every patch of ``images``."""
        return self.encode(patch_grid(images, self.patch_size, self.patch_stride))

    def forward(self, images: Tensor) -> Tensor:
        return self.grid(images).mean(dim=(2, 3))  # N×D


def patch_backbone(
    arch: str, in_channels: int, stem: str, width: int, patch_size: int, patch_stride: int
) -> PatchGrid:
    """CPC's backbone: a mocolab ResNet with layer norm as the patch encoder of a :class:`PatchGrid`."""
    net = layer_norm_(resnet(arch, in_channels=in_channels, stem=stem, width=width))
    return PatchGrid(net, patch_size, patch_stride)


class CausalConv2d(nn.Conv2d):
    """A k×k convolution whose output row i sees the input rows i−k+1 … i only: the input is
    padded by k−1 rows above and none below (PixelCNN's vertical stack, a masked convolution)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size[0]
        return super().forward(F.pad(x, (k // 2, k // 2, k - 1, 0)))


class ContextNetwork(nn.Module):
    """g: ``N×D×G×G`` patch features → ``N×C×G×G`` context, ``c_{i,j}`` a function of the
    rows ≤ i. A 1×1 projection, then residual blocks ``1×1 → causal 3×3 → 1×1`` (ReLU before
    each), as the bottleneck blocks of CPC v2's context network."""

    def __init__(self, in_dim: int, dim: int, blocks: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        hidden = max(1, dim // 2)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(dim, hidden, 1),
                nn.ReLU(),
                CausalConv2d(hidden),
                nn.ReLU(),
                nn.Conv2d(hidden, dim, 1),
            )
            for _ in range(blocks)
        )

    def forward(self, z: Tensor) -> Tensor:
        c = self.proj(z)
        for block in self.blocks:
            c = c + block(c)
        return c


def prediction_loss(
    z: Tensor,
    context: Tensor,
    predictors: nn.ModuleList | list[nn.Module],
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """CPC's InfoNCE (van den Oord et al., Eq. 4) for predictions k = 1..K rows down.

    For every image n and position (i, j) with i + k < G, the query ``ẑ = W_k c_{i,j}``
    (``predictors[k−1]``, a 1×1 convolution) must pick its positive ``z_{i+k,j}`` among all the
    patch features of the batch (of every rank): ``−log exp(ẑ·z⁺/τ) / Σ_{z ∈ batch} exp(ẑ·z/τ)``.
    The loss is the mean over k of the mean over (n, i, j).

    Args:
        z: ``N×D×G×G`` patch features; context: ``N×C×G×G`` (causal over rows).

    Returns:
        ``(loss, accuracy)``: accuracy is how often the positive scores highest.
    """
    n, d, g, g2 = z.shape
    keys = z.permute(0, 2, 3, 1).reshape(-1, d)  # M×D, row (n·G + i)·G + j
    all_keys = distributed.all_gather_with_grad(keys)  # every rank's patches are negatives
    offset = distributed.rank() * keys.shape[0]
    index = torch.arange(keys.shape[0], device=z.device).view(n, g, g2)
    losses, accs = [], []
    for k, w in enumerate(predictors, start=1):
        pred = w(context[:, :, : g - k])  # N×D×(G−k)×G: ẑ_{i+k,j} = W_k c_{i,j}
        query = pred.permute(0, 2, 3, 1).reshape(-1, d)
        target = index[:, k:].reshape(-1)  # row of z_{i+k,j}
        loss, logits = info_nce(query, keys[target], all_keys, temperature, exclude=target + offset)
        losses.append(loss)
        accs.append(contrastive_accuracy(logits.detach()))
    return torch.stack(losses).mean(), torch.stack(accs).mean()


class CPC(Method):
    """CPC v2.

    Args:
        backbone: a :class:`PatchGrid` (see :func:`patch_backbone`).
        dim: channels of the context network.
        prediction_steps: K, rows ahead predicted (the grid needs more than K rows).
        directions: subset of ``down, up, left, right`` (v2 uses all four; v1 down only).
        context_blocks: residual blocks of the context network.
        temperature: τ of InfoNCE on raw dot products (1 in the papers).
    """

    num_views = 1

    def __init__(
        self,
        backbone: PatchGrid,
        *,
        dim: int = 128,
        prediction_steps: int = 3,
        directions: tuple[str, ...] = ("down",),
        context_blocks: int = 2,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.query_encoder = encoder(backbone, nn.Identity())  # evaluated: mean of z
        self.context = ContextNetwork(backbone.num_features, dim, context_blocks)
        self.directions = tuple(directions)
        self.predictors = nn.ModuleList(  # W_k of each direction
            nn.ModuleList(nn.Conv2d(dim, backbone.num_features, 1) for _ in range(prediction_steps))
            for _ in self.directions
        )
        self.prediction_steps = prediction_steps
        self.temperature = temperature
        p = backbone.patch_size
        self.patch_views = ViewGenerator(
            AugmentConfig(size=p, **PATCH_AUGMENT, mean=(0.0,), std=(1.0,))
        )

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        grid = self.backbone
        patches = patch_grid(x, grid.patch_size, grid.patch_stride)  # N×G×G×C×p×p
        g = min(patches.shape[1:3])
        if g <= self.prediction_steps:
            raise ConfigError(
                f"--prediction-steps {self.prediction_steps} needs a grid of more rows "
                f"than {g} ({x.shape[-1]} px views, --patch-size {grid.patch_size}, "
                f"--patch-stride {grid.patch_stride}); lower it or the patch size / stride"
            )
        if self.training and generator is not None:  # every patch its own augmentation (v2)
            flat = augment_patches(
                patches.reshape(-1, *patches.shape[3:]), self.patch_views, generator
            )
            patches = flat.view(patches.shape)
        z = grid.encode(patches)  # N×D×G×G
        losses, accs = [], []
        for direction, predictors in zip(self.directions, self.predictors):
            zr = torch.rot90(z, ROTATIONS[direction], dims=(2, 3))
            loss, acc = prediction_loss(zr, self.context(zr), predictors, self.temperature)
            losses.append(loss)
            accs.append(acc)
        return LossOutput(torch.stack(losses).mean(), {"acc": torch.stack(accs).mean()})


def parse_directions(value: str) -> tuple[str, ...]:
    """``--prediction-directions``: ``all`` or a comma-separated list of down, up, left, right."""
    if value == "all":
        return ("down", "up", "left", "right")
    return tuple(d.strip() for d in value.split(","))


@dataclass
class CPCOptions(r.MethodOptions):
    """CPC v2's own options, sized for 28-32 px images (--patch-size 8, a run-level option
    shared with the ViTs, is set by the method's defaults): a 6×6 grid on 28 px, K = 3 rows
    ahead, downwards, raw dot products (τ = 1)."""

    patch_stride: int = opt(4, "step between patches, pixels (half the patch: overlapping)")
    prediction_steps: int = opt(3, "K, predict the patches 1..K rows ahead")
    prediction_directions: str = opt(
        "down", "down (CPC v1) | all (down, up, left, right: v2) | a comma-separated list of those"
    )
    context_blocks: int = opt(2, "residual blocks of causal convolutions in the context network")
    temperature: float = r.temperature(1.0)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            min(self.patch_stride, self.prediction_steps, self.context_blocks) > 0,
            "--patch-stride, --prediction-steps and --context-blocks must be positive",
        )
        r.check(
            self.prediction_directions == "all"
            or all(
                d.strip() in ("down", "up", "left", "right")
                for d in self.prediction_directions.split(",")
            ),
            "--prediction-directions must be all or a comma-separated list of down, up, left, "
            f"right, got {self.prediction_directions!r}",
        )
        r.check_temperature(self.temperature)


def _cpc_backbone(
    config: Mapping[str, Any], in_channels: int, stem: str, width: int, bn_splits: int
) -> PatchGrid:
    return patch_backbone(
        config["arch"], in_channels, stem, width, config["patch_size"], config["patch_stride"]
    )


# CPC v2: 128-channel context network, each patch augmented on its own (the ``cpc`` recipe).
@r.register_method(
    "cpc",
    options=CPCOptions,
    summary="CPC v2 (Hénaff et al. 2020)",
    defaults={
        "dim": 128,
        "head_layers": 1,
        "patch_size": 8,
        "augment": "cpc",
        "lr_schedule": "cosine",
    },
    backbone=_cpc_backbone,
)
def _cpc(backbone: nn.Module, cfg: PretrainConfig, o: CPCOptions, ctx: r.BuildContext) -> CPC:
    assert isinstance(backbone, PatchGrid)
    return CPC(
        backbone,
        dim=cfg.dim,
        prediction_steps=o.prediction_steps,
        directions=parse_directions(o.prediction_directions),
        context_blocks=o.context_blocks,
        temperature=o.temperature,
    )
