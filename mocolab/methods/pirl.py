"""PIRL: a representation of an image invariant to its jigsaw transform, against a memory bank.

Misra & van der Maaten, "Self-Supervised Learning of Pretext-Invariant Representations",
CVPR 2020, and its official implementation in VISSL (facebookresearch/vissl:
``configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet.yaml``, ``vissl/losses/nce_loss.py``,
``vissl/models/heads/siamese_concat_view.py``,
``vissl/data/ssl_transforms/img_pil_to_patches_and_image.py`` and ``img_patches_tensor.py``).

An image I gives two inputs (§3): a view ``v_I`` and its jigsaw transform ``I^t``, a 3×3
grid of tiles cut from another crop of I and shuffled. The same ResNet encodes the view and
each tile (siamese); ``f(v_I)`` is the view's feature through a linear head, and
``g(v_{I^t})`` projects every tile by a shared linear head, concatenates the 9 projections in
their shuffled order and projects that to 128-d (§3.2, implementation details). A memory bank
holds ``m_I``, one feature per image, an exponential moving average of ``f(v_I)`` (§3.1;
``m_I ← normalize(0.5·m_I + 0.5·f(v_I))`` after each step, VISSL's momentum 0.5). With the
paper's ``h(m, v) = exp(s(m, v)/τ) / (exp(s(m, v)/τ) + N/|D|)`` (``s`` the cosine, τ = 0.07,
N noise entries out of the |D| images) and
``L_NCE(m_I, v) = −log h(m_I, v) − Σ_{I′ ∈ D_N} log(1 − h(m_{I′}, v))`` (§3), the loss
(§3.1) is ``L = λ·L_NCE(m_I, g(v_{I^t})) + (1 − λ)·L_NCE(m_I, f(v_I))``, λ = 0.5, with
N = 32000 negatives drawn uniformly from the bank. The evaluated backbone is the ResNet on
whole images.

Where mocolab follows the official code over the paper's text, or where the text is silent:

- ``exp(s/τ)`` in h is divided by a normalising constant Z estimated once, from the first
  batch, as ``|D|·mean exp(s/τ)`` (VISSL's ``NCEAverage`` with ``norm_constant: -1``, the
  lemniscate NCE of InstDisc that PIRL's code adapts); the paper's h has no Z. One Z serves both terms,
  set from the first term's (the tiles') scores, as VISSL's one ``NCEAverage`` does.
  ``--loss softmax`` gives InfoNCE over the same entries (VISSL's ``loss_type:
  cross_entropy``).
- The jigsaw transform (``ImgPilToPatchesAndImage``): the tiles come from their own crop of I
  (area 60–100 %, resized to 255 px when the view is 224 px), not from the view ``v_I``; a
  3×3 grid of 85 px cells holds 64 px tiles at random places in their cells (here
  ``--tile-size 64 --tile-gap 21 --tile-jitter 10``); the 9 tiles are shuffled by a uniform
  random permutation of all 9! (``np.random.permutation``), not from a jigsaw permutation
  set.
- Each tile is augmented on its own, as the view: colour jitter (0.4, 0.4, 0.4, 0.2) always,
  grayscale with p = 0.2, horizontal flip (the config applies its transforms to every element
  of the list of view and tiles). The view: crop 8–100 % and the same colour changes
  (recipe ``pirl``).
- Heads: linear ``2048 → 128`` per tile, concatenation (``siamese_concat_view``), linear
  ``1152 → 128``; linear ``2048 → 128`` for the view (``--head-layers 2``: VISSL's
  ``resnet50_mlphead``, an MLP in both places). The tiles and the view go through the
  ResNet in separate batches (each its own batch-norm statistics), as VISSL's multi-input
  trunk does.

Simplifications: the N noise entries are drawn once per batch and shared by both terms and
every image (VISSL draws them per image and per term); VISSL's random photometric transform
(posterize, sharpness, solarize, autocontrast with p = 0.66) is left out of the view and tile
augmentation; each tile is colour-jittered after its own range is mapped to 0–255
(:func:`~mocolab.methods.tiles.augment_patches`, shared with CPC: the loop hands over
normalised views), not on the original pixels; the cosine LR schedule decays to 0, not to
0.00012.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import AugmentConfig, ViewGenerator, tile_crop_size
from ..heads import projection_head
from ..losses import contrastive_accuracy
from ..option import opt
from . import registry as r
from .base import LossOutput
from .instdisc import InstDisc, InstDiscOptions, memory_bank_loss
from .tiles import (
    augment_patches,
    encode_tiles,
    grid_side,
    tile_gap,
    tile_grid,
    tile_jitter,
    tile_size,
)

if TYPE_CHECKING:
    from ..config import PretrainConfig
    from ..dictionaries import MemoryBank

#: What each tile gets on its own (VISSL's PIRL config, applied to every tile): no crop (the
#: tile's place in its cell is the spatial jitter), colour jitter (0.4, 0.4, 0.4, 0.2) always,
#: grayscale with p = 0.2, horizontal flip.
TILE_AUGMENT = dict(
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    jitter=(0.4, 0.4, 0.4, 0.2),
    jitter_p=1.0,
    grayscale_p=0.2,
    hflip_p=0.5,
)


def random_permutations(n: int, cells: int, generator: torch.Generator) -> Tensor:
    """``n`` permutations of ``range(cells)`` drawn uniformly from all ``cells!`` (``n×cells``
    int64, on the generator's device): the argsort of uniform numbers."""
    u = torch.rand(n, cells, generator=generator, device=generator.device)
    return u.argsort(dim=1)


def permute_tiles(tiles: Tensor, perm: Tensor) -> Tensor:
    """The jigsaw transform: ``out[n, k] = tiles[n, perm[n, k]]`` for ``N×T×...`` tiles and
    ``N×T`` permutations (position k of the shuffled image shows tile ``perm[n, k]``)."""
    rows = torch.arange(tiles.shape[0], device=tiles.device)[:, None]
    return tiles[rows, perm.to(tiles.device)]


class TileHead(nn.Module):
    """g: the features of an image's T tiles, in their (shuffled) order → one ``dim``-d vector.

    Each tile's feature goes through the same projection (``tile``), the T projections are
    concatenated in order and projected again (``concat``): VISSL's ``mlp [2048, 128]`` →
    ``siamese_concat_view`` → ``mlp [1152, 128]``. The concatenation keeps the order, so g
    depends on where each tile sits in the shuffled image.
    """

    def __init__(
        self, in_dim: int, dim: int, tiles: int, hidden_dim: int | None, num_layers: int
    ) -> None:
        super().__init__()
        self.tile = projection_head(in_dim, dim, hidden_dim, num_layers=num_layers)
        self.concat = nn.Linear(tiles * dim, dim)

    def forward(self, z: Tensor) -> Tensor:
        n, t = z.shape[:2]
        per_tile = self.tile(z.reshape(n * t, -1))  # (N·T)×C
        return self.concat(per_tile.view(n, -1))  # N×(T·C) → N×C


def pirl_loss(
    f: Tensor,
    g: Tensor,
    bank: MemoryBank,
    index: Tensor,
    noise_index: Tensor,
    temperature: float,
    loss: str,
    normalizer: float,
    jigsaw_weight: float,
) -> tuple[Tensor, dict[str, Tensor], float]:
    """PIRL's loss (§3.1): ``λ·L(m_I, g(v_{I^t})) + (1 − λ)·L(m_I, f(v_I))``.

    Both terms are InstDisc's :func:`~mocolab.methods.instdisc.memory_bank_loss` of the
    normalised features (``N×C``) against the bank: positive ``m_I`` (``index``), negatives the
    entries ``noise_index``. One normaliser Z serves both; when ``normalizer < 0`` it is
    estimated from the tile term's scores (VISSL's order).

    Returns:
        ``(loss, metrics, Z)``: metrics hold each term and its accuracy.
    """
    loss_t, scores_t, z = memory_bank_loss(
        g, bank, index, noise_index, temperature, loss, normalizer
    )
    loss_i, scores_i, z = memory_bank_loss(f, bank, index, noise_index, temperature, loss, z)
    total = jigsaw_weight * loss_t + (1 - jigsaw_weight) * loss_i
    metrics = {
        "loss_jigsaw": loss_t.detach(),
        "loss_image": loss_i.detach(),
        "acc_jigsaw": contrastive_accuracy(scores_t.detach()),
        "acc": contrastive_accuracy(scores_i.detach()),
    }
    return total, metrics, z


class PIRL(InstDisc):
    """Pretext-invariant representation learning with the jigsaw transform.

    InstDisc (its memory bank, NCE, bank update from ``f(v_I)`` after the step, ``--bank-init``)
    with a second, jigsaw branch whose features are scored against the same bank.

    Args:
        backbone: the ResNet (``N×C×H×W → N×D``), shared by the view and the tiles.
        num_images: |D|, the training set size (one bank row per image).
        dim: feature dimension (128).
        head_layers: 1 = the linear heads of the paper; 2 = VISSL's MLP heads.
        hidden_dim: hidden width if ``head_layers > 1``.
        nce_k: N, bank entries drawn as negatives per batch (32000).
        bank_momentum: of the bank update (0.5).
        temperature: τ (0.07).
        loss: ``"nce"`` (the paper's) or ``"softmax"`` (InfoNCE over the same entries).
        bank_init: ``"random"`` (the paper's) or ``"encoder"`` (see InstDisc).
        jigsaw_weight: λ (0.5).
        grid: tiles per side (3).
        tile_size, tile_gap, tile_jitter: the tiles' geometry (:func:`tile_grid`).
    """

    num_views = 2  # v_I, and the crop the tiles of I^t are cut from

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_images: int,
        dim: int = 128,
        head_layers: int = 1,
        hidden_dim: int | None = None,
        nce_k: int = 32000,
        bank_momentum: float = 0.5,
        temperature: float = 0.07,
        loss: str = "nce",
        bank_init: str = "random",
        jigsaw_weight: float = 0.5,
        grid: int = 3,
        tile_size: int = 64,
        tile_gap: int = 21,
        tile_jitter: int = 10,
    ) -> None:
        super().__init__(
            backbone,
            num_images=num_images,
            dim=dim,
            head_layers=head_layers,
            hidden_dim=hidden_dim,
            nce_k=nce_k,
            bank_momentum=bank_momentum,
            temperature=temperature,
            loss=loss,
            bank_init=bank_init,
        )
        self.tile_head = TileHead(backbone.num_features, dim, grid * grid, hidden_dim, head_layers)
        self.jigsaw_weight = jigsaw_weight
        self.grid = grid
        self.tile_size = tile_size
        self.tile_gap = tile_gap
        self.tile_jitter = tile_jitter
        self.tile_views = ViewGenerator(
            AugmentConfig(size=tile_size, **TILE_AUGMENT, mean=(0.0,), std=(1.0,))
        )

    def view_recipes(self, augment: str) -> list[str]:
        """``--augment pirl``: the view's recipe ``pirl`` and the tiles' crop ``pirl-tiles``;
        another single name is the view's, the tiles' crop staying ``pirl-tiles``."""
        names = [a.strip() for a in augment.split(",")]
        return [names[0], "pirl-tiles"] if len(names) == 1 else super().view_recipes(augment)

    def tiles(self, x_t: Tensor, generator: torch.Generator | None) -> Tensor:
        """The 3×3 tiles of the crops ``x_t`` (``N×C×H×W``), each at a random place in its cell
        and augmented on its own in training: ``N×T×C×t×t``, in grid order."""
        jitter = generator if self.training else None
        tiles = tile_grid(
            x_t,
            grid=self.grid,
            tile=self.tile_size,
            gap=self.tile_gap,
            jitter=self.tile_jitter,
            generator=jitter,
        )
        if self.training and generator is not None:
            flat = augment_patches(tiles.flatten(0, 1), self.tile_views, generator)
            tiles = flat.view(tiles.shape)
        return tiles

    def jigsaw_features(self, tiles: Tensor, perm: Tensor) -> Tensor:
        """``g(v_{I^t})``, not normalised: the tiles shuffled by ``perm`` (:func:`permute_tiles`),
        each encoded by the backbone, then :class:`TileHead`."""
        return self.tile_head(encode_tiles(self.backbone, permute_tiles(tiles, perm)))

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        if index is None or generator is None:
            raise ValueError(
                "PIRL needs the batch's image indices and the run's generator: "
                "call model(views, generator, index=...)"
            )
        x, x_t = views  # v_I: N×C×H×W; the crop of I the tiles are cut from
        index = index.to(self.memory_bank.bank.device)
        f = F.normalize(self.query_encoder(x), dim=1)  # f(v_I): N×C
        tiles = self.tiles(x_t, generator)  # N×T×C×t×t
        perm = random_permutations(tiles.shape[0], tiles.shape[1], generator)  # N×T
        g = F.normalize(self.jigsaw_features(tiles, perm), dim=1)  # g(v_{I^t}): N×C
        noise = self.memory_bank.sample(self.nce_k, generator)  # N entries, shared
        loss, metrics, z = pirl_loss(
            f,
            g,
            self.memory_bank,
            index,
            noise,
            self.temperature,
            self.loss,
            self.scalar("normalizer"),
            self.jigsaw_weight,
        )
        self.set_scalar("normalizer", z)  # NCE's Z: set from the first batch, then fixed
        # the bank moves towards f(v_I) after the step (InstDisc.on_step_end)
        return LossOutput(loss, metrics, carry={"features": f.detach(), "index": index})


@dataclass
class PIRLOptions(InstDiscOptions):
    """PIRL's own options (Misra & van der Maaten 2020 and VISSL: τ = 0.07, N = 32000 negatives,
    bank momentum 0.5, NCE, λ = 0.5). The tiles are sized for 28-32 px images, as CPC's
    patches: 8 px tiles 2 px apart in the 32-36 px crop they are cut from (``pirl-imagenet``
    has VISSL's 64 px tiles in 85 px cells of a 255 px crop)."""

    nce_k: int = r.nce_k(32000)
    jigsaw_weight: float = opt(
        0.5, "λ of PIRL's loss λ·L(m_I, g(v_It)) + (1−λ)·L(m_I, f(v_I)): the jigsaw term's weight"
    )
    tile_size: int = tile_size(8)
    tile_gap: int = tile_gap(2)
    tile_jitter: int = tile_jitter(2)

    def validate(self, cfg: PretrainConfig) -> None:
        super().validate(cfg)
        r.check(
            0.0 <= self.jigsaw_weight <= 1.0,
            f"--jigsaw-weight must be in [0, 1] (0.5 in PIRL), got {self.jigsaw_weight}",
        )
        r.check(
            self.tile_size > 0 and self.tile_gap >= 0 and self.tile_jitter >= 0,
            "--tile-size must be positive, --tile-gap and --tile-jitter at least 0",
        )
        if cfg.crop_size is not None:
            side, need = tile_crop_size(cfg.crop_size), grid_side(3, self.tile_size, self.tile_gap)
            r.check(
                need <= side,
                f"--tile-size {self.tile_size} and --tile-gap {self.tile_gap} make a {need} px "
                f"grid, wider than the {side} px crop the tiles are cut from (255/224 of "
                f"--crop-size {cfg.crop_size}); lower them",
            )


# PIRL (VISSL's config): linear 128-d heads, crop 8-100% + colour for the view, cosine LR.
@r.register_method(
    "pirl",
    options=PIRLOptions,
    summary="PIRL with the jigsaw transform (Misra & van der Maaten 2020)",
    defaults={"head_layers": 1, "dim": 128, "augment": "pirl", "lr_schedule": "cosine"},
)
def _pirl(backbone: nn.Module, cfg: PretrainConfig, o: PIRLOptions, ctx: r.BuildContext) -> PIRL:
    if ctx.num_images is None:
        raise ValueError("pirl needs num_images (the training set size) for its memory bank")
    return PIRL(
        backbone,
        num_images=ctx.num_images,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        nce_k=o.nce_k,
        bank_momentum=o.bank_momentum,
        temperature=o.temperature,
        loss=o.loss,
        bank_init=o.bank_init,
        jigsaw_weight=o.jigsaw_weight,
        tile_size=o.tile_size,
        tile_gap=o.tile_gap,
        tile_jitter=o.tile_jitter,
    )
