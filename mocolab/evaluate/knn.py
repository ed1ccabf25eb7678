"""Weighted k-nearest-neighbour classification of Wu et al. (InstDisc, CVPR 2018, §3.4)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..results import KnnResult

BACKENDS = ("torch", "faiss")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "the faiss backend needs FAISS: pip install faiss-cpu "
            "(or faiss-gpu), or use backend='torch'"
        ) from None
    return faiss


@torch.no_grad()
def nearest_neighbours(
    query: Tensor, bank: Tensor, k: int, *, chunk_size: int = 1024, backend: str = "torch"
) -> tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar bank entries of every query.

    Args:
        query: ``M×D`` features; bank: ``N×D`` features (both normalised here).
        k: neighbours, at most N.
        chunk_size: queries per matrix product (``torch`` backend), to bound memory.
        backend: ``"torch"`` (exact, chunked matrix products on the features' device) or
            ``"faiss"`` (exact inner-product index ``IndexFlatIP`` on the CPU; needs
            ``pip install faiss-cpu``; faster on large banks).

    Returns:
        ``(similarities, indices)``, both ``M×k``, most similar first.
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k = {k} neighbours asked of a bank of {bank.shape[0]} entries")
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    if backend == "faiss":
        faiss = _faiss()
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank.cpu().contiguous().numpy())
        sims, idx = index.search(query.cpu().contiguous().numpy(), k)
        return (
            torch.from_numpy(sims).to(query.device),
            torch.from_numpy(idx).long().to(query.device),
        )
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    sims, idx = [], []
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start : start + chunk_size] @ bank.T  # m×N cosine similarities
        s, i = sim.topk(k, dim=1)  # m×k
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    backend: str = "torch",
) -> Tensor:
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
        backend: ``"torch"`` or ``"faiss"`` (see :func:`nearest_neighbours`).

    Returns:
        ``M×C`` class scores.
    """
    if bank.shape[0] == 0:
        raise ValueError("knn_predict: the feature bank is empty")
    k = min(k, bank.shape[0])
    top_sim, top_idx = nearest_neighbours(
        query, bank, k, chunk_size=chunk_size, backend=backend
    )  # M×k
    weights = (top_sim / temperature).exp()  # M×k
    votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    votes.scatter_add_(1, bank_labels.to(top_idx.device)[top_idx], weights)  # M×C
    return votes


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (k clamped to the number of classes)."""
    out = {}
    for kk in ks:
        kk_eff = min(kk, scores.shape[1])
        top = scores.topk(kk_eff, dim=1).indices
        out[f"top{kk}"] = 100.0 * (top == labels.view(-1, 1)).any(dim=1).float().mean().item()
    return out


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    backend: str = "torch",
) -> KnnResult:
    """Top-1 / top-5 (percent) of the weighted kNN classifier on ``test_features``.

    Examples:
        Two well separated classes, each test point beside its class:

        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> acc = knn_accuracy(bank, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 0.2]]),
        ...                    torch.tensor([0]), num_classes=2, k=2)
        >>> acc.top1, acc.k
        (100.0, 2)
    """
    scores = knn_predict(
        test_features, train_features, train_labels, num_classes, k, temperature, backend=backend
    )
    acc = topk_accuracy(scores, test_labels)
    return KnnResult(top1=acc["top1"], top5=acc["top5"], k=k, t=temperature)
