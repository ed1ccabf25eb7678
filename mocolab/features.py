"""Frozen-backbone features of a whole dataset, batched on the device.

A part below the methods (InstDisc initialises its memory bank with them) and the
evaluation protocols; :mod:`mocolab.evaluate.features` re-exports it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .augment import AugmentConfig, ViewGenerator, eval_view


def cpu_features(x: Tensor) -> Tensor:
    """``x`` detached, as float32 on the CPU, in storage of its own: a batch's features to keep.

    A backbone's output may be a view into a larger tensor — a ViT's [CLS] token is a slice of
    its ``N×T×D`` output — and a kept view keeps all of that alive: 50× the features for a ViT
    on 7×7 patches.

    >>> tokens = torch.randn(4, 50, 8)
    >>> cls = tokens[:, 0]  # a view: its storage is all 4×50×8 values
    >>> cls.untyped_storage().nbytes(), cpu_features(cls).untyped_storage().nbytes()
    (6400, 128)
    """
    x = x.detach().float().cpu()
    return x if x.untyped_storage().nbytes() == x.numel() * x.element_size() else x.clone()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
) -> Tensor:
    """Pooled backbone features of ``images`` (uint8 ``N×C×H×W``) → float32 ``N×D`` on the CPU.

    The backbone runs in eval mode (BN with running statistics) on the deterministic view
    (resize to ``size`` if needed, normalise); its training mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        out.append(cpu_features(backbone(eval_view(x, size, mean, std))))
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def classifier_augment(size: int, mean: Sequence[float], std: Sequence[float]) -> AugmentConfig:
    """The train-time view of the papers' classifiers (MoCo ``main_lincls.py``, SimCLR
    fine-tuning): RandomResizedCrop(size, scale 0.08–1) + horizontal flip, no colour change."""
    return AugmentConfig(
        size=size,
        scale=(0.08, 1.0),
        jitter_p=0.0,
        grayscale_p=0.0,
        mean=tuple(mean),
        std=tuple(std),
    )


@torch.no_grad()
def extract_augmented_features(
    backbone: nn.Module,
    images: Tensor,
    *,
    copies: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Frozen features of ``copies`` random train-time views of every image
    (:func:`classifier_augment`), computed once: ``(copies·N)×D`` float32 on the CPU, copy
    ``c`` of image ``i`` at row ``c·N + i`` (so labels repeat with ``labels.repeat(copies)``).

    Precomputing a few augmented copies approximates the papers' linear protocol, which draws a
    new crop every epoch, at the cost of ``copies`` feature passes instead of one per epoch.
    """
    device = torch.device(device)
    views = ViewGenerator(classifier_augment(size, mean, std))
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = backbone.training
    backbone.eval()
    out = []
    for c in range(copies):
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(
            starts, desc=f"augmented features {c + 1}/{copies}", disable=not progress, leave=False
        ):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            out.append(cpu_features(backbone(views(x, gen))))
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
