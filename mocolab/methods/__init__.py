"""Methods: each a short composition of backbone, heads, dictionary, momentum encoder, loss."""

from __future__ import annotations

from ..backbones import resnet
from ..config import PretrainConfig
from .base import LossOutput, Method
from .moco import MoCo

__all__ = ["LossOutput", "Method", "MoCo", "build_method"]


def build_method(cfg: PretrainConfig, in_channels: int, stem: str) -> Method:
    """The method named by ``cfg.method`` with its backbone, from a resolved config."""
    backbone = resnet(cfg.arch, in_channels=in_channels, stem=stem, bn_splits=cfg.bn_splits,
                      width=cfg.width)
    if cfg.method in ("mocov1", "mocov2"):
        return MoCo(backbone, dim=cfg.dim, head_layers=cfg.head_layers, hidden_dim=cfg.hidden_dim,
                    queue_size=cfg.queue_size, momentum=cfg.key_momentum,
                    momentum_schedule=cfg.momentum_schedule, temperature=cfg.temperature,
                    shuffle_bn=cfg.shuffle_bn)
    raise ValueError(f"unknown method {cfg.method!r}")
