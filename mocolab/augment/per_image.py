"""The usual per-image pipeline, kept for comparison (``--augment-backend torchvision``).

Each view of each image is made by ``torchvision.transforms.v2`` on one uint8 image tensor,
in DataLoader worker processes — the way the official MoCo code and most libraries make
views (there with PIL images). The same :class:`~mocolab.augment.views.AugmentConfig` drives
both backends, so a recipe means the same thing in each; the batched backend is the fast one
(see ``benchmarks/augment_speed.py``).

torchvision draws from torch's global RNG; each item is made under a forked RNG seeded with
(seed, image index), so the views depend on the seed, the epoch and the image only — not on
the number of workers or where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .views import AugmentConfig


def torchvision_pipeline(config: AugmentConfig) -> Callable[[Tensor], Tensor]:
    """``torchvision.transforms.v2`` composition equal in distribution to ``config``'s batched
    views: uint8 ``C×H×W`` image → float32 ``C×size×size`` normalised view.

    Order as the MoCo v2 code: random resized crop, colour jitter (with ``jitter_p``),
    grayscale, Gaussian blur (with ``blur_p``), solarize, horizontal flip, normalise. MoCo v1's
    grayscale-before-jitter is respected.
    """
    from torchvision.transforms import v2

    c = config
    steps: list[Callable] = [
        v2.RandomResizedCrop(c.size, scale=c.scale, ratio=c.ratio, antialias=True)
    ]
    gray = [v2.RandomGrayscale(p=c.grayscale_p)] if c.grayscale_p > 0 else []
    if c.grayscale_before_jitter:
        steps += gray
    if c.jitter_p > 0 and any(v > 0 for v in c.jitter):
        b, ct, s, h = c.jitter
        steps.append(v2.RandomApply([v2.ColorJitter(b, ct, s, h)], p=c.jitter_p))
    if not c.grayscale_before_jitter:
        steps += gray
    if c.blur_p > 0:
        steps.append(
            v2.RandomApply([v2.GaussianBlur(c.kernel_size, sigma=c.blur_sigma)], p=c.blur_p)
        )
    if c.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=c.solarize_p))  # uint8: 0.5 of the range
    if c.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=c.hflip_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(c.mean), list(c.std))]
    return v2.Compose(steps)


class PerImageViews(Dataset):
    """``dataset[i]`` → one view of image ``i`` per config (a tuple of float tensors).

    Args:
        images: uint8 ``N×C×H×W``.
        configs: one :class:`AugmentConfig` per view (two for MoCo).
        seed: with the image index, seeds the random parameters of the image's views.
    """

    def __init__(self, images: Tensor, configs: Sequence[AugmentConfig], seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"PerImageViews expects uint8 N×C×H×W images, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        self.images = images
        self.pipelines = [torchvision_pipeline(c) for c in configs]
        self.seed = seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        image = self.images[index]  # torchvision leaves saturation/hue/grayscale of 1 channel as is
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + index) % 2**63)
            return tuple(p(image) for p in self.pipelines)


def per_image_loader(
    images: Tensor,
    configs: Sequence[AugmentConfig],
    batches: Sequence[Tensor],
    workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that yields, for each index batch of ``batches``, the list of its views
    (``[view_1 N×C×s×s, view_2 ...]``), made image by image in ``workers`` processes.

    The views depend on ``seed`` and the image indices only (see :class:`PerImageViews`).
    """
    return DataLoader(
        PerImageViews(images, configs, seed),
        num_workers=workers,
        batch_sampler=[b.tolist() for b in batches],
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
