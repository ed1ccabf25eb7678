"""Methods: each a short composition of backbone, heads, dictionary, momentum encoder, loss."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from ..backbones import is_vit, resnet, split_batch_norm_1d, vit_backbone
from ..config import PretrainConfig
from .base import LossOutput, Method
from .byol import BYOL
from .cmc import CMC, lab_split_backbone, require_colour
from .cpc import CPC, parse_directions, patch_backbone
from .dino import DINO
from .instdisc import InstDisc
from .invaspread import InvaSpread
from .moco import MoCo, MoCoV3
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV

__all__ = ["LossOutput", "Method", "MoCo", "MoCoV3", "SimCLR", "BYOL", "SimSiam", "InstDisc",
           "InvaSpread", "SwAV", "DINO", "CPC", "CMC", "build_method", "build_backbone"]


def build_backbone(config: Mapping[str, Any], in_channels: int, stem: str, width: int,
                   bn_splits: int = 1, image_size: int | None = None) -> nn.Module:
    """The backbone a run of ``config["method"]`` trains and evaluation loads (also from a
    checkpoint's config dict): a ResNet, for CMC two ResNets on L and ab (a
    :class:`~mocolab.methods.cmc.LabSplitBackbone`), for CPC a ResNet over a grid of patches, or
    a ViT (``--arch vit_*``; ``image_size``, the crop side, sizes its position embedding)."""
    if config.get("method") == "cmc":  # two ResNets, on the L and on the ab channels of Lab
        require_colour(in_channels, config.get("data", ""))
        return lab_split_backbone(config["arch"], stem, width, bn_splits)
    if config.get("method") == "cpc":
        return patch_backbone(config["arch"], in_channels, stem, width, config["patch_size"],
                              config["patch_stride"])
    if is_vit(config["arch"]):
        return vit_backbone(config["arch"], in_channels=in_channels, image_size=image_size,
                            patch_size=config.get("patch_size"),
                            pos_embed=config.get("pos_embed") or "sincos",
                            freeze_patch_embed=bool(config.get("freeze_patch_embed")),
                            depth=config.get("vit_depth"), heads=config.get("vit_heads"))
    return resnet(config["arch"], in_channels=in_channels, stem=stem, bn_splits=bn_splits, width=width)


def build_method(cfg: PretrainConfig, in_channels: int, stem: str, num_images: int | None = None,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 image_size: int | None = None) -> Method:
    """The method named by ``cfg.method`` with its backbone, from a resolved config.

    ``num_images`` (the training set size) sizes InstDisc's and CMC's memory banks; ``mean``
    and ``std`` (the inputs' RGB normalisation) let CMC recover RGB for its Lab split;
    ``image_size`` (the crop side) sizes a ViT's position embedding. Every BN — the backbone's
    and the heads' — computes its statistics over ``cfg.bn_splits`` sub-batches.
    """
    return split_batch_norm_1d(_build_method(cfg, in_channels, stem, num_images, mean, std, image_size),
                               cfg.bn_splits)


def _build_method(cfg: PretrainConfig, in_channels: int, stem: str, num_images: int | None,
                  mean: Sequence[float], std: Sequence[float], image_size: int | None) -> Method:
    backbone = build_backbone(cfg.to_dict(), in_channels, stem, cfg.width, cfg.bn_splits,
                              image_size=image_size)
    if cfg.method == "cmc":
        if num_images is None:
            raise ValueError("cmc needs num_images (the training set size) for its memory banks")
        backbone.normalize_inputs(mean, std)
        return CMC(backbone, num_images=num_images, dim=cfg.dim, head_layers=cfg.head_layers,
                   hidden_dim=cfg.hidden_dim, nce_k=cfg.nce_k, bank_momentum=cfg.bank_momentum,
                   temperature=cfg.temperature, loss=cfg.loss)
    if cfg.method in ("mocov1", "mocov2"):
        return MoCo(backbone, dim=cfg.dim, head_layers=cfg.head_layers, hidden_dim=cfg.hidden_dim,
                    queue_size=cfg.queue_size, momentum=cfg.key_momentum,
                    momentum_schedule=cfg.momentum_schedule, temperature=cfg.temperature,
                    shuffle_bn=cfg.shuffle_bn, mochi_n=cfg.mochi_n, mochi_s=cfg.mochi_s,
                    mochi_s_prime=cfg.mochi_s_prime, symmetric=cfg.symmetric)
    heads = dict(dim=cfg.dim, head_layers=cfg.head_layers, hidden_dim=cfg.hidden_dim)
    if cfg.method in ("simclr", "simclr2"):
        return SimCLR(backbone, **heads, temperature=cfg.temperature,
                      memory=cfg.queue_size if cfg.simclr2_memory else 0,
                      momentum=0.999 if cfg.key_momentum is None else cfg.key_momentum,
                      momentum_schedule=cfg.momentum_schedule or "constant")
    if cfg.method == "byol":
        return BYOL(backbone, **heads, predictor_hidden_dim=cfg.predictor_hidden_dim,
                    momentum=cfg.key_momentum, momentum_schedule=cfg.momentum_schedule)
    if cfg.method == "simsiam":
        return SimSiam(backbone, **heads, predictor_hidden_dim=cfg.predictor_hidden_dim)
    if cfg.method == "mocov3":
        return MoCoV3(backbone, **heads, predictor_hidden_dim=cfg.predictor_hidden_dim,
                      momentum=cfg.key_momentum, momentum_schedule=cfg.momentum_schedule,
                      temperature=cfg.temperature)
    if cfg.method == "instdisc":
        if num_images is None:
            raise ValueError("instdisc needs num_images (the training set size) for its memory bank")
        return InstDisc(backbone, num_images=num_images, **heads, nce_k=cfg.nce_k,
                        bank_momentum=cfg.bank_momentum, temperature=cfg.temperature, loss=cfg.loss,
                        bank_init=cfg.bank_init)
    if cfg.method == "invaspread":
        return InvaSpread(backbone, **heads, temperature=cfg.temperature)
    if cfg.method == "swav":
        return SwAV(backbone, **heads, num_prototypes=cfg.prototypes, num_local=cfg.num_local_crops,
                    temperature=cfg.temperature, epsilon=cfg.sinkhorn_epsilon,
                    sinkhorn_iterations=cfg.sinkhorn_iterations,
                    freeze_prototypes_niters=cfg.freeze_prototypes_niters,
                    queue_length=cfg.swav_queue,
                    queue_start_step=cfg.swav_queue_start_epoch * ((num_images or 0) // cfg.batch_size))
    if cfg.method == "dino":
        return DINO(backbone, **heads, out_dim=cfg.prototypes, num_local=cfg.num_local_crops,
                    momentum=cfg.key_momentum, momentum_schedule=cfg.momentum_schedule,
                    temperature=cfg.temperature, teacher_temperature=cfg.teacher_temperature,
                    warmup_teacher_temperature=cfg.warmup_teacher_temperature,
                    teacher_temperature_warmup=cfg.teacher_temperature_warmup,
                    center_momentum=cfg.center_momentum, head_bn=cfg.head_bn,
                    freeze_last_layer_niters=cfg.freeze_prototypes_niters)
    if cfg.method == "cpc":
        return CPC(backbone, dim=cfg.dim, prediction_steps=cfg.prediction_steps,
                   directions=parse_directions(cfg.prediction_directions),
                   context_blocks=cfg.context_blocks, temperature=cfg.temperature)
    raise ValueError(f"unknown method {cfg.method!r}")
