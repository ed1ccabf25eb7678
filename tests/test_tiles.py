"""The shared tile cutter of the patch-based methods: the tile grid against hand-computed tile
contents, its jitter, the permutation set against the official code's and a plain re-reading of
Noroozi & Favaro's Algorithm 1, the Hamming distance, the siamese tile encoder."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch import nn

from mocolab.config import ConfigError
from mocolab.methods.tiles import (
    NEIGHBOURS,
    TileClassifier,
    augment_patches,
    drop_colour,
    encode_tiles,
    grayscale_puzzles,
    grid_side,
    min_hamming_distance,
    neighbour_pairs,
    permutation_set,
    project_colours,
    rgb_jitter,
    standardize_tiles,
    tile_grid,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def coordinates(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """An image batch whose pixel (n, c, y, x) holds the number n·10⁶ + c·10⁴ + y·100 + x."""
    n_, c_, y, x = torch.meshgrid(*(torch.arange(s) for s in (n, c, h, w)), indexing="ij")
    return (n_ * 10**6 + c_ * 10**4 + y * 100 + x).double()


def top_left(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) of the top-left pixel of each tile of ``coordinates`` images: N×T each."""
    corner = tiles[:, :, 0, 0, 0].long() % 10**4
    return corner // 100, corner % 100


# --- tile_grid ---------------------------------------------------------------------------------


def test_tiles_are_the_hand_computed_blocks_of_a_centred_grid():
    # 3×3 tiles of 5 px, 1 px apart: 17 px, centred on 20×19 px → corner at ((20−17)//2, (19−17)//2)
    assert grid_side(3, 5, 1) == 17
    x = coordinates(2, 3, 20, 19)
    tiles = tile_grid(x, grid=3, tile=5, gap=1, jitter=2)  # no generator: no jitter
    assert tiles.shape == (2, 9, 3, 5, 5)
    for n in range(2):
        for k in range(9):
            y0, x0 = 1 + 6 * (k // 3), 1 + 6 * (k % 3)  # row-major: row k // 3, column k % 3
            for c in range(3):
                want = torch.tensor(
                    [
                        [n * 10**6 + c * 10**4 + (y0 + i) * 100 + x0 + j for j in range(5)]
                        for i in range(5)
                    ],
                    dtype=torch.float64,
                )
                assert torch.equal(tiles[n, k, c], want), (n, k, c)
    # tile 5 (row 1, column 2) by hand: its corner is pixel (7, 13)
    assert tiles[1, 5, 2, 0, 0] == 1 * 10**6 + 2 * 10**4 + 7 * 100 + 13


def test_a_grid_that_fills_the_image_has_no_border_and_a_2x2_grid_without_gap():
    x = coordinates(1, 1, 8, 8)
    tiles = tile_grid(x, grid=2, tile=4, gap=0, jitter=0)
    assert torch.equal(
        tiles[0, :, 0],
        torch.stack([x[0, 0, :4, :4], x[0, 0, :4, 4:], x[0, 0, 4:, :4], x[0, 0, 4:, 4:]]),
    )


@pytest.mark.parametrize("side, tile, gap, jitter", [(28, 8, 1, 1), (32, 8, 2, 3), (26, 8, 1, 2)])
def test_jitter_moves_each_tile_by_its_own_offsets_within_bounds_and_inside_the_image(
    side, tile, gap, jitter
):
    x = coordinates(64, 1, side, side)
    g = torch.Generator().manual_seed(0)
    tiles = tile_grid(x, grid=3, tile=tile, gap=gap, jitter=jitter, generator=g)
    y, x0 = top_left(tiles)
    corner = (side - grid_side(3, tile, gap)) // 2
    ny = corner + (torch.arange(9) // 3) * (tile + gap)  # the tiles' places without jitter
    nx = corner + (torch.arange(9) % 3) * (tile + gap)
    dy, dx = y - ny, x0 - nx
    assert dy.abs().max() <= jitter and dx.abs().max() <= jitter
    assert y.min() >= 0 and x0.min() >= 0 and (y + tile).max() <= side and (x0 + tile).max() <= side
    # each tile is still a whole block of the image at its (moved) place
    for n, k in [(0, 0), (5, 4), (63, 8)]:
        a, b = int(y[n, k]), int(x0[n, k])
        assert torch.equal(tiles[n, k, 0], x[n, 0, a : a + tile, b : b + tile])
    # every offset in [−j, j] occurs and the offsets differ between tiles and images
    # (an offset pushed outside the image is clamped: then only the interior tiles reach every value)
    centre = dy[:, 4]
    assert set(centre.tolist()) == set(range(-jitter, jitter + 1))
    assert len({tuple(r) for r in dy.tolist()}) > 32


def test_jitter_is_clamped_at_the_border():
    x = coordinates(32, 1, 12, 12)  # the 3×4 px grid fills the image: the outer tiles clamp
    tiles = tile_grid(
        x, grid=3, tile=4, gap=0, jitter=2, generator=torch.Generator().manual_seed(1)
    )
    y, x0 = top_left(tiles)
    assert y.min() == 0 and y.max() == 8 and x0.min() == 0 and x0.max() == 8
    assert (y[:, :3] <= 2).all() and (y[:, 6:] >= 6).all()  # top row: nominal 0, at most +2


def test_same_generator_state_same_tiles_and_none_means_no_jitter():
    x = torch.randn(4, 3, 32, 32)
    a = tile_grid(x, grid=3, tile=8, gap=2, jitter=3, generator=torch.Generator().manual_seed(7))
    b = tile_grid(x, grid=3, tile=8, gap=2, jitter=3, generator=torch.Generator().manual_seed(7))
    c = tile_grid(x, grid=3, tile=8, gap=2, jitter=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(
        tile_grid(x, grid=3, tile=8, gap=2, jitter=3),
        tile_grid(x, grid=3, tile=8, gap=2, jitter=0, generator=torch.Generator()),
    )


def test_tiles_pass_gradients_to_the_image():
    x = torch.randn(2, 1, 10, 10, requires_grad=True)
    tile_grid(
        x, grid=2, tile=4, gap=1, jitter=1, generator=torch.Generator().manual_seed(0)
    ).sum().backward()
    assert x.grad.sum() == 2 * 4 * 16  # every tile pixel once


def test_a_grid_that_does_not_fit_is_a_config_error_naming_the_flags():
    with pytest.raises(ConfigError, match=r"--tile-size 8 .*--tile-gap 3 is 30 px .*28×28"):
        tile_grid(torch.zeros(1, 1, 28, 28), grid=3, tile=8, gap=3, jitter=0)
    tile_grid(torch.zeros(1, 1, 28, 28), grid=3, tile=8, gap=2, jitter=0)  # 28 px: fits


# --- permutations ------------------------------------------------------------------------------


def hamming(p, q) -> int:
    return sum(a != b for a, b in zip(p, q))


def greedy_by_hand(count: int, cells: int, first: int, criterion: str) -> list[tuple[int, ...]]:
    """Noroozi & Favaro's Algorithm 1 read plainly, one candidate at a time: start from the
    ``first`` permutation (lexicographic order), then add the candidate with the largest sum of
    Hamming distances to the chosen ones (``sum``) or the largest minimal distance, ties broken
    by that sum (``min``); the first candidate in order on ties."""
    candidates = list(itertools.permutations(range(cells)))
    chosen = [candidates.pop(first)]
    while len(chosen) < count:

        def key(p):
            d = [hamming(p, q) for q in chosen]
            return (sum(d),) if criterion == "sum" else (min(d), sum(d))

        best = max(range(len(candidates)), key=lambda i: (key(candidates[i]), -i))
        chosen.append(candidates.pop(best))
    return chosen


@pytest.mark.parametrize("criterion", ["min", "sum"])
@pytest.mark.parametrize("count, cells", [(6, 4), (10, 4), (24, 4), (12, 5)])
def test_permutation_set_is_algorithm_1_computed_by_hand(count, cells, criterion):
    p = permutation_set(count, cells, seed=3, criterion=criterion)
    first = list(itertools.permutations(range(cells))).index(tuple(p[0].tolist()))
    assert p.tolist() == [list(q) for q in greedy_by_hand(count, cells, first, criterion)]


def test_min_hamming_distance_is_the_brute_force_minimum():
    assert min_hamming_distance(torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0]])) == 2
    assert min_hamming_distance(torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]])) == 3
    assert min_hamming_distance(torch.tensor([[0, 1], [0, 1]])) == 0
    p = permutation_set(10, 5, seed=1)
    assert min_hamming_distance(p) == min(
        hamming(a, b) for a, b in itertools.combinations(p.tolist(), 2)
    )


def test_four_permutations_of_four_cells_differ_everywhere_and_24_of_4_is_all_of_them():
    assert min_hamming_distance(permutation_set(4, 4)) == 4  # a Latin square: the best possible
    assert sorted(map(tuple, permutation_set(24, 4).tolist())) == list(
        itertools.permutations(range(4))
    )


def average_distance(p: torch.Tensor) -> float:
    k = p.shape[0]
    return (p[:, None] != p[None]).sum(-1).sum().item() / (k * (k - 1))


def test_the_100_set_matches_the_official_set_on_average_and_beats_its_minimal_distance():
    """The official Caffe release's ``permutations_100_max.bin`` (read from
    MehdiNoroozi/JigsawPuzzleSolver): 100 rows, average Hamming distance 8.08, minimal 2."""
    for criterion, minimal in [("sum", 2), ("min", 6)]:
        p = permutation_set(100, criterion=criterion)
        assert p.shape == (100, 9) and p.dtype == torch.int64
        assert (p.sort(dim=1).values == torch.arange(9)).all()  # each row a permutation
        assert len({tuple(r) for r in p.tolist()}) == 100  # distinct
        assert average_distance(p) == pytest.approx(8.08)
        assert min_hamming_distance(p) == minimal


def test_the_1000_set_is_quick_distinct_and_at_least_as_spread_as_the_official_701_set():
    """The official ``permutations_701.bin``: minimal Hamming distance 3, average 7.999."""
    start = time.perf_counter()
    p = permutation_set(1000, seed=5)
    seconds = time.perf_counter() - start
    assert seconds < 30  # ~1 s on one idle core (a vectorised running sum and minimum)
    assert len({tuple(r) for r in p.tolist()}) == 1000
    assert (p.sort(dim=1).values == torch.arange(9)).all()
    assert min_hamming_distance(p) >= 3
    assert average_distance(p) > 7.99


def test_permutation_set_is_deterministic_in_its_seed():
    assert torch.equal(permutation_set(20, seed=4), permutation_set(20, seed=4))
    assert not torch.equal(permutation_set(20, seed=4), permutation_set(20, seed=9))
    p = permutation_set(20, seed=4)
    p.zero_()  # the caller gets a copy: the cache is untouched
    assert permutation_set(20, seed=4).sum() > 0


def test_permutation_count_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--permutations must be in 1\.\.24"):
        permutation_set(25, 4)
    with pytest.raises(ConfigError, match="--permutations"):
        permutation_set(0)


# --- encoding and per-tile processing ----------------------------------------------------------


def test_encode_tiles_is_the_same_backbone_on_every_tile():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tiles = torch.randn(2, 9, 3, 6, 6)
    z = encode_tiles(backbone, tiles)
    assert z.shape == (2, 9, 4)
    for n in range(2):
        for k in range(9):
            torch.testing.assert_close(z[n, k], backbone(tiles[n, k][None])[0])


def test_standardize_tiles_gives_each_tile_zero_mean_unit_std_over_its_pixels_and_channels():
    tiles = torch.randn(2, 9, 3, 5, 5) * torch.rand(2, 9, 1, 1, 1) * 10 + torch.randn(2, 9, 1, 1, 1)
    tiles[:, :, 1] += 3.0  # one channel brighter: one mean for the tile, not one per channel
    s = standardize_tiles(tiles)
    torch.testing.assert_close(s.mean(dim=(-3, -2, -1)), torch.zeros(2, 9), atol=1e-5, rtol=0)
    std = s.std(dim=(-3, -2, -1), unbiased=False)
    torch.testing.assert_close(std, torch.ones(2, 9), atol=1e-3, rtol=0)
    # by hand for one tile: (x − mean) / std over its 75 values
    x = tiles[1, 4]
    torch.testing.assert_close(s[1, 4], (x - x.mean()) / (x.std(unbiased=False) + 1e-5))
    assert s[:, :, 1].mean() > s[:, :, 0].mean() + 0.1  # the brighter channel stays brighter
    flat = torch.full((1, 1, 1, 2, 2), 3.0)  # a flat tile stays finite
    assert torch.equal(standardize_tiles(flat), torch.zeros_like(flat))


def test_per_channel_normalisation_of_a_2_tile_example_is_the_ports():
    """The jigsaw port (``JigsawImageLoader.py``): each channel of each tile less its mean,
    divided by its unbiased std (``tile.view(3, -1).std(dim=1)``), a std of 0 replaced by 1."""
    tiles = torch.tensor(
        [
            [[[1.0, 2.0], [3.0, 4.0]], [[2.0, 4.0], [6.0, 8.0]], [[7.0, 7.0], [7.0, 7.0]]],
            [[[10.0, 10.0], [10.0, 14.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 3.0], [1.0, 3.0]]],
        ]
    ).view(1, 2, 3, 2, 2)  # 1 image, 2 tiles, RGB, 2×2 pixels
    out = standardize_tiles(tiles, per_channel=True)[0]
    # tile 0: R 1..4, mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25)/3 = 5/3; G = 2·R (a
    # per-channel gain: the same after normalisation); B flat: std 0 → 1, all 0
    r = [(v - 2.5) / (5 / 3) ** 0.5 for v in (1, 2, 3, 4)]
    torch.testing.assert_close(out[0, 0].flatten(), torch.tensor(r))
    torch.testing.assert_close(out[0, 1].flatten(), torch.tensor(r))
    assert torch.equal(out[0, 2], torch.zeros(2, 2))
    # tile 1: R 10, 10, 10, 14: mean 11, var (1 + 1 + 1 + 9)/3 = 4, std 2; G flat; B 1, 3, 1, 3:
    # mean 2, var 4/3
    torch.testing.assert_close(out[1, 0].flatten(), torch.tensor([-0.5, -0.5, -0.5, 1.5]))
    assert torch.equal(out[1, 1], torch.zeros(2, 2))
    b = 1 / (4 / 3) ** 0.5
    torch.testing.assert_close(out[1, 2].flatten(), torch.tensor([-b, b, -b, b]))
    # one mean and std per tile instead keeps tile 0's colour balance (G brighter than R)
    whole = standardize_tiles(tiles)[0, 0]
    assert whole[1].mean() > whole[0].mean() + 0.5


def test_rgb_jitter_shifts_each_channel_of_each_tile_by_minus_2_to_1_grey_levels():
    """The port's ``rgb_jittering``: ``np.random.randint(-2, 2)`` per channel, then clipped."""
    tiles = torch.full((64, 9, 3, 2, 2), 0.5)
    out = rgb_jitter(tiles, torch.Generator().manual_seed(0))
    shift = (out - 0.5) * 255
    assert (shift == shift[..., :1, :1]).all()  # one shift per channel of a tile
    levels = shift[..., 0, 0].round()
    torch.testing.assert_close(shift[..., 0, 0], levels, atol=1e-4, rtol=0)
    assert set(levels.flatten().tolist()) == {-2.0, -1.0, 0.0, 1.0}  # never +2
    counts = torch.stack([(levels == v).sum() for v in (-2, -1, 0, 1)])
    assert counts.min() > 350  # uniform: 432 each of the 1728
    assert torch.equal(out, rgb_jitter(tiles, torch.Generator().manual_seed(0)))
    black = rgb_jitter(torch.zeros(8, 9, 3, 2, 2), torch.Generator().manual_seed(1))
    assert set((black * 255).round().unique().tolist()) == {0.0, 1.0}  # clipped at 0
    # cancelled by the per-channel normalisation (away from the clipping)
    x = torch.rand(4, 9, 3, 5, 5) * 0.8 + 0.1
    torch.testing.assert_close(
        standardize_tiles(rgb_jitter(x, torch.Generator().manual_seed(2)), per_channel=True),
        standardize_tiles(x, per_channel=True),
        atol=1e-4,
        rtol=0,
    )


def test_grayscale_and_colour_projection_of_whole_puzzles_by_hand():
    tiles = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 3, 1, 1).repeat(2, 9, 1, 2, 2)
    gray = grayscale_puzzles(tiles, torch.tensor([True, False]))
    luma = 0.299 * 1 + 0.587 * 0.5  # PIL's convert("L"): 0.5925
    torch.testing.assert_close(gray[0], torch.full((9, 3, 2, 2), luma))
    assert torch.equal(gray[1], tiles[1])
    projected = project_colours(tiles, torch.tensor([False, True]))
    assert torch.equal(projected[0], tiles[0])
    # the Caffe code's rows: r' = .8333r + .3333g − .1667b, g' = the mean, b' = −.1667r + ...
    want = [0.8333 + 0.3333 * 0.5, 0.3333 * 1.5, -0.1667 + 0.3333 * 0.5]
    torch.testing.assert_close(projected[1, :, :, 0, 0], torch.tensor(want).expand(9, 3))
    grey = torch.full((1, 9, 3, 2, 2), 0.4)  # a gray stays gray
    torch.testing.assert_close(project_colours(grey, torch.tensor([True])), grey, atol=1e-4, rtol=0)


def test_tile_offsets_in_the_75_px_cells_of_the_imagenet_preset_run_over_0_to_10():
    """jigsaw-imagenet: 64 px tiles 11 px apart, jittered by ±5, in a 225 px view."""
    y = torch.arange(225, dtype=torch.float64).view(225, 1).expand(225, 225)
    images = (y * 1000 + y.T).expand(24, 1, 225, 225)  # pixel (y, x) holds 1000·y + x
    tiles = tile_grid(
        images, grid=3, tile=64, gap=11, jitter=5, generator=torch.Generator().manual_seed(0)
    )
    corner = tiles[:, :, 0, 0, 0]  # N×9
    k = torch.arange(9)
    dy = (corner // 1000) - 75 * (k // 3)  # the offset in the tile's 75 px cell
    dx = (corner % 1000) - 75 * (k % 3)
    assert set(dy.flatten().long().tolist()) == set(range(11))
    assert set(dx.flatten().long().tolist()) == set(range(11))


def test_drop_colour_keeps_one_channel_less_its_mean_and_replaces_the_others_by_faint_noise():
    torch.manual_seed(0)
    tiles = torch.randn(16, 9, 3, 6, 6) * 2 + 5
    out = drop_colour(tiles, torch.Generator().manual_seed(3))
    centred = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
    kept = (out == centred).all(dim=(-2, -1))  # N×T×C: which channel was kept as it is
    assert (kept.sum(dim=2) == 1).all()  # exactly one per tile
    counts = kept.sum(dim=(0, 1))
    assert counts.min() > 20  # each channel is kept sometimes (48 each on average)
    noise = out[~kept[..., None, None].expand_as(out)]
    assert noise.abs().max() < 0.2 and noise.std() > 0.005  # ~1/100 of the kept channel's std 2
    grey = torch.randn(2, 9, 1, 4, 4) + 1
    torch.testing.assert_close(
        drop_colour(grey, torch.Generator()), grey - grey.mean(dim=(-2, -1), keepdim=True)
    )


def test_neighbour_pairs_by_hand():
    first, second, label = neighbour_pairs(3, centre_only=True)
    # the centre (tile 4) first; its neighbours 0 1 2 / 3 · 5 / 6 7 8 are the classes 0..7
    assert first.tolist() == [4] * 8
    assert second.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert label.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    first, second, label = neighbour_pairs(3)
    pairs = set(zip(first.tolist(), second.tolist(), label.tolist()))
    # 12 horizontal/vertical and 8 diagonal adjacencies of a 3×3 grid, both orders
    assert len(first) == len(pairs) == 40
    assert (0, 1, 4) in pairs and (1, 0, 3) in pairs  # right of 0 / left of 1
    assert (0, 4, 7) in pairs and (4, 0, 0) in pairs  # below-right / above-left
    assert (2, 4, 5) in pairs and (8, 5, 1) in pairs  # below-left of 2 / above 8
    assert (0, 2, 4) not in pairs and (3, 2, 2) not in pairs  # not adjacent
    for a, b, k in pairs:  # the label is the offset of the second from the first
        assert NEIGHBOURS[k] == (b // 3 - a // 3, b % 3 - a % 3)
    assert torch.bincount(label).tolist() == [4, 6, 4, 6, 6, 4, 6, 4]


def test_tile_classifier_is_fc6_per_tile_then_the_mlp_on_the_concatenation():
    torch.manual_seed(0)
    head = TileClassifier(in_dim=6, dim=4, tiles=3, classes=5, hidden_dim=7, layers=2).eval()
    z = torch.randn(2, 3, 6)
    e = torch.stack([head.tile_fc(z[:, k]) for k in range(3)], dim=1)  # the same fc6 per tile
    torch.testing.assert_close(head.embed(z), e)
    torch.testing.assert_close(head(z), head.fc(torch.cat([e[:, 0], e[:, 1], e[:, 2]], dim=1)))
    assert head(z).shape == (2, 5)
    # the order of the tiles matters (a concatenation, not a pooling)
    assert not torch.allclose(head(z), head(z[:, [1, 0, 2]]))


def test_tile_options_reject_a_grid_larger_than_the_crop():
    from mocolab.config import build_config

    with pytest.raises(
        ConfigError, match=r"--tile-size 10 .* 32 px wide, more than --crop-size 28"
    ):
        build_config(method="jigsaw", crop_size=28, tile_size=10)
    with pytest.raises(ConfigError, match="--tile-gap and --tile-jitter must be >= 0"):
        build_config(method="context", tile_jitter=-1)
    with pytest.raises(ConfigError, match="--tile-size must be positive"):
        build_config(method="jigsaw", tile_size=0)


def test_augment_patches_lives_here_and_cpc_still_exports_it():
    from mocolab.methods import cpc

    assert cpc.augment_patches is augment_patches


def test_the_examples_in_the_docstrings_run():
    import doctest

    from mocolab.methods import tiles

    result = doctest.testmod(tiles, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0
