"""A small deterministic labelled dataset that needs no files, for fast tests of training code.

Each class is a coloured sinusoidal grating with its own (orientation, frequency, colour);
every image draws a random phase, a jittered position of the soft round window that holds the
grating, a brightness and pixel noise. Orientations are spread over [0°, 90°) only, so a
horizontal flip (θ → 180° − θ) never turns one class into another, and the classes stay
separable under the usual crop / flip / colour augmentations: an encoder learns them in a few
hundred steps.
"""

from __future__ import annotations

import colorsys
import math

import torch

from .base import DatasetError, ImageDataset

DEFAULT_SIZE = 32
TRAIN_SIZE, TEST_SIZE = 512, 256
TRAIN_SEED, TEST_SEED = 0, 1
_ORIENTATIONS = 5  # θ_c = 90° · (c mod 5) / 5
_FREQUENCIES = (2.5, 5.0, 3.75, 6.25)  # cycles per image side, by (c div 5) mod 4


def class_parameters(c: int, num_classes: int) -> tuple[float, float, tuple[float, float, float]]:
    """``(θ radians, cycles per image side, RGB colour in [0, 1])`` of class ``c``."""
    theta = 0.5 * math.pi * (c % _ORIENTATIONS) / _ORIENTATIONS
    freq = _FREQUENCIES[(c // _ORIENTATIONS) % len(_FREQUENCIES)]
    rgb = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.75, 1.0)  # golden-ratio hue spacing
    return theta, freq, rgb


def make_synthetic(
    n: int, image_size: int = DEFAULT_SIZE, channels: int = 3, num_classes: int = 10, seed: int = 0
) -> ImageDataset:
    """``n`` images of ``num_classes`` grating classes, as uint8 ``n×channels×S×S``.

    Labels are balanced (``n // num_classes`` or one more per class) in a random order; the same
    arguments always give the same tensors.

    Args:
        n: number of images.
        image_size: side S in pixels.
        channels: 3 (colour) or 1 (luminance of the colour images).
        num_classes: number of classes.
        seed: seed of the private generator that draws labels, phases, positions and noise.

    Raises:
        DatasetError: a non-positive size or count, or channels not 1 or 3.
    """
    if n < 1 or image_size < 1 or num_classes < 1:
        raise DatasetError(
            f"make_synthetic needs n, image_size and num_classes >= 1, got "
            f"n={n}, image_size={image_size}, num_classes={num_classes}"
        )
    if channels not in (1, 3):
        raise DatasetError(f"make_synthetic: channels must be 1 or 3, got {channels}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    params = [class_parameters(c, num_classes) for c in range(num_classes)]
    theta = torch.tensor([p[0] for p in params], dtype=torch.float64)[labels]  # N
    freq = torch.tensor([p[1] for p in params], dtype=torch.float64)[labels]  # N
    colour = torch.tensor([p[2] for p in params], dtype=torch.float64)[labels]  # N×3

    phase = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi  # N
    centre = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 0.4  # N×2, ±0.2
    brightness = 0.75 + 0.25 * torch.rand(n, generator=g, dtype=torch.float64)  # N

    # pixel centres in [-0.5, 0.5): y down, x right
    coords = (torch.arange(image_size, dtype=torch.float64) + 0.5) / image_size - 0.5
    y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)  # 1×S×1, 1×1×S
    along = x * torch.cos(theta).view(-1, 1, 1) + y * torch.sin(theta).view(-1, 1, 1)  # N×S×S
    grating = 0.5 + 0.5 * torch.sin(
        2 * math.pi * freq.view(-1, 1, 1) * along + phase.view(-1, 1, 1)
    )
    r2 = (x - centre[:, 0].view(-1, 1, 1)) ** 2 + (y - centre[:, 1].view(-1, 1, 1)) ** 2
    window = torch.sigmoid((0.35**2 - r2) / 0.01)  # soft disc of radius ~0.35 image side
    pattern = (grating * window * brightness.view(-1, 1, 1)).unsqueeze(1)  # N×1×S×S
    background = 0.15
    img = background + (colour.view(n, 3, 1, 1) - background) * pattern  # N×3×S×S in [0, 1]
    if channels == 1:
        img = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
    img = img + 0.04 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    images = (img * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(
        images=images,
        labels=labels.to(torch.int64),
        classes=[f"grating{c}" for c in range(num_classes)],
        name=f"synthetic[{n}]",
    )


def load_synthetic(split: str, image_size: int = DEFAULT_SIZE) -> ImageDataset:
    """The built-in ``"synthetic"`` dataset: 10 classes, 3 channels, 512 train / 256 test
    images drawn with different fixed seeds."""
    if split not in ("train", "test"):
        raise DatasetError(f"synthetic has no split {split!r}; choose train or test")
    n, seed = (TRAIN_SIZE, TRAIN_SEED) if split == "train" else (TEST_SIZE, TEST_SEED)
    ds = make_synthetic(n, image_size=image_size, seed=seed)
    ds.name = f"synthetic/{split}"
    return ds
