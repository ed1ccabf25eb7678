"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(Alg. 1). A student (backbone → DINO head) matches the output distribution of a teacher, the
EMA of the student (momentum 0.996 → 1, cosine), across views: the teacher sees only the 2
global views, the student all views (multi-crop). Collapse is avoided by centering the teacher
output with an EMA center (momentum 0.9) and sharpening it with a low temperature τ_t,
warmed up linearly from 0.04 to 0.07 (§3.1, App.); the student's τ_s is 0.1. The head's last
layer is weight-normalised and frozen for the first iterations. DINO's per-parameter gradient
clipping and cosine weight-decay schedule are options of the training loop (``--clip-grad``,
``--weight-decay-end``), set in the dino presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import DINOHead
from ..losses import dino_loss
from ..momentum import Center, MomentumEncoder
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder
from .multicrop import encode_views, multi_crop_recipes

if TYPE_CHECKING:
    from ..config import PretrainConfig


def teacher_temperature(
    step: int, total_steps: int, start: float, end: float, warmup: float
) -> float:
    """τ_t at ``step``: linear from ``start`` to ``end`` over the first ``warmup`` fraction of
    training, then ``end`` (DINO: 0.04 → 0.07 over 30 epochs)."""
    warmup_steps = warmup * total_steps
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class DINO(Method):
    """Self-distillation with no labels.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: bottleneck of the head (256).
        out_dim: K, the head's output dimension (65536).
        head_layers: MLP layers of the head (3).
        hidden_dim: MLP width (2048; default: the backbone's width).
        num_local: small views besides the 2 global ones (8 in the code, 10 in the best models).
        momentum: teacher EMA base momentum (0.996), ``momentum_schedule`` cosine to 1.
        temperature: τ_s of the student (0.1).
        teacher_temperature: final τ_t (0.07); ``warmup_teacher_temperature`` the first (0.04),
            reached linearly over the first ``teacher_temperature_warmup`` fraction of training.
        center_momentum: m of the center (0.9).
        freeze_last_layer_niters: steps during which the head's last layer gets no update
            (DINO: the first epoch).
        head_bn: BN after the head's hidden layers (the official ``--use_bn_in_head``, off by
            default; it spreads a small ResNet's features apart at the start, see the
            Fashion-MNIST preset).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        out_dim: int = 65536,
        head_layers: int = 3,
        hidden_dim: int | None = None,
        num_local: int = 8,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
        temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature_warmup: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer_niters: int = 0,
        head_bn: bool = False,
    ) -> None:
        super().__init__()
        head = DINOHead(
            backbone.num_features,
            out_dim,
            hidden_dim or backbone.num_features,
            dim,
            num_layers=head_layers,
            batch_norm=head_bn,
        )
        self.query_encoder = encoder(backbone, head)  # the student g_θs
        # g_θt, θt = θs at start
        self.teacher_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        self.center = Center(out_dim, center_momentum)
        self.num_views = 2 + num_local
        self.temperature = temperature
        self.teacher_schedule = (
            warmup_teacher_temperature,
            teacher_temperature,
            teacher_temperature_warmup,
        )
        self.freeze_last_layer_niters = freeze_last_layer_niters
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken (resume)
        self.register_buffer("teacher_temp", torch.tensor(float(warmup_teacher_temperature)))

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.teacher_encoder

    def view_recipes(self, augment: str) -> list[str]:
        return multi_crop_recipes(augment, 2, self.num_views - 2)

    def _student(self, x: Tensor) -> Tensor:
        frozen = self.scalar("step") < self.freeze_last_layer_niters
        return self.query_encoder.head(self.query_encoder.backbone(x), freeze_last_layer=frozen)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        student = encode_views(self._student, views)  # V × N×K
        with torch.no_grad():
            teacher = encode_views(self.teacher_encoder, views[:2])  # 2 × N×K, global views only
        loss = dino_loss(
            student, teacher, self.center.center, self.temperature, self.scalar("teacher_temp")
        )
        return LossOutput(
            loss,
            {
                "teacher_temp": self.teacher_temp.detach().clone(),
                **self._entropies(student[:2], teacher),
            },
            carry={"teacher_out": torch.cat(teacher)},
        )  # the center moves later

    @torch.no_grad()
    def _entropies(self, student: list[Tensor], teacher: list[Tensor]) -> dict[str, Tensor]:
        """Collapse monitors (DINO §5.3, Fig. 7) on the global views: ``teacher_entropy``, the
        mean entropy ``H(P_t)`` of the centred, sharpened teacher (→ log K: collapse to the
        uniform); ``batch_entropy``, the entropy of the batch's mean ``P_t`` (→ 0: collapse to
        one dimension); ``kl``, ``KL(P_t ‖ P_s)`` of the same view (what the student still has
        to learn; the loss is ``H(P_t) + KL`` over pairs of views)."""
        t = torch.cat(teacher).float()
        log_p_t = F.log_softmax((t - self.center.center) / self.scalar("teacher_temp"), dim=1)
        log_p_s = F.log_softmax(torch.cat(student).detach().float() / self.temperature, dim=1)
        p_t = log_p_t.exp()
        mean = p_t.mean(dim=0)
        return {
            "teacher_entropy": -(p_t * log_p_t).sum(dim=1).mean(),
            "batch_entropy": -(mean * mean.clamp_min(1e-12).log()).sum(),
            "kl": (p_t * (log_p_t - log_p_s)).sum(dim=1).mean(),
        }

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """EMA of the teacher, of the center, and the next step's teacher temperature."""
        self.center.update(out.carry["teacher_out"])
        m = self.teacher_encoder.step(self.query_encoder, step, total_steps)
        self.set_scalar("step", step + 1)
        self.set_scalar(
            "teacher_temp", teacher_temperature(step + 1, total_steps, *self.teacher_schedule)
        )
        return {"momentum": m}


@dataclass
class DINOOptions(r.MethodOptions):
    """DINO's own options (Caron et al. 2021: K = 65536, τ_s = 0.1, τ_t 0.04 → 0.07 over the
    first 10% (30 of 300 epochs), center momentum 0.9, teacher EMA 0.996 → 1, 2 + 8 crops)."""

    out_dim: int = opt(65536, "K, the head's output dimension (the official --out_dim)")
    temperature: float = r.temperature(0.1)
    teacher_temperature: float = opt(0.07, "teacher τ_t after warmup")
    warmup_teacher_temperature: float = opt(0.04, "teacher τ_t at the start")
    teacher_temperature_warmup: float = opt(
        0.1, "fraction of training over which τ_t rises linearly (0.1: 30 of 300 epochs)"
    )
    center_momentum: float = opt(0.9, "momentum of the teacher center")
    key_momentum: float = r.key_momentum(0.996)
    momentum_schedule: str = r.momentum_schedule("cosine")
    num_local_crops: int = r.num_local_crops(8)
    freeze_last_layer_niters: int = opt(
        0, "steps with the head's last layer frozen (the official --freeze_last_layer: one epoch)"
    )
    head_bn: bool = opt(False, "BN after the head's hidden layers (the official --use_bn_in_head)")

    def validate(self, cfg: PretrainConfig) -> None:
        check_teacher_options(self)


def check_teacher_options(o: Any) -> None:
    """The checks of a DINO-style teacher's options (DINO, iBOT, DINOv2): the head's size, the
    temperatures and their warm-up, the momenta, the local crops, the frozen last layer."""
    r.check_positive("out_dim", o.out_dim)
    r.check_temperature(o.temperature)
    r.check_momentum(o.key_momentum, o.momentum_schedule)
    r.check(o.num_local_crops >= 0, f"--num-local-crops must be >= 0, got {o.num_local_crops}")
    for name in ("teacher_temperature", "warmup_teacher_temperature"):
        value = getattr(o, name)
        r.check(value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")
    r.check(
        0 <= o.teacher_temperature_warmup < 1,
        "--teacher-temperature-warmup is a fraction of training in [0, 1), got "
        f"{o.teacher_temperature_warmup}",
    )
    r.check(
        0 <= o.center_momentum < 1,
        f"--center-momentum must be in [0, 1) (0.9), got {o.center_momentum}",
    )
    r.check(
        o.freeze_last_layer_niters >= 0,
        f"--freeze-last-layer-niters must be >= 0, got {o.freeze_last_layer_niters}",
    )


# DINO: 3-layer GELU head to a 256-d bottleneck, weight-normalised last layer, multi-crop,
# cosine LR.
# Its presets and checkpoints before the registry said prototypes / freeze_prototypes_niters.
@r.register_method(
    "dino",
    options=DINOOptions,
    summary="DINO (Caron et al. 2021)",
    defaults={
        "head_layers": 3,
        "dim": 256,
        "augment": "dino-global1,dino-global2,dino-local",
        "lr_schedule": "cosine",
    },
    renamed={"prototypes": "out_dim", "freeze_prototypes_niters": "freeze_last_layer_niters"},
)
def _dino(backbone: nn.Module, cfg: PretrainConfig, o: DINOOptions, ctx: r.BuildContext) -> DINO:
    return DINO(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        out_dim=o.out_dim,
        num_local=o.num_local_crops,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
        temperature=o.temperature,
        teacher_temperature=o.teacher_temperature,
        warmup_teacher_temperature=o.warmup_teacher_temperature,
        teacher_temperature_warmup=o.teacher_temperature_warmup,
        center_momentum=o.center_momentum,
        head_bn=o.head_bn,
        freeze_last_layer_niters=o.freeze_last_layer_niters,
    )
