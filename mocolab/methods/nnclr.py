"""NNCLR: contrastive learning with nearest neighbours from a support set as positives.

Dwibedi, Aytar, Tompson, Sermanet & Zisserman, "With a Little Help from My Friends:
Nearest-Neighbor Contrastive Learning of Visual Representations", ICCV 2021. In the dictionary
look-up picture NNCLR keeps MoCo's queue but uses it the other way round: the queue (the
*support set*) holds the projections of earlier batches, and instead of serving as negatives
its entry nearest to a view's projection becomes that view's *positive* — a different image
that the network already finds similar — contrasted, as in SimCLR, against the other view's
predictions of the batch (§3, Eq. 2).

There is no official code; this follows the paper's Algorithm 1 (its PyTorch-like
pseudo-code): ``z = f(x)`` (backbone + projection MLP), ``p = g(z)`` (prediction MLP),
``NN1 = NN(z1, Q)``, ``loss = L(NN1, p2)/2 + L(NN2, p1)/2``, then ``update_queue(Q, z1)``
after the step; the heads as §4's implementation details (projection MLP ``[2048, 2048, d]``
with BN after every layer, ReLU after all but the last; prediction MLP ``[4096, d]`` with BN
and ReLU after the hidden layer; d = 256). Cross-checked with solo-learn ``solo/methods/nnclr.py``
and ``solo/losses/nnclr.py`` (commit 9187ea3), which follow the same pseudo-code, and lightly's
``examples/pytorch/nnclr.py`` and ``NNMemoryBankModule`` (commit e8d317f). Where they differ:

- lightly scores the neighbours with ``NTXentLoss`` (SimCLR's 2N-way softmax, the other
  neighbours as negatives too, both directions); here and in solo-learn the softmax runs over
  the other view's predictions only, as ``L`` in Algorithm 1;
- both give the projector's last BN an affine scale and shift (``nn.BatchNorm1d``'s
  default; the paper does not say); here it has none, as mocolab's SimCLR and MoCo v3 heads;
- the predictions of every process are gathered with their gradient (solo-learn gathers them
  too), so several processes compute what one does on the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..dictionaries import Queue, nearest_neighbours
from ..heads import projection_head
from ..losses import classification_accuracy, nnclr_loss
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class NNCLR(Method):
    """Nearest-Neighbour Contrastive Learning of visual Representations.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: d, the embedding size (256).
        head_layers: projection MLP layers (3).
        hidden_dim: projection MLP hidden width (2048; default: the backbone's width).
        predictor_hidden_dim: prediction MLP hidden width (4096).
        queue_size: the support set's size (98,304 on ImageNet).
        temperature: τ (0.1).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        head_layers: int = 3,
        hidden_dim: int | None = None,
        predictor_hidden_dim: int = 4096,
        queue_size: int = 98304,
        temperature: float = 0.1,
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
        self.query_encoder = encoder(backbone, projector)  # f
        self.predictor = projection_head(
            dim, dim, predictor_hidden_dim, num_layers=2, batch_norm=True
        )  # g
        # Q: random unit vectors at first (their own generator: the global stream is left as it
        # was), replaced by projections as batches arrive
        self.support_set = Queue(queue_size, dim, generator=torch.Generator().manual_seed(0))
        self.temperature = temperature

    @property
    def dictionary(self) -> Queue:
        return self.support_set

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x1, x2 = views
        z1, z2 = self.query_encoder(x1), self.query_encoder(x2)  # projections: N×d
        p1, p2 = self.predictor(z1), self.predictor(z2)  # predictions: N×d
        support = self.support_set.keys()  # K×d, no gradient
        _, nn1 = nearest_neighbours(z1, support)  # NN(z1, Q): N×d
        _, nn2 = nearest_neighbours(z2, support)
        # the predictions of the global batch, with gradient back to the rank that made them
        offset = distributed.rank() * z1.shape[0]
        p1_all, p2_all = distributed.all_gather_with_grad(p1), distributed.all_gather_with_grad(p2)
        loss12, logits12 = nnclr_loss(nn1, p2, self.temperature, p2_all, offset)
        loss21, logits21 = nnclr_loss(nn2, p1, self.temperature, p1_all, offset)
        labels = torch.arange(z1.shape[0], device=z1.device) + offset
        acc = (
            classification_accuracy(logits12, labels) + classification_accuracy(logits21, labels)
        ) / 2
        keys, index = distributed.gather_keys(F.normalize(z1.detach().float(), dim=1), index)
        carry = {"keys": keys}  # update_queue(Q, z1) after the step
        if index is not None:
            carry["index"] = index
        return LossOutput(loss12 / 2 + loss21 / 2, {"acc": acc}, carry=carry)

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """``update_queue(Q, z1)``: the step's view-1 projections (every rank's) replace the
        oldest entries of the support set."""
        self.support_set.push(out.carry["keys"], out.carry.get("index"))
        return {}


@dataclass
class NNCLROptions(r.MethodOptions):
    """NNCLR's own options (support set 98,304, τ = 0.1, prediction MLP 4096 wide: §4)."""

    queue_size: int = r.queue_size(98304)
    temperature: float = r.temperature(0.1)
    predictor_hidden_dim: int | None = r.predictor_hidden_dim(4096)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            self.queue_size > 0,
            f"--queue-size must be a positive number of keys, got {self.queue_size}",
        )
        r.check_temperature(self.temperature)
        r.check_positive("predictor_hidden_dim", self.predictor_hidden_dim)


# NNCLR: 3-layer projector with BN to 256-d, BYOL's asymmetric views (§4), cosine LR.
@r.register_method(
    "nnclr",
    options=NNCLROptions,
    summary="NNCLR (Dwibedi et al. 2021)",
    defaults={
        "head_layers": 3,
        "dim": 256,
        "augment": "byol-view1,byol-view2",
        "lr_schedule": "cosine",
    },
)
def _nnclr(backbone: nn.Module, cfg: PretrainConfig, o: NNCLROptions, ctx: r.BuildContext) -> NNCLR:
    return NNCLR(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        predictor_hidden_dim=o.predictor_hidden_dim or 4096,
        queue_size=o.queue_size,
        temperature=o.temperature,
    )
