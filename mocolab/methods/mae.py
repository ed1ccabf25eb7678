"""MAE: masked autoencoders.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (§3, App. A.1).
A ViT encoder sees only a random 25 % of each image's patches (no mask tokens); a light decoder
ViT (8 blocks, 512 wide, 16 heads) takes the encoded visible patches plus a shared, learned
mask token at every removed position, each with its sin-cos position embedding, and predicts
the removed patches' pixels. The loss is their mean squared error, on the removed patches only,
against per-patch normalised pixels (``--norm_pix_loss``, the recipe's choice for
representations). Views: a random resized crop (20–100 %) and a flip, no colour augmentation.

Follows facebookresearch/mae at efb2a80 (``models_mae.py``, ``main_pretrain.py``,
``PRETRAIN.md``). Where mocolab differs: the encoder is mocolab's ViT with its [CLS] token
(as MAE's), initialised as MAE's (Xavier-uniform on every linear layer, [CLS] and mask token
N(0, 0.02²)); the decoder holds the visible tokens first and the mask tokens after them instead
of restoring the grid order (attention is blind to the order; the position embedding carries
it), and it predicts only the removed patches (MAE predicts every patch and masks the loss:
the same loss); the fixed 2-D sin-cos embedding has MoCo v3's axis order (rows and columns
swapped against MAE's ``util/pos_embed.py``, a relabelling that changes nothing learned);
views are resized bilinearly (MAE: bicubic). The backbone that evaluation and export use is
the encoder; MAE's own fine-tuning averages the patch tokens (``--vit-pool avg``), its linear
probe reads the [CLS] token (the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..losses import mae_loss
from ..masking import random_masking
from ..option import opt
from ..vit import PatchPredictor, gather_tokens, init_xavier_, patchify
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class MAE(Method):
    """Masked autoencoder.

    Args:
        backbone: a :class:`mocolab.vit.VisionTransformer` (the encoder).
        mask_ratio: the fraction of patches removed (0.75).
        decoder_dim, decoder_depth, decoder_heads: the decoder ViT (512, 8, 16 in every MAE
            model).
        norm_pix_loss: targets normalised per patch (the recipe's ``--norm_pix_loss``).

    ``decoder`` is a :class:`~mocolab.vit.PatchPredictor` from the encoder's width to the
    ``p²·C`` pixels of a patch. One view per image.
    """

    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        vit: Any = backbone
        init_xavier_(vit)  # models_mae.py initialize_weights
        nn.init.normal_(vit.cls_token, std=0.02)
        self.query_encoder = encoder(backbone, nn.Identity())
        p, channels = vit.patch_size, vit.patch_embed.proj.in_channels
        self.decoder = PatchPredictor(
            vit.patch_embed.grid,
            vit.num_features,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            p * p * channels,
        )
        init_xavier_(self.decoder)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        vit: Any = self.backbone
        m = random_masking(
            x.shape[0],
            vit.num_patches,
            self.mask_ratio,
            generator=generator,
            device=x.device if generator is None else None,
        )  # keep: N×K visible, masked: N×M removed
        latent = vit.forward_features(x, keep=m.keep)  # [CLS; visible]: N×(1+K)×D
        prediction = self.decoder(latent, m.keep, m.masked)  # N×M×p²C
        target = gather_tokens(patchify(x, vit.patch_size), m.masked)  # N×M×p²C
        loss = mae_loss(prediction, target, self.norm_pix_loss)
        return LossOutput(loss)


@dataclass
class MAEOptions(r.MethodOptions):
    """MAE's own options (He et al. 2022: 75 % of the patches masked, decoder 8 × 512,
    normalised-pixel targets)."""

    mask_ratio: float = opt(0.75, "MAE: fraction of each image's patches removed (0.75)")
    decoder_dim: int = opt(512, "MAE: width of the decoder ViT (512)")
    decoder_depth: int = opt(8, "MAE: blocks of the decoder ViT (8)")
    decoder_heads: int = opt(16, "MAE: attention heads of the decoder ViT (16)")
    norm_pix_loss: bool = opt(
        True, "MAE: per-patch normalised pixels as targets (the official --norm_pix_loss)"
    )

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_vit(cfg, "mae")
        r.check(
            0 < self.mask_ratio < 1,
            f"--mask-ratio is the fraction of patches removed, in (0, 1) (0.75), got "
            f"{self.mask_ratio}",
        )
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            r.check_positive(name, getattr(self, name))
        r.check(
            self.decoder_dim % self.decoder_heads == 0 and self.decoder_dim % 4 == 0,
            f"--decoder-dim {self.decoder_dim} must be a multiple of 4 (its sin-cos position "
            f"embedding) and of --decoder-heads {self.decoder_heads}",
        )


# MAE: one crop-and-flip view, the encoder on the visible patches, a decoder ViT, cosine LR.
@r.register_method(
    "mae",
    options=MAEOptions,
    summary="MAE (He et al. 2022)",
    defaults={"head_layers": 1, "dim": 128, "augment": "crop-flip", "lr_schedule": "cosine"},
)
def _mae(backbone: nn.Module, cfg: PretrainConfig, o: MAEOptions, ctx: r.BuildContext) -> MAE:
    return MAE(
        backbone,
        mask_ratio=o.mask_ratio,
        decoder_dim=o.decoder_dim,
        decoder_depth=o.decoder_depth,
        decoder_heads=o.decoder_heads,
        norm_pix_loss=o.norm_pix_loss,
    )
