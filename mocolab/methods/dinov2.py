"""DINOv2: DINO and iBOT with Sinkhorn-Knopp centring, KoLeo and a LayerScale ViT.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024 (§4,
§5). iBOT (:mod:`mocolab.methods.ibot`) — DINO's [CLS] self-distillation over multi-crop views
plus masked patch self-distillation — with the paper's changes (§4): the teacher's outputs are
centred by three Sinkhorn-Knopp iterations (SwAV's :func:`~mocolab.losses.sinkhorn` at the
teacher temperature) instead of DINO's EMA centre; the KoLeo regulariser
(:func:`~mocolab.losses.koleo_loss`, weight 0.1) spreads the student's [CLS] features of each
global view apart; the ViT has LayerScale (``--vit-layer-scale``, 1e-5) and stochastic depth
(0.3 in every block); masks are drawn for half of the images, with ratios spread over 0.1–0.5
(:func:`~mocolab.masking.dinov2_mask_counts`, blocks of at most half the grid).

Follows facebookresearch/dinov2 at b8931f7 (``dinov2/train/ssl_meta_arch.py``
``forward_backward``, ``dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py``,
``dinov2/layers/{layer_scale,dino_head}.py``, ``dinov2/data/collate.py``,
``dinov2/train/train.py``) and its configs ``ssl_default_config.yaml`` and
``train/vitl16_short.yaml`` (the ``dinov2-imagenet`` preset). The losses are weighted as the
code: the [CLS] cross-entropy averaged over its ``2·(V − 1)`` (teacher, student) view pairs,
``0.1·(KoLeo(view 1) + KoLeo(view 2))``, and the patch loss over the ``2N`` global views.

Where mocolab differs: the [CLS] and patch heads' last layers learn their norms (as the code's
``weight_norm``) but their gradient is zeroed, not their LR, while frozen; ``--clip-grad``
clips each tensor's gradient (the code: each sub-network's total norm); the LR's cosine ends at
0 (the code's at 1e-6); the LR is the same for every layer (the default config's
``layerwise_decay`` 0.9 and ``patch_embed_lr_mult`` 0.2 are not offered; the long ViT-L/14 and
ViT-g/14 recipes use no layer-wise decay). Not offered: registers (``num_register_tokens``,
0 in these configs), the SwiGLU FFN (ViT-g), xFormers' memory-efficient attention and
block-diagonal batching of the crops (an efficiency of the same computation), FSDP, and the
high-resolution adaptation at the end of the long recipes (§4, "Adapting the resolution").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..heads import TokenHeads
from ..losses import koleo_loss, sinkhorn
from ..masking import block_masks, dinov2_mask_counts
from ..option import opt
from . import registry as r
from .ibot import (
    IBOT,
    check_distillation_options,
    distillation_arguments,
    init_vit_as_dino_,
    opt_center_momentum,
    opt_drop_path,
    opt_freeze_last_layer_niters,
    opt_lambda1,
    opt_lambda2,
    opt_out_dim,
    opt_teacher_temperature,
    opt_teacher_temperature_warmup,
    opt_warmup_teacher_temperature,
)

if TYPE_CHECKING:
    from ..config import PretrainConfig

#: How the teacher's outputs become targets: Sinkhorn-Knopp (the paper, §4; the ViT-L/14 and
#: ViT-g/14 configs) or DINO's centring and sharpening (``ssl_default_config.yaml``).
CENTERINGS = ("sinkhorn_knopp", "centering")


class DINOv2(IBOT):
    """DINOv2's self-supervised objective on a LayerScale ViT.

    Args:
        backbone: a :class:`mocolab.vit.VisionTransformer` (with LayerScale: ``layer_scale``).
        dim, hidden_dim, head_layers: the heads' bottleneck (256), MLP width (2048), layers (3).
        out_dim: K of the [CLS] head (``dino.head_n_prototypes``, 65536).
        separate_head: the patch tokens get their own head (``ibot.separate_head``; False: the
            [CLS] head) with ``patch_out_dim`` outputs (``ibot.head_n_prototypes``).
        num_local: small views besides the 2 global ones (8).
        momentum, momentum_schedule: the teacher's EMA (0.992 → 1, cosine).
        temperature: τ_s (0.1).
        teacher_temperature, warmup_teacher_temperature, teacher_temperature_warmup: τ_t of
            both targets, 0.04 → 0.07 linearly over the first 30 % (30 of 100 epochs).
        centering: ``"sinkhorn_knopp"`` or ``"centering"`` (EMA centres, ``center_momentum``).
        lambda1, lambda2: the weights of the [CLS] and patch losses (1, 1).
        koleo_weight: the KoLeo regulariser's weight (0.1).
        mask_probability, mask_ratio_range: the fraction of images masked (0.5) and the range
            their masked fractions are spread over (0.1–0.5).
        freeze_last_layer_niters: steps with the heads' last layers frozen (one epoch).
        drop_path: the student's stochastic depth, the same in every block (0.3).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        head_layers: int = 3,
        separate_head: bool = False,
        patch_out_dim: int = 65536,
        num_local: int = 8,
        momentum: float = 0.992,
        momentum_schedule: str = "cosine",
        temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature_warmup: float = 0.3,
        centering: str = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        koleo_weight: float = 0.1,
        mask_probability: float = 0.5,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        freeze_last_layer_niters: int = 0,
        drop_path: float = 0.3,
    ) -> None:
        if centering not in CENTERINGS:
            raise ValueError(f"unknown centering {centering!r}; choose one of {CENTERINGS}")
        super().__init__(
            backbone,
            dim=dim,
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            head_layers=head_layers,
            norm_last_layer=False,  # DINOHead: weight_norm with weight_g trained
            patch_head=separate_head,
            patch_out_dim=patch_out_dim if separate_head else out_dim,
            num_local=num_local,
            momentum=momentum,
            momentum_schedule=momentum_schedule,
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            warmup_teacher_temperature=warmup_teacher_temperature,
            teacher_patch_temperature=teacher_temperature,  # one τ_t for both
            warmup_teacher_patch_temperature=warmup_teacher_temperature,
            teacher_temperature_warmup=teacher_temperature_warmup,
            center_momentum=center_momentum,
            lambda1=lambda1,
            lambda2=lambda2,
            freeze_last_layer_niters=freeze_last_layer_niters,
            drop_path=drop_path,
        )
        self.centering = centering
        self.koleo_weight = koleo_weight
        self.mask_probability = mask_probability
        self.mask_ratio_range = (float(mask_ratio_range[0]), float(mask_ratio_range[1]))

    def init_backbone(self, vit: Any) -> None:
        """DINOv2's ``init_weights``: :func:`~mocolab.methods.ibot.init_vit_as_dino_` with the
        [CLS] token ``N(0, 10⁻⁶)``."""
        init_vit_as_dino_(vit, cls_std=None)

    def set_drop_path(self, vit: Any, rate: float) -> None:
        """``drop_path_uniform: true``: the same rate in every block of the student."""
        vit.set_drop_path(rate, uniform=True)

    def sample_masks(
        self, n: int, grid: tuple[int, int], generator: torch.Generator | None, device: Any
    ) -> Tensor:
        """``n×L`` booleans (``collate_data_and_cast`` over the ``2N`` global views): half of
        the images masked with ratios spread over 0.1–0.5, blockwise (``MaskingGenerator``:
        blocks of 4 patches or more, at most ``0.5 * S // p * S // p`` in one — the code's
        expression, half the grid when ``S/p`` is even)."""
        h, w = grid
        counts = dinov2_mask_counts(
            n,
            h * w,
            self.mask_ratio_range,
            self.mask_probability,
            generator=generator,
            device=None if generator is not None else device,
        )
        p = self.backbone.patch_size
        side = h * p  # the code's img_size (global crops are square)
        largest = 0.5 * side // p * side // p  # train.py: max_num_patches, evaluated left to right
        masks = block_masks(counts, grid, min_patches=4, max_patches=largest, generator=generator)
        return masks.flatten(1)

    def teacher_distributions(
        self, head: TokenHeads, patch_tokens: Tensor, cls_out: Tensor, masks: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The targets from the teacher (no gradient) at the masked patches only (the code's
        ``mask_indices_list``): Sinkhorn-Knopp at τ_t over the ``2N`` [CLS] outputs and over
        the ``M`` masked patch outputs of every rank (``sinkhorn_knopp_teacher``), or DINO's
        centred softmax with the EMA centres (``softmax_center_teacher``)."""
        patch_out = head.patches(patch_tokens[masks])  # M×K
        tau = self.scalar("teacher_temp")
        if self.centering == "sinkhorn_knopp":
            return sinkhorn(cls_out, tau, 3), sinkhorn(patch_out, tau, 3), {}
        cls_probs = self.center.probs(cls_out, tau)
        patch_probs = self.patch_center.probs(patch_out, tau)
        return cls_probs, patch_probs, {"cls_out": cls_out, "patch_out": patch_out}

    def update_centres(self, carry: dict[str, Any]) -> None:
        """With ``centering``: the EMA of the [CLS] centre and of the patch centre, the mean
        over the masked patch outputs (``iBOTPatchLoss.update_center``); nothing with
        Sinkhorn-Knopp."""
        if self.centering == "centering":
            self.center.update(carry["cls_out"])
            self.patch_center.update(carry["patch_out"])

    def regularisers(self, student_cls: Tensor, n: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        """KoLeo on the student's [CLS] backbone features, each global view on its own (the
        code: "we don't apply koleo loss between cls tokens of a same image"):
        ``koleo_weight · (KoLeo(view 1) + KoLeo(view 2))``; logged as their mean."""
        if self.koleo_weight <= 0:
            return None, {}
        terms = koleo_loss(student_cls[:n]) + koleo_loss(student_cls[n:])
        return self.koleo_weight * terms, {"koleo": terms.detach() / 2}


@dataclass
class DINOv2Options(r.MethodOptions):
    """DINOv2's own options (``ssl_default_config.yaml`` with the paper's Sinkhorn-Knopp
    centring: K = 65536, one head for [CLS] and patches, τ_s = 0.1, τ_t 0.04 → 0.07 over 30 of
    100 epochs, teacher EMA 0.992 → 1, 2 + 8 crops, half of the images masked at 10–50 %,
    KoLeo 0.1, drop path 0.3 in every block; LayerScale 1e-5 is ``--vit-layer-scale``)."""

    out_dim: int = opt_out_dim(65536)
    separate_head: bool = opt(
        False,
        "DINOv2: the patch tokens get their own head (ibot.separate_head; true in the ViT-L/14 "
        "and ViT-g/14 recipes)",
    )
    patch_out_dim: int = opt(
        65536, "DINOv2: K of the patch tokens' own head (ibot.head_n_prototypes)"
    )
    temperature: float = r.temperature(0.1)
    teacher_temperature: float = opt_teacher_temperature(0.07)
    warmup_teacher_temperature: float = opt_warmup_teacher_temperature(0.04)
    teacher_temperature_warmup: float = opt_teacher_temperature_warmup(0.3)
    centering: str = opt(
        "sinkhorn_knopp",
        "DINOv2: the teacher's targets by sinkhorn_knopp (the paper §4) | centering (DINO's "
        "EMA centre; ssl_default_config.yaml)",
        choices=CENTERINGS,
    )
    center_momentum: float = opt_center_momentum(0.9)
    key_momentum: float = r.key_momentum(0.992)
    momentum_schedule: str = r.momentum_schedule("cosine")
    num_local_crops: int = r.num_local_crops(8)
    lambda1: float = opt_lambda1(1.0)
    lambda2: float = opt_lambda2(1.0)
    koleo_weight: float = opt(
        0.1, "DINOv2: weight of the KoLeo regulariser on the student's [CLS] features"
    )
    mask_probability: float = opt(
        0.5, "DINOv2: fraction of the global views masked (ibot.mask_sample_probability)"
    )
    mask_ratio_range: tuple[float, ...] = opt(
        (0.1, 0.5),
        "DINOv2: the range the masked views' patch fractions are spread over "
        "(ibot.mask_ratio_min_max)",
    )
    freeze_last_layer_niters: int = opt_freeze_last_layer_niters(0)
    drop_path: float = opt_drop_path(0.3)

    def validate(self, cfg: PretrainConfig) -> None:
        check_distillation_options(self, "dinov2", cfg)
        r.check_positive("patch_out_dim", self.patch_out_dim)
        r.check(
            self.centering in CENTERINGS,
            f"--centering must be sinkhorn_knopp or centering, got {self.centering!r}",
        )
        r.check(self.koleo_weight >= 0, f"--koleo-weight must be >= 0, got {self.koleo_weight}")
        r.check(
            0 < self.mask_probability <= 1,
            f"--mask-probability must be in (0, 1] (0.5), got {self.mask_probability}",
        )
        lo_hi = tuple(self.mask_ratio_range)
        r.check(
            len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] < 1,
            f"--mask-ratio-range takes MIN MAX with 0 <= MIN <= MAX < 1 (0.1 0.5), got {list(lo_hi)}",
        )


# DINOv2: DINO heads (3-layer GELU MLP, 2048 → 256, weight-normalised last layer with learned
# norms), a LayerScale ViT, DINOv2's multi-crop recipes, cosine LR.
@r.register_method(
    "dinov2",
    options=DINOv2Options,
    summary="DINOv2 (Oquab et al. 2023)",
    defaults={
        "head_layers": 3,
        "dim": 256,
        "hidden_dim": 2048,
        "augment": "dinov2-global1,dinov2-global2,dinov2-local",
        "lr_schedule": "cosine",
        "vit_layer_scale": 1e-5,
    },
)
def _dinov2(
    backbone: nn.Module, cfg: PretrainConfig, o: DINOv2Options, ctx: r.BuildContext
) -> DINOv2:
    return DINOv2(
        backbone,
        separate_head=o.separate_head,
        patch_out_dim=o.patch_out_dim,
        centering=o.centering,
        koleo_weight=o.koleo_weight,
        mask_probability=o.mask_probability,
        mask_ratio_range=(o.mask_ratio_range[0], o.mask_ratio_range[1]),
        **distillation_arguments(cfg, o),
    )
