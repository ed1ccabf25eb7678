"""Per-image views for a ``DataLoader`` of your own: an image in, the list of a method's views out.

Each transform takes a PIL image or a uint8 ``C×H×W`` tensor (C = 1 or 3) and returns a list
of float32 views ``C×size×size``, normalised, one per view of the method: two for MoCo, SimCLR
and BYOL, two large and several small ones for SwAV and DINO (multi-crop). Use one as a
dataset's ``transform``: the ``DataLoader`` then yields a list of batched views, the input of
a method from :func:`mocolab.create_method`.

The views are those of ``mocolab pretrain --augment-backend torchvision``
(:mod:`mocolab.augment.per_image`: ``torchvision.transforms.v2`` on PIL images, with the
official MoCo v2 code's PIL blur), made from the recipes in :mod:`mocolab.augment.views` that
the batched :class:`~mocolab.augment.ViewGenerator` of ``mocolab pretrain`` uses: each method's
views as its registration names them (MoCo v2's two ``mocov2`` views, BYOL's ``byol-view1`` and
``byol-view2``, …), so they follow the same distribution as the built-in views (tested
statistically; the two backends differ in the last bits of PIL's resampling and blur).
Randomness comes from torch's global generator, which the ``DataLoader`` seeds per worker.

Examples:
    Two MoCo v2 views of each image of a dataset, batched by a ``DataLoader``:

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> views = MoCoV2Views(32)
    >>> image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    >>> [v.shape for v in views(image)]
    [torch.Size([3, 32, 32]), torch.Size([3, 32, 32])]
    >>> images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    >>> class Pairs(TensorDataset):
    ...     def __getitem__(self, i):
    ...         return views(self.tensors[0][i])
    >>> x_q, x_k = next(iter(DataLoader(Pairs(images), batch_size=4)))
    >>> x_q.shape
    torch.Size([4, 3, 32, 32])

    DINO's multi-crop: two large views and, by default, its paper's 8 small ones
    (96/224 of the side):

    >>> [v.shape[-1] for v in DINOViews(224)(image)]
    [224, 224, 96, 96, 96, 96, 96, 96, 96, 96]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from .augment.per_image import to_pil, torchvision_pipeline
from .augment.views import AugmentConfig, recipe
from .methods.multicrop import multi_crop_recipes
from .methods.registry import get_method

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Views",
    "MoCoV1Views",
    "MoCoV2Views",
    "SimCLRViews",
    "BYOLViews",
    "MoCoV3Views",
    "SwAVViews",
    "DINOViews",
]

#: ImageNet's per-channel mean and std (the papers' and torchvision's normalisation): the
#: default for RGB images; pass one value each (``mean=(0.5,), std=(0.5,)``) for gray ones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def method_recipes(method: str, num_local: int | None = None) -> list[str]:
    """The recipe of each view of a two-view or multi-crop ``method``, as it is registered
    (its default ``augment``); a multi-crop method (one with ``num_local_crops``) gets its 2
    large views and ``num_local`` small ones (default: its paper's number).

    Raises:
        ConfigError: an unknown method.
        ValueError: ``num_local`` for a method without multi-crop.
    """
    spec = get_method(method)
    augment = str(spec.defaults.get("augment", "mocov2"))
    paper_local = getattr(spec.options(), "num_local_crops", None)
    if paper_local is not None:
        return multi_crop_recipes(augment, 2, paper_local if num_local is None else num_local)
    if num_local is not None:
        raise ValueError(f"{method} has no small (multi-crop) views; leave num_local out")
    names = [a.strip() for a in augment.split(",")]
    return names * 2 if len(names) == 1 else names


class Views:
    """One view per recipe of an image: ``views(image)`` → ``[view_1, view_2, …]``.

    Args:
        recipes: one per view, each a name of :data:`mocolab.augment.RECIPES` or an
            :class:`~mocolab.augment.AugmentConfig` (then ``size``, ``mean`` and ``std`` are
            its own).
        size: the side of the views, pixels (a multi-crop recipe's small views are
            :func:`~mocolab.augment.local_crop_size` of it).
        mean: per-channel normalisation mean in 0–1 units (one value for gray images, or
            one for every channel); default ImageNet's.
        std: per-channel normalisation standard deviation, as ``mean``.

    Raises:
        ValueError: an unknown recipe (the message lists them).

    Examples:
        An asymmetric pair of your choice, on a gray PIL image:

        >>> from PIL import Image
        >>> views = Views(["byol-view1", "crop-flip"], 24, mean=(0.5,), std=(0.5,))
        >>> [tuple(v.shape) for v in views(Image.new("L", (30, 30)))]
        [(1, 24, 24), (1, 24, 24)]
    """

    def __init__(
        self,
        recipes: Sequence[str | AugmentConfig],
        size: int = 224,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.configs = [
            r if isinstance(r, AugmentConfig) else recipe(r, size, mean, std) for r in recipes
        ]
        self.pipelines: list[Callable[[Tensor | Image.Image], Tensor]] = [
            torchvision_pipeline(c) for c in self.configs
        ]

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        """The views of ``image``: a PIL image (modes other than L and RGB are converted to
        RGB) or a uint8 ``C×H×W`` tensor with C = 1 or 3."""
        if isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ValueError(
                    "expected a PIL image or a uint8 C×H×W tensor with C = 1 or 3, got "
                    f"{image.dtype} of shape {tuple(image.shape)}"
                )
            image = to_pil(image)
        elif image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        channels = 1 if image.mode == "L" else 3
        for c in self.configs:
            if len(c.mean) not in (1, channels):
                raise ValueError(
                    f"the views are normalised with {len(c.mean)} values per channel but the "
                    f"image has {channels} channel(s); pass mean and std with one value each "
                    "for gray images (or convert them to RGB)"
                )
        return [pipeline(image) for pipeline in self.pipelines]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.configs!r})"


class _MethodViews(Views):
    """The views of the registered method :attr:`method`."""

    method: str

    def __init__(
        self,
        size: int = 224,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(method_recipes(self.method), size, mean=mean, std=std)


class _MultiCropViews(Views):
    """The 2 large and ``num_local`` small views of the registered multi-crop :attr:`method`."""

    method: str

    def __init__(
        self,
        size: int = 224,
        *,
        num_local: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(method_recipes(self.method, num_local), size, mean=mean, std=std)


class MoCoV1Views(_MethodViews):
    """MoCo v1's two views (He et al. 2020, ``main_moco.py``): random resized crop (20–100 %),
    grayscale (p 0.2) before colour jitter (0.4, 0.4, 0.4, 0.4), flip (recipe ``mocov1``)."""

    method = "mocov1"


class MoCoV2Views(_MethodViews):
    """MoCo v2's two views (Chen et al. 2020, ``aug_plus``): random resized crop (20–100 %),
    colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, Gaussian blur σ ∈ [0.1, 2]
    with p 0.5, flip (recipe ``mocov2``; SimSiam's too)."""

    method = "mocov2"


class SimCLRViews(_MethodViews):
    """SimCLR's two views (Chen et al. 2020, App. A, s = 1): crop (8–100 %), colour jitter
    (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, blur p 0.5, flip (recipe ``simclr``)."""

    method = "simclr"


class BYOLViews(_MethodViews):
    """BYOL's asymmetric pair (Grill et al. 2020, Table 6): crop (8–100 %), flip, colour
    jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2; blur p 1.0 in the first view and
    0.1 in the second, solarize p 0.2 in the second only (``byol-view1``, ``byol-view2``)."""

    method = "byol"


class MoCoV3Views(_MethodViews):
    """MoCo v3's views: BYOL's asymmetric pair (Chen, Xie & He 2021, §4; see
    :class:`BYOLViews`)."""

    method = "mocov3"


class SwAVViews(_MultiCropViews):
    """SwAV's multi-crop (Caron et al. 2020, §3.2): 2 views of ``size`` (crops 14–100 %) and
    ``num_local`` small ones (crops 5–14 %, 96/224 of the side; default 6), colour distortion
    s = 1, blur p 0.5 (``swav-global``, ``swav-local``)."""

    method = "swav"


class DINOViews(_MultiCropViews):
    """DINO's multi-crop (Caron et al. 2021): 2 views of ``size`` (crops 40–100 %; blur p 1.0
    in the first, blur 0.1 and solarize 0.2 in the second) and ``num_local`` small ones
    (crops 5–40 %, 96/224 of the side, blur p 0.5; default 8), BYOL's colour jitter
    (``dino-global1``, ``dino-global2``, ``dino-local``)."""

    method = "dino"
