"""VICReg: variance, invariance and covariance regularisation of the two views' embeddings.

Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022. Like Barlow Twins there is no dictionary of negatives:
the two views' embeddings are pulled together (invariance), each embedding dimension is kept
from collapsing by a hinge on its standard deviation over the batch (variance), and the
dimensions are decorrelated by penalising the off-diagonal of each view's covariance
(covariance) — each view regularised on its own, so the branches need not share weights (§2–3).

Follows the official code, facebookresearch/vicreg ``main_vicreg.py`` (commit 4e12602): the
expander ``Linear → BN → ReLU`` twice then ``Linear`` without bias (8192-8192-8192 on
ImageNet), λ = μ = 25 and ν = 1 (``--sim-coeff``, ``--std-coeff``, ``--cov-coeff``), the
variance and covariance over the embeddings gathered from every process with their gradient
(its ``FullGatherLayer``: :func:`~mocolab.distributed.all_gather_with_grad`), the invariance on
each process's pairs, and the two views of ``augmentations.py`` (BYOL's asymmetric pair: blur
1.0 / 0.1, solarize 0 / 0.2); the loss as the code computes it, where it differs from the
paper's Eq. 5–6 (:func:`~mocolab.losses.vicreg_loss`). LARS, with biases and BN parameters
excluded from weight decay and adaptation, is mocolab's :class:`~mocolab.optim.LARS`. Where
mocolab differs: the cosine schedule ends at 0 rather than 0.001 × the peak, and the ResNet's
last BN in each block is not zero-initialised (``zero_init_residual``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import distributed
from ..heads import projection_head
from ..losses import vicreg_loss
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class VICReg(Method):
    """Variance-Invariance-Covariance Regularization.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: expander output d (8192 in the paper).
        head_layers: expander layers (3).
        hidden_dim: expander hidden width (8192; default: the backbone's width).
        invariance_weight, variance_weight, covariance_weight: λ, μ, ν (25, 25, 1).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 8192,
        head_layers: int = 3,
        hidden_dim: int | None = None,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
    ) -> None:
        super().__init__()
        # the official Projector: Linear → BN → ReLU, ..., Linear without bias (a hidden
        # Linear's bias, which the following BN removes, is left out)
        expander = projection_head(
            backbone.num_features,
            dim,
            hidden_dim,
            num_layers=head_layers,
            batch_norm=True,
            last_bias=False,
        )
        self.query_encoder = encoder(backbone, expander)
        self.weights = (invariance_weight, variance_weight, covariance_weight)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x, y = views
        z1, z2 = self.query_encoder(x), self.query_encoder(y)  # N×d embeddings
        # variance and covariance over the global batch, with gradient back to every rank
        gathered = (distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2))
        loss, invariance, variance, covariance = vicreg_loss(
            z1, z2, *self.weights, candidates=gathered
        )
        return LossOutput(
            loss,
            {
                "invariance": invariance.detach(),
                "variance": variance.detach(),
                "covariance": covariance.detach(),
            },
        )


@dataclass
class VICRegOptions(r.MethodOptions):
    """VICReg's own options (λ = μ = 25, ν = 1: the official ``main_vicreg.py``'s defaults)."""

    invariance_weight: float = opt(
        25.0, "λ, the weight of VICReg's invariance (mean squared distance) term (--sim-coeff 25)"
    )
    variance_weight: float = opt(
        25.0, "μ, the weight of VICReg's variance (std hinge) term (--std-coeff 25)"
    )
    covariance_weight: float = opt(
        1.0, "ν, the weight of VICReg's covariance (off-diagonal) term (--cov-coeff 1)"
    )

    def validate(self, cfg: PretrainConfig) -> None:
        for name in ("invariance_weight", "variance_weight", "covariance_weight"):
            value = getattr(self, name)
            r.check(
                value >= 0,
                f"--{name.replace('_', '-')} must be >= 0 (VICReg: 25, 25, 1), got {value}",
            )


# VICReg: 3-layer expander with BN to 8192-d, BYOL's asymmetric views, cosine LR.
@r.register_method(
    "vicreg",
    options=VICRegOptions,
    summary="VICReg (Bardes, Ponce & LeCun 2022)",
    defaults={
        "head_layers": 3,
        "dim": 8192,
        "augment": "byol-view1,byol-view2",
        "lr_schedule": "cosine",
    },
)
def _vicreg(
    backbone: nn.Module, cfg: PretrainConfig, o: VICRegOptions, ctx: r.BuildContext
) -> VICReg:
    return VICReg(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        invariance_weight=o.invariance_weight,
        variance_weight=o.variance_weight,
        covariance_weight=o.covariance_weight,
    )
