"""DenseCL: MoCo v2 with a second, dense dictionary look-up at every location of the feature map.

Wang, Zhang, Shen, Kong & Li, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", CVPR 2021. MoCo v2's global look-up (a query against its key and a queue of
negatives) is kept; beside it, a dense head projects every location of the last feature map,
and each query location looks up its key among a second queue: its positive is the key view's
dense projection at the location whose *backbone* feature is most similar (the
correspondence, §3.3), its negatives the pooled dense projections of earlier batches. The two
InfoNCE losses are mixed ``(1 − λ)·L_global + λ·L_dense`` with λ = 0.5 (§3.2, Eq. 1–3), which
helps dense transfer (detection, segmentation).

Follows the official code, WXinlong/DenseCL ``openselfsup/models/densecl.py``,
``openselfsup/models/necks.py`` (``DenseCLNeck``) and
``configs/selfsup/densecl/densecl_imagenet_200ep.py`` (commit b64bbb6): the global head
fc-ReLU-fc on the pooled map, the dense head 1×1 conv-ReLU-1×1 conv on the map (here the same
MLP on each location's vector, which is what a 1×1 convolution computes), 128-d, the dense
queue filled with the keys' dense projections averaged over the locations, the correspondence
from the L2-normalised ResNet stage-5 maps, K = 65536, m = 0.999, τ = 0.2, λ = 0.5 from the
first step (the ImageNet config uses no ``DenseCLWarmupHook``), shuffle-BN, MoCo v2's views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import check_resnet, is_vit, stage_maps
from ..dictionaries import Queue
from ..distributed import concat_all_gather, gather_keys, on_shuffled_batch
from ..heads import projection_head
from ..losses import contrastive_accuracy, dense_correspondence, dense_info_nce, info_nce
from ..momentum import MomentumEncoder
from ..option import opt
from . import registry as r
from .base import LossOutput, Method

if TYPE_CHECKING:
    from ..config import PretrainConfig


class DenseEncoder(nn.Module):
    """A ResNet with DenseCL's two heads (the official ``DenseCLNeck``).

    ``forward(x)`` is the global projection (``N×C``, what MoCo's encoder gives: the
    diagnostics and the key encoder's agreement read it); :meth:`dense` gives everything a
    DenseCL step needs.

    Args:
        backbone: a ResNet (``layer4`` is the map the dense head and the correspondence read).
        head: the global head on the pooled features (``D → C``).
        dense_head: the dense head applied to each location's feature (``D → C``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, dense_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.dense_head = dense_head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def dense(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, r, f)``: the global projection ``N×C`` of the pooled map, the dense projections
        ``N×S×C`` and the backbone features ``N×S×D`` at the ``S = H·W`` locations of the
        last stage's map (none of them normalised)."""
        fmap = stage_maps(self.backbone, x, ("layer4",))["layer4"]  # N×D×H×W
        f = fmap.flatten(2).transpose(1, 2)  # N×S×D
        return self.head(f.mean(dim=1)), self.dense_head(f), f


class DenseCL(Method):
    """Dense Contrastive Learning.

    Args:
        backbone: a ResNet (``N×C×H×W → N×D``, with ``num_features``).
        dim: C, the key dimension of both heads (128).
        head_layers: layers of both heads (2: MoCo v2's fc-ReLU-fc, the dense 1×1 convs).
        hidden_dim: their hidden width (default: the backbone's width, 2048 for ResNet-50).
        queue_size: K, of each queue (65536).
        momentum: m of the key encoder (0.999).
        momentum_schedule: ``"constant"`` (the official) or ``"cosine"``.
        temperature: τ of both losses (0.2).
        dense_weight: λ, the dense loss's share (0.5).
        shuffle_bn: shuffle the key batch before the key encoder (MoCo §3.3).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        head_layers: int = 2,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        momentum: float = 0.999,
        momentum_schedule: str = "constant",
        temperature: float = 0.2,
        dense_weight: float = 0.5,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__()
        check_resnet(backbone, "DenseCL")
        width = backbone.num_features
        self.query_encoder = DenseEncoder(
            backbone,
            projection_head(width, dim, hidden_dim, num_layers=head_layers),
            projection_head(width, dim, hidden_dim, num_layers=head_layers),
        )
        # f_k = f_q at start
        self.key_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        self.queue = Queue(queue_size, dim)  # pooled global keys
        self.dense_queue = Queue(queue_size, dim)  # dense keys averaged over their locations
        self.temperature = temperature
        self.dense_weight = dense_weight
        self.shuffle_bn = shuffle_bn

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.key_encoder

    @property
    def dictionary(self) -> Queue:
        return self.queue

    @torch.no_grad()
    def encode_keys(
        self, x_k: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The key view through f_k (on a shuffled batch when ``shuffle_bn``), all
        L2-normalised: the global keys ``N×C``, the dense keys ``N×S×C``, the backbone features
        ``N×S×D`` and the dense keys averaged over the locations ``N×C`` (for the dense queue)."""

        def encode(x: Tensor) -> tuple[Tensor, ...]:
            g, r_, f = self.key_encoder.module.dense(x)
            return (
                F.normalize(g, dim=1),
                F.normalize(r_, dim=2),
                F.normalize(f, dim=2),
                F.normalize(r_.mean(dim=1), dim=1),  # the official avgpool2 of the dense output
            )

        k, k_dense, k_features, k_pooled = on_shuffled_batch(
            encode, x_k, generator, self.shuffle_bn
        )
        return k, k_dense, k_features, k_pooled

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x_q, x_k = views
        g, r_, f = self.query_encoder.dense(x_q)
        q = F.normalize(g, dim=1)  # global query: N×C
        q_dense = F.normalize(r_, dim=2)  # dense queries: N×S×C
        k, k_dense, k_features, k_pooled = self.encode_keys(x_k, generator)  # no gradient
        match = dense_correspondence(f.detach(), k_features)  # N×S: the most similar key location
        queue = self.queue.keys().to(q.dtype)
        dense_queue = self.dense_queue.keys().to(q.dtype)
        loss_global, logits = info_nce(q, k, queue, self.temperature)  # N×(1+K)
        loss_dense, dense_logits = dense_info_nce(
            q_dense, k_dense.to(q.dtype), match, dense_queue, self.temperature
        )  # N·S×(1+K)
        loss = (1 - self.dense_weight) * loss_global + self.dense_weight * loss_dense
        metrics = {
            "acc": contrastive_accuracy(logits.detach()),
            "dense_acc": contrastive_accuracy(dense_logits.detach()),
            "loss_global": loss_global.detach(),
            "loss_dense": loss_dense.detach(),
        }
        carry = {"keys": k, "dense_keys": k_pooled}
        if index is not None:
            carry["index"] = index
        return LossOutput(loss, metrics, carry=carry)  # keys enqueued after the step

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Enqueue this step's global and pooled dense keys (gathered from all ranks), dequeue
        the oldest, and move f_k towards f_q: ``θk ← m·θk + (1−m)·θq``."""
        keys, index = gather_keys(out.carry["keys"], out.carry.get("index"))
        self.queue.push(keys, index)
        self.dense_queue.push(concat_all_gather(out.carry["dense_keys"]), index)
        return {"momentum": self.key_encoder.step(self.query_encoder, step, total_steps)}


@dataclass
class DenseCLOptions(r.MethodOptions):
    """DenseCL's own options (K = 65536, m = 0.999, τ = 0.2, λ = 0.5: the official
    ``densecl_imagenet_200ep.py``)."""

    queue_size: int = r.queue_size(65536)
    key_momentum: float = r.key_momentum(0.999)
    momentum_schedule: str = r.momentum_schedule("constant")
    temperature: float = r.temperature(0.2)
    dense_weight: float = opt(
        0.5, "λ of (1−λ)·global + λ·dense InfoNCE (DenseCL: 0.5; 0 is MoCo v2)"
    )
    shuffle_bn: bool = r.shuffle_bn(True)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            self.queue_size > 0,
            f"--queue-size must be a positive number of keys, got {self.queue_size}",
        )
        r.check_momentum(self.key_momentum, self.momentum_schedule)
        r.check_temperature(self.temperature)
        r.check(
            0.0 <= self.dense_weight <= 1.0,
            f"--dense-weight must be in [0, 1] (0.5 in DenseCL), got {self.dense_weight}",
        )
        r.check(
            not is_vit(cfg.arch),
            f"--method densecl contrasts a ResNet's feature maps; choose --arch "
            f"resnet18|34|50|101, not {cfg.arch}",
        )


# DenseCL: MoCo v2's 2-layer heads (global and dense) to 128-d, MoCo v2's views, cosine LR.
@r.register_method(
    "densecl",
    options=DenseCLOptions,
    summary="DenseCL (Wang et al. 2021)",
    defaults={"head_layers": 2, "dim": 128, "augment": "mocov2", "lr_schedule": "cosine"},
)
def _densecl(
    backbone: nn.Module, cfg: PretrainConfig, o: DenseCLOptions, ctx: r.BuildContext
) -> DenseCL:
    return DenseCL(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        queue_size=o.queue_size,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
        temperature=o.temperature,
        dense_weight=o.dense_weight,
        shuffle_bn=o.shuffle_bn,
    )
