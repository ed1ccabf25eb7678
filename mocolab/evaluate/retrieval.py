"""Nearest-neighbour retrieval: each test image queries the train split by cosine similarity
of frozen features; a retrieved image is relevant when it has the query's class.

For a query with ``R`` relevant images in the bank and relevance ``rel_i`` at rank ``i``:

- ``precision@K = (1/K) Σ_{i≤K} rel_i``
- ``recall@K    = (1/R) Σ_{i≤K} rel_i`` (the fraction of the query's class found)
- ``hit@K       = max_{i≤K} rel_i`` (at least one right; "Recall@K" of metric learning)
- ``AP@K        = (1/min(K, R)) Σ_{i≤K} precision@i · rel_i``; ``mAP@K`` is its mean

each averaged over the queries (in percent). ``AP@K`` divides by ``min(K, R)``, the most
relevant images a list of K can hold, so a perfect list scores 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..results import RetrievalResult
from .knn import nearest_neighbours


@torch.no_grad()
def retrieve(
    query: Tensor, bank: Tensor, k: int, *, exclude_self: bool = False, backend: str = "torch"
) -> tuple[Tensor, Tensor]:
    """Top-``k`` bank entries of each query by cosine similarity: ``(similarities, indices)``
    both ``M×k``. With ``exclude_self`` the query set is the bank, and each query's own entry
    (row ``i`` for query ``i``) is left out."""
    if k < 1 or k + int(exclude_self) > bank.shape[0]:
        raise ValueError(
            f"K = {k} is larger than the bank ({bank.shape[0]} entries"
            f"{', one of them the query itself' if exclude_self else ''}); lower K"
        )
    if not exclude_self:
        return nearest_neighbours(query, bank, k, backend=backend)
    sims, idx = nearest_neighbours(query, bank, k + 1, backend=backend)
    own = idx == torch.arange(query.shape[0], device=idx.device).view(-1, 1)
    # drop the query's own entry, or the last one when ties pushed it out of the top k+1
    drop = torch.where(own.any(1), own.float().argmax(1), torch.full_like(idx[:, 0], k))
    keep = torch.ones_like(own).scatter_(1, drop.view(-1, 1), False)
    return sims[keep].view(-1, k), idx[keep].view(-1, k)


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    exclude_self: bool = False,
    backend: str = "torch",
) -> RetrievalResult:
    """``precision@K``, ``recall@K``, ``hit@K`` and ``mAP@K`` (percent) for every K in ``ks``
    (see the module docstring for the definitions), by K.

    Raises:
        ValueError: a K larger than the bank (less the query itself with ``exclude_self``).
    """
    kmax = max(ks)
    _, idx = retrieve(query, bank, kmax, exclude_self=exclude_self, backend=backend)
    bank_labels = bank_labels.to(idx.device)
    query_labels = query_labels.to(idx.device)
    rel = (bank_labels[idx] == query_labels.view(-1, 1)).float()  # M×Kmax
    counts = torch.bincount(
        bank_labels, minlength=int(max(bank_labels.max(), query_labels.max())) + 1
    )
    total_rel = counts[query_labels].float() - float(exclude_self)  # R per query
    hits = rel.cumsum(1)  # relevant among the first i
    ranks = torch.arange(1, kmax + 1, device=idx.device).float()
    prec_at = hits / ranks  # precision@i
    precision, recall, hit, mean_ap = {}, {}, {}, {}
    for k in ks:
        r = rel[:, :k]
        precision[k] = 100.0 * (hits[:, k - 1] / k).mean().item()
        recall[k] = 100.0 * (hits[:, k - 1] / total_rel.clamp_min(1)).mean().item()
        hit[k] = 100.0 * (hits[:, k - 1] > 0).float().mean().item()
        denom = torch.minimum(total_rel, torch.tensor(float(k))).clamp_min(1)
        mean_ap[k] = 100.0 * ((prec_at[:, :k] * r).sum(1) / denom).mean().item()
    return RetrievalResult(precision=precision, recall=recall, hit=hit, mean_ap=mean_ap)
