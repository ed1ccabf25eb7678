"""CMC: contrastive multiview coding with the L and ab channels of Lab as the two views.

Tian, Krishnan & Isola, "Contrastive Multiview Coding", ECCV 2020 (arXiv 2019), and the
official code (``train_CMC.py``, ``NCEAverage.py``). An image (cropped and flipped, no colour
jitter) is converted to Lab; the L channel goes to an encoder ``f_L`` and the ab channels to
a second, separate encoder ``f_ab`` (two half-width ResNets in the paper). Each view keeps a
memory bank of one L2-normalised feature per image, updated as InstDisc's
(``v ← normalize(m·v + (1 − m)·f)``, m = 0.5). ``f_L(x_i)`` is contrasted against the **ab**
bank (positive: entry i, negatives: K entries drawn uniformly) and ``f_ab(x_i)`` against the
**L** bank (§3.2, Eq. 3–4), by NCE with a normaliser Z per view fixed on the first batch, or
by the softmax InfoNCE (the later code's default: τ 0.07, K 16384); the loss is their sum.

The K noise entries are drawn once per batch and shared by both views and all queries (the
official code draws them per query, the same indices for both banks). The evaluated backbone
(:class:`LabSplitBackbone`) takes the normalised RGB batch every mocolab backbone takes,
converts it to Lab and returns ``[f_L(L), f_ab(ab)]``: the paper's linear protocol on the
concatenation of both views' features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import resnet
from ..dictionaries import MemoryBank
from ..distributed import concat_all_gather
from ..heads import projection_head
from ..losses import contrastive_accuracy
from . import registry as r
from .base import LossOutput, Method, encoder
from .instdisc import check_memory_bank_options, memory_bank_loss
from .lab import LabBackbone, require_colour

if TYPE_CHECKING:
    from ..config import PretrainConfig


class LabSplitBackbone(LabBackbone):
    """``[f_L(L), f_ab(ab)]`` of an RGB batch: the two CMC encoders as one backbone.

    Input: the normalised RGB batch ``(x − mean)/std`` of every mocolab backbone (training
    views, evaluation, :class:`mocolab.encoder.Encoder`), turned into normalised Lab by
    :class:`~mocolab.methods.lab.LabBackbone`.

    Args:
        l_encoder: ``N×1×H×W → N×D_L`` (attribute ``num_features``).
        ab_encoder: ``N×2×H×W → N×D_ab``.
        mean, std: the RGB normalisation of the inputs (0–1 units; default none).
    """

    what = "two ResNets (on the L and ab channels of Lab)"

    def __init__(
        self,
        l_encoder: nn.Module,
        ab_encoder: nn.Module,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__(mean, std)
        self.l_encoder = l_encoder
        self.ab_encoder = ab_encoder
        self.split_at = int(l_encoder.num_features)
        self.num_features = self.split_at + int(ab_encoder.num_features)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two views of a normalised RGB batch: L (``N×1×H×W``) and ab (``N×2×H×W``),
        normalised as the official code does."""
        lab = self.lab(x)
        return lab[:, :1], lab[:, 1:]

    def forward(self, x: Tensor) -> Tensor:
        l, ab = self.split(x)
        return torch.cat([self.l_encoder(l), self.ab_encoder(ab)], dim=1)  # N×(D_L + D_ab)


def lab_split_backbone(
    arch: str,
    stem: str,
    width: int,
    bn_splits: int = 1,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> LabSplitBackbone:
    """Two mocolab ResNets ``arch`` (1 and 2 input channels, each of ``width``: the paper's
    halves are width 32 for a ResNet-50) as one :class:`LabSplitBackbone`."""
    return LabSplitBackbone(
        resnet(arch, in_channels=1, stem=stem, bn_splits=bn_splits, width=width),
        resnet(arch, in_channels=2, stem=stem, bn_splits=bn_splits, width=width),
        mean,
        std,
    )


class SplitHeads(nn.Module):
    """One projection head per view on the concatenated backbone features:
    ``[h_L, h_ab] → [g_L(h_L), g_ab(h_ab)]`` (``N×2C``, not yet normalised)."""

    def __init__(
        self, split_at: int, in_dim: int, dim: int, hidden_dim: int | None, num_layers: int
    ) -> None:
        super().__init__()
        self.split_at = split_at
        self.l_head = projection_head(split_at, dim, hidden_dim, num_layers=num_layers)
        self.ab_head = projection_head(in_dim - split_at, dim, hidden_dim, num_layers=num_layers)

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat(
            [self.l_head(h[:, : self.split_at]), self.ab_head(h[:, self.split_at :])], dim=1
        )


class CMC(Method):
    """Contrastive multiview coding, L ↔ ab.

    Args:
        backbone: a :class:`LabSplitBackbone`.
        num_images: n, the training set size (one row per image in each bank).
        dim: feature dimension of each view (128).
        head_layers: 1 = the paper's linear 128-d layer per view.
        hidden_dim: hidden width if ``head_layers > 1``.
        nce_k: K, bank entries drawn as negatives per batch (16384).
        bank_momentum: m of the bank update (0.5).
        temperature: τ (0.07).
        loss: ``"softmax"`` (InfoNCE, the later code's default) or ``"nce"`` (the paper's).
    """

    num_views = 1  # one RGB view per image; CMC's two views are its L and ab channels
    normalizer_l: Tensor
    normalizer_ab: Tensor

    def __init__(
        self,
        backbone: LabSplitBackbone,
        *,
        num_images: int,
        dim: int = 128,
        head_layers: int = 1,
        hidden_dim: int | None = None,
        nce_k: int = 16384,
        bank_momentum: float = 0.5,
        temperature: float = 0.07,
        loss: str = "softmax",
    ) -> None:
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise ValueError(f"CMC loss must be nce or softmax, got {loss!r}")
        head = SplitHeads(backbone.split_at, backbone.num_features, dim, hidden_dim, head_layers)
        self.query_encoder = encoder(backbone, head)
        self.bank_l = MemoryBank(num_images, dim, momentum=bank_momentum)  # f_L of every image
        self.bank_ab = MemoryBank(num_images, dim, momentum=bank_momentum)  # f_ab of every image
        self.register_buffer("normalizer_l", torch.tensor(-1.0))  # Z of f_L's scores (first batch)
        self.register_buffer("normalizer_ab", torch.tensor(-1.0))
        self.dim = dim
        self.nce_k = nce_k
        self.temperature = temperature
        self.loss = loss

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        if index is None:
            raise ValueError(
                "CMC needs the batch's image indices: call model(views, generator, index=...)"
            )
        (x,) = views
        index = index.to(self.bank_l.bank.device)
        z = self.query_encoder(x)  # N×2C
        z_l = F.normalize(z[:, : self.dim], dim=1)  # f_L(x): N×C
        z_ab = F.normalize(z[:, self.dim :], dim=1)  # f_ab(x): N×C
        noise = self.bank_l.sample(self.nce_k, generator)  # K indices, shared by both banks
        args = (self.temperature, self.loss)
        loss_l, scores_l, norm_l = memory_bank_loss(
            z_l, self.bank_ab, index, noise, *args, self.scalar("normalizer_l")
        )
        loss_ab, scores_ab, norm_ab = memory_bank_loss(
            z_ab, self.bank_l, index, noise, *args, self.scalar("normalizer_ab")
        )
        self.set_scalar("normalizer_l", norm_l)  # NCE's Z: set from the first batch, then fixed
        self.set_scalar("normalizer_ab", norm_ab)
        return LossOutput(
            loss_l + loss_ab,
            {
                "loss_l": loss_l.detach(),
                "loss_ab": loss_ab.detach(),
                "acc_l": contrastive_accuracy(scores_l.detach()),
                "acc_ab": contrastive_accuracy(scores_ab.detach()),
            },
            # the banks move after the step
            carry={"z_l": z_l.detach(), "z_ab": z_ab.detach(), "index": index},
        )

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Move each bank's rows of this step's images (from every rank) towards their features."""
        z_l, z_ab, index = (concat_all_gather(out.carry[k]) for k in ("z_l", "z_ab", "index"))
        self.bank_l.push(z_l, index)
        self.bank_ab.push(z_ab, index)
        return {}


@dataclass
class CMCOptions(r.MethodOptions):
    """CMC's own options (L ↔ ab; Tian et al. 2020: τ = 0.07, K = 16384, momentum 0.5, softmax
    InfoNCE, the official code's later default)."""

    temperature: float = r.temperature(0.07)
    nce_k: int = r.nce_k(16384)
    bank_momentum: float = r.bank_momentum(0.5)
    loss: str = r.bank_loss("softmax")

    def validate(self, cfg: PretrainConfig) -> None:
        check_memory_bank_options(self)
        r.check(
            cfg.init is None,
            "--init loads one ResNet, but cmc's backbone is two (the L and ab "
            "encoders); pretrain cmc without --init",
        )


def _cmc_backbone(
    config: Mapping[str, Any], in_channels: int, stem: str, width: int, bn_splits: int
) -> LabSplitBackbone:
    require_colour(in_channels, config.get("data", ""), "cmc", "Lab split")
    return lab_split_backbone(config["arch"], stem, width, bn_splits)


# CMC (L ↔ ab): a linear 128-d head per view, crop + flip only, step LR.
@r.register_method(
    "cmc",
    options=CMCOptions,
    summary="CMC, L and ab views (Tian et al. 2020)",
    defaults={"head_layers": 1, "dim": 128, "augment": "cmc", "lr_schedule": "step"},
    backbone=_cmc_backbone,
)
def _cmc(backbone: nn.Module, cfg: PretrainConfig, o: CMCOptions, ctx: r.BuildContext) -> CMC:
    if ctx.num_images is None:
        raise ValueError("cmc needs num_images (the training set size) for its memory banks")
    assert isinstance(backbone, LabSplitBackbone)
    backbone.normalize_inputs(ctx.mean, ctx.std)
    return CMC(
        backbone,
        num_images=ctx.num_images,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        nce_k=o.nce_k,
        bank_momentum=o.bank_momentum,
        temperature=o.temperature,
        loss=o.loss,
    )
