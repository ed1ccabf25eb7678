"""RotNet: learn features by predicting by how much an image was rotated.

Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018 (§2.2: the four rotations 0°, 90°, 180°, 270°, a 4-way classifier, the
cross-entropy of Eq. 1–3), and the official code (``gidariss/FeatureLearningRotNet``,
``dataloader.py`` and ``config/ImageNet_RotNet_AlexNet.py``).

Every image of the batch is fed in **all four** rotations in the same batch (the official data
loader stacks the four copies with labels 0, 1, 2, 3; the paper's §2.2 Eq. 2 averages over
them, and its §3.1 finds this better than one random rotation per image): N views → 4N
images, one batched ``torch.rot90`` per rotation on the device. Rotation k is k quarter turns
counter-clockwise (the official ``rotate_img``: ``flipud(transpose(img))`` for 90°), label k.

The backbone's pooled feature goes through a linear 4-way classifier (``--head-layers 1``;
the official code's ImageNet AlexNet keeps its fc layers as the classifier, ``--head-layers
2``/``3`` gives such an MLP). Simplifications: mocolab's ResNets instead of the paper's NIN
(CIFAR) and AlexNet (ImageNet); SGD without Nesterov; the view is the ``crop-flip`` recipe
(the official random-sized crop and flip, no colour jitter). Rotating a view onto itself
needs square views: mocolab's are (``--crop-size``), and a non-square batch is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import projection_head
from ..losses import classification_accuracy
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig

NUM_ROTATIONS = 4  #: 0°, 90°, 180°, 270°


def rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Every image of ``N×C×S×S`` in the four rotations: ``(4N×C×S×S, 4N labels)``; rows
    ``k·N … k·N + N − 1`` are the batch turned by k quarter turns counter-clockwise
    (``torch.rot90(x, k, dims=(2, 3))``), label k.

    Raises:
        ValueError: the images are not square.
    """
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"rotation needs square views to turn them by 90°, got {h}×{w}")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(n)
    return rotated, labels


class RotNet(Method):
    """Rotation prediction.

    Args:
        backbone: ``N×C×H×W → N×D`` (attribute ``num_features``).
        head_layers: 1 = a linear 4-way classifier; more: an MLP (hidden ``hidden_dim``).
        hidden_dim: hidden width of the MLP (default: the backbone's width).
    """

    num_views = 1

    def __init__(
        self, backbone: nn.Module, *, head_layers: int = 1, hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        head = projection_head(backbone.num_features, NUM_ROTATIONS, hidden_dim, head_layers)
        self.query_encoder = encoder(backbone, head)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        rotated, labels = rotations(x)  # 4N×C×S×S, 4N
        logits = self.query_encoder(rotated)  # 4N×4
        loss = F.cross_entropy(logits.float(), labels)  # Eq. 2: the mean over the 4 rotations
        acc = classification_accuracy(logits, labels)
        return LossOutput(loss, {"acc": acc})


@dataclass
class RotationOptions(r.MethodOptions):
    """RotNet has no options of its own: the classifier is sized by ``--head-layers`` and
    ``--hidden-dim``, the views by ``--augment`` / ``--crop-scale``."""


# RotNet: a linear 4-way classifier on the pooled feature, crop + flip views, step LR.
@r.register_method(
    "rotation",
    options=RotationOptions,
    summary="RotNet, predict the rotation (Gidaris et al. 2018)",
    defaults={
        "head_layers": 1,
        "dim": NUM_ROTATIONS,
        "augment": "crop-flip",
        "lr_schedule": "step",
    },
)
def _rotation(
    backbone: nn.Module, cfg: PretrainConfig, o: RotationOptions, ctx: r.BuildContext
) -> RotNet:
    return RotNet(backbone, head_layers=cfg.head_layers, hidden_dim=cfg.hidden_dim)
