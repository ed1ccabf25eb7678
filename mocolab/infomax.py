"""Mutual-information estimators over a score tensor: Deep InfoMax's JSD, DV and InfoNCE, and
AMDIM's NCE with tanh-clipped scores.

Every estimator takes the scores ``s[n, m, l]`` of ``N`` queries (a global vector per image)
against the ``L`` locations of the feature maps of ``M`` images (:func:`location_scores`) and
a boolean ``N×M`` mask of the positive pairs (:func:`positive_mask`: query ``n`` and image
``offset + n`` are the same image). A pair (n, m) that is not positive is a draw from the
product of the marginals: its scores at every location are negative samples. A global-to-
global estimate is the case ``L = 1``.

Hjelm et al., "Learning Deep Representations by Mutual Information Estimation and
Maximization", ICLR 2019 (DIM, §3.1 Eq. 2, 4, 5) and the official code (``rdevon/DIM``,
``cortex_DIM/functions/dim_losses.py`` and ``gan_losses.py``); Bachman, Hjelm & Buchwalter,
"Learning Representations by Maximizing Mutual Information Across Views", NeurIPS 2019
(AMDIM, §3.2-3.3) and its code (``Philip-Bachman/amdim-public``, ``costs.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: The MI estimators of DIM (``--mi-estimator``).
ESTIMATORS = ("jsd", "infonce", "dv")
_LOG2 = math.log(2.0)


def location_scores(queries: Tensor, maps: Tensor) -> Tensor:
    """``s[n, m, l] = q_n · c_{m,l}``: ``N×D`` queries against ``M×D×L`` feature maps (the
    locations flattened) → ``N×M×L`` (the "encoder-and-dot" critic of DIM §3.1 / App. A.2)."""
    return torch.einsum("nd,mdl->nml", queries, maps)


def positive_mask(n: int, m: int, offset: int = 0, device: torch.device | None = None) -> Tensor:
    """``N×M`` boolean mask, True at ``(i, offset + i)``: this rank's ``N`` queries are rows
    ``offset … offset + N − 1`` of the ``M`` gathered images."""
    rows = torch.arange(n, device=device)
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    mask[rows, rows + offset] = True
    return mask


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum()


def jsd_mi(scores: Tensor, positive: Tensor) -> Tensor:
    """The Jensen-Shannon MI estimator (DIM Eq. 4, with the official code's shift by log 2):

    ``Î_JSD = E_P[log 2 − sp(−T)] − E_{P×Ñ}[sp(T) − log 2]``, ``sp`` = softplus,

    the first mean over the positive pairs' scores (every location), the second over the
    negative pairs'. The paper's Eq. 4 is the same less ``2 log 2``; the maximum is ``2 log 2``.

    Args:
        scores: ``N×M×L``; positive: ``N×M`` boolean.

    Examples:
        One positive score 1 and one negative score −1: ``2·log 2 − 2·sp(−1) ≈ 0.7598``:

        >>> import math
        >>> scores = torch.tensor([[[1.0], [-1.0]]])  # 1 query × 2 images × 1 location
        >>> mi = jsd_mi(scores, torch.tensor([[True, False]]))
        >>> round(mi.item(), 4), round(2 * math.log(2) - 2 * math.log1p(math.exp(-1)), 4)
        (0.7598, 0.7598)
    """
    pos = positive.unsqueeze(-1).expand_as(scores).to(scores.dtype)
    e_pos = _masked_mean(_LOG2 - F.softplus(-scores), pos)
    e_neg = _masked_mean(F.softplus(scores) - _LOG2, 1 - pos)
    return e_pos - e_neg


def dv_mi(scores: Tensor, positive: Tensor) -> Tensor:
    """The Donsker-Varadhan MI estimator, DIM's Eq. 2 as the paper writes it:

    ``Î_DV = E_P[T] − log E_{P×Ñ}[e^T]``,

    the first mean over the positive pairs' scores, the second a log-mean-exp over all the
    negative pairs' scores at once (computed stably with ``logsumexp``).

    mocolab follows the paper here, not the official code: ``donsker_varadhan_loss``
    (rdevon/DIM ``cortex_DIM/functions/dim_losses.py``, commit
    bac4765a8126746675f517c7bfa1b04b88044d51) does not run on local features — its in-place
    ``u -= 10 * (1 - n_mask)`` broadcasts the ``N×N`` mask against the last two axes of the
    ``N×N×locations×globals`` scores and fails unless those sizes match — and its positive term
    ``(u.mean(2) * mask).sum() / mask.sum()`` broadcasts the same way, summing the scores of
    all N² pairs rather than the N positive ones.
    """
    pos = positive.unsqueeze(-1).expand_as(scores)
    e_pos = _masked_mean(scores, pos.to(scores.dtype))
    negatives = scores.masked_fill(pos, float("-inf")).flatten()
    count = (~pos).sum().to(scores.dtype)
    return e_pos - (torch.logsumexp(negatives, dim=0) - count.log())


def infonce_mi(scores: Tensor, positive: Tensor) -> Tensor:
    """The InfoNCE estimator over locations (DIM Eq. 5; AMDIM §3.2; both official codes):

    ``Î_NCE = E_{n,l}[ s[n,p,l] − log( e^{s[n,p,l]} + Σ_{m≠p, l'} e^{s[n,m,l']} ) ]``

    where ``p`` is query ``n``'s positive image: each positive location competes against every
    location of every negative image (the negatives shared by all of ``n``'s locations). The
    value is ≤ 0 (a mean log-softmax); ``log`` of the number of candidates is the bound's
    constant, left out as in the papers. Each row of ``positive`` holds exactly one True.
    """
    pos = positive.unsqueeze(-1).expand_as(scores)
    pos_scores = (scores * pos.to(scores.dtype)).sum(dim=1)  # N×L
    negatives = scores.masked_fill(pos, float("-inf")).flatten(1)  # N×(M·L)
    neg_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # N×1
    return (pos_scores - torch.logaddexp(pos_scores, neg_lse)).mean()


def mi_estimate(scores: Tensor, positive: Tensor, estimator: str) -> Tensor:
    """The estimate of :data:`ESTIMATORS` ``estimator`` (``jsd``, ``infonce``, ``dv``)."""
    if estimator == "jsd":
        return jsd_mi(scores, positive)
    if estimator == "infonce":
        return infonce_mi(scores, positive)
    if estimator == "dv":
        return dv_mi(scores, positive)
    raise ValueError(f"unknown MI estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def tanh_clip(scores: Tensor, clip: float | None) -> Tensor:
    """AMDIM's soft clipping ``s ← c·tanh(s/c)`` into ``(−c, c)`` (``costs.tanh_clip``);
    ``clip=None`` leaves the scores as they are."""
    return scores if clip is None else clip * torch.tanh(scores / clip)


def location_nce(
    queries: Tensor, maps: Tensor, positive: Tensor, clip: float | None = None
) -> tuple[Tensor, Tensor]:
    """AMDIM's NCE of ``queries`` predicting the locations of ``maps`` (``NCE_MI_MULTI``):

    the scores ``s = q·c / √D`` (:func:`location_scores` scaled by the feature width), soft
    clipped by :func:`tanh_clip`, then ``−Î_NCE`` (:func:`infonce_mi`).

    Args:
        queries: ``N×D``; maps: ``M×D×L``; positive: ``N×M`` (:func:`positive_mask`);
        clip: ``c`` of the tanh clipping (AMDIM's ``tclip``, 20), None for none.

    Returns:
        ``(loss, mean of s²)``: the NCE loss and the mean squared score before clipping, the
        term of AMDIM's score regulariser ``λ·mean(s²)``.
    """
    scores = location_scores(queries, maps).float() / math.sqrt(queries.shape[1])
    penalty = scores.pow(2).mean()
    return -infonce_mi(tanh_clip(scores, clip), positive), penalty
