"""Denoising autoencoder: reconstruct the clean image from a corrupted one.

Vincent, Larochelle, Bengio & Manzagol, "Extracting and Composing Robust Features with
Denoising Autoencoders", ICML 2008 (§2.3: the corruption q_D; §2.2: the reconstruction loss),
the "recovering the input under corruption" family of self-supervised pretext tasks.

The view x (crop + flip) is corrupted into x̃ by a draw from the run's generator (a fixed
stream, :func:`~mocolab.methods.base.fallback_generator`, where a call passes none):

- ``--corruption masking`` (the paper's "masking noise", §2.3): a fixed number ν·d of the
  d = C·H·W input components of each image, chosen uniformly, are set to 0 — per pixel *and*
  channel, as the paper's components; 0 is the pixel value 0 (black), i.e. ``−mean/std`` in the
  normalised input;
- ``--corruption gaussian`` (additive isotropic Gaussian noise, the paper's §2.3 alternative
  and the later Vincent et al. 2010): x̃ = x + σ·ε in pixel units (0–1), ε ~ N(0, 1);

with ν or σ = ``--corruption-level``. The encoder is the backbone up to the stage named by
``--decoder-stage`` (its feature map, :func:`mocolab.backbones.stage_maps`); a small decoder
(:class:`mocolab.heads.ConvDecoder`: ×2 upsampling + 3×3 conv blocks back to the input size)
gives x̂, and the loss is the squared error against the **clean** normalised view, averaged over
pixels and channels (the paper's L2 reconstruction loss for real-valued inputs, as a mean
rather than a sum). Simplifications: the paper's one-hidden-layer sigmoid autoencoders with
tied weights, stacked layer by layer, become a mocolab ResNet with a convolutional decoder
trained end to end; no official code is published with the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import STAGES, check_resnet, stage_channels, stage_maps, stage_stride
from ..heads import ConvDecoder
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder, fallback_generator

if TYPE_CHECKING:
    from ..config import PretrainConfig

CORRUPTIONS = ("masking", "gaussian")


def decoder_stage(default: str) -> Any:
    """``--decoder-stage``, shared by the methods that decode a ResNet stage's feature map."""
    return opt(
        default, "ResNet stage whose feature map the decoder reads: layer1..layer4", choices=STAGES
    )


def check_decoder_stage(stage: str) -> None:
    r.check(
        stage in STAGES,
        f"--decoder-stage must be one of {', '.join(STAGES)}, got {stage!r}",
    )


def corrupt(
    x: Tensor,
    kind: str,
    level: float,
    generator: torch.Generator | None,
    mean: Tensor,
    std: Tensor,
) -> Tensor:
    """x̃ ~ q_D(x̃ | x) for a normalised batch ``x`` (``N×C×H×W``; ``mean``, ``std``: the
    normalisation, broadcastable ``1×C×1×1``), drawn from ``generator`` — the run's; without
    one, from a fixed stream (:func:`~mocolab.methods.base.fallback_generator`, seed 0), never
    from torch's global RNG.

    - ``masking``: exactly ``round(level·C·H·W)`` components of each image, uniform without
      replacement, set to the pixel value 0 (``−mean/std``);
    - ``gaussian``: ``x + level·ε/std`` (σ = ``level`` in pixel units), ε ~ N(0, 1).
    """
    n = x.shape[0]
    if generator is None:
        generator = fallback_generator(x.device)
    if kind == "masking":
        d = x[0].numel()
        k = round(level * d)
        scores = torch.rand(n, d, generator=generator, device=x.device)
        mask = torch.zeros(n, d, dtype=torch.bool, device=x.device)
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)  # k components per image
        black = (-mean / std).to(x.dtype).expand_as(x)
        return torch.where(mask.view_as(x), black, x)
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + level * noise / std.to(x.dtype)
    raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")


class DenoisingAutoencoder(Method):
    """Denoising autoencoder on a ResNet's feature map.

    Args:
        backbone: a mocolab ResNet (``N×C×H×W → N×D``; its stage maps are decoded).
        in_channels: C, the channels reconstructed.
        corruption: ``masking`` or ``gaussian``.
        corruption_level: ν (the masked fraction) or σ (pixel units).
        stage: the stage whose map the decoder reads (``layer4``: every stage learns).
        mean, std: the inputs' normalisation (pixel units), for the corruption's 0 and σ.
    """

    num_views = 1
    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        in_channels: int,
        corruption: str = "masking",
        corruption_level: float = 0.25,
        stage: str = "layer4",
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__()
        check_resnet(backbone, "denoising")
        if corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}")
        self.query_encoder = encoder(backbone, nn.Identity())
        upsamples = stage_stride(backbone, stage).bit_length() - 1  # log2 of the stride
        self.decoder = ConvDecoder(stage_channels(backbone, stage), in_channels, upsamples)
        self.corruption = corruption
        self.corruption_level = corruption_level
        self.stage = stage
        shape = (1, -1, 1, 1)
        self.register_buffer("input_mean", torch.tensor([float(v) for v in mean]).view(shape))
        self.register_buffer("input_std", torch.tensor([float(v) for v in std]).view(shape))

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        noisy = corrupt(
            x, self.corruption, self.corruption_level, generator, self.input_mean, self.input_std
        )
        h = stage_maps(self.backbone, noisy, [self.stage])[self.stage]  # N×C_s×h×w
        recon = self.decoder(h, x.shape[-2:])  # x̂: N×C×H×W
        loss = F.mse_loss(recon.float(), x.float())  # against the clean view
        return LossOutput(loss, {"input_mse": F.mse_loss(noisy.detach().float(), x.float())})


@dataclass
class DenoisingOptions(r.MethodOptions):
    """The denoising autoencoder's own options (Vincent et al. 2008: masking noise, ν = 25%,
    one of the levels of its Table 1)."""

    corruption: str = opt(
        "masking",
        "masking (components set to 0) | gaussian (additive noise)",
        choices=CORRUPTIONS,
    )
    corruption_level: float = opt(
        0.25, "masking: the fraction ν of components zeroed; gaussian: σ in pixel units (0-1)"
    )
    decoder_stage: str = decoder_stage("layer4")

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            self.corruption in CORRUPTIONS,
            f"--corruption must be masking or gaussian, got {self.corruption!r}",
        )
        r.check(
            self.corruption_level > 0
            and (self.corruption != "masking" or self.corruption_level < 1),
            "--corruption-level must be > 0 (and < 1 for masking: a fraction), "
            f"got {self.corruption_level}",
        )
        check_decoder_stage(self.decoder_stage)


# Denoising autoencoder: the ResNet's last map decoded back to the image, crop + flip views.
@r.register_method(
    "denoising",
    options=DenoisingOptions,
    summary="denoising autoencoder (Vincent et al. 2008)",
    defaults={"head_layers": 1, "dim": 128, "augment": "crop-flip", "lr_schedule": "cosine"},
)
def _denoising(
    backbone: nn.Module, cfg: PretrainConfig, o: DenoisingOptions, ctx: r.BuildContext
) -> DenoisingAutoencoder:
    return DenoisingAutoencoder(
        backbone,
        in_channels=backbone.conv1.in_channels,
        corruption=o.corruption,
        corruption_level=o.corruption_level,
        stage=o.decoder_stage,
        mean=ctx.mean,
        std=ctx.std,
    )
