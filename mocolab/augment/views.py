"""View generators: the papers' augmentation recipes, batched on the training device.

A :class:`ViewGenerator` turns a uint8 batch ``N×C×H×W`` into float views
``N×C×size×size``. All random parameters are drawn per sample from the ``torch.Generator``
the training loop passes in, with a fixed number of generator calls per batch (one), so a
run repeats exactly from its seed and a resumed run continues the same stream. The math is in
:mod:`mocolab.augment.ops`.

Example::

    gen = ViewGenerator(recipe("mocov2", 28, mean=(0.286,), std=(0.353,)))
    g = torch.Generator(device=images.device).manual_seed(0)
    x_q, x_k = gen(images, g), gen(images, g)   # two views of each image
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops

__all__ = [
    "AugmentConfig",
    "ViewParams",
    "ViewGenerator",
    "RECIPES",
    "recipe",
    "eval_view",
    "crop_params",
    "whole_image_boxes",
    "default_blur_kernel",
    "MultiCropConfig",
    "multi_crop",
    "local_crop_size",
    "tile_crop_size",
]

_TRIES = 10  # RandomResizedCrop.get_params tries this many boxes before the central crop


def default_blur_kernel(size: int) -> int:
    """Blur kernel side for ``size``-pixel views: 10% of the side, made odd, at least 3
    (SimCLR, App. A: "kernel size is set to be 10% of the image height/width")."""
    k = int(0.1 * size)
    k += 1 - k % 2
    return max(k, 3)


@dataclass(frozen=True)
class AugmentConfig:
    """One view's augmentation, in the order of the MoCo v2 code: random resized crop,
    colour jitter (random order, applied with ``jitter_p``), grayscale, Gaussian blur,
    solarization, horizontal flip, normalisation.

    Defaults are MoCo v2's (Chen et al. 2020, "Improved Baselines…", §3 and its code) without
    the blur; :func:`recipe` gives each paper's setting.
    """

    size: int  #: output side, pixels
    scale: tuple[float, float] = (0.2, 1.0)  #: crop area fraction (MoCo v2)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  #: crop aspect ratio w/h range
    hflip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (
        0.4,
        0.4,
        0.4,
        0.1,
    )  #: brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None  #: None: odd, about 10% of size (SimCLR), at least 3
    solarize_p: float = 0.0
    mean: tuple[float, ...] = (0.5,)  #: normalisation per channel (length 1 broadcasts)
    std: tuple[float, ...] = (0.5,)
    grayscale_before_jitter: bool = False  #: MoCo v1's code applies RandomGrayscale first

    def __post_init__(self) -> None:
        # Sequences from YAML/CLI arrive as lists: store tuples so the config stays hashable.
        for name in ("scale", "ratio", "jitter", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.size < 1:
            raise ValueError(f"AugmentConfig.size must be >= 1, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"AugmentConfig.scale must satisfy 0 < min <= max <= 1, got {self.scale}"
            )
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"AugmentConfig.ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1], got {p}")
        if len(self.jitter) != 4 or min(self.jitter) < 0:
            raise ValueError(
                "AugmentConfig.jitter is (brightness, contrast, saturation, hue) >= 0, "
                f"got {self.jitter}"
            )
        if self.jitter[3] > 0.5:
            raise ValueError(
                f"AugmentConfig.jitter hue must be <= 0.5 (half a turn), got {self.jitter[3]}"
            )
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(
                f"AugmentConfig.blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}"
            )
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(
                f"AugmentConfig.blur_kernel must be odd and positive, got {self.blur_kernel}"
            )
        if self.blur_p > 0 and k // 2 >= self.size:
            raise ValueError(
                f"AugmentConfig.blur_kernel {k} is too large for size {self.size} "
                f"(reflect padding needs kernel // 2 < size)"
            )
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(
                f"AugmentConfig.mean and std need the same length >= 1, got {self.mean}, {self.std}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"AugmentConfig.std must be positive, got {self.std}")

    @property
    def kernel_size(self) -> int:
        """The blur kernel side actually used."""
        return self.blur_kernel if self.blur_kernel is not None else default_blur_kernel(self.size)


def recipe(
    name: str, size: int, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)
) -> AugmentConfig:
    """The augmentation of a paper for ``size``-pixel views.

    - ``"mocov1"``: MoCo v1 code (He et al. 2020, §3.3 / ``main_moco.py``): RandomResizedCrop
      (scale 0.2–1), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip.
    - ``"mocov2"``: MoCo v2 code (Chen et al. 2020, ``aug_plus``): crop (0.2–1),
      ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale 0.2, Gaussian blur σ ∈ [0.1, 2]
      with p = 0.5, flip.
    - ``"simclr"``: SimCLR (Chen et al. 2020, App. A, strength s = 1): crop (0.08–1),
      ColorJitter(0.8, 0.8, 0.8, 0.2) with p = 0.8, grayscale 0.2, blur p = 0.5, flip.
    - ``"byol-view1"`` / ``"byol-view2"``: BYOL's asymmetric pair (Grill et al. 2020, Table 6):
      crop (0.08–1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale 0.2,
      blur p = 1.0 / 0.1, solarize p = 0 / 0.2.
    - ``"cmc"``: CMC's Lab setting (Tian et al. 2019, ``train_CMC.py``): RandomResizedCrop
      (scale 0.2–1) and flip; no colour jitter or grayscale (the views are L and ab).
    - ``"crop-flip"``: the same crop and flip, for the pretext tasks that change no colour
      (rotation, colorization, denoising; ``--crop-scale`` sets the crop's range).
    - ``"pirl"`` / ``"pirl-tiles"``: PIRL's view and the crop its tiles are cut from (VISSL's
      ``ImgPilToPatchesAndImage``): crop (0.08–1), ColorJitter(0.4, 0.4, 0.4, 0.2) always,
      grayscale 0.2, flip / crop (0.6–1) to :func:`tile_crop_size`, nothing else (each tile is
      augmented on its own by the method).

    The blur kernel is 10% of the view side (SimCLR); the papers' 224-px views get 23 px.

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`RECIPES`).
    """
    common = dict(size=size, mean=tuple(mean), std=tuple(std))
    if name == "mocov1":
        return AugmentConfig(
            **common,
            scale=(0.2, 1.0),
            jitter=(0.4, 0.4, 0.4, 0.4),
            jitter_p=1.0,
            grayscale_p=0.2,
            grayscale_before_jitter=True,
        )
    if name == "mocov2":
        return AugmentConfig(
            **common,
            scale=(0.2, 1.0),
            jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.5,
        )
    if name == "simclr":
        return AugmentConfig(
            **common,
            scale=(0.08, 1.0),
            jitter=(0.8, 0.8, 0.8, 0.2),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.5,
        )
    if name in ("byol-view1", "byol-view2"):
        first = name == "byol-view1"
        return AugmentConfig(
            **common,
            scale=(0.08, 1.0),
            jitter=(0.4, 0.4, 0.2, 0.1),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=1.0 if first else 0.1,
            solarize_p=0.0 if first else 0.2,
        )
    if name in ("swav-global", "swav-local"):
        local = name == "swav-local"
        if local:
            common["size"] = local_crop_size(size)
        return AugmentConfig(
            **common,
            scale=(0.05, 0.14) if local else (0.14, 1.0),
            jitter=(0.8, 0.8, 0.8, 0.2),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.5,
        )
    if name in ("cmc", "crop-flip"):  # crop (0.2–1) and flip only; no colour change
        return AugmentConfig(**common, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0)
    if name.rpartition("-")[0] in MULTI_CROP_SCALES and name.endswith(
        ("-global1", "-global2", "-local")
    ):
        family, _, kind = name.rpartition("-")
        global_scale, local_scale = MULTI_CROP_SCALES[family]
        views = multi_crop(
            MultiCropConfig(
                global_size=size,
                local_size=local_crop_size(size),
                num_local=1,
                global_scale=global_scale,
                local_scale=local_scale,
                mean=tuple(mean),
                std=tuple(std),
            )
        )
        return views[("global1", "global2", "local").index(kind)].config
    if name == "cpc":  # the whole image of CPC v2; each patch is augmented by the method
        return AugmentConfig(**common, scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)
    if name == "pirl":  # PIRL's v_I (VISSL): crop 8-100 %, colour jitter always, gray, flip
        return AugmentConfig(
            **common, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.2), jitter_p=1.0, grayscale_p=0.2
        )
    if name == "pirl-tiles":  # the crop PIRL's tiles are cut from; each tile augmented later
        common["size"] = tile_crop_size(size)
        return AugmentConfig(**common, scale=(0.6, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    if name == "dim":  # Deep InfoMax contrasts one view's map with its own Y: light crops
        return AugmentConfig(**common, scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)
    if name == "ijepa":  # I-JEPA's released configs: crop (0.3–1) only, no flip, no colour
        return AugmentConfig(**common, scale=(0.3, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    if name in ("msn-rand", "msn-focal"):  # MSN's src/data_manager.py, colour strength 0.5
        focal = name == "msn-focal"
        if focal:
            common["size"] = local_crop_size(size)
        return AugmentConfig(
            **common,
            scale=(0.05, 0.3) if focal else (0.3, 1.0),
            jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.5,
        )
    if name == "amdim":  # AMDIM code (datasets.py, TransformsImageNet128)
        return AugmentConfig(
            **common,
            scale=(0.3, 1.0),
            ratio=(0.7, 1.4),
            jitter=(0.4, 0.4, 0.4, 0.2),
            jitter_p=0.8,
            grayscale_p=0.2,
        )
    raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {', '.join(RECIPES)}")


#: The crop scales (global, local) of the DINO family's multi-crop recipes ``NAME-global1``,
#: ``NAME-global2``, ``NAME-local`` (the same colour, blur and solarization as DINO's):
#: DINO's ``main_dino.py`` defaults, iBOT's README ViT recipes (``--global_crops_scale 0.25 1
#: --local_crops_scale 0.05 0.25``) and DINOv2's ``ssl_default_config.yaml`` (0.32–1 / 0.05–0.32).
MULTI_CROP_SCALES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "dino": ((0.4, 1.0), (0.05, 0.4)),
    "ibot": ((0.25, 1.0), (0.05, 0.25)),
    "dinov2": ((0.32, 1.0), (0.05, 0.32)),
}


def local_crop_size(size: int) -> int:
    """Side of the small multi-crop views for ``size``-pixel large ones: the papers' 96/224
    (SwAV §3.2, DINO §3.1), at least 8 pixels (12 for Fashion-MNIST's 28)."""
    return max(8, round(size * 96 / 224))


def tile_crop_size(size: int) -> int:
    """Side of the crop PIRL cuts its tiles from, for ``size``-pixel views: VISSL's 255/224."""
    return round(size * 255 / 224)


#: Names accepted by :func:`recipe`. The multi-crop ones (SwAV, DINO): ``swav-global`` /
#: ``swav-local`` (SwAV code: crops 0.14–1 / 0.05–0.14, colour distortion s = 1, blur 0.5) and
#: ``dino-global1``, ``dino-global2``, ``dino-local`` (:func:`multi_crop`'s DINO defaults); the
#: local views are :func:`local_crop_size` pixels. ``cpc``: crop (0.5–1) and flip only (CPC v2
#: augments every patch of the image on its own, in :mod:`mocolab.methods.cpc`). ``pirl`` /
#: ``pirl-tiles``: PIRL's view (crop 8–100 %, colour jitter (0.4, 0.4, 0.4, 0.2) always,
#: grayscale 0.2, flip) and the crop its tiles are cut from (60–100 %, 255/224 of the side;
#: each tile is augmented by :mod:`mocolab.methods.pirl`).
#: ``crop-flip``: crop (0.2–1) and flip only (rotation, colorization, denoising). ``dim``: crop
#: (0.5–1) and flip only (our choice for Deep InfoMax, which needs no second view); ``amdim``:
#: AMDIM's code (crop 0.3–1 with aspect 0.7–1.4, ColorJitter(0.4, 0.4, 0.4, 0.2) with p = 0.8,
#: grayscale 0.2, flip; the code flips once for both views, here each view flips on its own).
#: ``ijepa``: I-JEPA's (``src/transforms.py`` with its configs): crop (0.3–1) only. ``msn-rand`` /
#: ``msn-focal``: MSN's random and focal views (``src/data_manager.py``, colour strength 0.5):
#: crop 0.3–1 / 0.05–0.3 at :func:`local_crop_size`, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with
#: p = 0.8, grayscale 0.2, blur p = 0.5.
#: ``ibot-global1``, ``ibot-global2``, ``ibot-local`` and ``dinov2-global1``, ``dinov2-global2``,
#: ``dinov2-local``: DINO's with iBOT's and DINOv2's crop scales (:data:`MULTI_CROP_SCALES`).
RECIPES: tuple[str, ...] = (
    "mocov1",
    "mocov2",
    "simclr",
    "byol-view1",
    "byol-view2",
    "swav-global",
    "swav-local",
    "dino-global1",
    "dino-global2",
    "dino-local",
    "cpc",
    "cmc",
    "crop-flip",
    "pirl",
    "pirl-tiles",
    "dim",
    "amdim",
    "ijepa",
    "msn-rand",
    "msn-focal",
    "ibot-global1",
    "ibot-global2",
    "ibot-local",
    "dinov2-global1",
    "dinov2-global2",
    "dinov2-local",
)


@dataclass(frozen=True)
class ViewParams:
    """The per-sample random parameters of one batch of views (all tensors have ``N`` rows)."""

    boxes: Tensor  #: N×4 crop (top, left, height, width), integer-valued pixels
    flip: Tensor  #: N bool
    jitter: Tensor  #: N bool: colour jitter applied
    jitter_factors: Tensor  #: N×4 (brightness, contrast, saturation, hue)
    jitter_order: Tensor  #: N×4 permutation of 0..3 (order[n, slot] = adjustment)
    grayscale: Tensor  #: N bool
    blur: Tensor  #: N bool
    blur_sigma: Tensor  #: N
    solarize: Tensor  #: N bool


def crop_params(
    uniforms: Tensor,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Tensor:
    """RandomResizedCrop boxes from uniforms, torchvision's ``get_params`` vectorised.

    For each sample, try 10 boxes with area fraction ``~ U(scale)`` and
    ``log(w/h) ~ U(log ratio)``, ``w = round(√(A·r))``, ``h = round(√(A/r))``; take the first
    that fits, at a uniformly random integer position; if none fits, the central crop with the
    ratio clamped to ``ratio``. All 10 tries are computed for all samples at once.

    Args:
        uniforms: ``N×22`` values in [0, 1): 10 area draws, 10 log-ratio draws, 2 positions.
        height: image height: one for all samples (an int) or one per sample (an ``N``
            tensor: the true sizes of whole images of different shapes, see
            :meth:`ViewGenerator.params_from_uniforms`).
        width: image width, as ``height``.

    Returns:
        ``N×4`` float64 boxes (top, left, height, width), integer-valued.
    """
    u = uniforms.double()
    img_h = torch.as_tensor(height, dtype=torch.float64, device=u.device).reshape(
        -1, 1
    )  # N×1 or 1×1
    img_w = torch.as_tensor(width, dtype=torch.float64, device=u.device).reshape(-1, 1)
    target = img_h * img_w * (scale[0] + (scale[1] - scale[0]) * u[:, :_TRIES])  # N×10
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, _TRIES : 2 * _TRIES])  # N×10
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= img_w) & (h > 0) & (h <= img_h)  # N×10
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first try that fits (0 if none)
    ok = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    img_h, img_w = img_h.squeeze(1), img_w.squeeze(1)
    # Uniform integer offsets in [0, H − h]: floor(u·(H − h + 1)), guarded against u·n rounding to n.
    top = torch.minimum(torch.floor(u[:, 2 * _TRIES] * (img_h - h + 1)), img_h - h)
    left = torch.minimum(torch.floor(u[:, 2 * _TRIES + 1] * (img_w - w + 1)), img_w - w)
    # Fallback: the central crop with the aspect ratio clamped into ``ratio``.
    in_ratio = img_w / img_h
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(img_h * max(ratio)), img_w)
    fh = torch.where(narrow, torch.round(img_w / min(ratio)), img_h)
    fallback = (torch.floor((img_h - fh) / 2), torch.floor((img_w - fw) / 2), fh, fw)
    return torch.stack([torch.where(ok, v, f) for v, f in zip((top, left, h, w), fallback)], dim=1)


def whole_image_boxes(boxes: Tensor, sizes: Tensor, height: int, width: int) -> Tensor:
    """Boxes drawn on the true sizes of whole images, in the pixels of their stored copies.

    A whole image of true size ``h×w`` is stored stretched to the batch's ``height×width``
    (:mod:`mocolab.data.whole`): the box (top, left, bh, bw) on the true image is the box
    (top·H/h, left·W/w, bh·H/h, bw·W/w) on the stored one, whose resized crop is the same
    picture (to interpolation): the stretch is linear and separable.

    Args:
        boxes: ``N×4`` (top, left, height, width) on the true images.
        sizes: ``N×2`` true (h, w) of each image.
    """
    sizes = sizes.to(device=boxes.device, dtype=boxes.dtype)
    sy, sx = height / sizes[:, 0], width / sizes[:, 1]  # N
    return boxes * torch.stack([sy, sx, sy, sx], dim=1)


# Columns of the one uniform draw per batch.
_CROP = slice(0, 2 * _TRIES + 2)
_FLIP, _JITTER = 2 * _TRIES + 2, 2 * _TRIES + 3
_FACTORS = slice(2 * _TRIES + 4, 2 * _TRIES + 8)
_ORDER = slice(2 * _TRIES + 8, 2 * _TRIES + 12)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = (2 * _TRIES + 12 + i for i in range(4))
_COLUMNS = 2 * _TRIES + 16


class ViewGenerator:
    """Random views of a uint8 batch, every parameter drawn per sample (see :class:`AugmentConfig`).

    ``ViewGenerator(config)(images, generator)`` → float32 ``N×C×size×size``, normalised, on
    ``images.device``. Each call draws one ``N×36`` block of uniforms from ``generator``
    (on the images' device, or on the CPU: then the parameters are drawn on the host and
    reach a GPU without making the host wait; the training loop does this), whatever the
    probabilities turn out to select, so
    the stream of random numbers depends only on the seed and the batch sizes.

    ``compile``: make the views with one :func:`torch.compile` program (``True``), also
    replayed as a CUDA graph (``"reduce-overhead"``), see :meth:`views_from_uniforms`.
    ``tf32``: on CUDA, the crop's and blur's matrix products run on TF32 tensor cores (their
    rounding, about 5e-4 of the pixel range, is under a fifth of a uint8 step; half the
    views' GPU time at 224 px) rather than in full float32.

    Examples:
        Two views of a batch of four 32 px images with MoCo v2's recipe (24 px crops),
        normalised; the same seed gives the same views:

        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> views = ViewGenerator(recipe("mocov2", 24))
        >>> x = views(images, torch.Generator().manual_seed(0))
        >>> x.shape, x.dtype
        (torch.Size([4, 3, 24, 24]), torch.float32)
        >>> torch.equal(x, views(images, torch.Generator().manual_seed(0)))
        True
    """

    def __init__(
        self, config: AugmentConfig, compile: bool | str = False, tf32: bool = True
    ) -> None:
        self.config = config
        self.tf32 = tf32
        if compile not in (False, True, "default", "reduce-overhead"):
            raise ValueError(
                "ViewGenerator compile must be False, True, 'default' or 'reduce-overhead', "
                f"got {compile!r}"
            )
        self.compile = "default" if compile is True else compile
        # one fused program from the uniforms to the views (see views_from_uniforms), shared
        # by the generators of equal configs
        self._fused = _fused_views(config, self.compile) if self.compile else None

    def __repr__(self) -> str:
        return (
            f"ViewGenerator({self.config!r}{f', compile={self.compile!r}' if self.compile else ''})"
        )

    @staticmethod
    def draw_uniforms(
        n: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
    ) -> Tensor:
        """The one random draw of ``n`` views: ``n×36`` float64 uniforms (every parameter of
        a view is a function of its row, :meth:`params_from_uniforms`).

        ``pin_memory`` (host draws for a GPU): in page-locked memory, so that the copy to the
        GPU is truly asynchronous. From pageable memory, a copy of more than 64 KB (256 rows
        and up) makes the CUDA driver wait for the stream's queued kernels first — a hidden
        host–GPU synchronisation every view. PyTorch's caching host allocator reuses the
        pinned block only once its copy has run.
        """
        device = torch.device(device) if device is not None else generator.device
        return torch.rand(
            n,
            _COLUMNS,
            generator=generator,
            device=device,
            dtype=torch.float64,
            pin_memory=pin_memory,
        )

    def draw_params(
        self,
        n: int,
        height: int,
        width: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> ViewParams:
        """Draw the parameters of ``n`` views of ``height×width`` images (one generator call)."""
        return self.params_from_uniforms(self.draw_uniforms(n, generator, device), height, width)

    def params_from_uniforms(
        self, u: Tensor, height: int, width: int, sizes: Tensor | None = None
    ) -> ViewParams:
        """The parameters of the views whose uniforms are the rows of ``u`` (``N×36``, from
        :meth:`draw_uniforms`), computed where ``u`` is.

        ``sizes`` (``N×2``, the true (h, w) of whole images stored stretched to
        ``height×width``): the crops are drawn on each image's true size and aspect, as
        torchvision's ``RandomResizedCrop`` on the image itself, then mapped onto the stored
        pixels (:func:`whole_image_boxes`)."""
        cfg = self.config
        if sizes is None:
            boxes = crop_params(u[:, _CROP], height, width, cfg.scale, cfg.ratio)
        else:
            sizes = ops.to_device(sizes, u.device, u.dtype)
            boxes = whole_image_boxes(
                crop_params(u[:, _CROP], sizes[:, 0], sizes[:, 1], cfg.scale, cfg.ratio),
                sizes,
                height,
                width,
            )
        # Python numbers, not small tensors: a tensor built from a list copies from the host
        # and, on a GPU, waits for the queued kernels.
        lows = [max(0.0, 1 - v) for v in cfg.jitter[:3]] + [-cfg.jitter[3]]
        highs = [1 + v for v in cfg.jitter[:3]] + [cfg.jitter[3]]
        factors = u[:, _FACTORS]
        s_lo, s_hi = cfg.blur_sigma
        return ViewParams(
            boxes=boxes,
            flip=u[:, _FLIP] < cfg.hflip_p,
            jitter=u[:, _JITTER] < cfg.jitter_p,
            jitter_factors=torch.stack(
                [lo + (hi - lo) * factors[:, i] for i, (lo, hi) in enumerate(zip(lows, highs))],
                dim=1,
            ).float(),
            jitter_order=u[:, _ORDER].argsort(dim=1),  # a uniform random permutation per sample
            grayscale=u[:, _GRAY] < cfg.grayscale_p,
            blur=u[:, _BLUR] < cfg.blur_p,
            blur_sigma=(s_lo + (s_hi - s_lo) * u[:, _SIGMA]).float(),
            solarize=u[:, _SOLARIZE] < cfg.solarize_p,
        )

    def apply(self, images: Tensor, params: ViewParams, static: bool = False) -> Tensor:
        """The views of ``images`` (uint8 ``N×C×H×W``) for given parameters: deterministic.
        ``static``: no shapes that depend on the parameters (for :func:`torch.compile`; the
        same views to float rounding, see :func:`ops.color_jitter`)."""
        cfg = self.config
        channels = images.shape[1]
        if len(cfg.mean) not in (1, channels):
            raise ValueError(
                f"AugmentConfig.mean/std have {len(cfg.mean)} values for {channels}-channel images"
            )
        x = images.float().div_(255.0)
        # Crop + resize; the flip is folded into the horizontal interpolation matrix. Flipping
        # commutes with the colour ops and with the symmetric, reflect-padded blur, so doing it
        # first changes nothing but the cost.
        x = ops.resized_crop(
            x, params.boxes, cfg.size, flip=params.flip if cfg.hflip_p > 0 else None
        )
        color = channels == 3
        if color and cfg.grayscale_before_jitter and cfg.grayscale_p > 0:
            x = ops.rgb_to_grayscale(x, params.grayscale)
        if cfg.jitter_p > 0 and any(v > 0 for v in cfg.jitter):
            x = ops.color_jitter(
                x, params.jitter_factors, params.jitter_order, mask=params.jitter, static=static
            )
        if color and not cfg.grayscale_before_jitter and cfg.grayscale_p > 0:
            x = ops.rgb_to_grayscale(x, params.grayscale)
        if cfg.blur_p > 0:
            x = ops.gaussian_blur(x, params.blur_sigma, cfg.kernel_size, mask=params.blur)
        if cfg.solarize_p > 0:
            x = ops.solarize(x, params.solarize)
        return ops.normalize(x, cfg.mean, cfg.std)

    def _static_views(self, images: Tensor, u: Tensor, sizes: Tensor | None = None) -> Tensor:
        _, _, height, width = images.shape
        return self.apply(images, self.params_from_uniforms(u, height, width, sizes), static=True)

    def views_from_uniforms(self, images: Tensor, u: Tensor, sizes: Tensor | None = None) -> Tensor:
        """The views of ``images`` whose parameters are the rows of ``u`` (:meth:`draw_uniforms`).

        Eager, this is ``apply(images, params_from_uniforms(u, H, W))``: the parameters are
        computed where ``u`` is (on the host, the training loop's choice on a GPU). Compiled
        (``ViewGenerator(config, compile=True)``), ``u`` goes to the images' device with one
        non-blocking copy and one inductor program makes the parameters and the views there:
        a few fused kernels instead of about a hundred small ones, for the same views to
        float rounding (the first call of a new batch shape compiles it). With
        ``compile="reduce-overhead"`` the program is also a CUDA graph (one launch; the views
        are copied out of the graph's buffers, which its next replay overwrites).

        ``sizes``: the true (h, w) of whole images stored stretched (``N×2``, see
        :meth:`params_from_uniforms`); ``None`` for images that are what they show.
        """
        with _matmul_precision(images.device, self.tf32):
            if self._fused is None:
                return self.apply(
                    images, self.params_from_uniforms(u, images.shape[2], images.shape[3], sizes)
                )
            if sizes is not None:
                sizes = ops.to_device(sizes, images.device, torch.float64)
            views = self._fused(images, ops.to_device(u, images.device), sizes)
        return views.clone() if self.compile == "reduce-overhead" else views

    def __call__(
        self, images: Tensor, generator: torch.Generator, sizes: Tensor | None = None
    ) -> Tensor:
        """Views of ``images`` (uint8 ``N×C×H×W``, C = 1 or 3) using ``generator``'s stream;
        ``sizes``: the true (h, w) of whole images stored stretched (:mod:`mocolab.data.whole`)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                "ViewGenerator expects a uint8 N×C×H×W batch with C = 1 or 3, got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        if generator.device.type not in (images.device.type, "cpu"):
            raise ValueError(
                f"the generator is on {generator.device} but the images are on {images.device}; "
                "create it with torch.Generator(device=images.device), or on the CPU"
            )
        pin = images.is_cuda and generator.device.type == "cpu"
        return self.views_from_uniforms(
            images, self.draw_uniforms(images.shape[0], generator, pin_memory=pin), sizes
        )


@contextlib.contextmanager
def _matmul_precision(device: torch.device, tf32: bool) -> Iterator[None]:
    """On CUDA, the crop's and blur's float32 matrix products in TF32 (``tf32``) or full
    float32, whatever the global ``torch.backends.cuda.matmul.allow_tf32`` says; restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@functools.cache
def _fused_views(
    config: AugmentConfig, mode: str
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The compiled ``(images, uniforms, true sizes or None) → views`` program of ``config``
    (one per config and mode, so generators of equal configs share its compilations)."""
    return torch.compile(ViewGenerator(config)._static_views, dynamic=False, mode=mode)


def eval_view(
    images: Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    sizes: Tensor | None = None,
) -> Tensor:
    """The deterministic view for feature extraction: uint8 → float in [0, 1], the central
    square resized to ``size×size`` if it differs (bilinear, antialiased), normalised.

    For square images this is ``Resize(size)`` + ``Normalize``; for others it is the central
    ``min(H, W)`` square, as ``Resize`` + ``CenterCrop`` would give up to rounding. With
    ``sizes`` (``N×2``, the true (h, w) of whole images stored stretched) it is the central
    square of each true image.
    """
    n, _, height, width = images.shape
    x = images.float().div_(255.0)
    if sizes is not None:
        true = sizes.to(device=x.device, dtype=torch.float64)
        short = true.min(dim=1).values
        box = torch.stack(
            [
                torch.floor((true[:, 0] - short) / 2),
                torch.floor((true[:, 1] - short) / 2),
                short,
                short,
            ],
            dim=1,
        )
        x = ops.resized_crop(x, whole_image_boxes(box, true, height, width), size)
    elif (height, width) != (size, size):
        side = min(height, width)
        box = torch.tensor(
            [(height - side) // 2, (width - side) // 2, side, side], dtype=x.dtype, device=x.device
        ).expand(n, 4)
        x = ops.resized_crop(x, box, size)
    return ops.normalize(x, mean, std)


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop (SwAV, Caron et al. 2020 §3.2; DINO, Caron et al. 2021): a few global views
    at ``global_size`` plus many small local views at ``local_size``.

    Defaults are DINO's: 2 global crops with scale 0.4–1 (blur p = 1.0 on the first, 0.1 and
    solarize p = 0.2 on the second), 6 local crops of scale 0.05–0.4 with blur p = 0.5, all
    with BYOL's colour jitter (0.4, 0.4, 0.2, 0.1) p = 0.8 and grayscale 0.2.
    """

    global_size: int
    local_size: int
    num_global: int = 2
    num_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


def multi_crop(config: MultiCropConfig) -> list[ViewGenerator]:
    """One :class:`ViewGenerator` per view of a multi-crop setting: the global views first."""
    base = dict(
        jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_p=0.8,
        grayscale_p=0.2,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )
    views = []
    for i in range(config.num_global):
        blur_p, solarize_p = (1.0, 0.0) if i % 2 == 0 else (0.1, 0.2)
        views.append(
            AugmentConfig(
                size=config.global_size,
                scale=config.global_scale,
                blur_p=blur_p,
                solarize_p=solarize_p,
                **base,
            )
        )
    local = AugmentConfig(size=config.local_size, scale=config.local_scale, blur_p=0.5, **base)
    views.extend([local] * config.num_local)
    return [ViewGenerator(c) for c in views]
