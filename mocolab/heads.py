"""Projection heads placed after the backbone's pooled features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def projection_head(
    in_dim: int,
    out_dim: int,
    hidden_dim: int | None = None,
    num_layers: int = 2,
    batch_norm: bool = False,
    last_batch_norm: bool = False,
    last_bias: bool | None = None,
    activation: str = "relu",
) -> nn.Module:
    """An MLP ``in_dim → hidden_dim → ... → out_dim`` with ReLU between layers.

    - ``num_layers=1``: a single linear layer (MoCo v1's 128-d fc).
    - ``num_layers=2``: ``fc → ReLU → fc`` (MoCo v2 / SimCLR's 2-layer MLP head, hidden 2048
      on ImageNet, i.e. the backbone's width).
    - ``batch_norm``: BN after each hidden layer (SimCLR v2, BYOL, MoCo v3);
      ``last_batch_norm``: BN without affine on the output (MoCo v3, Barlow Twins).
    - ``last_bias``: whether the last linear layer has a bias (default: none before a last BN,
      else one; VICReg's expander has none).
    - ``activation``: ``"relu"`` or ``"gelu"`` (MSN's ViT head, ``src/msn_train.py``).

    A hidden linear layer followed by BN has no bias (the BN's mean removes it).
    """
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be relu or gelu, got {activation!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    hidden_dim = hidden_dim or in_dim
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True) if activation == "relu" else nn.GELU())
        dim = hidden_dim
    bias = not last_batch_norm if last_bias is None else last_bias
    layers.append(nn.Linear(dim, out_dim, bias=bias))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class Prototypes(nn.Module):
    """SwAV's prototypes ``C`` (Caron et al. 2020, §3.1): a linear layer without bias from the
    ``dim``-d normalised features to ``K`` scores, whose rows (the prototype vectors) are
    L2-normalised at every step (:meth:`normalize_`), so ``zᵀc`` is a cosine.

    Args:
        dim: feature dimension (128).
        num_prototypes: K (3000 on ImageNet).
        normalize: start from unit rows (SwAV); ``False`` keeps the uniform ``±1/√dim`` draw
            (MSN's ``src/msn_train.py``, which normalises them inside its loss instead).
    """

    def __init__(self, dim: int, num_prototypes: int, normalize: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        # nn.Linear's initialisation: U(±1/√dim)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if normalize:
            self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """``c_k ← c_k / ‖c_k‖`` for every prototype (the official code, each iteration)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: Tensor, frozen: bool = False) -> Tensor:
        """Scores ``z Cᵀ`` (``N×K``); ``frozen`` gives the prototypes a zero gradient (SwAV
        freezes them for the first iterations; a zero rather than no gradient keeps DDP's
        reduction complete, and the step it leaves is parallel to ``c`` and undone by the
        normalisation)."""
        weight = self.weight.detach() + 0 * self.weight if frozen else self.weight
        return z @ weight.T


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, §3.1 and App.): a 3-layer MLP with GELU
    (hidden 2048) to a 256-d bottleneck, L2 normalisation, then a weight-normalised linear layer
    without bias to ``K`` outputs, its norm fixed to 1 (``norm_last_layer``): ``W = V / ‖V‖``
    row-wise; with ``norm_last_layer=False`` each row's norm is a learned gain ``g`` (starting
    at 1, ``W = g · V / ‖V‖``: ``weight_norm`` with ``weight_g`` trained, as iBOT's ViT-S/16
    recipe ``--norm_last_layer false`` and DINOv2's ``DINOHead``).

    Args:
        in_dim: backbone width D.
        out_dim: K (65536).
        hidden_dim: MLP width (2048).
        bottleneck_dim: 256.
        num_layers: MLP layers (3).
        batch_norm: BN after each hidden layer (the official ``--use_bn_in_head``; off by default).
        norm_last_layer: the last layer's row norms fixed to 1 (True, DINO's default) or
            learned (``last_layer_gain``, ``K×1``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [
                nn.Linear(dim, hidden_dim),
                *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []),
                nn.GELU(),
            ]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)  # V of the weight norm
        self.last_layer_gain: nn.Parameter | None = None  # g of the weight norm, when learned
        if not norm_last_layer:
            self.last_layer_gain = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """``…×in_dim → …×K`` (a batch of vectors, or of token sequences)."""
        x = F.normalize(self.mlp(x), dim=-1)
        v: Tensor = self.last_layer.weight
        g: Tensor | None = self.last_layer_gain
        if freeze_last_layer:  # DINO cancels its gradient during the first epoch
            v = v.detach() + 0 * v
            g = None if g is None else g.detach() + 0 * g
        w = F.normalize(v, dim=1)
        return F.linear(x, w if g is None else g * w)


class TokenHeads(nn.Module):
    """The heads of masked self-distillation (iBOT, DINOv2): ``dino`` projects the [CLS]
    token (:meth:`forward`) and ``ibot`` the patch tokens (:meth:`patches`); ``ibot=None``
    sends the patch tokens through ``dino`` too (iBOT's ``--shared_head true``, DINOv2's
    ``ibot.separate_head: false``). Called as a module it is the [CLS] head, so
    ``backbone → heads`` is an encoder of images like DINO's.

    Args:
        dino: the [CLS] token's :class:`DINOHead`.
        ibot: the patch tokens' own :class:`DINOHead` (DINOv2's ``ibot_head``), or ``None``.
    """

    def __init__(self, dino: DINOHead, ibot: DINOHead | None = None) -> None:
        super().__init__()
        self.dino = dino
        self.ibot = ibot

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        return self.dino(x, freeze_last_layer)

    def patches(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """The patch tokens' outputs, ``…×D → …×K``."""
        return (self.dino if self.ibot is None else self.ibot)(x, freeze_last_layer)


class ConvDecoder(nn.Module):
    """A feature map → a dense prediction: ``upsamples`` blocks of ×2 nearest upsampling →
    3×3 conv → BN → ReLU (each halving the channels, to no fewer than ``min_channels``), then a 1×1
    conv to ``out_channels``; the output is resized (bilinear) to the ``size`` asked for when
    the blocks do not land on it. The decoder of colorization (ab-bin logits at a quarter of
    the image) and denoising (the image itself); ``upsamples=0``: 1×1 logits on the map.

    ``N×C_in×h×w → N×out_channels×H×W`` with ``(H, W) = size``.

    Args:
        in_channels: channels of the feature map.
        out_channels: channels predicted per location (313 ab bins, 3 RGB values).
        upsamples: ×2 blocks (log2 of the stride from the map to the output).
        min_channels: no block narrower than this.
    """

    def __init__(
        self, in_channels: int, out_channels: int, upsamples: int, min_channels: int = 16
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(upsamples):
            width = max(channels // 2, min_channels)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.blocks = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.out(self.blocks(x))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y
