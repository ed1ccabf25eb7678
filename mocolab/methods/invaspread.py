"""Invariant and spreading instance features: end-to-end instance discrimination in the batch.

Ye, Zhang, Yuen & Chang, "Unsupervised Embedding Learning via Invariant and Spreading Instance
Feature", CVPR 2019. Two augmented views of each image go through the same encoder (a
"siamese network", §3.2); the batch's features act as the instance classifier, so a view must
recognise the other view of its image (invariance) and not the other images' views
(spreading): :func:`mocolab.losses.invaspread_loss`. The negatives are the batch's other views
(MoCo §2: "end-to-end" dictionary), gathered from every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import projection_head
from ..losses import invaspread_loss
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class InvaSpread(Method):
    """Invariant and spreading instance features.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: embedding dimension (128, after a linear layer, L2-normalised).
        head_layers: 1 = the paper's linear layer.
        hidden_dim: hidden width if ``head_layers > 1``.
        temperature: τ (0.1).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        head_layers: int = 1,
        hidden_dim: int | None = None,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        head = projection_head(backbone.num_features, dim, hidden_dim, num_layers=head_layers)
        self.query_encoder = encoder(backbone, head)
        self.temperature = temperature

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x1, x2 = views
        z1 = F.normalize(self.query_encoder(x1), dim=1)  # f: N×C
        z2 = F.normalize(self.query_encoder(x2), dim=1)  # f̂: N×C
        candidates = distributed.concat_all_gather(z1), distributed.concat_all_gather(z2)
        loss = invaspread_loss(
            z1, z2, self.temperature, candidates, offset=distributed.rank() * z1.shape[0]
        )
        return LossOutput(loss)


@dataclass
class InvaSpreadOptions(r.MethodOptions):
    """InvaSpread's own options (τ = 0.1; Ye et al. 2019)."""

    temperature: float = r.temperature(0.1)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_temperature(self.temperature)


# InvaSpread: linear 128-d head, crop/jitter/grayscale/flip augmentation, step LR.
@r.register_method(
    "invaspread",
    options=InvaSpreadOptions,
    summary="InvaSpread (Ye et al. 2019)",
    defaults={"head_layers": 1, "dim": 128, "augment": "mocov1", "lr_schedule": "step"},
)
def _invaspread(
    backbone: nn.Module, cfg: PretrainConfig, o: InvaSpreadOptions, ctx: r.BuildContext
) -> InvaSpread:
    return InvaSpread(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        temperature=o.temperature,
    )
