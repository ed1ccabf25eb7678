"""MSN: masked siamese networks.

Assran et al., "Masked Siamese Networks for Label-Efficient Learning", ECCV 2022 (§3, App. C).
Anchor views — a large view with 15 % of its patches dropped, and ten small "focal" views —
are matched to the prototype assignment of an unmasked target view of the same image, computed
by a target encoder (the EMA of the anchor encoder, momentum 0.996 → 1 linearly). The anchors'
soft assignments ``softmax(cos(z, prototypes) / 0.1)`` learn the target's, sharpened with
T = 0.25 (and balanced by Sinkhorn-Knopp in the released config); a mean-entropy-maximisation
regulariser (me-max) keeps every prototype in use. The encoder is a ViT whose [CLS] token goes
through a 3-layer GELU projection head with BN (2048 → 256); 1024 learnable prototypes.

Follows facebookresearch/msn at 4388dc1 (``src/msn_train.py``, ``src/losses.py``,
``src/deit.py``, ``src/data_manager.py``, ``configs/pretrain/msn_vits16.yaml``). Masking is
:func:`mocolab.masking.random_masking` with one draw for the whole batch, as ``src/deit.py``'s
``patch_drop`` (one ``torch.randperm`` per batch); the focal views are not masked. The momentum
ramp spans 1.25× the training steps, as the code's schedulers. Where mocolab differs: the LR
and weight-decay schedules are mocolab's (warmup from 0 and a cosine to 0 over the run; the
code warms up from 2e-4 and stretches its cosines over 1.25× the run); ``--clip-grad`` clips
each tensor's gradient (the code clips the global norm at 3); the sharpening temperature is
constant (the released config's ``start_sharpen`` = ``final_sharpen`` = 0.25); the code's
entropy term has weight 0 in the released config and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..heads import Prototypes, projection_head
from ..losses import msn_loss
from ..masking import random_masking
from ..momentum import MomentumEncoder, scheduled_momentum
from ..option import opt
from ..vit import init_trunc_normal_
from . import registry as r
from .base import LossOutput, Method, encoder
from .multicrop import encode_views, multi_crop_recipes

if TYPE_CHECKING:
    from ..config import PretrainConfig

#: The code's schedules (momentum, LR, weight decay) run over 1.25× the training steps.
SCHEDULE_STRETCH = 1.25


class MSN(Method):
    """Masked siamese networks.

    Args:
        backbone: a :class:`mocolab.vit.VisionTransformer`.
        dim: the projection's output (256).
        hidden_dim: its hidden width (2048).
        head_layers: its layers (3: Linear-BN-GELU twice, then Linear).
        num_prototypes: K (1024).
        num_focal: small anchor views besides the masked large one (10).
        patch_drop: the fraction of the large anchor view's patches dropped (0.15).
        temperature: τ of the soft assignments (0.1).
        sharpen_temperature: T of the targets (0.25).
        me_max_weight: λ of the me-max regulariser (1).
        sinkhorn: balance the targets with Sinkhorn-Knopp (the released config).
        momentum, momentum_schedule: the target encoder's EMA (0.996, ``"linear"`` to 1 over
            1.25× the training).

    Views: ``[target, anchor, focal × num_focal]`` (two large, then the small ones).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        hidden_dim: int | None = 2048,
        head_layers: int = 3,
        num_prototypes: int = 1024,
        num_focal: int = 10,
        patch_drop: float = 0.15,
        temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        me_max_weight: float = 1.0,
        sinkhorn: bool = True,
        momentum: float = 0.996,
        momentum_schedule: str = "linear",
    ) -> None:
        super().__init__()
        vit: Any = backbone
        # src/deit.py and msn_train.py init_model: DeiT's truncated normal, the patch
        # projection Kaiming-normal (fan in), the [CLS] token N(0, 0.02²)
        init_trunc_normal_(vit, patch_embed=False)
        nn.init.kaiming_normal_(vit.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(vit.patch_embed.proj.bias)
        nn.init.trunc_normal_(vit.cls_token, std=0.02, a=-2.0, b=2.0)
        head = projection_head(
            vit.num_features,
            dim,
            hidden_dim or vit.num_features,
            num_layers=head_layers,
            batch_norm=True,
            activation="gelu",
        )
        init_trunc_normal_(head)
        self.query_encoder = encoder(backbone, head)  # the anchor encoder
        # the target encoder, θ̄ = θ at start
        self.target_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        self.prototypes = Prototypes(dim, num_prototypes, normalize=False)  # U(±1/√dim)
        self.num_views = 2 + num_focal
        self.patch_drop = patch_drop
        self.loss_options = {
            "temperature": temperature,
            "sharpen_temperature": sharpen_temperature,
            "me_max_weight": me_max_weight,
            "sinkhorn_targets": sinkhorn,
        }

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.target_encoder

    def no_weight_decay(self) -> list[nn.Parameter]:
        """The prototypes (``init_opt`` puts them in a group without weight decay)."""
        return [self.prototypes.weight]

    def view_recipes(self, augment: str) -> list[str]:
        return multi_crop_recipes(augment, 2, self.num_views - 2)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        target_view, anchor_view, *focal = views
        vit: Any = self.backbone
        n = anchor_view.shape[0]
        keep = random_masking(
            n,
            vit.num_patches,
            self.patch_drop,
            generator=generator,
            device=anchor_view.device if generator is None else None,
            shared=True,
        ).keep  # the same patches kept in every image: N×K
        anchors = [self.query_encoder.head(vit(anchor_view, keep=keep))]  # N×d
        anchors += encode_views(self.query_encoder, focal)  # num_focal × N×d
        with torch.no_grad():
            target = self.target_encoder(target_view)  # N×d
        loss, cross_entropy, me_max = msn_loss(
            torch.cat(anchors), target, self.prototypes.weight, **self.loss_options
        )
        return LossOutput(loss, {"msn": cross_entropy.detach(), "me_max": me_max.detach()})

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """``θ̄ ← m·θ̄ + (1 − m)·θ`` (projection head included), m ramped over 1.25× the run."""
        m = scheduled_momentum(
            self.target_encoder.momentum,
            self.target_encoder.schedule,
            step,
            round(SCHEDULE_STRETCH * total_steps),
        )
        self.target_encoder.update(self.query_encoder, m)
        return {"momentum": m}


@dataclass
class MSNOptions(r.MethodOptions):
    """MSN's own options (the released ``configs/pretrain/msn_vits16.yaml``: 1024 prototypes,
    patch drop 0.15, 1 + 10 anchor views, τ = 0.1, T = 0.25, me-max weight 1, Sinkhorn on the
    targets, EMA 0.996 → 1 linearly)."""

    num_prototypes: int = opt(1024, "MSN: K, the learnable prototypes (num_proto)")
    patch_drop: float = opt(0.15, "MSN: fraction of the large anchor view's patches dropped")
    num_local_crops: int = r.num_local_crops(10)
    temperature: float = r.temperature(0.1)
    sharpen_temperature: float = opt(0.25, "MSN: T of the targets' sharpening (start_sharpen)")
    me_max_weight: float = opt(1.0, "MSN: λ of the mean-entropy-maximisation regulariser")
    sinkhorn: bool = opt(True, "MSN: balance the targets with Sinkhorn-Knopp (use_sinkhorn)")
    key_momentum: float = r.key_momentum(0.996)
    momentum_schedule: str = r.momentum_schedule("linear")

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_vit(cfg, "msn")
        r.check_positive("num_prototypes", self.num_prototypes)
        r.check(
            0 <= self.patch_drop < 1,
            f"--patch-drop is a fraction of the patches in [0, 1) (0.15), got {self.patch_drop}",
        )
        r.check(
            self.num_local_crops >= 0, f"--num-local-crops must be >= 0, got {self.num_local_crops}"
        )
        r.check_temperature(self.temperature)
        r.check(
            self.sharpen_temperature > 0,
            f"--sharpen-temperature must be > 0 (0.25), got {self.sharpen_temperature}",
        )
        r.check(self.me_max_weight >= 0, f"--me-max-weight must be >= 0, got {self.me_max_weight}")
        r.check_momentum(self.key_momentum, self.momentum_schedule)


# MSN: a 3-layer GELU head with BN to 256, 1024 prototypes, a target and a masked anchor view
# plus focal views (multi-crop), cosine LR.
@r.register_method(
    "msn",
    options=MSNOptions,
    summary="MSN (Assran et al. 2022)",
    defaults={
        "head_layers": 3,
        "dim": 256,
        "augment": "msn-rand,msn-rand,msn-focal",
        "lr_schedule": "cosine",
    },
)
def _msn(backbone: nn.Module, cfg: PretrainConfig, o: MSNOptions, ctx: r.BuildContext) -> MSN:
    return MSN(
        backbone,
        dim=cfg.dim,
        hidden_dim=cfg.hidden_dim,
        head_layers=cfg.head_layers,
        num_prototypes=o.num_prototypes,
        num_focal=o.num_local_crops,
        patch_drop=o.patch_drop,
        temperature=o.temperature,
        sharpen_temperature=o.sharpen_temperature,
        me_max_weight=o.me_max_weight,
        sinkhorn=o.sinkhorn,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
    )
