"""The linear protocol: a linear classifier trained on frozen features (MoCo §4.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..results import LinearResult
from .knn import topk_accuracy

#: Named settings of the linear protocol. ``default``: standardised features, lr 0.1, cosine
#: decay (one learning rate works across backbones). ``moco``: MoCo v1's recipe (He et al.
#: 2020, §4.1 and its ``main_lincls.py``): raw features, SGD lr 30, momentum 0.9, no weight
#: decay, 100 epochs, lr × 0.1 at epochs 60 and 80 (milestones are fractions of the epochs, so
#: a shorter run keeps the shape).
LINEAR_RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(
        epochs=100,
        lr=0.1,
        weight_decay=0.0,
        standardize=True,
        lr_schedule="cosine",
        milestones=(0.6, 0.8),
    ),
    "moco": dict(
        epochs=100,
        lr=30.0,
        weight_decay=0.0,
        standardize=False,
        lr_schedule="step",
        milestones=(0.6, 0.8),
    ),
}


def probe_lr(
    lr: float,
    step: int,
    total: int,
    schedule: str = "cosine",
    milestones: Sequence[float] = (0.6, 0.8),
    gamma: float = 0.1,
) -> float:
    """The classifier's learning rate at ``step`` of ``total``: cosine decay to 0, or step
    decay (× ``gamma`` at each milestone, given as a fraction of training)."""
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "step":
        return lr * gamma ** sum(step >= round(m * total) for m in milestones)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose cosine or step")


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    standardize: bool = True,
    seed: int = 0,
    lr_schedule: str = "cosine",
    milestones: Sequence[float] = (0.6, 0.8),
) -> LinearResult:
    """Train ``nn.Linear(D, C)`` on precomputed frozen features with SGD (cosine or step LR
    schedule, see :func:`probe_lr`); return test top-1 / top-5 (percent) and the final train
    loss. :data:`LINEAR_RECIPES` holds the named settings (``moco``: lr 30, step decay).

    ``train_features`` may hold several augmented copies of each training image (see
    :func:`mocolab.evaluate.features.extract_augmented_features`): the papers train the
    classifier on random-resized-crop + flip views.

    ``standardize`` normalises each feature dimension with the training set's mean and std,
    like the parameter-free BatchNorm that MoCo v3 and MAE put before the linear layer; it
    makes one learning rate work across backbones (MoCo v1 instead used lr = 30 on raw
    features). Without it, pass a learning rate suited to the feature scale.
    """
    train_features = train_features.float()
    test_features = test_features.float()
    if standardize:
        mu = train_features.mean(0, keepdim=True)
        sd = train_features.std(0, keepdim=True).clamp_min(1e-6)
        train_features = (train_features - mu) / sd
        test_features = (test_features - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = nn.Linear(train_features.shape[1], num_classes)
    opt = torch.optim.SGD(
        classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    n = train_features.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step, loss = 0, torch.tensor(float("nan"))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            for g in opt.param_groups:
                g["lr"] = probe_lr(lr, step, total, lr_schedule, milestones)
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(classifier(train_features[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
    with torch.no_grad():
        scores = classifier(test_features)
    acc = topk_accuracy(scores, test_labels)
    return LinearResult(top1=acc["top1"], top5=acc["top5"], train_loss=float(loss.detach()))
