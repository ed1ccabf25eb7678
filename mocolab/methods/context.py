"""Context prediction: where is the second patch relative to the first?

Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context Prediction",
ICCV 2015. Official code: github.com/cdoersch/deepcontext (``train.py``), which mocolab
follows where it is more precise than the text.

- §3, Fig. 2: a patch and one of its 8 neighbours on a 3 × 3 grid; the network says which of
  the 8 positions (``pos2lbl`` of the code: row-major around the first patch) the second one
  holds; cross-entropy over the 8 classes.
- §3.1, shortcuts: a gap between the patches (half a patch: 48 px for 96 px patches) and a
  jitter of up to 7 px (``--tile-gap``, ``--tile-jitter``:
  :func:`~mocolab.methods.tiles.tile_grid`), so low-level continuation of edges and textures
  does not solve the task; against chromatic aberration, colour dropping
  (:func:`~mocolab.methods.tiles.drop_colour`: one channel kept per patch, the others noise);
  each patch then normalised on its own (the code scales it to a fixed RMS).
- §3.2, the late-fusion pair network: each patch through the same backbone, ``fc6`` per patch,
  the pair's outputs concatenated, ``fc7``, ``fc8`` (4096 each in the code) and ``fc9`` to the
  8 positions (:class:`~mocolab.methods.tiles.TileClassifier`, ``--head-layers 3``).
- Batching (``--context-pairs``): the code cuts a whole grid of patches from each image and
  trains on every pair of adjacent patches, in both orders; ``all`` does the same on the
  3 × 3 grid (40 pairs per image, each of the 9 patches encoded once), ``centre`` keeps the
  centre patch's 8 pairs of the paper's figure (each class once per image). ``all`` is the
  default: five times the pairs for the same 9 patch encodings.

Where mocolab differs: a mocolab ResNet (BN) encodes the patches instead of the code's
AlexNet with BN in conv3–fc6; the code's random down-sampling of a third of the patches
(to as few as 100 pixels, against pixelation cues) and its projection alternative to colour
dropping are left out; the grid is centred on the loop's augmented view (``--augment cpc``:
a resized crop of 50–100% and a flip) instead of placed at random on an image resized to
150k–450k pixels. The evaluated backbone is that ResNet on the whole image.
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
    NEIGHBOURS,
    TileClassifier,
    TileOptions,
    drop_colour,
    encode_tiles,
    neighbour_pairs,
    standardize_tiles,
    tile_gap,
    tile_grid,
    tile_jitter,
    tile_size,
)

if TYPE_CHECKING:
    from ..config import PretrainConfig


class Context(Method):
    """Context prediction (relative patch location) on a mocolab backbone.

    Args:
        backbone: the patch encoder and evaluated encoder (``N×C×H×W → N×D``).
        tile_size, tile_gap, tile_jitter: the 3 × 3 grid of patches (:func:`tile_grid`).
        pairs: ``all`` (every ordered pair of adjacent patches) or ``centre`` (the centre
            and its 8 neighbours), see :func:`neighbour_pairs`.
        dim: fc6 width per patch; hidden_dim: fc7/fc8 width; head_layers: layers after the
            concatenation (3: fc7, fc8, fc9, as the code).
    """

    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        *,
        tile_size: int = 8,
        tile_gap: int = 2,
        tile_jitter: int = 1,
        pairs: str = "all",
        dim: int = 128,
        hidden_dim: int = 512,
        head_layers: int = 3,
    ) -> None:
        super().__init__()
        self.query_encoder = encoder(backbone, nn.Identity())  # evaluated: the whole image
        first, second, labels = neighbour_pairs(3, centre_only=pairs == "centre")
        self.register_buffer("first", first, persistent=False)
        self.register_buffer("second", second, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        self.classifier = TileClassifier(
            backbone.num_features, dim, 2, len(NEIGHBOURS), hidden_dim, head_layers
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
            tiles = drop_colour(tiles, g)
        e = self.classifier.embed(encode_tiles(self.backbone, standardize_tiles(tiles)))  # N×9×E
        pairs = torch.stack([e[:, self.first], e[:, self.second]], dim=2)  # N×M×2×E
        logits = self.classifier.classify(pairs.flatten(0, 1))  # (N·M)×8
        labels = self.labels.repeat(x.shape[0])  # (N·M), pair m of image n at row n·M + m
        loss = F.cross_entropy(logits.float(), labels)
        acc = classification_accuracy(logits, labels)
        return LossOutput(loss, {"acc": acc})


@dataclass
class ContextOptions(TileOptions):
    """Context prediction's own options, sized for 28–32 px images: 8 px patches 2 px apart
    (a quarter patch; the paper's half patch leaves no room on 28 px), jitter ±1; the ImageNet
    preset has the paper's 96 px patches, gap 48, jitter 7."""

    tile_size: int = tile_size(8)
    tile_gap: int = tile_gap(2)
    tile_jitter: int = tile_jitter(1)
    context_pairs: str = opt(
        "all",
        "all (every ordered pair of adjacent patches of the 3x3 grid: the official code) | "
        "centre (the centre and its 8 neighbours: the paper's figure)",
        choices=("all", "centre"),
    )

    def validate(self, cfg: PretrainConfig) -> None:
        super().validate(cfg)
        r.check(
            self.context_pairs in ("all", "centre"),
            f"--context-pairs must be all or centre, got {self.context_pairs!r}",
        )


# The code's pair network: fc6 per patch, fc7 and fc8 of 4096, fc9 to the 8 positions.
@r.register_method(
    "context",
    options=ContextOptions,
    summary="Context prediction (Doersch et al. 2015)",
    defaults={
        "dim": 128,
        "hidden_dim": 512,
        "head_layers": 3,
        "augment": "cpc",
        "lr_schedule": "cosine",
    },
)
def _context(
    backbone: nn.Module, cfg: PretrainConfig, o: ContextOptions, ctx: r.BuildContext
) -> Context:
    return Context(
        backbone,
        tile_size=o.tile_size,
        tile_gap=o.tile_gap,
        tile_jitter=o.tile_jitter,
        pairs=o.context_pairs,
        dim=cfg.dim,
        hidden_dim=cfg.hidden_dim or 4 * cfg.dim,
        head_layers=cfg.head_layers,
    )
