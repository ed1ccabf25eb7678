"""Views on the training device: batched augmentations with per-sample random parameters.

:mod:`mocolab.augment.ops` holds the pure, batched image operations (crop-resize, flip, colour
jitter, grayscale, blur, solarize, normalise) with torchvision's definitions;
:mod:`mocolab.augment.views` holds the configs, the papers' recipes and the
:class:`ViewGenerator` that draws the parameters from a ``torch.Generator``.
"""

from . import ops
from .views import (
    RECIPES,
    AugmentConfig,
    MultiCropConfig,
    ViewGenerator,
    ViewParams,
    crop_params,
    default_blur_kernel,
    eval_view,
    local_crop_size,
    multi_crop,
    recipe,
    tile_crop_size,
    whole_image_boxes,
)

__all__ = [
    "ops",
    "RECIPES",
    "AugmentConfig",
    "MultiCropConfig",
    "ViewGenerator",
    "ViewParams",
    "crop_params",
    "default_blur_kernel",
    "eval_view",
    "local_crop_size",
    "tile_crop_size",
    "multi_crop",
    "recipe",
    "whole_image_boxes",
]
