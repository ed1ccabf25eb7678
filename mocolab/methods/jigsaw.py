"""Jigsaw: which permutation shuffled the 3 × 3 tiles of an image?

Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles",
ECCV 2016. Official code: github.com/MehdiNoroozi/JigsawPuzzleSolver (Caffe) and its PyTorch
port github.com/bbrattoli/JigsawPuzzlePytorch (``JigsawImageLoader.py``, ``JigsawNetwork.py``,
``select_permutations.py``), which mocolab follows where they are more precise than the text.

- §3.2: a 225 px crop is split into 3 × 3 cells of 75 px and a 64 px tile is cut at a random
  place in each cell: here :func:`~mocolab.methods.tiles.tile_grid`, a centred grid of
  ``--tile-size`` tiles ``--tile-gap`` apart, each moved by up to ``--tile-jitter`` (75 =
  64 + 11: gap 11, jitter ±5 on ImageNet). Each tile is normalised on its own (one mean and
  one std per tile, as the port does) after a random gain per colour channel (the port's
  ``rgb_jittering``, 0.8–1.2): shortcuts through low-level statistics and chromatic aberration.
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
no colour change) rather than from a fixed 256 px resize. The evaluated backbone is that
ResNet on the whole image, as for every other method.
"""

from __future__ import annotations

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
    channel_gain,
    encode_tiles,
    permutation_set,
    standardize_tiles,
    tile_grid,
)

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
    """

    num_views = 1

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
    ) -> None:
        super().__init__()
        self.query_encoder = encoder(backbone, nn.Identity())  # evaluated: the whole image
        self.register_buffer("permutations", permutations.clone())
        self.classifier = TileClassifier(
            backbone.num_features, dim, 9, permutations.shape[0], hidden_dim, head_layers
        )
        self.tile_size, self.tile_gap, self.tile_jitter = tile_size, tile_gap, tile_jitter

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
        if g is not None:
            tiles = channel_gain(tiles, g)
        tiles = standardize_tiles(tiles)
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
    the paper's 64 px tiles) and the size of the permutation set."""

    permutations: int = opt(
        1000, "size of the jigsaw permutation set, chosen by maximal Hamming distance (100|1000)"
    )

    def validate(self, cfg: PretrainConfig) -> None:
        super().validate(cfg)
        r.check(
            2 <= self.permutations <= 362880,
            f"--permutations must be in 2..362880 (9!), got {self.permutations}",
        )


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
    )
