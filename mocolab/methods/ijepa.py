"""I-JEPA: the image-based joint-embedding predictive architecture.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023 (§3, App. A and C). From one large context block of an image, a
narrow predictor ViT predicts the representations of four target blocks of the same image, as
a target encoder (the EMA of the context encoder, momentum 0.996 → 1 linearly) gives them.
The context encoder sees only the context patches (the targets removed from its block); the
predictor gets the context tokens plus a mask token with the position embedding of each target
patch, once per target block. Targets are the target encoder's patch tokens of the full image
after a LayerNorm without parameters. No augmentation but a random resized crop (30–100 %).

Follows facebookresearch/ijepa at 52c1ae9 (``src/train.py``, ``src/masks/multiblock.py``,
``src/models/vision_transformer.py``, ``src/helper.py``, ``configs/in1k_vith14_ep300.yaml``).
Where the paper and the code differ, the code is followed: the loss is ``F.smooth_l1_loss``
(the paper writes an L2 distance). Where mocolab differs: the encoder is mocolab's ViT, which
has a [CLS] token: it is kept in the sequence of both encoders (an extra token that no loss
reads, like a register) so that training and evaluation see the same sequence; I-JEPA's ViT
has none. Evaluation averages the patch tokens (``--vit-pool avg``), as I-JEPA's linear probes
do. The LR schedule is mocolab's (warmup from 0, cosine to 0; the code warms up from
``start_lr`` 2e-4 and ends at ``final_lr`` 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import ijepa_loss
from ..masking import MultiBlockMasks, jepa_block_size, multiblock_masks
from ..momentum import MomentumEncoder
from ..option import opt
from ..vit import PatchPredictor, gather_tokens, init_trunc_normal_, rescale_blocks_
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


class IJEPA(Method):
    """I-JEPA.

    Args:
        backbone: a :class:`mocolab.vit.VisionTransformer` (the context encoder).
        predictor_dim, predictor_depth: the predictor ViT's width and blocks (384 and 12 in
            the released configs; the code's default depth is 6).
        predictor_heads: its attention heads (default: the encoder's, as the code).
        num_targets: target blocks per image (4).
        target_scale, target_aspect: their scale and aspect ranges ((0.15, 0.2), (0.75, 1.5)).
        context_scale: the context block's scale range ((0.85, 1.0); its aspect is 1).
        min_keep: a block holds more than this many patches (10).
        allow_overlap: keep the targets in the context (off).
        momentum, momentum_schedule: the target encoder's EMA (0.996, ``"linear"`` to 1).

    The encoder and the predictor are initialised as the code's ``init_model``: truncated
    normal (std 0.02), each block's output projections divided by ``√(2·depth)``.
    """

    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        *,
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        predictor_heads: int | None = None,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_keep: int = 10,
        allow_overlap: bool = False,
        momentum: float = 0.996,
        momentum_schedule: str = "linear",
    ) -> None:
        super().__init__()
        vit: Any = backbone
        init_trunc_normal_(vit)  # src/helper.py init_model, then the ViT's fix_init_weight
        rescale_blocks_(vit.blocks)
        self.query_encoder = encoder(backbone, nn.Identity())  # the context encoder
        # the target encoder, θ̄ = θ at start
        self.target_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        heads = predictor_heads or vit.blocks[0].attn.num_heads
        self.predictor = PatchPredictor(
            vit.patch_embed.grid,
            vit.num_features,
            predictor_dim,
            predictor_depth,
            heads,
            vit.num_features,
        )
        init_trunc_normal_(self.predictor)
        rescale_blocks_(self.predictor.blocks)
        self.masking = {
            "num_targets": num_targets,
            "target_scale": tuple(target_scale),
            "target_aspect": tuple(target_aspect),
            "context_scale": tuple(context_scale),
            "min_keep": min_keep,
            "allow_overlap": allow_overlap,
        }

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.target_encoder

    def sample_masks(self, x: Tensor, generator: torch.Generator | None = None) -> MultiBlockMasks:
        """The context and target blocks of a batch (:func:`~mocolab.masking.multiblock_masks`)."""
        return multiblock_masks(
            x.shape[0],
            self.backbone.patch_embed.grid,
            generator=generator,
            device=x.device if generator is None else None,
            **self.masking,
        )

    @torch.no_grad()
    def targets(self, x: Tensor, masks: MultiBlockMasks) -> Tensor:
        """The code's ``forward_target``: the target encoder's patch tokens of the full image,
        layer-normed without parameters, of each target block: ``(M·N)×Kt×D``, block-major
        (block 0 of every image first, as ``apply_masks``)."""
        n, m, kt = masks.targets.shape
        h = self.target_encoder.module.backbone.forward_features(x)[:, 1:]  # N×L×D
        h = F.layer_norm(h, (h.shape[-1],))
        return gather_tokens(h.repeat(m, 1, 1), masks.targets.transpose(0, 1).reshape(m * n, kt))

    def predictions(self, x: Tensor, masks: MultiBlockMasks) -> Tensor:
        """The code's ``forward_context``: the context encoder on the context patches, then the
        predictor once per target block: ``(M·N)×Kt×D``, block-major."""
        n, m, kt = masks.targets.shape
        vit: Any = self.backbone
        z = vit.forward_features(x, keep=masks.context)[:, 1:]  # the context tokens: N×Kc×D
        return self.predictor(
            z.repeat(m, 1, 1),
            masks.context.repeat(m, 1),
            masks.targets.transpose(0, 1).reshape(m * n, kt),
        )

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        masks = self.sample_masks(x, generator)  # context: N×Kc, targets: N×M×Kt
        loss = ijepa_loss(self.predictions(x, masks), self.targets(x, masks))
        sizes = [float(masks.context.shape[1]), float(masks.targets.shape[2])]
        counts = torch.tensor(sizes, device=loss.device)
        return LossOutput(loss, {"context_patches": counts[0], "target_patches": counts[1]})

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """``θ̄ ← m·θ̄ + (1 − m)·θ`` with m ramped linearly from 0.996 to 1."""
        return {"momentum": self.target_encoder.step(self.query_encoder, step, total_steps)}


def check_blocks(grid: int, o: IJEPAOptions) -> None:
    """Every block size the sampler can draw on a ``grid×grid`` patch grid holds more than
    ``--min-keep`` patches (the official sampler would loop forever on a smaller one)."""
    for what, scale, aspect in (
        ("target", o.target_scale, o.target_aspect),
        ("context", o.context_scale, (1.0, 1.0)),
    ):
        for i in range(101):
            h, w = jepa_block_size(i / 100, grid, scale, aspect)
            if h * w <= o.min_keep or min(h, w) < 1:
                raise ConfigError(
                    f"--method ijepa: a {what} block can be {h}x{w} patches on this {grid}x{grid} "
                    f"grid, not more than --min-keep {o.min_keep}; lower --min-keep, raise "
                    f"--{what}-scale or use smaller patches (--patch-size)"
                )


def _pair(name: str, value: tuple[float, float], low: float, high: float) -> None:
    r.check(
        len(value) == 2 and low < value[0] <= value[1] <= high,
        f"--{name.replace('_', '-')} takes MIN MAX with {low} < MIN <= MAX <= {high}, got {value}",
    )


@dataclass
class IJEPAOptions(r.MethodOptions):
    """I-JEPA's own options (the released ``configs/in1k_vith14_ep300.yaml``: predictor 384 × 12,
    4 targets of scale 0.15–0.2 and aspect 0.75–1.5, a context of scale 0.85–1, min_keep 10,
    EMA 0.996 → 1 linearly)."""

    predictor_dim: int = opt(384, "I-JEPA: width of the predictor ViT (pred_emb_dim)")
    predictor_depth: int = opt(
        12, "I-JEPA: blocks of the predictor ViT (pred_depth: 12 in the released configs)"
    )
    predictor_heads: int | None = opt(
        None, "I-JEPA: attention heads of the predictor (default: the encoder's)"
    )
    num_targets: int = opt(4, "I-JEPA: target blocks per image (num_pred_masks)")
    target_scale: tuple[float, float] = opt(
        (0.15, 0.2), "I-JEPA: target block area, a fraction of the image (pred_mask_scale)"
    )
    target_aspect: tuple[float, float] = opt(
        (0.75, 1.5), "I-JEPA: target block aspect h/w (aspect_ratio)"
    )
    context_scale: tuple[float, float] = opt(
        (0.85, 1.0), "I-JEPA: context block area before the targets are removed (enc_mask_scale)"
    )
    min_keep: int = opt(10, "I-JEPA: a block holds more than this many patches (min_keep)")
    allow_overlap: bool = opt(False, "I-JEPA: keep the targets in the context (allow_overlap)")
    key_momentum: float = r.key_momentum(0.996)
    momentum_schedule: str = r.momentum_schedule("linear")

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_vit(cfg, "ijepa")
        for name in ("predictor_dim", "predictor_depth", "predictor_heads", "num_targets"):
            r.check_positive(name, getattr(self, name))
        r.check(
            self.predictor_dim % 4 == 0,
            f"--predictor-dim {self.predictor_dim} must be a multiple of 4 (its sin-cos position "
            "embedding)",
        )
        r.check(
            self.predictor_heads is None or self.predictor_dim % self.predictor_heads == 0,
            f"--predictor-heads {self.predictor_heads} must divide --predictor-dim "
            f"{self.predictor_dim}",
        )
        _pair("target_scale", self.target_scale, 0, 1)
        _pair("context_scale", self.context_scale, 0, 1)
        _pair("target_aspect", self.target_aspect, 0, float("inf"))
        r.check(self.min_keep >= 0, f"--min-keep must be >= 0, got {self.min_keep}")
        r.check_momentum(self.key_momentum, self.momentum_schedule)


# I-JEPA: one crop, context and target blocks, predictor ViT, EMA target encoder; the
# features of the evaluations average the patch tokens.
@r.register_method(
    "ijepa",
    options=IJEPAOptions,
    summary="I-JEPA (Assran et al. 2023)",
    defaults={
        "head_layers": 1,
        "dim": 128,
        "augment": "ijepa",
        "lr_schedule": "cosine",
        "vit_pool": "avg",
    },
)
def _ijepa(backbone: nn.Module, cfg: PretrainConfig, o: IJEPAOptions, ctx: r.BuildContext) -> IJEPA:
    vit: Any = backbone
    check_blocks(vit.patch_embed.grid, o)
    heads = o.predictor_heads or vit.blocks[0].attn.num_heads
    if o.predictor_dim % heads:
        raise ConfigError(
            f"--method ijepa: the predictor takes the encoder's {heads} heads, which do not "
            f"divide --predictor-dim {o.predictor_dim}; set --predictor-heads"
        )
    return IJEPA(
        backbone,
        predictor_dim=o.predictor_dim,
        predictor_depth=o.predictor_depth,
        predictor_heads=o.predictor_heads,
        num_targets=o.num_targets,
        target_scale=o.target_scale,
        target_aspect=o.target_aspect,
        context_scale=o.context_scale,
        min_keep=o.min_keep,
        allow_overlap=o.allow_overlap,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
    )
