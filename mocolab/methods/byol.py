"""BYOL: an online network predicts a slow-moving target network's projection of another view.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. No negatives: the online network (backbone, projector, predictor) regresses
the target's projection with the normalised MSE, symmetrised over the two views (§3.1, Eq. 2);
the target (backbone, projector) is an EMA of the online network whose momentum rises from
τ_base = 0.996 to 1 with a cosine schedule (§3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..heads import projection_head
from ..losses import byol_loss
from ..momentum import MomentumEncoder
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class BYOL(Method):
    """Bootstrap Your Own Latent.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: projection size (256 in the paper).
        head_layers: layers of the projector (2 in the paper).
        hidden_dim: hidden width of the projector (4096 in the paper; default: the backbone's).
        predictor_hidden_dim: hidden width of the predictor (default: ``hidden_dim``).
        momentum: τ_base of the target EMA (0.996).
        momentum_schedule: ``"cosine"`` (the paper: τ ramped to 1) or ``"constant"``.
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        head_layers: int = 2,
        hidden_dim: int | None = None,
        predictor_hidden_dim: int | None = None,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or backbone.num_features
        # MLPs of §3.3: linear → BN → ReLU → linear
        projector = projection_head(
            backbone.num_features, dim, hidden_dim, num_layers=head_layers, batch_norm=True
        )
        self.query_encoder = encoder(backbone, projector)  # online f_θ, g_θ
        self.predictor = projection_head(
            dim, dim, predictor_hidden_dim or hidden_dim, num_layers=2, batch_norm=True
        )  # q_θ
        # f_ξ, g_ξ; ξ = θ at start
        self.target_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.target_encoder

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        v1, v2 = views
        p1 = self.predictor(self.query_encoder(v1))  # q_θ(z_θ): N×dim
        p2 = self.predictor(self.query_encoder(v2))
        with torch.no_grad():
            z1, z2 = self.target_encoder(v1), self.target_encoder(v2)  # z′_ξ: N×dim
        # L + L̃: each view's prediction regresses the target's projection of the other view
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return LossOutput(loss)

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """``ξ ← τ·ξ + (1 − τ)·θ`` with τ from the schedule."""
        return {"momentum": self.target_encoder.step(self.query_encoder, step, total_steps)}


@dataclass
class BYOLOptions(r.MethodOptions):
    """BYOL's own options (τ_base = 0.996 ramped to 1 by a cosine; Grill et al. 2020, §3.2)."""

    key_momentum: float = r.key_momentum(0.996)
    momentum_schedule: str = r.momentum_schedule("cosine")
    predictor_hidden_dim: int | None = r.predictor_hidden_dim(None)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_momentum(self.key_momentum, self.momentum_schedule)
        r.check_positive("predictor_hidden_dim", self.predictor_hidden_dim)


# BYOL: 2-layer projector and predictor with BN, 256-d, the asymmetric pair of views, cosine LR.
@r.register_method(
    "byol",
    options=BYOLOptions,
    summary="BYOL (Grill et al. 2020)",
    defaults={
        "head_layers": 2,
        "dim": 256,
        "augment": "byol-view1,byol-view2",
        "lr_schedule": "cosine",
    },
)
def _byol(backbone: nn.Module, cfg: PretrainConfig, o: BYOLOptions, ctx: r.BuildContext) -> BYOL:
    return BYOL(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        predictor_hidden_dim=o.predictor_hidden_dim,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
    )
