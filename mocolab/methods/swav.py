"""SwAV: online clustering with swapped prediction and multi-crop.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020. No pairwise comparisons: the normalised projections ``z`` are scored against
learnable prototypes ``C``; the codes ``q`` of each large view come from Sinkhorn-Knopp with an
equal partition of the batch over the prototypes (ε = 0.05, 3 iterations) and every other view
predicts them with a softmax of temperature τ = 0.1 (§3.1). Multi-crop (§3.2): 2 large views
plus V small ones; codes only from the large ones. The prototypes are L2-normalised every step
and frozen for the first iterations. For small batches (§4, "queue"), the projections of the
large crops of the last batches are kept in a queue per crop and scored against the current
prototypes, so the equipartition of Sinkhorn spans more samples than the batch; they only
shape the codes, they are never predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..dictionaries import Queue
from ..heads import Prototypes, projection_head
from ..losses import swav_loss
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder
from .multicrop import encode_views, multi_crop_recipes

if TYPE_CHECKING:
    from ..config import PretrainConfig


class SwAV(Method):
    """Swapping Assignments between Views.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: projection size (128).
        head_layers: projector layers (2: linear → BN → ReLU → linear).
        hidden_dim: projector hidden width (2048; default: the backbone's).
        num_prototypes: K (3000).
        num_local: V, small views besides the 2 large ones (6).
        temperature: τ of the swapped prediction (0.1).
        epsilon: ε of Sinkhorn-Knopp (0.05).
        sinkhorn_iterations: 3.
        freeze_prototypes_niters: steps during which the prototypes get no update (313 on
            ImageNet, about one epoch at batch 4096).
        queue_length: features kept per large crop for the codes (the official
            ``--queue_length``, 3840 at batch 256; 0: no queue); split evenly over processes,
            each keeping its own, as the official code.
        queue_start_step: the step from which the queues are filled (``--epoch_queue_starts``,
            15 epochs); they take part in Sinkhorn once full.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        head_layers: int = 2,
        hidden_dim: int | None = None,
        num_prototypes: int = 3000,
        num_local: int = 6,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        freeze_prototypes_niters: int = 313,
        queue_length: int = 0,
        queue_start_step: int = 0,
    ) -> None:
        super().__init__()
        projector = projection_head(
            backbone.num_features,
            dim,
            hidden_dim or backbone.num_features,
            num_layers=head_layers,
            batch_norm=True,
        )
        self.query_encoder = encoder(backbone, projector)
        self.prototypes = Prototypes(dim, num_prototypes)
        self.num_views = 2 + num_local
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken (resume)
        self.queues: nn.ModuleList | None = None
        self.queue_start_step = queue_start_step
        if queue_length > 0:  # random initial rows are never used: a queue counts once full
            g = torch.Generator().manual_seed(0)  # leaves the global stream (the init) as it was
            self.queues = nn.ModuleList(
                Queue(max(1, queue_length // distributed.world_size()), dim, g) for _ in range(2)
            )

    def view_recipes(self, augment: str) -> list[str]:
        return multi_crop_recipes(augment, 2, self.num_views - 2)

    @property
    def prototypes_frozen(self) -> bool:
        return self.scalar("step") < self.freeze_prototypes_niters

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        self.prototypes.normalize_()  # c_k on the unit sphere before each step
        z = [F.normalize(h, dim=1) for h in encode_views(self.query_encoder, views)]  # V × N×dim
        frozen = self.prototypes_frozen
        scores = [self.prototypes(zv, frozen=frozen) for zv in z]  # V × N×K
        queue_scores, carry = None, {}
        if self.queues is not None:
            if all(q.full for q in self.queues):
                with torch.no_grad():  # Q×K per large crop, scored by the current prototypes
                    queue_scores = [
                        q.keys().to(z[0].dtype) @ self.prototypes.weight.T for q in self.queues
                    ]
            if self.scalar("step") >= self.queue_start_step:
                carry["z_large"] = [z[0].detach(), z[1].detach()]  # enqueued after the step
        loss = swav_loss(
            scores,
            self.temperature,
            self.epsilon,
            self.sinkhorn_iterations,
            queue_scores=queue_scores,
        )
        return LossOutput(loss, carry=carry)

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Enqueue the large crops' projections (``--swav-queue``), count the step."""
        if self.queues is not None and "z_large" in out.carry:
            for queue, z in zip(self.queues, out.carry["z_large"]):
                queue.push(z)
        self.set_scalar("step", step + 1)
        return {}


@dataclass
class SwAVOptions(r.MethodOptions):
    """SwAV's own options (Caron et al. 2020: K = 3000, τ = 0.1, ε = 0.05, 3 iterations, 2×224 +
    6×96 crops, prototypes frozen for 313 iterations)."""

    prototypes: int = opt(3000, "K, the number of prototypes")
    temperature: float = r.temperature(0.1)
    sinkhorn_epsilon: float = opt(0.05, "ε of the Sinkhorn-Knopp equipartition")
    sinkhorn_iterations: int = opt(3, "Sinkhorn-Knopp iterations")
    num_local_crops: int = r.num_local_crops(6)
    freeze_prototypes_niters: int = opt(
        313, "steps with the prototypes frozen (313: about one ImageNet epoch at batch 4096)"
    )
    swav_queue: int = opt(
        0,
        "past large-crop features per crop kept for the Sinkhorn codes "
        "(paper §4 for small batches: 3840; 0: off)",
    )
    swav_queue_start_epoch: int = opt(15, "epoch from which --swav-queue is filled")

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_positive("prototypes", self.prototypes)
        r.check_temperature(self.temperature)
        r.check(
            self.num_local_crops >= 0, f"--num-local-crops must be >= 0, got {self.num_local_crops}"
        )
        r.check(
            self.sinkhorn_epsilon > 0,
            f"--sinkhorn-epsilon must be > 0 (0.05 in SwAV), got {self.sinkhorn_epsilon}",
        )
        r.check(
            self.sinkhorn_iterations > 0,
            f"--sinkhorn-iterations must be positive (3 in SwAV), got {self.sinkhorn_iterations}",
        )
        r.check(
            self.swav_queue >= 0 and self.swav_queue_start_epoch >= 0,
            "--swav-queue and --swav-queue-start-epoch must be >= 0 (0: no queue / from the start)",
        )
        r.check(
            self.freeze_prototypes_niters >= 0,
            f"--freeze-prototypes-niters must be >= 0, got {self.freeze_prototypes_niters}",
        )


# SwAV: 2-layer projector with BN to 128-d, multi-crop views, cosine LR.
@r.register_method(
    "swav",
    options=SwAVOptions,
    summary="SwAV (Caron et al. 2020)",
    defaults={
        "head_layers": 2,
        "dim": 128,
        "augment": "swav-global,swav-local",
        "lr_schedule": "cosine",
    },
)
def _swav(backbone: nn.Module, cfg: PretrainConfig, o: SwAVOptions, ctx: r.BuildContext) -> SwAV:
    steps_per_epoch = (ctx.num_images or 0) // cfg.batch_size
    return SwAV(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        num_prototypes=o.prototypes,
        num_local=o.num_local_crops,
        temperature=o.temperature,
        epsilon=o.sinkhorn_epsilon,
        sinkhorn_iterations=o.sinkhorn_iterations,
        freeze_prototypes_niters=o.freeze_prototypes_niters,
        queue_length=o.swav_queue,
        queue_start_step=o.swav_queue_start_epoch * steps_per_epoch,
    )
