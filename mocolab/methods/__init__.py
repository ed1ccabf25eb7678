"""Methods: each a short composition of backbone, heads, dictionary, momentum encoder, loss.

Every module here registers its methods (:mod:`mocolab.methods.registry`); importing this
package imports them all, and exports each module's :class:`Method` classes (``MoCo``,
``BYOL``, ``DINO``, ...) under this package's name.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..backbones import is_vit, resnet, split_batch_norm_1d, vit_backbone
from .base import LossOutput, Method
from .registry import (
    BuildContext,
    MethodOptions,
    get_method,
    load_methods,
    method_names,
    register_method,
)

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = [
    "LossOutput",
    "Method",
    "MethodOptions",
    "BuildContext",
    "register_method",
    "get_method",
    "method_names",
    "build_method",
    "build_backbone",
]

for _spec in load_methods().values():  # the Method classes of every method module, by name
    for _name, _obj in vars(sys.modules[_spec.build.__module__]).items():
        if isinstance(_obj, type) and issubclass(_obj, Method) and _obj is not Method:
            globals().setdefault(_name, _obj)
            if _name not in __all__:
                __all__.append(_name)


def build_backbone(
    config: Mapping[str, Any],
    in_channels: int,
    stem: str,
    width: int,
    bn_splits: int = 1,
    image_size: int | None = None,
) -> nn.Module:
    """The backbone a run of ``config["method"]`` trains and evaluation loads (also from a
    checkpoint's config dict): the method's own kind when it registers one (CMC's two ResNets
    on L and ab, CPC's ResNet over a grid of patches), else a ResNet or a ViT (``--arch
    vit_*``; ``image_size``, the crop side, sizes its position embedding)."""
    spec = load_methods().get(str(config.get("method")))
    if spec is not None and spec.backbone is not None:
        return spec.backbone(config, in_channels, stem, width, bn_splits)
    if is_vit(config["arch"]):
        return vit_backbone(
            config["arch"],
            in_channels=in_channels,
            image_size=image_size,
            patch_size=config.get("patch_size"),
            pos_embed=config.get("pos_embed") or "sincos",
            freeze_patch_embed=bool(config.get("freeze_patch_embed")),
            depth=config.get("vit_depth"),
            heads=config.get("vit_heads"),
            global_pool=config.get("vit_pool") or "token",
            layer_scale=float(config.get("vit_layer_scale") or 0.0),
        )
    return resnet(
        config["arch"], in_channels=in_channels, stem=stem, bn_splits=bn_splits, width=width
    )


def build_method(
    cfg: PretrainConfig,
    in_channels: int,
    stem: str,
    num_images: int | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    image_size: int | None = None,
) -> Method:
    """The method named by ``cfg.method`` with its backbone, from a resolved config, by its
    registered builder.

    ``num_images`` (the training set size) sizes InstDisc's and CMC's memory banks; ``mean``
    and ``std`` (the inputs' RGB normalisation) let CMC recover RGB for its Lab split;
    ``image_size`` (the crop side) sizes a ViT's position embedding. Every BN — the backbone's
    and the heads' — computes its statistics over ``cfg.bn_splits`` sub-batches.
    """
    spec = get_method(cfg.method)
    backbone = build_backbone(
        cfg.to_dict(), in_channels, stem, cfg.width, cfg.bn_splits, image_size=image_size
    )
    options = cfg.options if cfg.options is not None else spec.options()
    model = spec.build(backbone, cfg, options, BuildContext(num_images, mean, std, image_size))
    return split_batch_norm_1d(model, cfg.bn_splits)
