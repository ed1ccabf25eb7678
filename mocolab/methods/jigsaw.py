"""Jigsaw: which permutation shuffled the 3 × 3 tiles of an image?

Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles",
ECCV 2016. Official code: github.com/MehdiNoroozi/JigsawPuzzleSolver (Caffe; read at commit
8c7ec09789555c269475de9707e5e6c7f6edbcf7) and its PyTorch port
github.com/bbrattoli/JigsawPuzzlePytorch (commit ec85994b9f244d08652a3975c1c7a55483cdfc05:
``Dataset/JigsawImageLoader.py``, ``JigsawNetwork.py``, ``select_permutations.py``), which
mocolab follows where they are more precise than the text — the port where the two differ.

- §3.2, the tiles: a 225 px crop is split into 3 × 3 cells of 75 px and a 64 px tile is cut at
  a random place in each cell. Here :func:`~mocolab.methods.tiles.tile_grid` cuts a centred
  grid of ``--tile-size`` tiles ``--tile-gap`` apart, each moved by up to ``--tile-jitter`` px:
  with the ImageNet preset (64, 11, ±5 in a 225 px view) the grid is 214 px wide, 5 px from the
  view's border, so a tile's offset in its 75 px cell runs over 0..10 (11 of the 12 places,
  0..11, a 64 px tile has there). The official codes place them otherwise: the Caffe data
  layer (``caffe-master-jps++/src/caffe/data_transformer.cpp``, ``jitter_size: 21`` in
  ``train_val_cfn_jps.prototxt``) in 85 px cells of a 255 px image at offsets 0..21, each
  colour channel shifted by a further 0..2 px; the port cuts a random 64 px crop of each
  86 px cell of a 255 px image and resizes it to 75 px.
- Colour, against shortcuts through low-level statistics and chromatic aberration, as the
  port (``JigsawImageLoader.py``): 30 % of the puzzles grayscale (``--tile-grayscale``;
  :func:`~mocolab.methods.tiles.grayscale_puzzles`), each tile's channels shifted by
  k ∈ {−2, −1, 0, 1} grey levels (``rgb_jittering``: :func:`~mocolab.methods.tiles.rgb_jitter`),
  then each tile normalised **per channel** to zero mean and unit std (``--tile-norm
  channel``: :func:`~mocolab.methods.tiles.standardize_tiles`), which removes each tile's
  colour balance and cancels the shift. The Caffe code instead makes 50 % of the puzzles gray
  and projects the colours of half of the rest (``--tile-grayscale 0.5 --tile-projection
  0.5``: :func:`~mocolab.methods.tiles.project_colours`) and does not normalise the tiles;
  ``--tile-norm tile`` normalises each tile over all its channels at once (a reading of the
  paper's §3.2).
- §3.3: the permutation set (``--permutations``, 1000 in the paper's main results; the Caffe
  release trains on 100) by maximal Hamming distance, Algorithm 1
  (:func:`~mocolab.methods.tiles.permutation_set`; mocolab ranks candidates by their minimal
  distance to the chosen ones first and the paper's sum second: the same average distance,
  8.08 on 100, as the official ``permutations_100_max.bin``, and minimal distance 6 instead of
  2). The set is fixed (seed 0), stored with the run.
- Each image gets a permutation index drawn uniformly; position t of the input holds the tile
  ``perm[t]`` (``data = [tiles[perm[t]] for t in range(9)]`` in the port); the label is the
  permutation's index.
- §3.1, the context-free network: each tile through the same backbone (siamese), ``fc6`` per
  tile (1024 in the code, 512 in the text), the 9 outputs concatenated in order, ``fc7``
  (4096) and ``fc8`` to the permutations (:class:`~mocolab.methods.tiles.TileClassifier`),
  cross-entropy.

Where mocolab differs: the tile encoder is a mocolab ResNet (BN, global pooling) instead of
an AlexNet with LRN and stride-2 conv1, and the fc layers use BN instead of dropout; tiles are
cut from the loop's augmented view (``--augment cpc``: a resized crop of 50–100% and a flip,
no colour change) rather than from a fixed 256 px resize, at the places described above, and
are not resized. The evaluated backbone is that ResNet on the whole image, as for every other
method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import classification_accuracy
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder
from .tiles import (
    TileClassifier,
    TileOptions,
    encode_tiles,
    grayscale_puzzles,
    permutation_set,
    project_colours,
    rgb_jitter,
    standardize_tiles,
    tile_grid,
)

TILE_NORMS = ("channel", "tile")

if TYPE_CHECKING:
    from ..config import PretrainConfig


def shuffle_tiles(tiles: Tensor, permutations: Tensor, labels: Tensor) -> Tensor:
    """``N×9×…`` tiles reordered by ``permutations[labels[n]]``: position t of image n holds
    its tile ``permutations[labels[n], t]`` (one gather for the batch)."""
    order = permutations[labels]  # N×9
    index = order.view(*order.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, index)


class Jigsaw(Method):
    """The jigsaw puzzle task on a mocolab backbone.

    Args:
        backbone: the tile encoder and evaluated encoder (``N×C×H×W → N×D``).
        permutations: ``P×9`` permutation set (see :func:`permutation_set`).
        tile_size, tile_gap, tile_jitter: the 3 × 3 grid (:func:`tile_grid`).
        dim: fc6 width per tile; hidden_dim: fc7 width; head_layers: layers after the
            concatenation (2: fc7 and fc8, as the paper).
        tile_norm: ``channel`` (each tile per channel, the port) or ``tile`` (over all its
            channels) (:func:`standardize_tiles`).
        grayscale: fraction of the puzzles made grayscale (0.3, the port's); projection:
            fraction of the other puzzles whose colours are projected (0; the Caffe code's 0.5).
        mean, std: the inputs' normalisation, undone to work on pixel values as the port does.
    """

    num_views = 1
    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        permutations: Tensor,
        *,
        tile_size: int = 8,
        tile_gap: int = 1,
        tile_jitter: int = 1,
        dim: int = 128,
        hidden_dim: int = 512,
        head_layers: int = 2,
        tile_norm: str = "channel",
        grayscale: float = 0.3,
        projection: float = 0.0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__()
        if tile_norm not in TILE_NORMS:
            raise ValueError(f"tile_norm must be one of {', '.join(TILE_NORMS)}, got {tile_norm!r}")
        self.query_encoder = encoder(backbone, nn.Identity())  # evaluated: the whole image
        self.register_buffer("permutations", permutations.clone())
        self.classifier = TileClassifier(
            backbone.num_features, dim, 9, permutations.shape[0], hidden_dim, head_layers
        )
        self.tile_size, self.tile_gap, self.tile_jitter = tile_size, tile_gap, tile_jitter
        self.tile_norm, self.grayscale, self.projection = tile_norm, grayscale, projection
        shape = (1, 1, -1, 1, 1)  # over N×T×C×t×t tiles; derived from the data: not saved
        mean_t, std_t = (torch.tensor([float(v) for v in a]).view(shape) for a in (mean, std))
        self.register_buffer("input_mean", mean_t, persistent=False)
        self.register_buffer("input_std", std_t, persistent=False)

    def prepare_tiles(self, tiles: Tensor, generator: torch.Generator | None) -> Tensor:
        """Normalised ``N×T×C×t×t`` tiles → what the tile encoder sees: pixel values, then (with
        a ``generator``, in training) grayscale and projected puzzles (one draw per image
        each) and the port's ``rgb_jittering``, then :func:`standardize_tiles`."""
        tiles = tiles * self.input_std.to(tiles.dtype) + self.input_mean.to(tiles.dtype)
        if generator is not None:
            u = torch.rand(2, tiles.shape[0], generator=generator, device=tiles.device)
            if tiles.shape[2] == 3:  # colour puzzles
                gray = u[0] < self.grayscale  # N
                tiles = grayscale_puzzles(tiles, gray)
                tiles = project_colours(tiles, ~gray & (u[1] < self.projection))
            tiles = rgb_jitter(tiles, generator)
        return standardize_tiles(tiles, per_channel=self.tile_norm == "channel")

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        g = generator if self.training else None
        tiles = tile_grid(
            x, grid=3, tile=self.tile_size, gap=self.tile_gap, jitter=self.tile_jitter, generator=g
        )  # N×9×C×t×t
        tiles = self.prepare_tiles(tiles, g)
        n, count = x.shape[0], self.permutations.shape[0]
        if g is not None:
            labels = torch.randint(count, (n,), generator=g, device=x.device)  # N
        else:  # a fixed spread of permutations where there is no random stream
            labels = torch.arange(n, device=x.device) % count
        z = encode_tiles(self.backbone, shuffle_tiles(tiles, self.permutations, labels))  # N×9×D
        logits = self.classifier(z)  # N×P
        loss = F.cross_entropy(logits.float(), labels)
        acc = classification_accuracy(logits, labels)
        return LossOutput(loss, {"acc": acc})


@dataclass
class JigsawOptions(TileOptions):
    """Jigsaw's own options: the tile grid (sized for 28–32 px images; the ImageNet preset has
    the paper's 64 px tiles), the size of the permutation set, and the tiles' colour handling
    (the PyTorch port's: per-channel normalisation, 30 % grayscale puzzles, no projection)."""

    permutations: int = opt(
        1000, "size of the jigsaw permutation set, chosen by maximal Hamming distance (100|1000)"
    )
    tile_norm: str = opt(
        "channel",
        "normalise each jigsaw tile per colour channel (channel: the PyTorch port) or over all "
        "its channels at once (tile)",
        choices=("channel", "tile"),
    )
    tile_grayscale: float = opt(
        0.3,
        "fraction of jigsaw puzzles made grayscale (0.3: the PyTorch port; 0.5: the Caffe code)",
    )
    tile_projection: float = opt(
        0.0,
        "fraction of the other jigsaw puzzles whose colours are projected (the Caffe code: 0.5)",
    )

    def validate(self, cfg: PretrainConfig) -> None:
        super().validate(cfg)
        r.check(
            2 <= self.permutations <= 362880,
            f"--permutations must be in 2..362880 (9!), got {self.permutations}",
        )
        r.check(
            self.tile_norm in TILE_NORMS,
            f"--tile-norm must be channel or tile, got {self.tile_norm!r}",
        )
        for name, value in (
            ("grayscale", self.tile_grayscale),
            ("projection", self.tile_projection),
        ):
            r.check(0 <= value <= 1, f"--tile-{name} must be in [0, 1], got {value}")


# The paper's head: fc6 per tile, fc7 on the concatenation, fc8 to the permutations; SGD with
# a step schedule in the official solver (lr 0.01, ÷10 every 100k of 350k iterations).
@r.register_method(
    "jigsaw",
    options=JigsawOptions,
    summary="Jigsaw puzzles (Noroozi & Favaro 2016)",
    defaults={
        "dim": 128,
        "hidden_dim": 512,
        "head_layers": 2,
        "augment": "cpc",
        "lr_schedule": "cosine",
    },
)
def _jigsaw(
    backbone: nn.Module, cfg: PretrainConfig, o: JigsawOptions, ctx: r.BuildContext
) -> Jigsaw:
    return Jigsaw(
        backbone,
        permutation_set(o.permutations),
        tile_size=o.tile_size,
        tile_gap=o.tile_gap,
        tile_jitter=o.tile_jitter,
        dim=cfg.dim,
        hidden_dim=cfg.hidden_dim or 4 * cfg.dim,
        head_layers=cfg.head_layers,
        tile_norm=o.tile_norm,
        grayscale=o.tile_grayscale,
        projection=o.tile_projection,
        mean=ctx.mean,
        std=ctx.std,
    )
