"""mocolab.transforms: per-image views for a user's DataLoader, against the built-in views.

Each family's views are the recipes the training loop gives the method (``view_recipes`` of
the built method), and the per-image views follow the distribution of the batched
ViewGenerator's views of the same recipe: on one test image whose pixels reveal the random
parameters, 1,500 views from each backend are compared — rates (grayscale, flip) against the
recipe's probability within 4 binomial standard deviations, and per-view statistics (mean,
contrast, chroma, the red-blue balance that hue jitter moves) by the two-sample
Kolmogorov-Smirnov test at α = 0.001 (critical D = 1.95·√(2/n)). The test can fail: SimCLR's
views differ from MoCo v2's by D ≈ 0.16-0.21 on these statistics at this size.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from mocolab import create_method
from mocolab.augment import ViewGenerator, recipe
from mocolab.config import build_config
from mocolab.transforms import (
    BYOLViews,
    DINOViews,
    MoCoV1Views,
    MoCoV2Views,
    MoCoV3Views,
    SimCLRViews,
    SwAVViews,
    Views,
    method_recipes,
)

MEAN, STD = (0.5,) * 3, (0.25,) * 3  # the same for each channel: gray views stay r = g = b
N, SIZE = 1500, 32


def _image() -> torch.Tensor:
    """48×64 RGB: every channel a ramp rising to the right (its direction shows a flip through
    any jitter, which never clips it), coloured differently by row (jitter and grayscale show)."""
    h, w = 48, 64
    x = torch.linspace(0.05, 0.6, w).view(1, 1, w).expand(1, h, w)
    y = torch.linspace(0, 1, h).view(1, h, 1).expand(1, h, w)
    rgb = torch.cat([x, x * (0.3 + 0.7 * y), x * (1 - 0.7 * y)])
    return (rgb * 255).round().to(torch.uint8)


def _statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    p = views * STD[0] + MEAN[0]  # N×3×S×S pixels in 0–1
    spread = p.amax(1) - p.amin(1)  # per pixel: 0 for gray
    half = p.shape[-1] // 2
    return {
        "mean": p.mean((1, 2, 3)),
        "contrast": p.std((1, 2, 3)),
        "chroma": spread.mean((1, 2)),
        "red-blue": (p[:, 0] - p[:, 2]).mean((1, 2)),
        "gray": spread.amax((1, 2)) < 1e-6,
        "flip": p[..., :half].mean((1, 2, 3)) > p[..., half:].mean((1, 2, 3)),
    }


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two
    empirical distribution functions."""
    a, b = a.double().sort().values, b.double().sort().values
    at = torch.cat([a, b])
    gap = torch.searchsorted(a, at, right=True) / len(a) - torch.searchsorted(b, at, right=True) / len(b)
    return gap.abs().max().item()


def _binomial_ok(flags: torch.Tensor, p: float) -> bool:
    return abs(flags.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / len(flags))


@pytest.mark.parametrize("name", ["mocov2", "byol-view2"])
def test_per_image_views_follow_the_batched_views_distribution(name, one_thread):
    image = _image()
    views = Views([name], SIZE, mean=MEAN, std=STD)
    torch.manual_seed(0)
    per_image = torch.stack([views(image)[0] for _ in range(N)])
    batched_views = ViewGenerator(recipe(name, SIZE, MEAN, STD))
    g = torch.Generator().manual_seed(0)
    batch = image.expand(N // 5, *image.shape).contiguous()
    batched = torch.cat([batched_views(batch, g) for _ in range(5)])
    ours, theirs = _statistics(per_image), _statistics(batched)
    config = recipe(name, SIZE)
    for flags, p in (("gray", config.grayscale_p), ("flip", config.hflip_p)):
        assert _binomial_ok(ours[flags], p), (flags, ours[flags].float().mean())
        assert _binomial_ok(theirs[flags], p), (flags, theirs[flags].float().mean())
    critical = 1.95 * math.sqrt(2 / N)
    for stat in ("mean", "contrast", "chroma", "red-blue"):
        assert _ks(ours[stat], theirs[stat]) < critical, stat


def test_the_statistics_tell_two_recipes_apart(one_thread):
    """The comparison above has power: MoCo v2's per-image views against SimCLR's batched
    views (stronger colour jitter, smaller crops) fail it."""
    image = _image()
    views = Views(["mocov2"], SIZE, mean=MEAN, std=STD)
    torch.manual_seed(0)
    ours = _statistics(torch.stack([views(image)[0] for _ in range(N)]))
    simclr = ViewGenerator(recipe("simclr", SIZE, MEAN, STD))
    batch = image.expand(N, *image.shape).contiguous()
    theirs = _statistics(simclr(batch, torch.Generator().manual_seed(0)))
    critical = 1.95 * math.sqrt(2 / N)
    assert max(_ks(ours[s], theirs[s]) for s in ("mean", "contrast", "chroma")) > critical


@pytest.mark.parametrize(
    "views,method",
    [
        (MoCoV1Views, "mocov1"),
        (MoCoV2Views, "mocov2"),
        (SimCLRViews, "simclr"),
        (BYOLViews, "byol"),
        (MoCoV3Views, "mocov3"),
        (SwAVViews, "swav"),
        (DINOViews, "dino"),
    ],
)
def test_each_family_makes_the_views_the_training_loop_gives_its_method(views, method):
    """The recipes of the training loop: ``model.view_recipes(cfg.augment)`` of the method as
    ``mocolab pretrain`` builds it (DINO's 8 and SwAV's 6 small views included)."""
    model = create_method(method, image_size=32, width=4, num_images=8)
    names = model.view_recipes(str(build_config(method=method).augment))
    expected = [recipe(n, 32, MEAN, STD) for n in names]
    assert views(32, mean=MEAN, std=STD).configs == expected
    assert len(expected) == {"swav": 8, "dino": 10}.get(method, 2)


def test_multi_crop_takes_another_number_of_small_views():
    sizes = [v.shape[-1] for v in SwAVViews(64, num_local=2)(_image())]
    assert sizes == [64, 64, 27, 27]  # 96/224 of 64 = 27.4
    with pytest.raises(ValueError, match="no small"):  # a two-view method has none
        method_recipes("mocov2", num_local=2)


def test_inputs_a_user_has():
    views = MoCoV2Views(16)
    rgba = Image.new("RGBA", (20, 24), (200, 30, 40, 128))
    assert [tuple(v.shape) for v in views(rgba)] == [(3, 16, 16)] * 2  # converted to RGB
    out = views(torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8))
    assert all(v.dtype == torch.float32 for v in out)
    with pytest.raises(ValueError, match="uint8 C×H×W"):
        views(torch.rand(3, 20, 24))
    with pytest.raises(ValueError, match="one value each for gray"):
        views(Image.new("L", (20, 20)))  # ImageNet's 3-channel normalisation on a gray image
    gray = MoCoV2Views(16, mean=(0.5,), std=(0.5,))(torch.zeros(1, 20, 20, dtype=torch.uint8))
    assert [tuple(v.shape) for v in gray] == [(1, 16, 16)] * 2
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        Views(["mocov9"], 16)
