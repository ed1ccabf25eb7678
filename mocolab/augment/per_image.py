"""The usual per-image pipeline (``--augment-backend torchvision``): each view of each image made
on its own, in DataLoader worker processes, as the official MoCo code makes them.

Each image (uint8 ``C×H×W``) becomes a PIL image and goes through ``torchvision.transforms.v2``
on PIL — the official MoCo v2 transform, including its PIL Gaussian blur
(``moco/loader.py``: ``ImageFilter.GaussianBlur(radius=σ)``, σ uniform in the recipe's range)
— then a normalised float tensor. PIL's uint8 operations are several times faster per image on
a CPU than the same transforms on tensors (``benchmarks/data_path.py``), which is why the
official per-image path beats the batched views on a CPU at 224 px (docs/data.md). The same
:class:`~mocolab.augment.views.AugmentConfig` drives both backends, so a recipe means the same
thing in each (in distribution: PIL's resampling and blur differ from the batched ops in their
last bits); the batched backend is the one made for the GPU.

Whole images (a folder cached with ``--crops whole``: each image stretched to ``S×S`` next
to its true ``(h, w)``, :mod:`mocolab.data.whole`) get :class:`WholeImageResizedCrop`: the
box is drawn on the true ``h×w`` by torchvision's sampler, as torchvision's ``ImageFolder``
pipeline draws it from the file, and cut from the stored pixels in one resampling, as the
batched views do (:func:`~mocolab.augment.views.whole_image_boxes`). (Resizing the stored
image back to ``h×w`` first, then cropping, resamples twice: measurably blurrier views than
the batched ones.)

torchvision draws from torch's global RNG (and so does the blur's σ here); each item is made
under a forked RNG seeded with (seed, image index), so the views depend on the seed, the epoch
and the image only — not on the number of workers or where a run was resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .views import AugmentConfig


def to_pil(image: Tensor) -> Image.Image:
    """A uint8 ``C×H×W`` tensor (C = 1 or 3) as a PIL image (mode L or RGB), without a copy
    of the pixels beyond the one PIL makes."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


class PILGaussianBlur:
    """The official MoCo v2 blur (``moco/loader.py``): PIL's Gaussian blur with σ drawn
    uniformly from ``sigma`` (from torch's RNG, so that views repeat under a seed)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        s = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=s))


class WholeImageResizedCrop:
    """``RandomResizedCrop`` of a whole image stored stretched: the box drawn on the image's
    true size (torchvision's ``RandomResizedCrop.get_params``), mapped onto the stored pixels
    and resized from there in one resampling (PIL's bilinear with antialiasing, as
    torchvision's crop of a PIL image), like the batched views' crops of whole images.

    ``crop(image, (h, w))``: ``image`` (PIL) holds a picture of true size ``h×w``; returns the
    ``size×size`` crop. Where the stored size is the true size it is torchvision's crop.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
        from torchvision.transforms import RandomResizedCrop

        self.size, self.scale, self.ratio = size, scale, ratio
        self.get_params = RandomResizedCrop.get_params

    def __call__(self, image: Image.Image, true_size: tuple[int, int]) -> Image.Image:
        h, w = true_size
        # the sampler reads only the size of its image: an empty tensor of that size
        top, left, bh, bw = self.get_params(
            torch.empty(0, h, w), list(self.scale), list(self.ratio)
        )
        sy, sx = image.height / h, image.width / w
        box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)  # on the stored pixels
        # the pixels the box overlaps, so that the filter stops at its edges (as after a crop)
        hull = (
            math.floor(box[0]),
            math.floor(box[1]),
            min(image.width, math.ceil(box[2])),
            min(image.height, math.ceil(box[3])),
        )
        inside = (box[0] - hull[0], box[1] - hull[1], box[2] - hull[0], box[3] - hull[1])
        return image.crop(hull).resize(
            (self.size, self.size), Image.Resampling.BILINEAR, box=inside
        )


def torchvision_pipeline(
    config: AugmentConfig, *, crop: bool = True
) -> Callable[[Tensor | Image.Image], Tensor]:
    """``torchvision.transforms.v2`` on PIL images, equal in distribution to ``config``'s
    batched views: a uint8 ``C×H×W`` image (or a PIL image) → float32 ``C×size×size``
    normalised view.

    Order as the MoCo v2 code: random resized crop, colour jitter (with ``jitter_p``),
    grayscale, Gaussian blur (with ``blur_p``), solarize, horizontal flip, normalise. MoCo v1's
    grayscale-before-jitter is respected. ``crop=False``: the steps after the crop, for a
    ``size×size`` PIL image cropped already (:class:`WholeImageResizedCrop`).
    """
    from torchvision.transforms import v2

    c = config
    steps: list[Callable[[Any], Any]] = [lambda x: to_pil(x) if isinstance(x, Tensor) else x]
    if crop:
        steps.append(v2.RandomResizedCrop(c.size, scale=c.scale, ratio=c.ratio, antialias=True))
    gray = [v2.RandomGrayscale(p=c.grayscale_p)] if c.grayscale_p > 0 else []
    if c.grayscale_before_jitter:
        steps += gray
    if c.jitter_p > 0 and any(v > 0 for v in c.jitter):
        b, ct, s, h = c.jitter
        steps.append(v2.RandomApply([v2.ColorJitter(b, ct, s, h)], p=c.jitter_p))
    if not c.grayscale_before_jitter:
        steps += gray
    if c.blur_p > 0:
        steps.append(v2.RandomApply([PILGaussianBlur(c.blur_sigma)], p=c.blur_p))
    if c.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=c.solarize_p))  # uint8: 0.5 of the range
    if c.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=c.hflip_p))
    steps += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(c.mean), list(c.std)),
    ]
    return cast(Callable[[Tensor | Image.Image], Tensor], v2.Compose(steps))


class PerImageViews(Dataset[tuple[Tensor, ...]]):
    """``dataset[i]`` → one view of image ``i`` per config (a tuple of float tensors).

    Args:
        images: uint8 ``N×C×H×W``.
        configs: one :class:`AugmentConfig` per view (two for MoCo).
        seed: with the image index, seeds the random parameters of the image's views.
        sizes: ``N×2`` true ``(h, w)`` of whole images stored stretched to ``H×W``: their
            crops are drawn on ``h×w`` (:class:`WholeImageResizedCrop`). ``None``: as stored.
    """

    def __init__(
        self,
        images: Tensor,
        configs: Sequence[AugmentConfig],
        seed: int = 0,
        sizes: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"PerImageViews expects uint8 N×C×H×W images, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if sizes is not None and sizes.shape != (images.shape[0], 2):
            raise ValueError(f"PerImageViews: sizes must be N×2, got {tuple(sizes.shape)}")
        self.images = images
        self.sizes = sizes
        self.pipelines = [torchvision_pipeline(c) for c in configs]
        self.whole = [
            (WholeImageResizedCrop(c.size, c.scale, c.ratio), torchvision_pipeline(c, crop=False))
            for c in configs
        ]
        self.seed = seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        image = to_pil(self.images[index])  # saturation/hue/grayscale of mode L: left as is
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + index) % 2**63)
            if self.sizes is None:
                return tuple(p(image) for p in self.pipelines)
            h, w = (int(v) for v in self.sizes[index])  # crops drawn on the true size
            return tuple(rest(crop(image, (h, w))) for crop, rest in self.whole)


def per_image_loader(
    images: Tensor,
    configs: Sequence[AugmentConfig],
    batches: Sequence[Tensor],
    workers: int,
    seed: int,
    pin_memory: bool = False,
    sizes: Tensor | None = None,
) -> DataLoader[tuple[Tensor, ...]]:
    """A DataLoader that yields, for each index batch of ``batches``, the list of its views
    (``[view_1 N×C×s×s, view_2 ...]``), made image by image in ``workers`` processes.

    The views depend on ``seed`` and the image indices only (see :class:`PerImageViews`);
    ``sizes``: the true sizes of whole images (see there).
    """
    return DataLoader(
        PerImageViews(images, configs, seed, sizes),
        num_workers=workers,
        batch_sampler=[b.tolist() for b in batches],
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
