"""Contrastive losses as pure functions, with the formula in each docstring.

The dictionary of negatives (queue, memory bank, batch) lives in :mod:`mocolab.dictionaries`;
a loss only receives the tensors it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce_logits(query: Tensor, positive_key: Tensor, negative_keys: Tensor | None,
                    temperature: float) -> Tensor:
    """Logits of the (K+1)-way InfoNCE softmax, positive first (MoCo, Alg. 1).

    ``logits = [q·k+, q·k_1, ..., q·k_K] / τ``

    Args:
        query: ``N×C`` queries, L2-normalised.
        positive_key: ``N×C`` positive keys (row i is the positive of query i).
        negative_keys: ``K×C`` negatives shared by all queries (a queue or a bank), or None.
        temperature: τ > 0.

    Returns:
        ``N×(1+K)`` logits; the positive is in column 0.
    """
    l_pos = torch.einsum("nc,nc->n", query, positive_key).unsqueeze(-1)  # N×1
    if negative_keys is None:
        logits = l_pos
    else:
        l_neg = torch.einsum("nc,kc->nk", query, negative_keys)  # N×K
        logits = torch.cat([l_pos, l_neg], dim=1)  # N×(1+K)
    return logits / temperature


def info_nce(query: Tensor, positive_key: Tensor, negative_keys: Tensor | None,
             temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE (van den Oord et al. 2018) as used by MoCo, Eq. (1):

    ``L_q = −log( exp(q·k+/τ) / (exp(q·k+/τ) + Σ_i exp(q·k_i/τ)) )``, averaged over queries.

    It is the cross-entropy of :func:`info_nce_logits` with label 0.

    Returns:
        ``(loss, logits)``: the scalar mean loss and the ``N×(1+K)`` logits (for accuracy).
    """
    logits = info_nce_logits(query, positive_key, negative_keys, temperature)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels), logits


def contrastive_accuracy(logits: Tensor) -> Tensor:
    """Fraction of queries whose positive (column 0) has the largest logit: the instance
    discrimination accuracy of the pretext task."""
    return (logits.argmax(dim=1) == 0).float().mean()
