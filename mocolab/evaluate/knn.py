"""Weighted k-nearest-neighbour classification of Wu et al. (InstDisc, CVPR 2018, §3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> Tensor:
    """Class scores by the weighted vote of the k most similar bank entries.

    With cosine similarities ``s_i`` between a query and its top-k neighbours, each neighbour
    votes for its class with weight ``exp(s_i / τ)``; a class's score is the sum of its votes.

    Args:
        query: ``M×D`` features (normalised here).
        bank: ``N×D`` features of the labelled set (normalised here).
        bank_labels: ``N`` class indices.
        num_classes: number of classes C.
        k: neighbours (200 in InstDisc); clamped to N.
        temperature: τ (0.1 in InstDisc).
        chunk_size: queries per matrix product, to bound memory on large banks.

    Returns:
        ``M×C`` class scores.
    """
    if bank.shape[0] == 0:
        raise ValueError("knn_predict: the feature bank is empty")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    scores = []
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start:start + chunk_size] @ bank.T  # m×N cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # m×k
        weights = (top_sim / temperature).exp()  # m×k
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)  # m×C
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (k clamped to the number of classes)."""
    out = {}
    for kk in ks:
        kk_eff = min(kk, scores.shape[1])
        top = scores.topk(kk_eff, dim=1).indices
        out[f"top{kk}"] = 100.0 * (top == labels.view(-1, 1)).any(dim=1).float().mean().item()
    return out


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> dict[str, float]:
    """Top-1 / top-5 (percent) of the weighted kNN classifier on ``test_features``."""
    scores = knn_predict(test_features, train_features, train_labels, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)
