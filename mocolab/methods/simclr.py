"""SimCLR: end-to-end contrast of two views against the other views of the batch.

Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (v1: 2-layer MLP head, NT-Xent, Algorithm 1); Chen, Kornblith,
Swersky, Norouzi & Hinton, "Big Self-Supervised Models are Strong Semi-Supervised Learners",
NeurIPS 2020 (v2: 3-layer head). The dictionary is the batch itself: the negatives of a view
are the other 2N − 2 views, gathered from every rank with their gradient. v2 optionally adds
MoCo's memory (§2: "a memory network (with a moving average of weights for stabilization)
whose output will be buffered as negative examples"): a momentum copy of the encoder whose
keys of both views fill a queue, the queue's keys joining the batch's views as negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..dictionaries import Queue
from ..heads import projection_head
from ..losses import nt_xent_logits
from ..momentum import MomentumEncoder
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class SimCLR(Method):
    """SimCLR v1 (``head_layers=2``) or v2 (``head_layers=3``).

    Args:
        backbone: the encoder body f (``N×C×H×W → N×D``, with ``num_features``).
        dim: output of the projection head g (128 in the papers).
        head_layers: 2 (v1) or 3 (v2); BN after every layer, as the official code.
        hidden_dim: hidden width of g (default: the backbone's width, 2048 for ResNet-50).
        temperature: τ of NT-Xent (0.1 for the ImageNet results of both papers).
        memory: K, the size of the queue of momentum-encoder keys used as extra negatives
            (v2's memory, §2; 0: none, the batch is the whole dictionary).
        momentum: m of the momentum encoder, ``momentum_schedule`` constant or cosine to 1.
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        head_layers: int = 2,
        hidden_dim: int | None = None,
        temperature: float = 0.1,
        memory: int = 0,
        momentum: float = 0.999,
        momentum_schedule: str = "constant",
    ) -> None:
        super().__init__()
        head = projection_head(
            backbone.num_features,
            dim,
            hidden_dim,
            num_layers=head_layers,
            batch_norm=True,
            last_batch_norm=True,
        )
        self.query_encoder = encoder(backbone, head)  # g(f(·))
        self.temperature = temperature
        self.key_encoder: MomentumEncoder | None = None
        self.queue: Queue | None = None
        if memory > 0:
            # the memory network
            self.key_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
            self.queue = Queue(memory, dim, generator=torch.Generator().manual_seed(0))

    @property
    def momentum_encoder(self) -> MomentumEncoder | None:
        return self.key_encoder

    @property
    def dictionary(self) -> Queue | None:
        return self.queue

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x1, x2 = views
        z1 = F.normalize(self.query_encoder(x1), dim=1)  # N×C
        z2 = F.normalize(self.query_encoder(x2), dim=1)  # N×C
        # the other views of the global batch, with gradient back to the rank that made them
        z1_all, z2_all = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
        logits, labels = nt_xent_logits(
            z1, z2, self.temperature, (z1_all, z2_all), offset=distributed.rank() * z1.shape[0]
        )  # 2N×2M
        carry = {}
        if self.queue is not None:
            with torch.no_grad():  # keys of both views from the memory network: 2N×C
                k = F.normalize(self.key_encoder(torch.cat([x1, x2])), dim=1)
            carry["keys"] = distributed.concat_all_gather(k)  # enqueued after the step
            negatives = (
                torch.cat([z1, z2]) @ self.queue.keys().to(z1.dtype).T / self.temperature
            )  # 2N×K
            logits = torch.cat([logits, negatives], dim=1)  # 2N×(2M+K)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        return LossOutput(loss, {"acc": acc}, carry=carry)

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Memory: the momentum encoder follows the encoder, the step's keys join the queue."""
        if self.key_encoder is None or self.queue is None:
            return {}
        m = self.key_encoder.step(self.query_encoder, step, total_steps)
        self.queue.push(out.carry["keys"])
        return {"momentum": m}


@dataclass
class SimCLROptions(r.MethodOptions):
    """SimCLR's own options (τ = 0.1 for the ImageNet results; Chen et al. 2020)."""

    temperature: float = r.temperature(0.1)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_temperature(self.temperature)


@dataclass
class SimCLR2Options(SimCLROptions):
    """SimCLR v2's own options: v1's and the optional memory (§2), MoCo's queue and EMA."""

    simclr2_memory: bool = opt(
        False,
        "MoCo's memory, a momentum encoder (--key-momentum) whose keys in a "
        "queue of --queue-size are extra negatives",
    )
    queue_size: int = r.queue_size(4096)
    key_momentum: float = r.key_momentum(0.999)
    momentum_schedule: str = r.momentum_schedule("constant")

    def validate(self, cfg: PretrainConfig) -> None:
        super().validate(cfg)
        r.check(
            self.queue_size > 0,
            f"--queue-size must be a positive number of keys, got {self.queue_size}",
        )
        r.check_momentum(self.key_momentum, self.momentum_schedule)


# SimCLR v1: 2-layer head with BN, 128-d, SimCLR augmentation, cosine LR.
@r.register_method(
    "simclr",
    options=SimCLROptions,
    summary="SimCLR (Chen et al. 2020)",
    defaults={"head_layers": 2, "dim": 128, "augment": "simclr", "lr_schedule": "cosine"},
)
def _simclr(
    backbone: nn.Module, cfg: PretrainConfig, o: SimCLROptions, ctx: r.BuildContext
) -> SimCLR:
    if isinstance(o, SimCLR2Options) and o.simclr2_memory:
        return SimCLR(
            backbone,
            dim=cfg.dim,
            head_layers=cfg.head_layers,
            hidden_dim=cfg.hidden_dim,
            temperature=o.temperature,
            memory=o.queue_size,
            momentum=o.key_momentum,
            momentum_schedule=o.momentum_schedule,
        )
    return SimCLR(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        temperature=o.temperature,
    )


# SimCLR v2: the same with a 3-layer head (and the optional memory).
r.register_method(
    "simclr2",
    options=SimCLR2Options,
    summary="SimCLR v2 (Chen et al. 2020)",
    defaults={"head_layers": 3, "dim": 128, "augment": "simclr", "lr_schedule": "cosine"},
)(_simclr)
