"""Batched views against torchvision applied image by image, and the random parameters
against torchvision's samplers and the binomial/uniform laws of the recipes.

Tolerances (float32 images in [0, 1]):
- blends (brightness, contrast, saturation), grayscale, flip, blur, solarize, normalise:
  ``atol = 1e-6`` (a different order of the same float operations);
- hue: ``atol = 1e-5`` (the HSV round trip is written differently from torchvision's);
- resized crop: ``atol = 1e-5`` for upscaling, equal size *and* downscaling: the op builds
  torchvision's antialiased interpolation weights exactly, so no looser bound is needed;
- whole pipeline vs torchvision with the same parameters: ``atol = 1e-4`` after
  normalisation by std 0.25 (errors above, amplified ×4 and accumulated over the chain).
Rates use 4 binomial standard deviations. The per-image path (PIL, its own random parameters)
against the batched views: per-view statistics, two-sample Kolmogorov–Smirnov at α = 0.001.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from mocolab.augment import (
    RECIPES,
    AugmentConfig,
    MultiCropConfig,
    ViewGenerator,
    crop_params,
    default_blur_kernel,
    eval_view,
    multi_crop,
    ops,
    recipe,
)

TIGHT = dict(atol=1e-6, rtol=0)


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with saturated, gray (r = g = b) and tied-maximum pixels mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    x[:, :, 0, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)  # gray pixels
    if c == 3:
        x[:, 0, 1, 0], x[:, 1, 1, 0], x[:, 2, 1, 0] = 200, 200, 10  # r = g maximum
        x[:, 0, 1, 1], x[:, 1, 1, 1], x[:, 2, 1, 1] = 30, 220, 220  # g = b maximum
    return x


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def _per_image(fn, images: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(images[i], *(p[i].item() for p in params)) for i in range(images.shape[0])])


# --------------------------------------------------------------------------------------------
# ops vs torchvision.transforms.v2.functional, image by image
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
def test_brightness_contrast_saturation_match_torchvision(channels):
    x = _float(_images(7, channels, 9, 11))
    f = torch.tensor([0.0, 0.3, 0.6, 1.0, 1.2, 1.4, 2.5])
    torch.testing.assert_close(ops.adjust_brightness(x, f), _per_image(TF.adjust_brightness, x, f), **TIGHT)
    torch.testing.assert_close(ops.adjust_contrast(x, f), _per_image(TF.adjust_contrast, x, f), **TIGHT)
    torch.testing.assert_close(ops.adjust_saturation(x, f), _per_image(TF.adjust_saturation, x, f), **TIGHT)


@pytest.mark.parametrize("channels", [3, 1])
def test_hue_matches_torchvision(channels):
    x = _float(_images(9, channels, 9, 11))
    f = torch.tensor([-0.5, -0.4, -0.1, -0.01, 0.0, 0.05, 0.1, 0.33, 0.5])
    torch.testing.assert_close(ops.adjust_hue(x, f), _per_image(TF.adjust_hue, x, f), atol=1e-5, rtol=0)


def test_grayscale_flip_solarize_normalize_match_torchvision():
    x = _float(_images(6, 3, 8, 10))
    mask = torch.tensor([True, False, True, True, False, False])

    def where(fn):
        return torch.stack([fn(x[i]) if mask[i] else x[i] for i in range(6)])

    torch.testing.assert_close(ops.rgb_to_grayscale(x, mask),
                               where(lambda im: TF.rgb_to_grayscale(im, num_output_channels=3)), **TIGHT)
    torch.testing.assert_close(ops.hflip(x, mask), where(TF.horizontal_flip), **TIGHT)
    torch.testing.assert_close(ops.solarize(x, mask), where(lambda im: TF.solarize(im, 0.5)), **TIGHT)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    torch.testing.assert_close(ops.normalize(x, mean, std),
                               torch.stack([TF.normalize(im, list(mean), list(std)) for im in x]), **TIGHT)
    gray = _float(_images(2, 1, 5, 5))
    torch.testing.assert_close(ops.rgb_to_grayscale(gray, torch.tensor([True, False])), gray)
    torch.testing.assert_close(ops.normalize(gray, (0.3,), (0.2,)), (gray - 0.3) / 0.2, **TIGHT)


def test_gaussian_kernel_is_the_sampled_gaussian():
    sigma = torch.tensor([0.1, 0.7, 2.0], dtype=torch.float64)
    k = ops.gaussian_kernel1d(sigma, 5)
    for row, s in zip(k, sigma.tolist()):
        w = torch.tensor([math.exp(-(i - 2) ** 2 / (2 * s * s)) for i in range(5)], dtype=torch.float64)
        torch.testing.assert_close(row, w / w.sum())


def test_blur_matrix_folds_the_reflect_padding_in():
    # 1-D, 4 pixels, taps (a, b, c) at offsets −1, 0, +1: reflect(−1) = 1 and reflect(4) = 2,
    # so the first row is b·x0 + (a + c)·x1 and the last (a + c)·x2 + b·x3.
    a, b, c = 0.2, 0.5, 0.3
    m = ops._blur_matrices(torch.tensor([[a, b, c]]), 4)[0]
    expected = torch.tensor([[b, a + c, 0, 0], [a, b, c, 0], [0, a, b, c], [0, 0, a + c, b]])
    torch.testing.assert_close(m, expected)


@pytest.mark.parametrize("channels,kernel", [(3, 3), (3, 5), (1, 3), (3, 15)])  # 15: taps reflect far in
def test_gaussian_blur_matches_torchvision(channels, kernel):
    x = _float(_images(5, channels, 9, 12))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    mask = torch.tensor([True, True, False, True, True])
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2) if mask[i] else x[i]
                       for i in range(5)])
    torch.testing.assert_close(ops.gaussian_blur(x, sigma, kernel, mask=mask), ref, **TIGHT)


@pytest.mark.parametrize("size", [6, 10, 16])  # down-, equal and up-scaling of 10-pixel boxes
def test_resized_crop_matches_torchvision(size):
    x = _float(_images(8, 3, 14, 17))
    g = torch.Generator().manual_seed(size)
    boxes = []
    for _ in range(8):
        h = int(torch.randint(3, 15, (1,), generator=g))
        w = int(torch.randint(3, 18, (1,), generator=g))
        boxes.append([int(torch.randint(0, 14 - h + 1, (1,), generator=g)),
                      int(torch.randint(0, 17 - w + 1, (1,), generator=g)), h, w])
    boxes[0] = [2, 3, 10, 10]
    boxes[1] = [0, 0, 14, 17]  # the whole image
    boxes = torch.tensor(boxes)
    ref = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [size, size], antialias=True) for i in range(8)])
    out = ops.resized_crop(x, boxes, size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    flip = torch.tensor([True, False] * 4)
    torch.testing.assert_close(ops.resized_crop(x, boxes, size, flip=flip), ops.hflip(out, flip), **TIGHT)


def test_resized_crop_with_fractional_boxes_interpolates_a_linear_ramp_exactly():
    # Pixel j holds j/20 (its centre is at j + ½); bilinear interpolation of a linear function
    # at the output centres c = start + s·(i + ½) gives (c − ½)/20 while every c lies between
    # the centres of the pixels the box overlaps (beyond them the crop clamps, as torchvision).
    x = (torch.arange(20.0) / 20).expand(2, 1, 20, 20).transpose(2, 3).contiguous()  # varies along H
    boxes = torch.tensor([[2.5, 0.0, 4.0, 20.0], [3.7, 3.0, 2.6, 10.0]])
    out = ops.resized_crop(x, boxes, 8)
    for n, (top, _, height, _) in enumerate(boxes.tolist()):
        centres = top + height / 8 * (torch.arange(8.0) + 0.5)
        torch.testing.assert_close(out[n, 0, :, 0], (centres - 0.5) / 20, atol=1e-6, rtol=0)


def test_resized_crop_of_the_whole_image_at_its_size_is_the_identity():
    x = _float(_images(3, 1, 12, 12))
    torch.testing.assert_close(ops.resized_crop(x, torch.tensor([[0, 0, 12, 12]] * 3), 12), x, **TIGHT)


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_applies_the_per_sample_order(channels):
    n = 24
    x = _float(_images(n, channels, 7, 9))
    g = torch.Generator().manual_seed(3)
    factors = torch.stack([0.6 + 0.8 * torch.rand(n, generator=g), 0.6 + 0.8 * torch.rand(n, generator=g),
                           0.6 + 0.8 * torch.rand(n, generator=g), 0.2 * torch.rand(n, generator=g) - 0.1], 1)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    mask = torch.rand(n, generator=g) < 0.8
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for i in range(n):
        im = x[i]
        if mask[i]:
            for op in order[i].tolist():
                im = fns[op](im, factors[i, op].item())
        ref.append(im)
    out = ops.color_jitter(x, factors, order, mask=mask)
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# random parameters
# --------------------------------------------------------------------------------------------

def _binomial_ok(hits: torch.Tensor, p: float) -> bool:
    n = hits.numel()
    return abs(hits.float().sum().item() - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9


def _means_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
    return abs(a.mean().item() - b.mean().item()) <= 4 * se


def _get_params_reference(u: list[float], height: int, width: int, scale, ratio) -> list[int]:
    """torchvision's ``RandomResizedCrop.get_params``, one sample, transcribed in plain Python
    with its random draws replaced by the given uniforms (10 areas, 10 log-ratios, 2 offsets)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t])
        aspect_ratio = math.exp(log_lo + (log_hi - log_lo) * u[10 + t])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return [int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w]  # randint
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize("height,width,scale", [(28, 28, (0.2, 1.0)), (12, 30, (0.08, 1.0)),
                                                (30, 6, (0.5, 1.0))])
def test_crop_params_equal_get_params_for_the_same_uniforms(height, width, scale):
    u = torch.rand(2000, 22, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    boxes = crop_params(u, height, width, scale, (3 / 4, 4 / 3))
    ref = [_get_params_reference(row, height, width, scale, (3 / 4, 4 / 3)) for row in u.tolist()]
    assert boxes.long().tolist() == ref


@pytest.mark.parametrize("height,width,scale", [(28, 28, (0.2, 1.0)), (12, 30, (0.08, 1.0))])
def test_crop_params_follow_torchvision_get_params(height, width, scale):
    n, ratio = 4000, (3 / 4, 4 / 3)
    u = torch.rand(n, 22, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    boxes = crop_params(u, height, width, scale, ratio)
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    frac = h * w / (height * width)
    # Rounding w and h to pixels moves the area by at most about (w + h)/2 pixels.
    slack = (w + h) / 2 / (height * width) + 1e-9
    assert (frac >= scale[0] - slack).all() and (frac <= 1).all()

    torch.manual_seed(0)  # torchvision draws from the global generator
    rrc = T.RandomResizedCrop(8, scale=scale, ratio=ratio)
    probe = torch.zeros(1, height, width)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                        for p in (rrc.make_params([probe]) for _ in range(n))], dtype=torch.float64)
    rtop, rleft, rh, rw = ref.unbind(1)
    assert _means_agree(frac, rh * rw / (height * width))
    assert _means_agree(torch.log(w / h), torch.log(rw / rh))
    assert _means_agree(top, rtop) and _means_agree(left, rleft)
    # Offsets are uniform integers in [0, H − h]: the mean offset is (H − h)/2.
    assert _means_agree(top - (height - h) / 2, torch.zeros(2))


def test_crop_params_fall_back_to_the_central_crop():
    u = torch.full((3, 22), 0.999, dtype=torch.float64)  # area ≈ whole image at ratio 4/3: never fits
    boxes = crop_params(u, 10, 40, (0.99, 1.0), (3 / 4, 4 / 3))
    # in_ratio 4 > 4/3: h = H, w = round(H · 4/3) = 13, centred.
    assert boxes.tolist() == [[0, 13, 10, 13]] * 3


def test_drawn_parameters_follow_the_recipe():
    cfg = AugmentConfig(size=8, jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                        blur_sigma=(0.1, 2.0), solarize_p=0.2, hflip_p=0.5)
    n = 4000
    p = ViewGenerator(cfg).draw_params(n, 16, 16, torch.Generator().manual_seed(1))
    assert _binomial_ok(p.flip, 0.5) and _binomial_ok(p.jitter, 0.8) and _binomial_ok(p.grayscale, 0.2)
    assert _binomial_ok(p.blur, 0.5) and _binomial_ok(p.solarize, 0.2)
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        f = p.jitter_factors[:, j].double()
        assert f.min() >= lo and f.max() <= hi
        sd = (hi - lo) / math.sqrt(12)
        assert abs(f.mean().item() - (lo + hi) / 2) <= 4 * sd / math.sqrt(n)
    s = p.blur_sigma.double()
    assert s.min() >= 0.1 and s.max() <= 2.0
    assert abs(s.mean().item() - 1.05) <= 4 * (1.9 / math.sqrt(12)) / math.sqrt(n)
    # The order is a uniformly random permutation: each of the 24 is about n/24 times.
    assert torch.equal(p.jitter_order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    codes = (p.jitter_order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes).float()
    counts = counts[counts > 0]
    assert counts.numel() == 24
    assert ((counts - n / 24).abs() <= 4 * math.sqrt(n / 24 * (1 - 1 / 24))).all()


def test_jitter_rate_in_the_views():
    # With only brightness jitter (factor range [0.5, 1.5]) a constant image shows which samples
    # were jittered: exactly those whose value moved.
    cfg = AugmentConfig(size=4, scale=(1, 1), ratio=(1, 1), hflip_p=0, jitter=(0.5, 0, 0, 0), jitter_p=0.8,
                        grayscale_p=0, mean=(0,), std=(1,))
    x = torch.full((4000, 1, 4, 4), 100, dtype=torch.uint8)
    out = ViewGenerator(cfg)(x, torch.Generator().manual_seed(5))
    moved = (out[:, 0, 0, 0] - 100 / 255).abs() > 1e-6
    assert _binomial_ok(moved, 0.8)


# --------------------------------------------------------------------------------------------
# the view generator
# --------------------------------------------------------------------------------------------

def _reference_views(cfg: AugmentConfig, images: torch.Tensor, params) -> torch.Tensor:
    """The views by torchvision.transforms.v2.functional, one image at a time, same parameters."""
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(images.shape[0]):
        im = TF.to_dtype(images[i], torch.float32, scale=True)
        im = TF.resized_crop(im, *[int(v) for v in params.boxes[i]], [cfg.size, cfg.size], antialias=True)
        if cfg.grayscale_before_jitter and params.grayscale[i] and im.shape[0] == 3:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if params.jitter[i]:
            for op in params.jitter_order[i].tolist():
                im = fns[op](im, params.jitter_factors[i, op].item())
        if not cfg.grayscale_before_jitter and params.grayscale[i] and im.shape[0] == 3:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if cfg.blur_p > 0 and params.blur[i]:
            k = cfg.kernel_size
            im = TF.gaussian_blur(im, [k, k], [params.blur_sigma[i].item()] * 2)
        if cfg.solarize_p > 0 and params.solarize[i]:
            im = TF.solarize(im, 0.5)
        if params.flip[i]:
            im = TF.horizontal_flip(im)
        mean = list(cfg.mean) * (im.shape[0] // len(cfg.mean))
        std = list(cfg.std) * (im.shape[0] // len(cfg.std))
        out.append(TF.normalize(im, mean, std))
    return torch.stack(out)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("channels", [3, 1])
def test_views_equal_torchvision_pipeline_with_the_same_parameters(name, channels):
    cfg = recipe(name, 9, mean=(0.5,), std=(0.25,))
    gen = ViewGenerator(cfg)
    images = _images(24, channels, 13, 11, seed=7)
    params = gen.draw_params(24, 13, 11, torch.Generator().manual_seed(11))
    torch.testing.assert_close(gen.apply(images, params), _reference_views(cfg, images, params),
                               atol=1e-4, rtol=0)


def test_same_seed_same_views_and_the_stream_resumes():
    gen = ViewGenerator(recipe("mocov2", 10))
    x = _images(16, 3, 12, 12)
    before = x.clone()
    a1 = gen(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    b1 = gen(x, g)
    state = g.get_state()
    b2 = gen(x, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(a1, b1)
    assert torch.equal(gen(x, resumed), b2)
    assert not torch.equal(b1, b2)  # the next call continues the stream
    assert not torch.equal(a1, gen(x, torch.Generator().manual_seed(1)))
    assert torch.equal(x, before)  # the input is not mutated
    assert a1.dtype == torch.float32 and a1.shape == (16, 3, 10, 10) and a1.device == x.device


def test_one_generator_call_per_batch_whatever_the_probabilities():
    x = _images(8, 3, 12, 12)
    ends = []
    for p in (0.0, 1.0):
        cfg = AugmentConfig(size=8, hflip_p=p, jitter_p=p, grayscale_p=p, blur_p=p, solarize_p=p)
        g = torch.Generator().manual_seed(0)
        ViewGenerator(cfg)(x, g)
        ends.append(torch.rand(1, generator=g))
    assert torch.equal(ends[0], ends[1])


def test_fashion_mnist_like_grayscale_batch():
    x = _images(32, 1, 28, 28)
    out = ViewGenerator(recipe("mocov2", 28, mean=(0.286,), std=(0.353,)))(x, torch.Generator().manual_seed(0))
    assert out.shape == (32, 1, 28, 28) and out.dtype == torch.float32 and torch.isfinite(out).all()
    lo, hi = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5


def test_probability_one_and_zero_switches():
    x = _images(6, 3, 10, 10)
    g = torch.Generator().manual_seed(0)
    plain = dict(size=10, scale=(1, 1), ratio=(1, 1), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                 mean=(0.0,), std=(1.0,))
    ident = ViewGenerator(AugmentConfig(**plain))(x, g)
    torch.testing.assert_close(ident, _float(x), **TIGHT)
    gray = ViewGenerator(AugmentConfig(**{**plain, "grayscale_p": 1.0}))(x, g)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    flipped = ViewGenerator(AugmentConfig(**{**plain, "hflip_p": 1.0}))(x, g)
    torch.testing.assert_close(flipped, _float(x).flip(-1), **TIGHT)


def test_eval_view():
    x = _images(4, 3, 20, 20)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    torch.testing.assert_close(eval_view(x, 20, mean, std), TF.normalize(_float(x), list(mean), list(std)), **TIGHT)
    ref = TF.normalize(TF.resize(_float(x), [12, 12], antialias=True), list(mean), list(std))
    torch.testing.assert_close(eval_view(x, 12, mean, std), ref, atol=1e-5, rtol=0)
    wide = _images(2, 1, 10, 16)
    ref = TF.resized_crop(_float(wide), 0, 3, 10, 10, [8, 8], antialias=True)
    torch.testing.assert_close(eval_view(wide, 8, (0.0,), (1.0,)), ref, atol=1e-5, rtol=0)


def test_recipes_and_validation():
    assert RECIPES == ("mocov1", "mocov2", "simclr", "byol-view1", "byol-view2", "swav-global",
                       "swav-local", "dino-global1", "dino-global2", "dino-local", "cpc", "cmc",
                       "crop-flip", "pirl", "pirl-tiles", "dim", "amdim", "ijepa", "msn-rand",
                       "msn-focal", "ibot-global1", "ibot-global2", "ibot-local", "dinov2-global1",
                       "dinov2-global2", "dinov2-local")
    ij = recipe("ijepa", 224)  # I-JEPA configs: crop_scale 0.3-1, no flip / colour / blur
    assert (ij.scale, ij.hflip_p, ij.jitter_p, ij.grayscale_p, ij.blur_p) == ((0.3, 1.0), 0, 0, 0, 0)
    rand, focal = recipe("msn-rand", 224), recipe("msn-focal", 224)  # MSN, colour strength 0.5
    assert (rand.size, rand.scale, focal.size, focal.scale) == (224, (0.3, 1.0), 96, (0.05, 0.3))
    assert (focal.jitter, focal.jitter_p, focal.grayscale_p, focal.blur_p, focal.hflip_p) == \
        ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.5)
    am = recipe("amdim", 128)  # amdim-public datasets.py, TransformsImageNet128
    assert (am.scale, am.ratio, am.jitter, am.jitter_p, am.grayscale_p, am.blur_p) == \
        ((0.3, 1.0), (0.7, 1.4), (0.4, 0.4, 0.4, 0.2), 0.8, 0.2, 0.0)
    v2 = recipe("mocov2", 224)
    assert (v2.scale, v2.jitter, v2.jitter_p, v2.blur_p) == ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.5)
    assert v2.kernel_size == 23 and default_blur_kernel(28) == 3 and default_blur_kernel(96) == 9
    v1 = recipe("mocov1", 32)
    assert v1.jitter == (0.4, 0.4, 0.4, 0.4) and v1.jitter_p == 1.0 and v1.blur_p == 0
    b1, b2 = recipe("byol-view1", 32), recipe("byol-view2", 32)
    assert (b1.blur_p, b1.solarize_p, b2.blur_p, b2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert recipe("simclr", 32).jitter == (0.8, 0.8, 0.8, 0.2)
    with pytest.raises(ValueError, match="mocov2"):
        recipe("mocov9", 32)
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(size=8, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="blur_p"):
        AugmentConfig(size=8, blur_p=1.5)
    with pytest.raises(ValueError, match="uint8"):
        ViewGenerator(AugmentConfig(size=8))(torch.zeros(2, 3, 8, 8), torch.Generator())


def test_multi_crop_views():
    gens = multi_crop(MultiCropConfig(global_size=12, local_size=6, num_local=3))
    x = _images(5, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    shapes = [tuple(gen(x, g).shape) for gen in gens]
    assert shapes == [(5, 3, 12, 12)] * 2 + [(5, 3, 6, 6)] * 3


@pytest.mark.parametrize("name,channels", [("mocov2", 1), ("mocov2", 3), ("mocov1", 3)])
def test_static_colour_jitter_gives_the_same_views(name, channels):
    # static=True (no host-selected hue samples, for torch.compile) changes only the rounding
    gen = ViewGenerator(recipe(name, 12, mean=(0.5,) * channels, std=(0.25,) * channels))
    x = _images(24, channels, 16, 16)
    params = gen.draw_params(24, 16, 16, torch.Generator().manual_seed(5))
    assert params.jitter_order.eq(3).any() and params.jitter.any()
    torch.testing.assert_close(gen.apply(x, params, static=True), gen.apply(x, params), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,channels", [("mocov2", 1), ("simclr", 3)])
def test_compiled_views_equal_the_eager_views_row_by_row(name, channels):
    from mocolab.train import compile_works

    if not compile_works(torch.device("cpu")):
        pytest.skip("torch.compile cannot build kernels here (no C++ compiler)")
    cfg = recipe(name, 12, mean=(0.5,) * channels, std=(0.25,) * channels)
    eager, fused = ViewGenerator(cfg), ViewGenerator(cfg, compile=True)
    x = _images(32, channels, 16, 16)
    u = ViewGenerator.draw_uniforms(32, torch.Generator().manual_seed(7))
    out = fused.views_from_uniforms(x, u)
    torch.testing.assert_close(out, eager.views_from_uniforms(x, u), atol=1e-4, rtol=0)
    # row n of the views depends on row n of the uniforms only (how ranks split a global batch)
    torch.testing.assert_close(eager.views_from_uniforms(x[8:24], u[8:24]), out[8:24], atol=1e-4, rtol=0)
    assert ViewGenerator(cfg, compile=True)._fused is fused._fused  # equal configs share the program
    with pytest.raises(ValueError, match="compile must be"):
        ViewGenerator(cfg, compile="max-speed")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_for_the_same_parameters():
    gen = ViewGenerator(recipe("byol-view2", 16))
    x = _images(32, 3, 20, 20)
    g = torch.Generator(device="cuda").manual_seed(0)
    params = gen.draw_params(32, 20, 20, g)
    assert all(v.device.type == "cuda" for v in vars(params).values())
    cpu_params = type(params)(**{k: v.cpu() for k, v in vars(params).items()})
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:  # compare in full float32: no TF32 in the blur's conv or the crop's matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = gen.apply(x.cuda(), params)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), gen.apply(x, cpu_params), atol=1e-4, rtol=0)
    views = gen(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    again = gen(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert views.device.type == "cuda" and torch.equal(views, again)


# --- the per-image backend (--augment-backend torchvision) -------------------------------------

def test_per_image_pipeline_without_randomness_equals_the_batched_view():
    from mocolab.augment.per_image import torchvision_pipeline

    for channels in (1, 3):
        cfg = AugmentConfig(size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0,
                            grayscale_p=0.0, mean=(0.3,) * channels, std=(0.2,) * channels)
        x = _images(4, channels, 20, 20)
        expected = (x.float() / 255 - 0.3) / 0.2  # the full image, normalised
        per_image = torch.stack([torchvision_pipeline(cfg)(img) for img in x])
        batched = ViewGenerator(cfg)(x, torch.Generator().manual_seed(0))
        torch.testing.assert_close(per_image, expected)
        torch.testing.assert_close(batched, expected)


def test_per_image_loader_yields_views_of_the_requested_batches():
    from mocolab.augment.per_image import per_image_loader

    x = _images(12, 3, 16, 16)
    cfg = recipe("mocov2", 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batches = [torch.tensor([3, 1, 4, 0]), torch.tensor([5, 9, 2, 6])]
    out = [list(per_image_loader(x, [cfg, cfg], batches, workers=w, seed=1)) for w in (0, 2)]
    assert len(out[0]) == 2 and [v.shape for v in out[0][0]] == [(4, 3, 8, 8)] * 2
    for a, b in zip(out[0], out[1]):  # the same views with or without worker processes
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(out[0][0][0], out[0][0][1])  # two different views of each image
    other = next(iter(per_image_loader(x, [cfg], [torch.tensor([5, 1])], workers=0, seed=1)))[0]
    assert torch.equal(other[1], out[0][0][0][1])  # image 1's view depends on (seed, image) only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True, "reduce-overhead"])
@pytest.mark.parametrize("name", ["mocov2", "byol-view2", "mocov1"])
def test_views_from_host_parameters_never_make_the_host_wait_for_the_gpu(name, compile):
    # The training loop draws the views' parameters on the host: making the views of a batch
    # on the GPU must then not synchronise (a synchronising call raises in this mode), and
    # the views equal the CPU's for the same parameters — eager, compiled, and as a CUDA graph.
    gen = ViewGenerator(recipe(name, 16), compile=compile, tf32=False)
    x = _images(32, 3, 20, 20)
    x_gpu = x.cuda()
    for seed in range(3):  # compile (and record the CUDA graph) first
        gen(x_gpu, torch.Generator().manual_seed(seed))
    torch.cuda.synchronize()
    g = torch.Generator().manual_seed(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gen(x_gpu, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:  # compare in full float32
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = gen(x_gpu, torch.Generator().manual_seed(3))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    eager = ViewGenerator(gen.config)
    torch.testing.assert_close(out.cpu(), eager(x, torch.Generator().manual_seed(3)), atol=1e-4, rtol=0)
    if name != "byol-view2":  # (solarization's threshold turns a rounding difference into a jump)
        fast = ViewGenerator(gen.config, compile=compile)(x_gpu, torch.Generator().manual_seed(3))
        step = 1 / 255 / 0.5  # one uint8 step after normalisation by std 0.5
        assert (fast - out).abs().max().item() < step  # TF32 matrix products: under one step
        assert not torch.backends.cuda.matmul.allow_tf32  # the global setting is left as it was


# --- the per-image path against the batched views, in distribution ----------------------------
# On a CPU at large views --augment-backend auto trains on the per-image path (PIL in the
# workers): its views must be the batched views' in distribution, from whole images (the
# default from --image-size 128) and from squares, for each recipe.

KS_C = math.sqrt(math.log(2 / 0.001) / 2)  # 1.95: the two-sample KS test's c(α) at α = 0.001


def _scene(h: int, w: int) -> torch.Tensor:
    """A 3×h×w uint8 picture whose views' statistics see each step of a recipe: a red ramp
    from left to right (the flip, the crop's position), green stripes in the right part (the
    crop's scale), a blue disc, pixel noise (the blur)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    green = 0.5 + 0.5 * torch.sin(12 * math.pi * yy) * (xx > 0.3)
    blue = ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05).float()
    noise = torch.randn(h, w, generator=torch.Generator().manual_seed(0)) * 25
    picture = torch.stack([xx, green, blue]) * 200 + 27 + noise
    return picture.round().clamp(0, 255).to(torch.uint8)


def _view_statistics(v: torch.Tensor) -> torch.Tensor:
    """``N×10`` statistics of ``N`` views: the mean and standard deviation of each channel, the
    mean |horizontal difference|, the red ramp's direction, the colourfulness (max − min over
    the channels) and the mean |Laplacian| (fine detail: the blur)."""
    dx = v[..., 1:] - v[..., :-1]
    laplacian = (4 * v[..., 1:-1, 1:-1] - v[..., :-2, 1:-1] - v[..., 2:, 1:-1]
                 - v[..., 1:-1, :-2] - v[..., 1:-1, 2:])
    return torch.cat([
        v.mean((2, 3)), v.std((2, 3)),
        dx.abs().mean((1, 2, 3))[:, None], dx[:, 0].mean((1, 2))[:, None],
        (v.max(1).values - v.min(1).values).mean((1, 2))[:, None],
        laplacian.abs().mean((1, 2, 3))[:, None],
    ], dim=1)  # fmt: skip


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b| of two samples."""
    points = torch.cat([a, b]).sort().values
    f_a = torch.searchsorted(a.sort().values, points, right=True) / len(a)
    f_b = torch.searchsorted(b.sort().values, points, right=True) / len(b)
    return (f_a - f_b).abs().max().item()


def _distances(name: str, size: int, whole: bool, n: int, **per_image_change) -> list[float]:
    """KS distances of the statistics of ``n`` batched and ``n`` per-image views of one
    scene (true size 3:4 of a ``round(size·8/7)`` px square, as a folder's cache stores it)."""
    from mocolab.augment.per_image import PerImageViews

    cfg = recipe(name, size, mean=(0.5,) * 3, std=(0.25,) * 3)
    side = round(size * 8 / 7)
    h, w = (side * 3 // 4, side) if whole else (side, side)
    stored = TF.resize(_scene(h, w), [side, side], antialias=True)  # stretched when whole
    x = stored.expand(n, -1, -1, -1).contiguous()
    sizes = torch.tensor([[h, w]] * n) if whole else None
    gen, g = ViewGenerator(cfg), torch.Generator().manual_seed(0)
    batched = torch.cat([gen(x[i : i + 50], g, None if sizes is None else sizes[i : i + 50])
                         for i in range(0, n, 50)])  # fmt: skip
    per_cfg = dataclasses.replace(cfg, **per_image_change)
    views = PerImageViews(x, [per_cfg], seed=1, sizes=sizes)
    per_image = torch.stack([views[i][0] for i in range(n)])
    a, b = _view_statistics(batched), _view_statistics(per_image)
    return [_ks_distance(a[:, k], b[:, k]) for k in range(a.shape[1])]


@pytest.mark.parametrize("name,size,whole,n", [
    ("mocov2", 224, True, 200),  # the default recipe at the papers' size, from whole images
    ("mocov2", 96, False, 200),  # from the centre square
    ("mocov1", 160, True, 200),  # grayscale before jitter, hue 0.4
    ("byol-view2", 160, True, 200),  # solarization
    ("simclr", 160, True, 200),  # strong jitter, crops from 8 %
])  # fmt: skip
def test_per_image_views_follow_the_batched_views_in_distribution(one_thread, name, size, whole, n):
    distances = _distances(name, size, whole, n)
    assert max(distances) < KS_C * math.sqrt(2 / n), distances


@pytest.mark.parametrize("change", [{"blur_p": 0.0}, {"hflip_p": 0.0}, {"grayscale_p": 0.0}])
def test_the_distribution_check_sees_a_step_left_out(one_thread, change):
    # the statistics tell the two paths apart when the per-image one skips a step
    assert max(_distances("mocov2", 160, True, 200, **change)) > KS_C * math.sqrt(2 / 200)
