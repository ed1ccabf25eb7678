"""Frozen-backbone features of a whole dataset, batched on the device."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..augment import eval_view


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Tensor, *, size: int,
                     mean: Sequence[float], std: Sequence[float], batch_size: int = 512,
                     device: str | torch.device = "cpu", progress: bool = False,
                     desc: str = "features") -> Tensor:
    """Pooled backbone features of ``images`` (uint8 ``N×C×H×W``) → float32 ``N×D`` on the CPU.

    The backbone runs in eval mode (BN with running statistics) on the deterministic view
    (resize to ``size`` if needed, normalise); its training mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        out.append(backbone(eval_view(x, size, mean, std)).float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
