"""Where a ViT's [CLS] token looks: the last block's attention of [CLS] to the patches, one map
per head (Caron et al. 2021, DINO, Fig. 1 and §4.2.1), upsampled and laid over the image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import eval_view
from ._mpl import pyplot, save, show


def has_attention(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a mocolab ViT (has :meth:`~mocolab.vit.VisionTransformer.last_attention`)."""
    return callable(getattr(backbone, "last_attention", None))


@torch.no_grad()
def cls_attention_maps(backbone: nn.Module, images: Tensor) -> Tensor:
    """The [CLS] token's attention to the patches in the last block, ``N×heads×h×w``.

    ``images`` is the backbone's input (normalised float ``N×C×S×S``); ``h = w = S/p``. Each
    map is the [CLS] row of ``softmax(q·kᵀ/√d)`` without its [CLS]→[CLS] entry, renormalised so
    that it sums to 1 over the patches (a distribution over where the token looks).

    Raises:
        ValueError: the backbone is not a ViT.
    """
    if not has_attention(backbone):
        raise ValueError("attention maps need a ViT backbone (--arch vit_tiny|vit_small|vit_base)")
    was_training = backbone.training
    backbone.eval()
    try:
        attn = cast(Callable[[Tensor], Tensor], backbone.last_attention)(
            images
        ).float()  # N×H×(1+L)×(1+L)
    finally:
        backbone.train(was_training)
    cls = attn[:, :, 0, 1:]  # N×H×L: [CLS] → patches
    cls = cls / cls.sum(dim=-1, keepdim=True)
    side = int(round(cls.shape[-1] ** 0.5))
    return cls.reshape(*cls.shape[:2], side, side)


def attention_figure(
    backbone: nn.Module,
    images: Tensor,
    path: str | Path,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    alpha: float = 0.6,
) -> Path:
    """Draw each image (uint8 ``N×C×H×W``, a row each) and its per-head [CLS] attention maps,
    upsampled to the image (bilinear) and overlaid on it, each min-max scaled on its own."""
    plt = pyplot()
    device = next(backbone.parameters()).device
    x = eval_view(images.to(device), size, mean, std)
    maps = cls_attention_maps(backbone, x)  # N×H×h×w
    up = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).cpu()
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    up = (up - lo) / (hi - lo).clamp_min(1e-12)
    shown = x.float() * torch.tensor(std, device=device).view(1, -1, 1, 1) + torch.tensor(
        mean, device=device
    ).view(1, -1, 1, 1)
    shown = (shown.clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # the view the network saw
    n, heads = maps.shape[:2]
    fig, axes = plt.subplots(
        n, heads + 1, figsize=(1.3 * (heads + 1), 1.3 * n + 0.4), squeeze=False
    )
    for i in range(n):
        show(axes[i, 0], shown[i])
        for h in range(heads):
            ax = axes[i, h + 1]
            show(ax, shown[i])
            ax.imshow(
                up[i, h].numpy(),
                cmap="inferno",
                alpha=alpha,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            if i == 0:
                ax.set_title(f"head {h}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    grid = maps.shape[-1]
    fig.suptitle(
        f"[CLS] attention of the last block: {heads} heads, {grid}×{grid} patches", fontsize=9
    )
    return save(fig, path)
