"""Tiles of an image for the patch-based pretext tasks: jigsaw, context prediction, PIRL.

- :func:`tile_grid` cuts a ``grid × grid`` grid of square tiles, ``gap`` pixels apart and each
  moved by its own random jitter, out of a batch of images in one gather (Noroozi & Favaro
  2016, §3.2: 64 px tiles at random places in the 75 px cells of a 225 px crop; Doersch et al.
  2015, §3: 96 px patches with a gap of half a patch and a jitter of up to 7 px).
- :func:`permutation_set` chooses the jigsaw's permutation set by maximal Hamming distance
  (Noroozi & Favaro, §3.3, Algorithm 1), :func:`min_hamming_distance` measures a set.
- :func:`encode_tiles` runs every tile of a batch through one (siamese) backbone;
  :func:`standardize_tiles` normalises each tile on its own (per channel or over all its
  channels), :func:`rgb_jitter`, :func:`drop_colour` and :func:`augment_patches` change each
  tile on its own, :func:`grayscale_puzzles` and :func:`project_colours` change the colours of
  whole puzzles (all against low-level shortcuts between tiles).
- :func:`neighbour_pairs` lists the pairs of adjacent tiles and their relative position
  (context prediction's 8 classes); :class:`TileClassifier` is the late-fusion head both
  tasks share (an fc per tile, the tiles' outputs concatenated, an MLP to the classes).
- :class:`TileOptions` declares ``--tile-size``, ``--tile-gap`` and ``--tile-jitter`` once for
  every method that cuts tiles.

Every random draw comes from the ``torch.Generator`` passed in, on the images' device.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..augment import ViewGenerator
from ..errors import ConfigError
from ..heads import projection_head
from ..option import opt
from . import registry as r

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = [
    "TileClassifier",
    "TileOptions",
    "augment_patches",
    "drop_colour",
    "encode_tiles",
    "grayscale_puzzles",
    "grid_side",
    "min_hamming_distance",
    "neighbour_pairs",
    "permutation_set",
    "project_colours",
    "rgb_jitter",
    "standardize_tiles",
    "tile_grid",
]


def grid_side(grid: int, tile: int, gap: int) -> int:
    """The side of a ``grid × grid`` grid of ``tile`` px tiles ``gap`` px apart:
    ``grid·tile + (grid − 1)·gap`` (Noroozi's 3 × 64 + 2 × 11 = 214 px in a 225 px crop)."""
    return grid * tile + (grid - 1) * gap


def tile_grid(
    images: Tensor,
    *,
    grid: int,
    tile: int,
    gap: int,
    jitter: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``grid × grid`` tiles of each image: ``N×C×H×W → N×grid²×C×tile×tile``, row-major
    (tile k at row ``k // grid``, column ``k % grid``).

    The grid (side :func:`grid_side`) is centred on the image (its top-left corner at
    ``((H − side) // 2, (W − side) // 2)``); tile (r, c) starts at ``r·(tile + gap)``,
    ``c·(tile + gap)`` from that corner, moved by its own integer offsets ``dy, dx`` uniform in
    ``[−jitter, jitter]`` drawn from ``generator`` (on the images' device) and clamped so the tile
    stays inside the image. ``generator=None``: no jitter (evaluation, tests).

    One gather over the whole batch: no Python loop over images or tiles.

    Raises:
        ConfigError: the grid does not fit the image (names ``--tile-size`` and ``--tile-gap``).
    """
    n, c, h, w = images.shape
    side = grid_side(grid, tile, gap)
    if side > min(h, w):
        raise ConfigError(
            f"a {grid}×{grid} grid of --tile-size {tile} px tiles with --tile-gap {gap} is "
            f"{side} px wide and does not fit {h}×{w} px images; lower --tile-size or --tile-gap"
        )
    device = images.device
    steps = torch.arange(grid, device=device) * (tile + gap)
    top = ((h - side) // 2 + steps).repeat_interleave(grid)  # T: row of tile k = k // grid
    left = ((w - side) // 2 + steps).repeat(grid)  # T: column of tile k = k % grid
    top, left = top.expand(n, -1), left.expand(n, -1)  # N×T
    if generator is not None and jitter > 0:
        shift = torch.randint(
            -jitter, jitter + 1, (2, n, grid * grid), generator=generator, device=device
        )
        top = (top + shift[0]).clamp(0, h - tile)
        left = (left + shift[1]).clamp(0, w - tile)
    offsets = torch.arange(tile, device=device)
    rows = (top[..., None] + offsets)[..., :, None]  # N×T×t×1
    cols = (left[..., None] + offsets)[..., None, :]  # N×T×1×t
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    tiles = images.permute(0, 2, 3, 1)[batch, rows, cols]  # N×T×t×t×C
    return tiles.permute(0, 1, 4, 2, 3)


@functools.lru_cache(maxsize=4)
def _all_permutations(cells: int) -> Tensor:
    """Every permutation of ``range(cells)`` in lexicographic order: ``cells!×cells`` uint8."""
    return torch.tensor(list(itertools.permutations(range(cells))), dtype=torch.uint8)


@functools.lru_cache(maxsize=8)
def _permutation_set(count: int, cells: int, seed: int, criterion: str) -> Tensor:
    candidates = _all_permutations(cells)  # P̄: cells!×cells
    total = candidates.shape[0]
    if not 0 < count <= total:
        raise ConfigError(f"--permutations must be in 1..{total} ({cells}!), got {count}")
    if criterion not in ("min", "sum"):
        raise ValueError(f"permutation_set: criterion must be min or sum, got {criterion!r}")
    g = torch.Generator().manual_seed(seed)
    j = int(torch.randint(total, (1,), generator=g))  # Algorithm 1, line 3: j ∼ U[1, cells!]
    # Hamming(p, q) = cells − matches(p, q); matches with row j = Σ_k same[k·cells + P̄j[k]],
    # where same[k·cells + v] marks the candidates holding v in cell k (uint8 rows: fast adds)
    columns = candidates.t()
    same = torch.stack([columns[k] == v for k in range(cells) for v in range(cells)]).byte()
    summed = torch.zeros(total, dtype=torch.int32)  # Σ over P of matches: minimal ⇔ D̄ maximal
    most = torch.zeros(total, dtype=torch.uint8)  # max over P of matches ⇔ minimal distance
    weight = count * cells + 1  # the minimal distance first, the sum among equals
    chosen = []
    for _ in range(count):
        chosen.append(j)
        cells_of_j = [k * cells + v for k, v in enumerate(candidates[j].tolist())]
        matches = same[cells_of_j[0]].clone()
        for row in cells_of_j[1:]:
            matches += same[row]
        summed += matches
        summed[j] = total * cells  # line 7: P̄j leaves the candidates
        torch.maximum(most, matches, out=most)
        score = summed if criterion == "sum" else most.int() * weight + summed
        j = int(score.argmin())  # line 10, the first index on ties
    return candidates[chosen].long()


def permutation_set(count: int, cells: int = 9, *, seed: int = 0, criterion: str = "min") -> Tensor:
    """The jigsaw's permutation set: ``count×cells`` int64, each row a permutation of
    ``range(cells)``, chosen greedily for maximal Hamming distance.

    Noroozi & Favaro 2016, §3.3, Algorithm 1, and their code (the PyTorch port's
    ``select_permutations.py --selection max``; the Caffe release ships its result as
    ``permutations_100_max.bin``): the first permutation is drawn uniformly from all ``cells!``
    (here from ``seed``, so the set is deterministic in it; it is not the identity), then each
    next one is the remaining permutation farthest from those already chosen.

    ``criterion="sum"`` is Algorithm 1 to the letter: the largest *sum* of Hamming distances to
    the chosen ones (``D̄ = 1ᵀD``, ``argmax`` taking the first, in lexicographic order, of the
    many ties). That sum does not keep the set's minimal distance up: ties are broken towards
    near neighbours of earlier rows (the 100-set of seed 0 has two rows 2 cells apart).
    ``criterion="min"`` (the default) takes the largest *minimal* distance to the chosen ones,
    ties broken by the paper's sum and then by order: the same greedy scheme and objective
    among equals, with a minimal distance of 6 cells on the 100-set instead of 2 (the paper's
    §3.3 finds that a larger minimal distance makes a harder task and better features).

    The distances of all candidates are kept as a running sum and minimum (one vectorised
    comparison of the ``cells!`` candidates with the newly chosen row per step), so 1000 of 9!
    take a few seconds on a CPU; results are cached.

    >>> p = permutation_set(4, cells=4)
    >>> p.shape, bool((p.sort(dim=1).values == torch.arange(4)).all())
    (torch.Size([4, 4]), True)
    >>> min_hamming_distance(p)  # four permutations of 4 cells that differ everywhere
    4
    """
    return _permutation_set(count, cells, seed, criterion).clone()


def min_hamming_distance(perms: Tensor) -> int:
    """The smallest Hamming distance (cells that differ) between two rows of ``perms``
    (``K×cells``, K ≥ 2); ``0`` when two rows are equal.

    >>> min_hamming_distance(torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]]))
    2
    """
    if perms.shape[0] < 2:
        raise ValueError("min_hamming_distance: needs at least two rows")
    distance = (perms[:, None, :] != perms[None, :, :]).sum(dim=-1)  # K×K
    distance.fill_diagonal_(perms.shape[1] + 1)
    return int(distance.min())


def encode_tiles(backbone: nn.Module, tiles: Tensor) -> Tensor:
    """Every tile through the same (siamese) ``backbone`` in one batch:
    ``N×T×C×t×t → N×T×D`` (Noroozi & Favaro's context-free network, Doersch et al.'s
    late-fusion pair: the weights are shared by every tile)."""
    n, t = tiles.shape[:2]
    z = backbone(tiles.reshape(n * t, *tiles.shape[2:]))  # (N·T)×D
    return z.view(n, t, -1)


def standardize_tiles(tiles: Tensor, eps: float = 1e-5, *, per_channel: bool = False) -> Tensor:
    """Each tile (``...×C×t×t``) normalised on its own, so that the brightness, contrast (and,
    per channel, the colour balance) of neighbouring tiles do not give their arrangement away.

    - ``per_channel=True``: each channel of each tile to zero mean and unit standard deviation
      over its pixels — the jigsaw's PyTorch port (bbrattoli/JigsawPuzzlePytorch,
      ``Dataset/JigsawImageLoader.py``, commit ec85994b9f244d08652a3975c1c7a55483cdfc05:
      ``tile.view(3, -1).mean(dim=1)`` and ``.std(dim=1)``, torch's unbiased std, and a std of
      0 replaced by 1), exactly as there;
    - ``per_channel=False``: one mean and one (biased) std over all the tile's pixels and
      channels, plus ``eps`` — a reading of Noroozi & Favaro's §3.2, which normalises each
      tile's mean and standard deviation without saying per channel, what the port's first
      version did (commit 0beb2bce4e25fc481a61daa258faaa98d3ab46e3: ``tile.mean()``,
      ``tile.std()``; per channel since commit
      e224d35a03b7d2b516e2f9c6ceddb1339b8b9beb), and close to Doersch et al.'s code
      (cdoersch/deepcontext ``train.py`` ``prep_image``: each patch scaled to a fixed RMS over
      all its channels); context prediction uses it.
    """
    if per_channel:
        mean = tiles.mean(dim=(-2, -1), keepdim=True)
        std = tiles.std(dim=(-2, -1), keepdim=True)  # unbiased, as the port's
        return (tiles - mean) / torch.where(std == 0, torch.ones_like(std), std)
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


#: The jigsaw port's ``rgb_jittering``: ``np.random.randint(-2, 2)`` grey levels per channel.
JITTER_LEVELS = (-2, 1)


def rgb_jitter(tiles: Tensor, generator: torch.Generator) -> Tensor:
    """The jigsaw port's ``rgb_jittering`` (``Dataset/JigsawImageLoader.py``, commit
    ec85994b9f244d08652a3975c1c7a55483cdfc05): each channel of each tile (``N×T×C×t×t``, pixel
    values in [0, 1]) shifted by its own integer number of grey levels k ∈ {−2, −1, 0, 1}
    (``np.random.randint(-2, 2)``, drawn here from ``generator``), i.e. by ``k/255``, then
    clipped to [0, 1] as the port clips to 0..255. The per-channel normalisation that follows
    in the port (:func:`standardize_tiles` with ``per_channel=True``) cancels the shift except
    where it clipped. The port's first version (commit 0beb2bce4e25fc481a61daa258faaa98d3ab46e3)
    multiplied each channel by a gain of 0.8–1.2 and shifted all three by ±0..5 levels; commit
    e224d35a03b7d2b516e2f9c6ceddb1339b8b9beb ("jittering +-2") replaced both with this shift."""
    n, t, c = tiles.shape[:3]
    low, high = JITTER_LEVELS
    k = torch.randint(low, high + 1, (n, t, c, 1, 1), generator=generator, device=tiles.device)
    return (tiles + k.to(tiles.dtype) / 255).clamp(0, 1)


#: PIL's ``convert("L")`` (ITU-R 601-2 luma), the jigsaw port's grayscale.
LUMA = (0.299, 0.587, 0.114)
#: The Caffe jigsaw code's colour projection (``data_transformer.cpp``), rows r', g', b' of r, g, b.
COLOUR_PROJECTION = (
    (0.8333, 0.3333, -0.1667),
    (0.3333, 0.3333, 0.3333),
    (-0.1667, 0.3333, 0.8333),
)


def grayscale_puzzles(tiles: Tensor, which: Tensor) -> Tensor:
    """The puzzles ``which`` (``N`` booleans) of ``N×T×3×t×t`` RGB tiles (pixel values) made
    grayscale: every tile of such an image becomes its luma ``0.299 R + 0.587 G + 0.114 B`` in
    all three channels — the jigsaw port's ``img.convert('LA').convert('RGB')``, for 30 % of
    the images (``np.random.rand() < 0.30``; ``Dataset/JigsawImageLoader.py``, commit
    ec85994b9f244d08652a3975c1c7a55483cdfc05). The Caffe code (MehdiNoroozi/JigsawPuzzleSolver
    ``caffe-master-jps++/src/caffe/data_transformer.cpp``, commit
    8c7ec09789555c269475de9707e5e6c7f6edbcf7) makes 50 % of the puzzles gray with the channels'
    mean instead of the luma. Against chromatic-aberration shortcuts."""
    weights = torch.tensor(LUMA, device=tiles.device, dtype=tiles.dtype).view(1, 1, 3, 1, 1)
    luma = (tiles * weights).sum(dim=2, keepdim=True).expand_as(tiles)
    return torch.where(which.view(-1, 1, 1, 1, 1), luma, tiles)


def project_colours(tiles: Tensor, which: Tensor) -> Tensor:
    """The Caffe jigsaw code's colour projection (MehdiNoroozi/JigsawPuzzleSolver,
    ``caffe-master-jps++/src/caffe/data_transformer.cpp``, commit
    8c7ec09789555c269475de9707e5e6c7f6edbcf7): every tile of the puzzles ``which`` (``N``
    booleans) of ``N×T×3×t×t`` RGB tiles mapped by :data:`COLOUR_PROJECTION`, which keeps grays
    gray and pulls each channel towards the others (the Caffe code projects half of the
    puzzles it did not make gray). Applied to the pixel values; the Caffe code applies it
    after subtracting its mean colour, which differs by a constant per channel that the
    per-channel normalisation removes."""
    matrix = torch.tensor(COLOUR_PROJECTION, device=tiles.device, dtype=tiles.dtype)
    projected = torch.einsum("ij,ntjhw->ntihw", matrix, tiles)
    return torch.where(which.view(-1, 1, 1, 1, 1), projected, tiles)


def drop_colour(tiles: Tensor, generator: torch.Generator) -> Tensor:
    """Colour dropping (Doersch et al. 2015, §3.1, and ``prep_image`` of their code): of each
    tile (``N×T×C×t×t``) one channel, drawn from ``generator``, is kept (less its mean) and the
    others become Gaussian noise of 1/100 of the kept channel's standard deviation (the
    paper's words; the code draws uniform noise of ±0.5 grey levels, about as small), so
    chromatic aberration (colour fringes that grow towards the image border) cannot tell the
    patches' positions. One channel: only the mean is removed."""
    n, t, c = tiles.shape[:3]
    kept = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
    if c == 1:
        return kept
    keep = torch.randint(c, (n, t, 1, 1, 1), generator=generator, device=tiles.device)
    mask = torch.arange(c, device=tiles.device).view(1, 1, c, 1, 1) == keep  # N×T×C×1×1
    scale = (kept * mask).sum(dim=2, keepdim=True).std(dim=(-2, -1), keepdim=True) / 100
    noise = torch.randn(tiles.shape, generator=generator, device=tiles.device, dtype=tiles.dtype)
    return torch.where(mask, kept, noise * scale)


def augment_patches(patches: Tensor, views: ViewGenerator, generator: torch.Generator) -> Tensor:
    """Each of ``M×C×p×p`` normalised patches augmented on its own by ``views`` (a mocolab
    :class:`ViewGenerator` whose config has mean 0, std 1). The loop hands over normalised
    images, so each patch is mapped to 0–255 by its own min and max, augmented, and mapped back."""
    lo = patches.amin(dim=(1, 2, 3), keepdim=True)
    span = (patches.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    u8 = ((patches - lo) / span).mul(255).round_().to(torch.uint8)
    return views(u8, generator).to(patches.dtype) * span + lo


#: The relative positions of context prediction (Doersch et al., Fig. 2; ``pos2lbl`` of their
#: code): class k is the offset ``(dy, dx)`` of the second patch from the first, row-major
#: around the centre.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_pairs(grid: int = 3, *, centre_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The ordered pairs of adjacent tiles of a ``grid × grid`` grid (row-major tile indices)
    and their class: ``(first, second, label)``, int64 vectors of one row per pair, where
    ``label`` indexes :data:`NEIGHBOURS`, the position of ``second`` relative to ``first``.

    ``centre_only``: the centre tile first and each of its 8 neighbours second (the paper's
    Fig. 2; 8 pairs, each class once). Otherwise every tile with each of its neighbours, in
    both orders (Doersch et al.'s code pairs every patch of its grid so; 40 pairs on 3 × 3).
    """
    pairs = []
    for y, x in itertools.product(range(grid), repeat=2):
        if centre_only and (y, x) != (grid // 2, grid // 2):
            continue
        for label, (dy, dx) in enumerate(NEIGHBOURS):
            if 0 <= y + dy < grid and 0 <= x + dx < grid:
                pairs.append((y * grid + x, (y + dy) * grid + x + dx, label))
    return tuple(torch.tensor(column) for column in zip(*pairs))  # type: ignore[return-value]


class TileClassifier(nn.Module):
    """The late-fusion head of the tile tasks: ``fc6`` on each tile's backbone feature
    (``Linear → BN → ReLU``, shared by the tiles), the ``K`` tiles' outputs concatenated in
    order, then an MLP (``fc7 …``, BN after each hidden layer) to the classes — Noroozi &
    Favaro's context-free network (fc6 per tile, fc7 on the 9 concatenated, fc8 to the
    permutations) and Doersch et al.'s pair network (fc6 per patch, fc7–fc9 on the pair).

    Args:
        in_dim: the backbone's ``num_features``; dim: fc6 width per tile; tiles: K;
        classes: outputs; hidden_dim: width of the hidden layers after the concatenation;
        layers: layers after the concatenation (1: a linear classifier).
    """

    def __init__(
        self, in_dim: int, dim: int, tiles: int, classes: int, hidden_dim: int, layers: int
    ) -> None:
        super().__init__()
        self.tile_fc = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)
        )
        self.tiles = tiles
        self.fc = projection_head(tiles * dim, classes, hidden_dim, layers, batch_norm=True)

    def embed(self, z: Tensor) -> Tensor:
        """fc6 of each tile: ``N×T×D → N×T×dim``."""
        n, t = z.shape[:2]
        return self.tile_fc(z.reshape(n * t, -1)).view(n, t, -1)

    def classify(self, e: Tensor) -> Tensor:
        """``M×K×dim`` fc6 outputs of K tiles, in order → ``M×classes`` logits."""
        return self.fc(e.flatten(1))

    def forward(self, z: Tensor) -> Tensor:
        """``N×K×D`` backbone features of K tiles, in order → ``N×classes`` logits."""
        return self.classify(self.embed(z))


# -- the tile flags: one name, one type, one help text for every method that cuts tiles -------
def tile_size(default: int) -> Any:
    return opt(default, "side of each tile, pixels (Jigsaw 64, Context 96 on ImageNet)")


def tile_gap(default: int) -> Any:
    return opt(default, "pixels between neighbouring tiles of the grid, before jitter")


def tile_jitter(default: int) -> Any:
    return opt(default, "each tile moved by up to this many pixels in y and x (0: none)")


@dataclass
class TileOptions(r.MethodOptions):
    """The options of a method that cuts a 3 × 3 grid of tiles (:func:`tile_grid`), sized for
    28–32 px images: 8 px tiles, 1 px apart, jittered by ±1 (26 px: fits 28 and 32)."""

    tile_size: int = tile_size(8)
    tile_gap: int = tile_gap(1)
    tile_jitter: int = tile_jitter(1)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(self.tile_size > 0, f"--tile-size must be positive, got {self.tile_size}")
        r.check(
            min(self.tile_gap, self.tile_jitter) >= 0,
            f"--tile-gap and --tile-jitter must be >= 0, got {self.tile_gap}, {self.tile_jitter}",
        )
        side = grid_side(3, self.tile_size, self.tile_gap)
        r.check(
            cfg.crop_size is None or side <= cfg.crop_size,
            f"a 3×3 grid of --tile-size {self.tile_size} px tiles with --tile-gap "
            f"{self.tile_gap} is {side} px wide, more than --crop-size {cfg.crop_size}; lower "
            "--tile-size or --tile-gap",
        )
