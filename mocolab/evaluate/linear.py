"""The linear protocol: a linear classifier trained on frozen features (MoCo §4.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .knn import topk_accuracy


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, num_classes: int, *, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                 standardize: bool = True, seed: int = 0) -> dict[str, float]:
    """Train ``nn.Linear(D, C)`` on precomputed frozen features with SGD and a cosine LR
    schedule; return test top-1 / top-5 (percent) and the final train loss.

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
    opt = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    n = train_features.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step, loss = 0, torch.tensor(float("nan"))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(classifier(train_features[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        scores = classifier(test_features)
    return {**topk_accuracy(scores, test_labels), "train_loss": float(loss.detach())}
