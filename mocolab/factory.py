"""Build a method or a backbone by name, as ``timm.create_model`` builds a model.

:func:`create_method` gives the :class:`~mocolab.methods.Method` that ``mocolab pretrain
--method NAME`` trains, for a training loop of your own; :func:`create_backbone` the encoder
alone. Options are keyword arguments with the names of ``mocolab pretrain``'s flags
(``queue_size`` for ``--queue-size``) and the same defaults: each method's own options default
to its paper's values, the network to ``mocolab pretrain``'s CPU-sized ResNet-18 at width 16
(``arch="resnet50", width=64`` for the papers' ResNet-50). An option the method does not have
is a :class:`~mocolab.errors.ConfigError` naming it. The names come from the method registry
(:func:`list_methods`), so a method added as a module or a plug-in is built the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .backbones import default_stem
from .config import build_config
from .errors import ConfigError
from .methods import build_backbone, build_method
from .methods.base import Method
from .methods.registry import MethodSpec, load_methods, owners

__all__ = ["create_backbone", "create_method", "list_methods"]

#: The per-channel mean and std of ImageNet's RGB images (torchvision's and the papers'
#: normalisation), the default normalisation of RGB inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The options of ``mocolab pretrain`` that shape a backbone.
BACKBONE_OPTIONS = (
    "width",
    "stem",
    "bn_splits",
    "patch_size",
    "pos_embed",
    "freeze_patch_embed",
    "vit_depth",
    "vit_heads",
)
#: The options of ``mocolab pretrain`` that shape a method besides its own: the backbone's,
#: the heads' and the batch (SwAV counts its queue's start in steps of ``batch_size``).
MODEL_OPTIONS = ("arch", *BACKBONE_OPTIONS, "dim", "head_layers", "hidden_dim", "batch_size")


def list_methods() -> list[str]:
    """The method names :func:`create_method` and ``mocolab pretrain --method`` take, in the
    order they were registered.

    Examples:
        >>> names = list_methods()
        >>> "mocov2" in names and "simclr" in names
        True
    """
    return list(load_methods())


def _method(name: str) -> MethodSpec:
    registry = load_methods()
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown method {name!r}; {hint}choose one of {', '.join(registry)} "
            "(mocolab.list_methods())"
        )
    return registry[name]


def _check_options(where: str, given: Iterable[str], allowed: Sequence[str]) -> None:
    """A :class:`ConfigError` naming the first option of ``given`` not in ``allowed``, a close
    name, the methods that have it, and the options there are."""
    for key in given:
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        theirs = owners(key)
        notes = [f"did you mean {close[0]!r}?"] if close else []
        notes += [f"an option of {', '.join(theirs)}"] if theirs else []
        note = f" ({'; '.join(notes)})" if notes else ""
        raise ConfigError(
            f"{where}: unknown option {key!r}{note}; its options: {', '.join(allowed)}"
        )


def create_method(
    name: str,
    *,
    in_channels: int = 3,
    image_size: int = 224,
    num_images: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> Method:
    """The method ``name`` (one of :func:`list_methods`) with a new backbone, ready to train.

    The method is the module ``mocolab pretrain --method NAME`` trains: call it on a list of
    views (``model(views, generator)`` → :class:`~mocolab.methods.LossOutput`, ``.loss`` to
    minimise), step your optimiser, then ``model.on_step_end(out, step, total_steps)`` (the
    momentum encoder's and the queue's updates). ``model.backbone`` is the encoder to keep;
    :mod:`mocolab.transforms` makes the views in a ``DataLoader``.

    Args:
        name: the method (``"mocov2"``, ``"simclr"``, ``"byol"``, … :func:`list_methods`).
        in_channels: 3 for RGB images, 1 for gray ones.
        image_size: the side of the views the model takes; picks the ResNet stem (``imagenet``
            from 96 px, ``cifar`` from 32, else ``compact``) and sizes a ViT's position
            embedding.
        num_images: the training set's size, for the methods with a memory bank (``instdisc``,
            ``cmc``, ``pirl``: one entry per image).
        mean: the views' per-channel normalisation mean (CMC recovers RGB from it for its Lab
            split); default ImageNet's for RGB, 0.5 for gray.
        std: the views' per-channel normalisation standard deviation; default as ``mean``.
        **options: the method's own options (its paper's defaults: ``queue_size``,
            ``temperature``, …; ``mocolab pretrain --method NAME --help`` lists them) and the
            network's (``arch``, ``width``, ``stem``, ``dim``, ``head_layers``,
            ``hidden_dim``, ``bn_splits``, ``batch_size``, the ViT options).

    Raises:
        ConfigError: an unknown method or option (the message names it and a close name), or
            an invalid value.

    Examples:
        MoCo v2 with a smaller queue on 32 px RGB views: one step's loss, then the queue's
        update.

        >>> import torch
        >>> model = create_method("mocov2", image_size=32, queue_size=256)
        >>> model.temperature, model.dictionary.size
        (0.2, 256)
        >>> views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
        >>> out = model(views, torch.Generator().manual_seed(0))
        >>> out.loss.shape, sorted(out.metrics)
        (torch.Size([]), ['acc'])
        >>> _ = model.on_step_end(out, step=0, total_steps=100)

        An option the method does not have is an error that names it:

        >>> create_method("mocov2", queue=256)
        Traceback (most recent call last):
        ...
        mocolab.errors.ConfigError: create_method('mocov2'): unknown option 'queue' (did you mean 'queue_size'?)...
    """
    spec = _method(name)
    _check_options(
        f"create_method({name!r})", options, [*spec.option_names(), *spec.renamed, *MODEL_OPTIONS]
    )
    cfg = build_config(method=name, crop_size=image_size, **options)
    if mean is None or std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else ((0.5,), (0.5,))
    return build_method(
        cfg,
        in_channels,
        cfg.stem or default_stem(image_size),
        num_images=num_images,
        mean=mean,
        std=std,
        image_size=image_size,
    )


def create_backbone(
    arch: str = "resnet18",
    *,
    in_channels: int = 3,
    image_size: int = 224,
    method: str | None = None,
    **options: Any,
) -> nn.Module:
    """A new backbone (``N×C×H×W`` → pooled features ``N×D``, attribute ``num_features``).

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101`` | ``vit_tiny`` |
            ``vit_small`` | ``vit_base``.
        in_channels: 3 for RGB images, 1 for gray ones.
        image_size: the side of the images it takes; picks the ResNet stem (``imagenet`` from
            96 px, ``cifar`` from 32, else ``compact``) and sizes a ViT's position embedding.
        method: a method that trains its own kind of backbone (``cmc``'s two ResNets on L and
            ab, ``cpc``'s patch grid); ``None``: the ``arch`` network.
        **options: ``width`` (a ResNet's first-stage channels: 16 by default, 64 is
            torchvision's), ``stem``, ``bn_splits`` (1 by default), and for a ViT
            ``patch_size``, ``pos_embed``, ``freeze_patch_embed``, ``vit_depth``, ``vit_heads``.

    Raises:
        ConfigError: an unknown architecture or option, or an invalid value.

    Examples:
        A ResNet-18 at width 8 for 32 px RGB images (the ``cifar`` stem), and a 2-block ViT:

        >>> import torch
        >>> net = create_backbone("resnet18", width=8, image_size=32)
        >>> net.num_features, net(torch.zeros(2, 3, 32, 32)).shape
        (64, torch.Size([2, 64]))
        >>> vit = create_backbone("vit_tiny", image_size=32, vit_depth=2, patch_size=8)
        >>> vit(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 192])
    """
    if method is not None:
        _method(method)
    _check_options(f"create_backbone({arch!r})", options, BACKBONE_OPTIONS)
    values: Mapping[str, Any] = {"bn_splits": 1, **options}
    cfg = build_config(method=method, arch=arch, crop_size=image_size, **values)
    return build_backbone(
        cfg.to_dict(),
        in_channels,
        cfg.stem or default_stem(image_size),
        cfg.width,
        cfg.bn_splits,
        image_size=image_size,
    )
