"""Whole-image crops: RandomResizedCrop drawn on each image's true size and aspect.

- per-sample sizes give, row by row, exactly the boxes of one size at a time;
- on non-square images the boxes follow the statistics of torchvision's
  ``RandomResizedCrop.get_params`` (two-sample Kolmogorov–Smirnov on every coordinate, and the
  share of central fallbacks);
- a view of an image stored stretched, with its true size, is the torchvision resized crop of
  the original image for the same box (to interpolation);
- a folder of non-square JPEGs loads whole, with the true sizes, cached; JPEG draft decoding
  stays close to the full decode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy.stats import ks_2samp

from mocolab.augment import AugmentConfig, ViewGenerator, crop_params, eval_view
from mocolab.augment.views import whole_image_boxes
from mocolab.data.whole import decode_whole, load_folder_whole, true_size

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def test_per_sample_sizes_equal_one_size_at_a_time():
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[32, 32], [20, 90], [90, 20], [64, 48], [7, 300], [1, 1]] * 50)
    u = torch.rand(len(sizes), 22, generator=g, dtype=torch.float64)
    together = crop_params(u, sizes[:, 0], sizes[:, 1], SCALE, RATIO)
    for n, (h, w) in enumerate(sizes.tolist()):
        assert torch.equal(together[n], crop_params(u[n:n + 1], h, w, SCALE, RATIO)[0])


@pytest.mark.parametrize("height, width", [(300, 200), (60, 200), (480, 640)])
def test_boxes_follow_torchvision_get_params_on_non_square_images(height, width):
    """torchvision draws its boxes with the global RNG one image at a time; ours come from
    uniforms, all at once. Same distribution: KS on each coordinate, same fallback share."""
    n = 4000
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO))
                        for _ in range(n)], dtype=torch.float64)  # (top, left, h, w)
    u = torch.rand(n, 22, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = crop_params(u, torch.full((n,), height), torch.full((n,), width), SCALE, RATIO)
    for k, name in enumerate(("top", "left", "height", "width")):
        p = ks_2samp(ours[:, k].numpy(), ref[:, k].numpy()).pvalue
        assert p > 1e-3, f"{name}: KS p-value {p:.2g}"
    area = (ours[:, 2] * ours[:, 3]) / (height * width)
    assert area.min() >= SCALE[0] * 0.9 and area.max() <= 1.0
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    # the central fallback (no try fits) happens as often: compare the full-height boxes
    full = lambda b: ((b[:, 2] == height) & (b[:, 0] == 0)).double().mean().item()
    assert abs(full(ours) - full(ref)) < 0.03


def _smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A uint8 3×H×W image without fine detail (so two resamplings agree closely)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 9, generator=g)
    return (torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic",
                                            align_corners=False)
            .clamp(0, 1).mul(255).round().to(torch.uint8)[0])


def test_view_of_a_stretched_image_is_the_crop_of_the_original():
    """A 120×200 photo stored at side 200 (stretched to 200×200, true size 120×200): the view
    is torchvision's resized_crop of the original at the box drawn on 120×200; the centre
    square of the old cache could not even contain most of these boxes."""
    original = _smooth_image(120, 200)
    buf = Image.fromarray(original.permute(1, 2, 0).numpy())
    png = io.BytesIO()
    buf.save(png, format="PNG")
    stored, gray, (h, w) = decode_whole(png.getvalue(), 200)
    assert (h, w) == (120, 200) and not gray and stored.shape == (3, 200, 200)
    n = 16
    images = torch.from_numpy(stored).expand(n, 3, 200, 200).contiguous()
    sizes = torch.tensor([[h, w]] * n)
    gen = ViewGenerator(AugmentConfig(size=64, scale=(0.2, 1.0), hflip_p=0.0, jitter_p=0.0,
                                      grayscale_p=0.0, mean=(0.0,), std=(1.0,)))
    u = gen.draw_uniforms(n, torch.Generator().manual_seed(3))
    views = gen.views_from_uniforms(images, u, sizes)
    boxes = crop_params(u[:, :22], h, w, (0.2, 1.0), (3 / 4, 4 / 3))
    assert (boxes[:, 3] > 120).any()  # wider than the centre square: only the whole image has it
    for v, (top, left, bh, bw) in zip(views, boxes.long().tolist()):
        ref = TF.resized_crop(original.float() / 255, top, left, bh, bw, [64, 64], antialias=True)
        assert (v - ref).abs().mean() < 4e-3 and (v - ref).abs().max() < 0.06
    # the evaluation view: the centre square of the true image
    centre = eval_view(images[:1], 64, (0.0,), (1.0,), sizes[:1])[0]
    ref = TF.resized_crop(original.float() / 255, 0, 40, 120, 120, [64, 64], antialias=True)
    assert (centre - ref).abs().mean() < 4e-3


def test_whole_image_boxes_map_true_pixels_to_stored_ones():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    mapped = whole_image_boxes(boxes, torch.tensor([[60, 80]]), 120, 160)
    assert mapped.tolist() == [[20.0, 40.0, 60.0, 80.0]]  # both axes ×2
    # identity for square images stored at their own size: the old square path exactly
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    gen = ViewGenerator(AugmentConfig(size=16))
    u = gen.draw_uniforms(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gen.views_from_uniforms(x, u, torch.tensor([[32, 32]] * 4)),
                               gen.views_from_uniforms(x, u))


def test_true_size_keeps_the_aspect():
    assert true_size(640, 480, 256) == (192, 256)
    assert true_size(480, 640, 256) == (256, 192)
    assert true_size(1000, 1, 100) == (1, 100)


def test_folder_of_non_square_jpegs_loads_whole(tmp_path):
    shapes = [(90, 160), (160, 90), (120, 120), (50, 200)]  # (h, w)
    for k, (hh, ww) in enumerate(shapes):
        for cls in ("a", "b"):
            (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
            arr = _smooth_image(hh, ww, seed=k).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(tmp_path / "d" / cls / f"{k}.jpg", quality=95)
    (tmp_path / "d" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 of 9"):
        ds = load_folder_whole(tmp_path / "d", side=64, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (8, 3, 64, 64) and ds.labels.tolist() == [0] * 4 + [1] * 4
    expected = [true_size(ww, hh, 64) for hh, ww in shapes]
    assert [tuple(s) for s in ds.sizes.tolist()] == expected * 2
    with pytest.warns(UserWarning, match="skipped 1 of 9"):  # the cache keeps the count
        again = load_folder_whole(tmp_path / "d", side=64, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, ds.images) and torch.equal(again.sizes, ds.sizes)


def test_jpeg_draft_decoding_is_close_to_the_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_smooth_image(600, 800).permute(1, 2, 0).numpy()).save(path, quality=95)
    with Image.open(path) as im:  # the draft really reduces: 1/2 scale still covers 200x150
        im.draft("RGB", (200, 150))
        assert im.size == (200, 150)
    fast, _, size = decode_whole(path, 100)
    full, _, size_full = decode_whole(path, 100, draft=False)
    assert size == size_full == (75, 100)
    assert np.abs(fast.astype(float) - full.astype(float)).mean() < 3.0  # of 255


def test_per_image_backend_draws_its_crops_on_the_true_size():
    """``--augment-backend torchvision`` on whole images: the stretched image is resized back to
    its true ``h×w`` before torchvision's RandomResizedCrop, so its views equal the views of the
    original image under the same seed (an image constant down its columns stretches and
    shrinks back exactly). Without the true size the boxes are drawn on the square instead."""
    from mocolab.augment.per_image import PerImageViews

    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, 256, (3, 1, 40), generator=g, dtype=torch.uint8)
    original = row.expand(3, 20, 40).contiguous()  # h 20, w 40: only the columns differ
    stretched = TF.resize(original, [40, 40], antialias=True)  # as the whole-image cache stores it
    cfg = AugmentConfig(size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    expected = PerImageViews(original[None], [cfg, cfg], seed=3)[0]
    got = PerImageViews(stretched[None], [cfg, cfg], seed=3, sizes=torch.tensor([[20, 40]]))[0]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    square = PerImageViews(stretched[None], [cfg, cfg], seed=3)[0]
    assert any((a - b).abs().max() > 0.1 for a, b in zip(square, expected))


def test_whole_folder_trains_on_the_per_image_backend(tmp_path):
    from mocolab.cli import main

    for k, (hh, ww) in enumerate([(30, 60), (60, 30), (40, 40), (24, 72)] * 4):
        (tmp_path / "d").mkdir(exist_ok=True)
        Image.fromarray(_smooth_image(hh, ww, seed=k).permute(1, 2, 0).numpy()).save(
            tmp_path / "d" / f"{k}.png")
    argv = ["pretrain", "--method", "mocov2", "--data", str(tmp_path / "d"), "--crops", "whole",
            "--image-size", "32", "--width", "4", "--batch-size", "8", "--queue-size", "16",
            "--bn-splits", "2", "--max-steps", "2", "--augment-backend", "torchvision",
            "--workers", "0", "--threads", "1", "--no-progress", "--no-final-eval",
            "--no-compile", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert main(argv) == 0
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
