"""SimSiam: two views through one encoder, a predictor, and a stop-gradient; no negatives, no
momentum encoder.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021. Loss
``L = ½·D(p1, stopgrad(z2)) + ½·D(p2, stopgrad(z1))`` with ``D`` the negative cosine (Eq. 3,
Algorithm 1). Projector: 3 layers with BN on every layer, the output BN without affine (§4.1);
predictor: a 2-layer bottleneck MLP (hidden 512 for a 2048-d output) without BN on its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..heads import projection_head
from ..losses import simsiam_loss
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class SimSiam(Method):
    """Simple Siamese networks.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: projection and prediction size (2048 in the paper).
        head_layers: layers of the projector (3 in the paper).
        hidden_dim: hidden width of the projector (default: the backbone's width, 2048).
        predictor_hidden_dim: the predictor's bottleneck (default ``dim // 4``: 512).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 2048,
        head_layers: int = 3,
        hidden_dim: int | None = None,
        predictor_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        projector = projection_head(
            backbone.num_features,
            dim,
            hidden_dim,
            num_layers=head_layers,
            batch_norm=True,
            last_batch_norm=True,
        )
        self.query_encoder = encoder(backbone, projector)  # f: backbone + projection MLP
        self.predictor = projection_head(
            dim, dim, predictor_hidden_dim or max(dim // 4, 1), num_layers=2, batch_norm=True
        )  # h

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x1, x2 = views
        z1, z2 = self.query_encoder(x1), self.query_encoder(x2)  # N×dim
        p1, p2 = self.predictor(z1), self.predictor(z2)  # N×dim
        # simsiam_loss stops the gradient of its target argument
        loss = 0.5 * simsiam_loss(p1, z2) + 0.5 * simsiam_loss(p2, z1)
        # std of the normalised output (§4.1: ≈ 1/√dim when not collapsed, 0 when collapsed)
        std = torch.nn.functional.normalize(z1.detach().float(), dim=1).std(dim=0).mean()
        return LossOutput(loss, {"z_std": std})


@dataclass
class SimSiamOptions(r.MethodOptions):
    """SimSiam's own options (the predictor's bottleneck: dim/4, 512 for 2048; Chen & He 2021)."""

    predictor_hidden_dim: int | None = r.predictor_hidden_dim(None)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_positive("predictor_hidden_dim", self.predictor_hidden_dim)


# SimSiam: 3-layer projector with BN, 2048-d, bottleneck predictor, MoCo v2 augmentation.
@r.register_method(
    "simsiam",
    options=SimSiamOptions,
    summary="SimSiam (Chen & He 2021)",
    defaults={"head_layers": 3, "dim": 2048, "augment": "mocov2", "lr_schedule": "cosine"},
)
def _simsiam(
    backbone: nn.Module, cfg: PretrainConfig, o: SimSiamOptions, ctx: r.BuildContext
) -> SimSiam:
    return SimSiam(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        predictor_hidden_dim=o.predictor_hidden_dim,
    )
