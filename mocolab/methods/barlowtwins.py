"""Barlow Twins: redundancy reduction between the two views' projections, no negatives.

Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021. In the dictionary look-up picture there is no dictionary: instead of
telling a key from negatives, the two views' batch-standardised projections are made to agree
feature by feature (the diagonal of their cross-correlation → 1) while different features are
decorrelated (the off-diagonal → 0), which rules out the collapsed solutions that negatives
otherwise prevent (§2, Eq. 1–2).

Follows the official code, facebookresearch/barlowtwins ``main.py`` (commit 8e8d284): the
projector ``Linear → BN → ReLU`` twice then ``Linear`` (no biases; 8192-8192-8192 on ImageNet),
the projections standardised by a BN without affine parameters (its ``self.bn``; here the
projector's last layer), ``C = bn(z1)ᵀ bn(z2) / N`` summed over processes, λ = 0.0051, and
BYOL's asymmetric pair of views (its ``Transform``: blur 1.0 / 0.1, solarize 0 / 0.2). LARS
with biases and BN parameters excluded from weight decay and adaptation is mocolab's
:class:`~mocolab.optim.LARS`; their separate learning rate (``--learning-rate-biases``) is
``--lr-biases``. Where mocolab differs: the cross-correlation is summed over processes with its
gradient (:func:`~mocolab.distributed.all_reduce_with_grad`; the official in-place
``all_reduce`` leaves each rank ``1/W`` of it), the cosine schedule ends at 0 rather than
0.001 × the peak, and the ResNet's last BN in each block is not zero-initialised
(``zero_init_residual``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import distributed
from ..heads import projection_head
from ..losses import barlow_twins_loss
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class BarlowTwins(Method):
    """Barlow Twins.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: projector output (8192 in the paper).
        head_layers: projector layers (3).
        hidden_dim: projector hidden width (8192; default: the backbone's width).
        off_diagonal_weight: λ of the redundancy-reduction term (0.0051).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 8192,
        head_layers: int = 3,
        hidden_dim: int | None = None,
        off_diagonal_weight: float = 0.0051,
    ) -> None:
        super().__init__()
        # Linear (no bias) → BN → ReLU, ..., Linear (no bias), then the official self.bn: a BN
        # without affine parameters that standardises each feature over the batch
        projector = projection_head(
            backbone.num_features,
            dim,
            hidden_dim,
            num_layers=head_layers,
            batch_norm=True,
            last_batch_norm=True,
        )
        self.query_encoder = encoder(backbone, projector)
        self.off_diagonal_weight = off_diagonal_weight

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        y1, y2 = views
        z1 = self.query_encoder(y1).float()  # bn(z1): N×D, each feature standardised
        z2 = self.query_encoder(y2).float()
        batch = z1.shape[0] * distributed.world_size()  # the global batch
        c = distributed.all_reduce_with_grad(z1.T @ z2 / batch)  # D×D cross-correlation
        loss, invariance, redundancy = barlow_twins_loss(c, self.off_diagonal_weight)
        return LossOutput(
            loss, {"invariance": invariance.detach(), "redundancy": redundancy.detach()}
        )


@dataclass
class BarlowTwinsOptions(r.MethodOptions):
    """Barlow Twins' own options (λ = 0.0051: the official ``main.py``'s ``--lambd``)."""

    off_diagonal_weight: float = opt(
        0.0051,
        "λ, the weight of the redundancy-reduction (off-diagonal) term (Barlow Twins: 0.0051)",
    )

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            self.off_diagonal_weight >= 0,
            "--off-diagonal-weight must be >= 0 (0.0051 in Barlow Twins), got "
            f"{self.off_diagonal_weight}",
        )


# Barlow Twins: 3-layer projector with BN to 8192-d, BYOL's asymmetric views, cosine LR.
@r.register_method(
    "barlowtwins",
    options=BarlowTwinsOptions,
    summary="Barlow Twins (Zbontar et al. 2021)",
    defaults={
        "head_layers": 3,
        "dim": 8192,
        "augment": "byol-view1,byol-view2",
        "lr_schedule": "cosine",
    },
)
def _barlowtwins(
    backbone: nn.Module, cfg: PretrainConfig, o: BarlowTwinsOptions, ctx: r.BuildContext
) -> BarlowTwins:
    return BarlowTwins(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        off_diagonal_weight=o.off_diagonal_weight,
    )
