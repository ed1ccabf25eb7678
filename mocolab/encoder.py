"""A pretrained backbone with its input pipeline, ready for inference on raw images.

Example::

    import mocolab
    encoder = mocolab.load_encoder("runs/mocov2-fashion-mnist-…")  # or an exported .safetensors
    features = encoder(images)  # uint8 (0–255) or float (0–1), N×C×H×W or C×H×W → N×D
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .augment import ops
from .checkpoint import load_backbone_and_info

# ITU-R 601 luma, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def match_channels(x: Tensor, channels: int) -> Tensor:
    """A float ``N×C×H×W`` batch with ``channels`` channels: RGB → gray by ITU-R 601 luma,
    gray → RGB by repetition, unchanged when they already match.

    Raises:
        ValueError: another pair of channel counts (only 1 and 3 are converted).
    """
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        return (x * torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(
            1, keepdim=True
        )
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(
        f"images have {c} channels; the backbone takes {channels} (1 and 3 are converted)"
    )


class Encoder(nn.Module):
    """``backbone ∘ normalise ∘ resize``: images as a user has them → pooled features ``N×D``.

    Input: uint8 images in 0–255 or float images in 0–1, ``N×C×H×W`` (or one ``C×H×W``) of any
    size and with 1 or 3 channels. The central square is resized to ``size×size`` (bilinear,
    antialiased, as the evaluation view of training) when it differs, RGB becomes gray (ITU-R
    601 luma) or gray is repeated to match ``in_channels``, then ``(x − mean) / std``.

    Args:
        backbone: ``N×C×S×S → N×D`` (a mocolab ResNet; attribute ``num_features``).
        mean: per-channel mean in 0–1 units (the training images' statistics).
        std: per-channel standard deviation in 0–1 units.
        size: S, the side the backbone was trained on (the run's crop size).
        in_channels: C of the backbone.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        size: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.info: dict[str, Any] = {}  # the run's info, set by load_encoder
        self.size = int(size)
        self.in_channels = int(in_channels)
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_features(self) -> int:
        """D, the feature dimension."""
        return int(cast(int, self.backbone.num_features))

    def preprocess(self, images: Tensor) -> Tensor:
        """Raw images → the normalised ``N×in_channels×size×size`` float batch the backbone takes."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(
                f"Encoder: expected N×C×H×W or C×H×W images, got shape {tuple(images.shape)}"
            )
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        x = match_channels(x, self.in_channels)
        n, _, h, w = x.shape
        if (h, w) != (self.size, self.size):
            side = min(h, w)
            box = torch.tensor(
                [(h - side) // 2, (w - side) // 2, side, side], dtype=x.dtype, device=x.device
            ).expand(n, 4)
            x = ops.resized_crop(x, box, self.size)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return cast(Tensor, self.backbone(self.preprocess(images)))


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> Encoder:
    """The :class:`Encoder` of a run directory, checkpoint or ``.safetensors`` export, in eval
    mode; its ``info`` attribute holds the run's info (config, step, dataset …).

    Examples:
        The encoder of a small run kept with the tests (MoCo v2, a width-4 ResNet-18 on
        16 px synthetic images): features of images of any size and channel count.

        >>> from pathlib import Path
        >>> run = Path(__file__).parents[1] / "tests" / "data" / "old_run"
        >>> encoder = load_encoder(run)
        >>> encoder.info["config"]["method"], encoder.size, encoder.num_features
        ('mocov2', 16, 32)
        >>> encoder(torch.randint(0, 256, (2, 1, 40, 30), dtype=torch.uint8)).shape
        torch.Size([2, 32])
    """
    backbone, info = load_backbone_and_info(path, map_location)
    encoder = Encoder(backbone, info["mean"], info["std"], info["crop_size"], info["in_channels"])
    encoder.info = info
    return encoder.to(map_location).eval()
