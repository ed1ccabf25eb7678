"""Vision Transformers (Dosovitskiy et al. 2021) as MoCo v3 trains them, with timm's key names.

The parameters are named as timm's ``VisionTransformer`` names them (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` /
``mlp.fc1`` / ``mlp.fc2``, ``norm``), so a backbone's state dict loads strictly into
``timm.create_model("vit_small_patch16_224", num_classes=0)`` and gives the same features, and
the official MoCo v3 ViT checkpoints (timm names under ``module.base_encoder.``) fit it.

MoCo v3 choices (Chen, Xie & He 2021, §4 and App.): a fixed 2-D sin-cos position embedding,
Xavier-uniform linear layers (the q, k, v matrices each on its own), and optionally a frozen
random patch projection ("stop-grad-conv1"), which the paper finds stabilises training.

For the masked-image methods: the encoder runs on a subset of the patch tokens
(``forward_features(x, keep=…)``: MAE's visible 25 %, I-JEPA's context block, MSN's dropped
patches), :class:`PatchPredictor` is the light ViT that predicts the other patches (MAE's
decoder, I-JEPA's predictor), and :func:`patchify`, :func:`gather_tokens` and the official
initialisations (:func:`init_xavier_`, :func:`init_trunc_normal_`, :func:`rescale_blocks_`)
sit beside them.

For the masked self-distillation methods (iBOT, DINOv2): masked patch tokens replaced by a
learned mask token before the blocks (``forward_features(x, mask=…, mask_token=…)``, every
token returned, the [CLS] token first), LayerScale (``layer_scale``: CaiT's per-channel scale
of each residual branch, DINOv2's ``dinov2/layers/layer_scale.py``; timm's ``ls1`` / ``ls2``
names) and stochastic depth (:meth:`VisionTransformer.set_drop_path`, drawn from the run's
generator).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

# name: (embedding dim D, depth, heads), as timm / DeiT.
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
POS_EMBEDS = ("sincos", "learned")
#: What a ViT's features are: ``token``, the [CLS] token after the final norm (MoCo v3, DINO,
#: MAE's linear probe, MSN); ``avg``, the mean of the patch tokens after it (I-JEPA's evaluation;
#: timm's ``global_pool="avg", fc_norm=False``).
GLOBAL_POOLS = ("token", "avg")


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """The tokens ``index`` (``N×K``) of each sequence ``x`` (``N×L×D``): ``N×K×D`` (MAE's
    ``torch.gather`` of the kept patches; I-JEPA's ``apply_masks`` for one mask)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``N×C×H×W`` images → ``N×L×(p²·C)`` patches, row-major, each patch's pixels in MAE's
    order (row, column, channel: ``models_mae.py`` ``patchify``'s ``nchpwq->nhwpqc``)."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"images of {h}x{w} px are not a whole number of {p}-px patches")
    x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """The inverse of :func:`patchify` for square images: ``N×L×(p²·C)`` → ``N×C×H×W``."""
    n, length, _ = patches.shape
    g, p = math.isqrt(length), patch_size
    x = patches.reshape(n, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, g * p, g * p)


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding, ``1×(1+grid²)×dim``: a quarter of the
    channels each ``sin``/``cos`` of the patch row and of the column at frequencies
    ``1/temperature^(i/(dim/4))``; the [CLS] token's row is zero (``build_2d_sincos_position_embedding``
    of the official ``vits.py``)."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a dim divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]  # L×dim/4
    out_h = grid_h.flatten()[:, None] * omega[None]
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # L×dim
    return torch.cat([torch.zeros(1, dim), pos]).unsqueeze(0)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p×p`` patches → tokens: a ``p×p`` convolution with stride ``p``."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # N×L×D


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(q·kᵀ/√d)·v`` per head, with one qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each N×H×L×d
        return q, k, v

    def attention(self, x: Tensor) -> Tensor:
        """The attention weights ``softmax(q·kᵀ/√d)``, ``N×H×L×L`` (each row sums to 1)."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)  # N×H×L×d, fused where available
        return self.proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """``fc1 → GELU → fc2`` with hidden width ``4·dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch, ``x·γ`` with ``γ`` initialised to
    ``init_value`` (Touvron et al. 2021, CaiT §2.1; DINOv2's ``dinov2/layers/layer_scale.py``,
    1e-5 in its configs' ``student.layerscale``; timm's ``LayerScale``, parameter ``gamma``)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Stochastic depth (Huang et al. 2016) of a residual branch ``x`` (``N×…``): each sample's
    branch is kept with probability ``1 − rate`` and then scaled by ``1/(1 − rate)``, else
    zeroed (DINO's, iBOT's and DINOv2's ``drop_path``: ``floor(1 − rate + U(0, 1))``); the
    uniforms come from ``generator`` (the run's: a resumed run drops the same paths)."""
    if rate <= 0:
        return x
    keep = 1.0 - rate
    u = torch.rand(
        (x.shape[0],) + (1,) * (x.ndim - 1), generator=generator, device=x.device
    )  # N×1×1
    return x * (torch.floor(keep + u) / keep).to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``layer_scale`` (> 0) scales each branch by a :class:`LayerScale` (``ls1``, ``ls2``)
    initialised to it; :attr:`drop_path` (set by :meth:`VisionTransformer.set_drop_path`, 0 by
    default) drops each branch per sample in training (:func:`drop_path`)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1: nn.Module = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.ls2: nn.Module = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.drop_path = 0.0

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        rate = self.drop_path if self.training else 0.0
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), rate, generator)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), rate, generator)


def replace_masked(x: Tensor, mask: Tensor, token: Tensor) -> Tensor:
    """Patch embeddings ``x`` (``N×L×D``) with the masked ones (``mask``, ``N×L`` booleans)
    replaced by ``token`` (``1×D`` or ``D``): iBOT's ``mask_model`` and DINOv2's
    ``prepare_tokens_with_masks`` (``torch.where(masks, mask_token, x)``), before the position
    embedding is added."""
    return torch.where(mask.unsqueeze(-1), token.reshape(1, 1, -1).to(x.dtype), x)


class VisionTransformer(nn.Module):
    """A ViT whose output is the [CLS] token after the final LayerNorm: ``N×C×S×S → N×D``.

    Args:
        image_size: S, the side of the input (a multiple of ``patch_size``).
        patch_size: p; the sequence has ``(S/p)²`` patch tokens and one [CLS] token.
        in_channels: 1 for grayscale images, 3 for RGB.
        dim, depth, num_heads: D, the number of blocks and of attention heads.
        pos_embed: ``"sincos"`` (fixed 2-D sin-cos, MoCo v3; a buffer) or ``"learned"``
            (a parameter, truncated-normal initialised, as DeiT / DINO).
        freeze_patch_embed: MoCo v3's random patch projection: ``patch_embed`` keeps its
            random initialisation (``requires_grad`` False).
        global_pool: the features :meth:`forward` returns (:data:`GLOBAL_POOLS`): ``"token"``,
            the [CLS] token; ``"avg"``, the mean of the patch tokens (I-JEPA).
        layer_scale: the initial value of every block's :class:`LayerScale` (DINOv2: 1e-5);
            0: none (the blocks have no ``ls1`` / ``ls2`` parameters).

    The model has attribute ``num_features`` (D).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        freeze_patch_embed: bool = False,
        global_pool: str = "token",
        layer_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(
                f"unknown global_pool {global_pool!r}; choose one of {', '.join(GLOBAL_POOLS)}"
            )
        self.global_pool = global_pool
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image side {image_size} is not a multiple of the patch size {patch_size}"
            )
        if pos_embed not in POS_EMBEDS:
            raise ValueError(
                f"unknown pos_embed {pos_embed!r}; choose one of {', '.join(POS_EMBEDS)}"
            )
        self.num_features = dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        num_tokens = 1 + self.patch_embed.grid**2
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_position_embedding(self.patch_embed.grid, dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layer_scale = layer_scale
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, layer_scale) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights(in_channels)
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, in_channels: int) -> None:
        """MoCo v3's initialisation: Xavier-uniform linear layers, q, k and v each as its own
        ``D×D`` matrix; the patch projection Xavier-uniform on its flattened ``D×(C·p²)``
        weight; zero biases; [CLS] token ``N(0, 10⁻⁶)``."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                fan_out = m.weight.shape[0] // 3 if name.endswith("qkv") else m.weight.shape[0]
                bound = math.sqrt(6.0 / (fan_out + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (in_channels * self.patch_size**2 + proj.out_channels))
        nn.init.uniform_(proj.weight, -bound, bound)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def num_patches(self) -> int:
        """L, the patch tokens of a full image."""
        return self.patch_embed.grid**2

    def patch_position_embedding(self, height: int, width: int) -> Tensor:
        """The position embedding of a ``height×width`` patch grid, ``1×(h·w)×D``: the model's
        own at its grid, else bicubically resized (the smaller views of multi-crop: DINO's and
        MSN's ``interpolate_pos_encoding``)."""
        pos = self.pos_embed[:, 1:]
        g = self.patch_embed.grid
        if (height, width) == (g, g):
            return pos
        pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(height, width), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def tokens(
        self,
        x: Tensor,
        keep: Tensor | None = None,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> Tensor:
        """The input sequence of the first block: ``[CLS; patches] + pos_embed``, ``N×(1+L)×D``;
        with ``keep`` (``N×K`` patch indices, row-major on the grid) only the [CLS] token and
        those patches, in ``keep``'s order: ``N×(1+K)×D`` (MAE's ``forward_encoder``: the
        position embedding is added before the patches are dropped). With ``mask`` (``N×L``
        booleans) the masked patches' embeddings are replaced by ``mask_token`` before the
        position embedding is added (:func:`replace_masked`: iBOT, DINOv2). Inputs of another
        side than the model's get a resized position embedding."""
        p = self.patch_size
        pos = self.patch_position_embedding(x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs the mask_token that replaces the masked patches")
            x = replace_masked(x, mask, mask_token)
        x = x + pos
        if keep is not None:
            x = gather_tokens(x, keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_features(
        self,
        x: Tensor,
        keep: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Every token after the final norm, ``N×(1+L)×D``, the [CLS] token first
        (``N×(1+K)×D`` with ``keep``: the encoder on a subset of the patches; ``mask`` and
        ``mask_token``: masked patches replaced, see :meth:`tokens`). ``generator`` draws the
        dropped paths in training (:meth:`set_drop_path`)."""
        h = self.tokens(x, keep, mask, mask_token)
        for block in self.blocks:
            h = block(h, generator)
        return self.norm(h)

    def set_drop_path(self, rate: float, uniform: bool = False) -> None:
        """Stochastic depth in training: block ``i`` of ``d`` drops its branches with
        probability ``rate·i/(d − 1)`` (DINO's and iBOT's ``linspace(0, drop_path_rate,
        depth)``) or ``rate`` in every block when ``uniform`` (DINOv2's
        ``drop_path_uniform``). No parameters change; 0 turns it off."""
        depth = len(self.blocks)
        rates = [rate] * depth if uniform else torch.linspace(0, rate, depth).tolist()
        block: Any
        for block, r in zip(self.blocks, rates):
            block.drop_path = float(r)

    def pool(self, tokens: Tensor) -> Tensor:
        """The features of a sequence of :meth:`forward_features`: its [CLS] token or the mean
        of its patch tokens (``global_pool``), ``N×D``."""
        return tokens[:, 0] if self.global_pool == "token" else tokens[:, 1:].mean(dim=1)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.pool(self.forward_features(x, keep))  # N×D

    @torch.no_grad()
    def last_attention(self, x: Tensor) -> Tensor:
        """The attention weights of the last block, ``N×H×(1+L)×(1+L)`` (token 0 is [CLS])."""
        h = self.tokens(x)
        for block in self.blocks[:-1]:
            h = block(h)
        last: Any = self.blocks[-1]
        return last.attn.attention(last.norm1(h))


def vit(
    arch: str = "vit_small",
    *,
    image_size: int = 224,
    patch_size: int = 16,
    in_channels: int = 3,
    pos_embed: str = "sincos",
    freeze_patch_embed: bool = False,
    depth: int | None = None,
    heads: int | None = None,
    global_pool: str = "token",
    layer_scale: float = 0.0,
) -> VisionTransformer:
    """The ViT named ``arch`` (one of :data:`VIT_SIZES`); ``depth`` overrides its blocks
    (12; ViT-L 24; fewer make quick tests and CPU demos), ``heads`` its number of attention
    heads (MoCo v3's ViT-S has 12, timm's and DeiT's 6: the weights have the same shapes either
    way); ``global_pool`` picks its features (:data:`GLOBAL_POOLS`); ``layer_scale`` > 0 gives
    every block :class:`LayerScale` (DINOv2: 1e-5)."""
    if arch not in VIT_SIZES:
        raise ValueError(f"unknown ViT {arch!r}; choose one of {', '.join(VIT_SIZES)}")
    dim, default_depth, default_heads = VIT_SIZES[arch]
    heads = heads or default_heads
    if dim % heads:
        raise ConfigError(
            f"--vit-heads {heads} does not divide {arch}'s {dim}-d embedding; pick a divisor of {dim}"
        )
    return VisionTransformer(
        image_size,
        patch_size,
        in_channels,
        dim,
        depth or default_depth,
        heads,
        pos_embed=pos_embed,
        freeze_patch_embed=freeze_patch_embed,
        global_pool=global_pool,
        layer_scale=layer_scale,
    )


def default_patch_size(image_size: int) -> int:
    """The patch side that suits an image side: 16 from 160 px (224 → 14×14 tokens), 8 from
    48 px (64 → 8×8, 96 → 12×12), else 4 (28 → 7×7, 32 → 8×8)."""
    if image_size >= 160:
        return 16
    if image_size >= 48:
        return 8
    return 4


class PatchPredictor(nn.Module):
    """A light ViT that predicts the tokens of chosen patches from the encoder's tokens of the
    visible ones: MAE's decoder (He et al. 2022, §3 "MAE decoder"; ``models_mae.py``
    ``forward_decoder``) and I-JEPA's predictor (Assran et al. 2023, §3; ``src/models/
    vision_transformer.py`` ``VisionTransformerPredictor``), built from :class:`Block`.

    The sequence is ``[embed(prefix); embed(visible) + pos(visible); mask_token + pos(target)]``
    (``embed`` a linear map from the encoder's width, ``pos`` the fixed 2-D sin-cos embedding of
    the patch's position on the grid; a prefix token, MAE's [CLS], gets none, as its row of
    MAE's embedding is 0), then the blocks, a LayerNorm and a linear ``head`` read at the target
    positions. MAE's decoder holds every position in grid order; here the visible tokens come
    first and the masked ones after them, which attention does not see (the position embedding
    carries the order), so the predictions are MAE's.

    Args:
        grid: patches per side of the encoder's grid.
        in_dim: the encoder's width D.
        dim: the predictor's width (MAE 512; I-JEPA 384).
        depth: blocks (MAE 8; I-JEPA 12 for ViT-H, 6 by default in its code).
        num_heads: attention heads (MAE 16; I-JEPA the encoder's).
        out_dim: the width of a prediction (MAE ``p²·C`` pixels; I-JEPA D).

    Attributes ``embed`` (MAE's ``decoder_embed``, I-JEPA's ``predictor_embed``),
    ``mask_token``, ``pos_embed`` (a buffer), ``blocks``, ``norm`` and ``head`` (``decoder_pred``
    / ``predictor_proj``). Initialisation: call :func:`init_xavier_` (MAE) or
    :func:`init_trunc_normal_` and :func:`rescale_blocks_` (I-JEPA) on it.
    """

    pos_embed: Tensor

    def __init__(
        self,
        grid: int,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_position_embedding(grid, dim)[:, 1:])  # 1×L×dim
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, visible: Tensor, targets: Tensor) -> Tensor:
        """Predictions ``N×T×out_dim`` at the positions ``targets`` (``N×T``) from ``x``
        (``N×(P+K)×in_dim``: ``P`` prefix tokens, then the tokens of the ``K`` patches at
        ``visible``, ``N×K``)."""
        n, k = visible.shape
        h = self.embed(x)  # N×(P+K)×dim
        pos = self.pos_embed.expand(n, -1, -1)
        prefix, h = h[:, : h.shape[1] - k], h[:, h.shape[1] - k :] + gather_tokens(pos, visible)
        masked = self.mask_token + gather_tokens(pos, targets)  # N×T×dim
        out = self.norm(self.blocks(torch.cat([prefix, h, masked], dim=1)))
        return self.head(out[:, -targets.shape[1] :])


@torch.no_grad()
def init_xavier_(module: nn.Module) -> None:
    """MAE's initialisation (``models_mae.py`` ``initialize_weights``, "following official JAX
    ViT"): every linear layer Xavier-uniform as one matrix (the qkv projection too), biases 0;
    the patch projection Xavier-uniform on its flattened weight; a ``mask_token`` N(0, 0.02²)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
        token = getattr(m, "mask_token", None)
        if isinstance(token, nn.Parameter):
            nn.init.normal_(token, std=0.02)


@torch.no_grad()
def init_trunc_normal_(module: nn.Module, std: float = 0.02, *, patch_embed: bool = True) -> None:
    """DeiT's initialisation as I-JEPA (``src/helper.py`` ``init_model``) and MSN
    (``src/msn_train.py`` ``init_model``) apply it: every linear layer, and the patch
    projection when ``patch_embed``, ``N(0, std²)`` truncated at ±2 (absolute, as their
    ``trunc_normal_``), biases 0, LayerNorms 1 and 0; a ``mask_token`` likewise."""
    for m in module.modules():
        if isinstance(m, nn.Linear) or (patch_embed and isinstance(m, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        token = getattr(m, "mask_token", None)
        if isinstance(token, nn.Parameter):
            nn.init.trunc_normal_(token, std=std, a=-2.0, b=2.0)


@torch.no_grad()
def rescale_blocks_(blocks: nn.Module) -> None:
    """I-JEPA's ``fix_init_weight``: block ``i`` (from 1) has its attention output projection and
    its MLP's second layer divided by ``√(2i)``."""
    block: Any
    for i, block in enumerate(blocks.children(), start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * i))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
