"""Tiles of an image for the patch-based pretext tasks: jigsaw, context prediction, PIRL.

- :func:`tile_grid` cuts a ``grid × grid`` grid of square tiles, ``gap`` pixels apart and each
  moved by its own random jitter, out of a batch of images in one gather (Noroozi & Favaro
  2016, §3.2: 64 px tiles at random places in the 75 px cells of a 225 px crop; Doersch et al.
  2015, §3: 96 px patches with a gap of half a patch and a jitter of up to 7 px).
- :func:`permutation_set` chooses the jigsaw's permutation set by maximal Hamming distance
  (Noroozi & Favaro, §3.3, Algorithm 1), :func:`min_hamming_distance` measures a set.
- :func:`encode_tiles` runs every tile of a batch through one (siamese) backbone;
  :func:`standardize_tiles` normalises each tile on its own and :func:`augment_patches`
  augments each tile on its own (both against low-level shortcuts between tiles).

Every random draw comes from the ``torch.Generator`` passed in, on the images' device.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor, nn

from ..augment import ViewGenerator
from ..errors import ConfigError

__all__ = [
    "augment_patches",
    "encode_tiles",
    "grid_side",
    "min_hamming_distance",
    "permutation_set",
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


def standardize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile's channels to zero mean and unit standard deviation over its own pixels
    (``...×C×t×t``; Noroozi & Favaro §3.2: each tile normalised independently, so the mean and
    contrast of neighbours do not give their order away)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


def augment_patches(patches: Tensor, views: ViewGenerator, generator: torch.Generator) -> Tensor:
    """Each of ``M×C×p×p`` normalised patches augmented on its own by ``views`` (a mocolab
    :class:`ViewGenerator` whose config has mean 0, std 1). The loop hands over normalised
    images, so each patch is mapped to 0–255 by its own min and max, augmented, and mapped back."""
    lo = patches.amin(dim=(1, 2, 3), keepdim=True)
    span = (patches.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    u8 = ((patches - lo) / span).mul(255).round_().to(torch.uint8)
    return views(u8, generator).to(patches.dtype) * span + lo
