"""Shared by the export / import / embed tests: a mocolab run directory without training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mocolab.backbones import resnet
from mocolab.checkpoint import CHECKPOINT_NAME, save_atomic
from mocolab.config import build_config

# These tests run tiny convolutions: one thread is faster than several and, on a shared CPU,
# avoids threads spinning against each other (the tiny pretraining runs use threads=1 too).
torch.set_num_threads(1)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial affine parameters and running statistics, so that eval-mode
    features depend on all of the state dict (fresh BNs are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def fake_run(root: Path, name: str = "run", *, arch: str = "resnet18", stem: str = "imagenet",
             width: int = 64, in_channels: int = 3, crop_size: int = 32, seed: int = 0) -> Path:
    """A run directory whose checkpoint has the layout pretraining writes (random weights)."""
    cfg = build_config(data="synthetic", arch=arch, width=width, stem=stem, batch_size=32,
                       bn_splits=4, queue_size=64, threads=1, progress=False)
    torch.manual_seed(seed)
    backbone = randomize_bn(resnet(arch, in_channels=in_channels, stem=stem, width=width), seed)
    # the method's state dict holds the backbone under query_encoder.backbone (the rest of the
    # method — head, key encoder, queue — is left out: exports never read it)
    model = {"query_encoder.backbone." + k: v for k, v in backbone.state_dict().items()}
    mean = [0.4, 0.5, 0.6][:in_channels]
    std = [0.2, 0.25, 0.3][:in_channels]
    info = {"in_channels": in_channels, "stem": stem, "width": width, "crop_size": crop_size,
            "mean": mean, "std": std, "dataset": "synthetic/train", "num_images": 512}
    run = Path(root) / name
    save_atomic({"format": "mocolab", "version": 1, "config": cfg.to_dict(), "info": info,
                 "step": 7, "model": model}, run / CHECKPOINT_NAME)
    return run
