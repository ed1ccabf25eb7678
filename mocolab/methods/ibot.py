"""iBOT: image BERT pre-training with an online tokenizer.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022 (§3, App. A).
DINO's self-distillation of the [CLS] token (the teacher an EMA of the student, its output
centred and sharpened, multi-crop) plus masked image modelling by self-distillation (MIM,
``L_MIM``): the student sees the two global views with blocks of patches replaced by a learned
mask token, and each masked patch token predicts the teacher's distribution of the same patch
of the *unmasked* view — the teacher is the online tokenizer. The patch tokens go through the
[CLS] token's head (``--shared_head true``, the paper's choice), their teacher outputs are
centred by a patch-level centre (``center2``) and sharpened by their own temperature;
``L = λ1·L_[CLS] + λ2·L_MIM``.

Follows bytedance/ibot at da316d8 (``main_ibot.py`` ``iBOTLoss`` and ``train_one_epoch``,
``models/head.py`` ``iBOTHead``, ``models/vision_transformer.py``, ``loader.py``
``ImageFolderMask``) with the README's ViT-S/16 command as defaults (``--shared_head true
--norm_last_layer false --teacher_temp 0.07 --local_crops_number 10 --pred_ratio 0 0.3
--pred_ratio_var 0 0.2``, crops 0.25–1 / 0.05–0.25: the ``ibot-*`` recipes). Masks are
:func:`mocolab.masking.block_masks` with :func:`~mocolab.masking.ibot_mask_counts`, drawn for
the whole batch on the device (the loader's minimum block ``(min(H, W) // 3)²``); only the
global views are masked, and only for the student.

Where mocolab differs: the teacher temperatures rise per step (the code indexes its
``np.linspace`` by epoch); ``--clip-grad`` clips each tensor's gradient, as the code; the
frozen last layer gets a zero gradient instead of none; the LR's cosine ends at 0 (the code's
at ``--min_lr`` 1e-6). Not offered: ``--shared_head false`` (the argparse default, which gives
the student's patch tokens their own last layer while the teacher's keep the shared one — the
README's recipes all set it true), ``--pred_shape rand`` and ``--pred_start_epoch`` (for Swin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..heads import DINOHead, TokenHeads
from ..losses import ibot_patch_loss, self_distillation_loss
from ..masking import block_masks, ibot_mask_counts
from ..momentum import Center, MomentumEncoder
from ..option import opt
from ..vit import init_trunc_normal_
from . import registry as r
from .base import LossOutput, Method, encoder
from .dino import check_teacher_options, teacher_temperature
from .multicrop import encode_views, multi_crop_recipes

if TYPE_CHECKING:
    from ..config import PretrainConfig


def init_vit_as_dino_(vit: Any, cls_std: float | None = 0.02) -> None:
    """DINO's, iBOT's and DINOv2's ViT initialisation (``vision_transformer.py``
    ``_init_weights`` / ``init_weights_vit_timm``): linear layers ``N(0, 0.02²)`` truncated at
    ±2, biases 0, LayerNorms 1 and 0; the patch projection PyTorch's default (their init skips
    the convolution); the [CLS] token ``N(0, cls_std²)`` truncated (iBOT 0.02; DINOv2 keeps
    mocolab's ``N(0, 10⁻⁶)``: ``cls_std=None``). A learned position embedding is already
    ``N(0, 0.02²)`` truncated."""
    init_trunc_normal_(vit, patch_embed=False)
    vit.patch_embed.proj.reset_parameters()
    if cls_std is not None:
        nn.init.trunc_normal_(vit.cls_token, std=cls_std, a=-2.0, b=2.0)


def distillation_head(in_dim: int, out_dim: int, hidden_dim: int, dim: int, layers: int,
                      norm_last_layer: bool) -> DINOHead:  # fmt: skip
    """A :class:`~mocolab.heads.DINOHead` initialised as iBOT's and DINOv2's: the MLP's linear
    layers ``N(0, 0.02²)`` truncated, biases 0 (``_init_weights``); the last layer's ``V``
    PyTorch's default."""
    head = DINOHead(in_dim, out_dim, hidden_dim, dim, num_layers=layers,
                    norm_last_layer=norm_last_layer)  # fmt: skip
    init_trunc_normal_(head.mlp)
    return head


class IBOT(Method):
    """iBOT: [CLS] self-distillation plus masked patch self-distillation.

    A variant changes the hooks :meth:`sample_masks` (which patches of the global views are
    masked), :meth:`teacher_distributions` (how the teacher's outputs become targets) and
    :meth:`regularisers` (extra loss terms): DINOv2 (:mod:`mocolab.methods.dinov2`) is iBOT
    with other hooks.

    Args:
        backbone: a :class:`mocolab.vit.VisionTransformer` (initialised here as iBOT's).
        dim: the head's bottleneck (256).
        out_dim: K, the head's outputs (8192).
        hidden_dim: the head's MLP width (2048).
        head_layers: its layers (3).
        norm_last_layer: the last layer's row norms fixed to 1 (False in the ViT-S recipe).
        patch_head: a separate head for the patch tokens (DINOv2's ``ibot.separate_head``;
            iBOT shares the [CLS] head); ``patch_out_dim`` its K.
        num_local: small views besides the 2 global ones (10).
        momentum, momentum_schedule: the teacher's EMA (0.996 → 1, cosine).
        temperature: τ_s of the student (0.1).
        teacher_temperature, warmup_teacher_temperature: τ_t of the [CLS] targets, linear from
            the second to the first over the first ``teacher_temperature_warmup`` of training
            (0.04 → 0.07 over 30 of 800 epochs).
        teacher_patch_temperature, warmup_teacher_patch_temperature: the same for the patch
            targets (0.04 → 0.07).
        center_momentum: m of both centres (0.9).
        lambda1, lambda2: the weights of ``L_[CLS]`` and ``L_MIM`` (1, 1).
        pred_ratio, pred_ratio_var: the masked fractions (``(0, 0.3)`` ± ``(0, 0.2)``: half of
            the images unmasked, the others 10–50 %).
        freeze_last_layer_niters: steps with the last layer frozen (the code: one epoch).
        drop_path: the student's stochastic depth, rising to it over the blocks (0.1).

    Views: ``[global1, global2, local × num_local]`` (the two global views of one size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        head_layers: int = 3,
        norm_last_layer: bool = False,
        patch_head: bool = False,
        patch_out_dim: int | None = None,
        num_local: int = 10,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
        temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        teacher_temperature_warmup: float = 0.0375,
        center_momentum: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        pred_ratio: tuple[float, ...] = (0.0, 0.3),
        pred_ratio_var: tuple[float, ...] = (0.0, 0.2),
        freeze_last_layer_niters: int = 0,
        drop_path: float = 0.1,
    ) -> None:
        super().__init__()
        vit: Any = backbone
        self.init_backbone(vit)
        d = vit.num_features
        patch_out_dim = patch_out_dim or out_dim
        heads = TokenHeads(
            distillation_head(d, out_dim, hidden_dim, dim, head_layers, norm_last_layer),
            distillation_head(d, patch_out_dim, hidden_dim, dim, head_layers, norm_last_layer)
            if patch_head
            else None,
        )
        self.query_encoder = encoder(backbone, heads)  # the student
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # iBOT's masked_embed: zeros
        self.teacher_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        self.set_drop_path(vit, drop_path)  # the student's blocks only (the teacher has none)
        self.center = Center(out_dim, center_momentum)  # [CLS]
        self.patch_center = Center(patch_out_dim, center_momentum)  # iBOT's center2
        self.num_views = 2 + num_local
        self.temperature = temperature
        self.lambdas = (lambda1, lambda2)
        self.pred_ratio = tuple(pred_ratio)
        self.pred_ratio_var = tuple(pred_ratio_var)
        self.freeze_last_layer_niters = freeze_last_layer_niters
        self.schedules = {
            "teacher_temp": (warmup_teacher_temperature, teacher_temperature),
            "teacher_patch_temp": (warmup_teacher_patch_temperature, teacher_patch_temperature),
        }
        self.teacher_temperature_warmup = teacher_temperature_warmup
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken (resume)
        self.register_buffer("teacher_temp", torch.tensor(float(warmup_teacher_temperature)))
        self.register_buffer(
            "teacher_patch_temp", torch.tensor(float(warmup_teacher_patch_temperature))
        )

    # --- hooks of the variants -------------------------------------------------------------

    def init_backbone(self, vit: Any) -> None:
        """iBOT's ViT initialisation (:func:`init_vit_as_dino_`, [CLS] token ``N(0, 0.02²)``)."""
        init_vit_as_dino_(vit, cls_std=0.02)

    def set_drop_path(self, vit: Any, rate: float) -> None:
        """The student's stochastic depth: ``linspace(0, rate, depth)`` over the blocks."""
        vit.set_drop_path(rate, uniform=False)

    def sample_masks(
        self, n: int, grid: tuple[int, int], generator: torch.Generator | None, device: Any
    ) -> Tensor:
        """``n×L`` booleans: iBOT's blockwise masks (``loader.py``): a ratio per image from
        ``pred_ratio ± pred_ratio_var``, blocks of at least ``(min(H, W) // 3)²`` patches."""
        h, w = grid
        counts = ibot_mask_counts(
            n,
            h * w,
            self.pred_ratio,
            self.pred_ratio_var,
            generator=generator,
            device=None if generator is not None else device,
        )
        masks = block_masks(counts, grid, min_patches=(min(h, w) // 3) ** 2, generator=generator)
        return masks.flatten(1)

    def teacher_distributions(
        self, head: TokenHeads, patch_tokens: Tensor, cls_out: Tensor, masks: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The targets from the teacher (no gradient): ``P_t = softmax((g_t − c) / τ_t)`` of the
        [CLS] outputs ``cls_out`` (``2N×K``) and of the masked patches (``M×K``, with
        ``center2`` and τ_t of the patches), and what the centres need after the step: the
        [CLS] outputs and each image's mean over *all* its patch outputs (``iBOTLoss
        .update_center``'s ``teacher_patch.mean(1)``)."""
        patches = head.patches(patch_tokens)  # 2N×L×K, every patch: the centre sees them all
        cls_probs = self.center.probs(cls_out, self.scalar("teacher_temp"))
        patch_probs = self.patch_center.probs(patches[masks], self.scalar("teacher_patch_temp"))
        return cls_probs, patch_probs, {"cls_out": cls_out, "patch_mean": patches.mean(dim=1)}

    def update_centres(self, carry: dict[str, Any]) -> None:
        """EMA of the [CLS] centre and of ``center2`` (iBOT: both, every step)."""
        self.center.update(carry["cls_out"])
        self.patch_center.update(carry["patch_mean"])

    def regularisers(self, student_cls: Tensor, n: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Extra loss terms on the student's [CLS] backbone features of the global views
        (``2N×D``, view 1 then view 2): none in iBOT."""
        return None, {}

    # --- the step --------------------------------------------------------------------------

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.teacher_encoder

    def view_recipes(self, augment: str) -> list[str]:
        return multi_crop_recipes(augment, 2, self.num_views - 2)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        first, second, *local = views
        n = first.shape[0]
        images = torch.cat([first, second])  # 2N×C×S×S, the global views
        vit: Any = self.backbone
        p = vit.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        masks = self.sample_masks(2 * n, grid, generator, images.device)  # 2N×L, the student's
        frozen = self.scalar("step") < self.freeze_last_layer_niters
        heads: Any = self.query_encoder.head
        with torch.no_grad():  # the teacher: the unmasked global views
            t_vit: Any = self.teacher_encoder.module.backbone
            t_heads: Any = self.teacher_encoder.module.head
            t_tokens = t_vit.forward_features(images)  # 2N×(1+L)×D
            cls_probs, patch_probs, carry = self.teacher_distributions(
                t_heads, t_tokens[:, 1:], t_heads(t_tokens[:, 0]), masks
            )
        tokens = vit.forward_features(
            images, mask=masks, mask_token=self.mask_token, generator=generator
        )  # 2N×(1+L)×D, masked patches replaced by the mask token
        student = list(heads(tokens[:, 0], frozen).chunk(2))  # 2 × N×K
        student += encode_views(
            lambda x: heads(vit.forward_features(x, generator=generator)[:, 0], frozen), local
        )  # num_local × N×K, never masked
        cls_loss = self_distillation_loss(student, list(cls_probs.chunk(2)), self.temperature)
        patch_out = heads.patches(tokens[:, 1:][masks], frozen)  # M×K, the masked patches
        patch_loss = ibot_patch_loss(patch_out, patch_probs, masks, self.temperature)
        lambda1, lambda2 = self.lambdas
        loss = lambda1 * cls_loss + lambda2 * patch_loss
        extra, metrics = self.regularisers(tokens[:, 0], n)
        if extra is not None:
            loss = loss + extra
        with torch.no_grad():
            metrics = {
                "cls": cls_loss.detach(),
                "patch": patch_loss.detach(),
                **metrics,
                "masked": masks.float().mean(),
                "teacher_temp": self.teacher_temp.detach().clone(),
                "teacher_entropy": -torch.special.xlogy(cls_probs, cls_probs).sum(1).mean(),
            }
        return LossOutput(loss, metrics, carry={k: v.detach() for k, v in carry.items()})

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """The centres, the teacher's EMA, and the next step's teacher temperatures."""
        self.update_centres(out.carry)
        m = self.teacher_encoder.step(self.query_encoder, step, total_steps)
        self.set_scalar("step", step + 1)
        for name, (start, end) in self.schedules.items():
            value = teacher_temperature(
                step + 1, total_steps, start, end, self.teacher_temperature_warmup
            )
            self.set_scalar(name, value)
        return {"momentum": m}


# -- options shared by the masked self-distillation methods (one name, one help text) -------
def opt_lambda1(default: float) -> Any:
    return opt(
        default, "weight of the [CLS] self-distillation loss (iBOT λ1; DINOv2 dino.loss_weight)"
    )


def opt_lambda2(default: float) -> Any:
    return opt(default, "weight of the masked patch loss (iBOT λ2; DINOv2 ibot.loss_weight)")


def opt_drop_path(default: float) -> Any:
    return opt(
        default,
        "stochastic depth of the student ViT's blocks (iBOT 0.1, rising over the blocks; "
        "DINOv2 0.3 in every block)",
    )


def opt_out_dim(default: int) -> Any:
    return opt(default, "K, the head's output dimension (the official --out_dim)")


def opt_teacher_temperature(default: float) -> Any:
    return opt(default, "teacher τ_t after warmup")


def opt_warmup_teacher_temperature(default: float) -> Any:
    return opt(default, "teacher τ_t at the start")


def opt_teacher_temperature_warmup(default: float) -> Any:
    return opt(
        default, "fraction of training over which τ_t rises linearly (0.1: 30 of 300 epochs)"
    )


def opt_center_momentum(default: float) -> Any:
    return opt(default, "momentum of the teacher center")


def opt_freeze_last_layer_niters(default: int) -> Any:
    return opt(
        default,
        "steps with the head's last layer frozen (the official --freeze_last_layer: one epoch)",
    )


def check_distillation_options(o: Any, method: str, cfg: PretrainConfig) -> None:
    """The checks iBOT and DINOv2 share."""
    r.check_vit(cfg, method)
    check_teacher_options(o)
    r.check(0 <= o.drop_path < 1, f"--drop-path is a probability in [0, 1), got {o.drop_path}")
    r.check(
        o.lambda1 >= 0 and o.lambda2 >= 0,
        f"--lambda1 and --lambda2 must be >= 0, got {o.lambda1} and {o.lambda2}",
    )


def distillation_arguments(cfg: PretrainConfig, o: Any) -> dict[str, Any]:
    """The constructor arguments iBOT and DINOv2 share, from the run's config and the method's
    options (the heads' sizes default to the official ViT-S recipe's)."""
    return dict(
        dim=cfg.dim or 256,
        out_dim=o.out_dim,
        hidden_dim=cfg.hidden_dim or 2048,
        head_layers=cfg.head_layers or 3,
        num_local=o.num_local_crops,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
        temperature=o.temperature,
        teacher_temperature=o.teacher_temperature,
        warmup_teacher_temperature=o.warmup_teacher_temperature,
        teacher_temperature_warmup=o.teacher_temperature_warmup,
        center_momentum=o.center_momentum,
        lambda1=o.lambda1,
        lambda2=o.lambda2,
        freeze_last_layer_niters=o.freeze_last_layer_niters,
        drop_path=o.drop_path,
    )


@dataclass
class IBOTOptions(r.MethodOptions):
    """iBOT's own options (the README's ViT-S/16 command: K = 8192 shared by the [CLS] and
    patch tokens, last layer not normalised, τ_s = 0.1, τ_t 0.04 → 0.07 for both over 30 of 800
    epochs, centres' momentum 0.9, teacher EMA 0.996 → 1, 2 + 10 crops, masks of 0 or 0.3 ± 0.2
    of the patches, λ1 = λ2 = 1, drop path 0.1)."""

    out_dim: int = opt_out_dim(8192)
    norm_last_layer: bool = opt(
        False,
        "iBOT: the head's last-layer row norms fixed to 1 (--norm_last_layer; false in the "
        "ViT-S/16 recipe: learned)",
    )
    temperature: float = r.temperature(0.1)
    teacher_temperature: float = opt_teacher_temperature(0.07)
    warmup_teacher_temperature: float = opt_warmup_teacher_temperature(0.04)
    teacher_patch_temperature: float = opt(
        0.07, "iBOT: teacher τ of the patch tokens after warmup (--teacher_patch_temp)"
    )
    warmup_teacher_patch_temperature: float = opt(
        0.04, "iBOT: teacher τ of the patch tokens at the start (--warmup_teacher_patch_temp)"
    )
    teacher_temperature_warmup: float = opt_teacher_temperature_warmup(0.0375)
    center_momentum: float = opt_center_momentum(0.9)
    key_momentum: float = r.key_momentum(0.996)
    momentum_schedule: str = r.momentum_schedule("cosine")
    num_local_crops: int = r.num_local_crops(10)
    lambda1: float = opt_lambda1(1.0)
    lambda2: float = opt_lambda2(1.0)
    pred_ratio: tuple[float, ...] = opt(
        (0.0, 0.3),
        "iBOT: masked fractions of a global view's patches, one picked per image (--pred_ratio)",
    )
    pred_ratio_var: tuple[float, ...] = opt(
        (0.0, 0.2), "iBOT: the ± spread of each --pred-ratio (--pred_ratio_var)"
    )
    freeze_last_layer_niters: int = opt_freeze_last_layer_niters(0)
    drop_path: float = opt_drop_path(0.1)

    def validate(self, cfg: PretrainConfig) -> None:
        check_distillation_options(self, "ibot", cfg)
        for name in ("teacher_patch_temperature", "warmup_teacher_patch_temperature"):
            value = getattr(self, name)
            r.check(value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")
        ratios, spreads = tuple(self.pred_ratio), tuple(self.pred_ratio_var)
        r.check(
            len(ratios) == len(spreads) >= 1
            and all(0 <= v <= p and p + v < 1 for p, v in zip(ratios, spreads)),
            f"--pred-ratio {list(ratios)} and --pred-ratio-var {list(spreads)} need the same "
            "number of values, each spread <= its ratio and ratio + spread < 1 (0 0.3 and 0 0.2)",
        )


# iBOT: DINO's head (3-layer GELU MLP, 2048 → 256 bottleneck, weight-normalised last layer)
# shared by the [CLS] and patch tokens, iBOT's multi-crop recipes, cosine LR.
@r.register_method(
    "ibot",
    options=IBOTOptions,
    summary="iBOT (Zhou et al. 2022)",
    defaults={
        "head_layers": 3,
        "dim": 256,
        "hidden_dim": 2048,
        "augment": "ibot-global1,ibot-global2,ibot-local",
        "lr_schedule": "cosine",
    },
)
def _ibot(backbone: nn.Module, cfg: PretrainConfig, o: IBOTOptions, ctx: r.BuildContext) -> IBOT:
    return IBOT(
        backbone,
        norm_last_layer=o.norm_last_layer,
        teacher_patch_temperature=o.teacher_patch_temperature,
        warmup_teacher_patch_temperature=o.warmup_teacher_patch_temperature,
        pred_ratio=tuple(o.pred_ratio),
        pred_ratio_var=tuple(o.pred_ratio_var),
        **distillation_arguments(cfg, o),
    )
