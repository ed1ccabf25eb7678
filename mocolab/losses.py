"""Contrastive losses as pure functions, with the formula in each docstring.

The dictionary of negatives (queue, memory bank, batch) lives in :mod:`mocolab.dictionaries`;
a loss only receives the tensors it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import all_reduce_mean, is_distributed, world_size


def info_nce_logits(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float,
    exclude: Tensor | None = None,
) -> Tensor:
    """Logits of the (K+1)-way InfoNCE softmax, positive first (MoCo, Alg. 1).

    ``logits = [q·k+, q·k_1, ..., q·k_K] / τ``

    Args:
        query: ``N×C`` queries, L2-normalised.
        positive_key: ``N×C`` positive keys (row i is the positive of query i).
        negative_keys: ``K×C`` negatives shared by all queries (a queue or a bank), or None.
        temperature: τ > 0.
        exclude: optional ``N`` indices into ``negative_keys``: the entry each query must not
            count as a negative (its own positive, when the negatives are the whole batch, as
            in CPC); its logit becomes −∞.

    Returns:
        ``N×(1+K)`` logits; the positive is in column 0.
    """
    l_pos = torch.einsum("nc,nc->n", query, positive_key).unsqueeze(-1)  # N×1
    if negative_keys is None:
        logits = l_pos
    else:
        l_neg = torch.einsum("nc,kc->nk", query, negative_keys)  # N×K
        if exclude is not None:
            l_neg = l_neg.scatter(1, exclude.unsqueeze(1), float("-inf"))
        logits = torch.cat([l_pos, l_neg], dim=1)  # N×(1+K)
    return logits / temperature


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """InfoNCE (van den Oord et al. 2018) as used by MoCo, Eq. (1):

    ``L_q = −log( exp(q·k+/τ) / (exp(q·k+/τ) + Σ_i exp(q·k_i/τ)) )``, averaged over queries.

    It is the cross-entropy of :func:`info_nce_logits` with label 0 (``exclude``: see there).

    Returns:
        ``(loss, logits)``: the scalar mean loss and the ``N×(1+K)`` logits (for accuracy).

    Examples:
        One query, its key and one negative, orthogonal to it; with τ = 0.5 the logits are
        ``(1/τ, 0) = (2, 0)`` and the loss ``−log(e²/(e² + 1)) = log(1 + e⁻²) ≈ 0.1269``:

        >>> import math
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> loss, logits = info_nce(q, q, torch.tensor([[0.0, 1.0]]), temperature=0.5)
        >>> logits
        tensor([[2., 0.]])
        >>> round(loss.item(), 4), round(math.log(1 + math.exp(-2)), 4)
        (0.1269, 0.1269)
    """
    logits = info_nce_logits(query, positive_key, negative_keys, temperature, exclude)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels), logits


def classification_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows of ``logits`` whose largest entry is at ``labels`` (a pretext task's
    accuracy: rotations, permutations, relative positions)."""
    return (logits.detach().argmax(dim=1) == labels).float().mean()


def contrastive_accuracy(logits: Tensor) -> Tensor:
    """Fraction of queries whose positive (column 0) has the largest logit: the instance
    discrimination accuracy of the pretext task."""
    return (logits.argmax(dim=1) == 0).float().mean()


def in_batch_logits(
    query: Tensor, keys: Tensor, temperature: float, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits of InfoNCE with the batch's own keys as the dictionary (MoCo v3, Alg. 1):
    query ``i`` against every key, its positive being key ``offset + i``.

    ``logits = q·kᵀ / τ`` (``N×M``); the ``M`` keys may be gathered from all ranks, this rank's
    queries then being rows ``offset ... offset + N − 1`` of the global batch.

    Returns:
        ``(logits, labels)``: ``N×M`` logits and the column of each query's positive.
    """
    logits = query @ keys.T / temperature  # N×M
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return logits, labels


def nt_xent_logits(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    candidates: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Logits of NT-Xent over ``2N`` views (SimCLR, Chen et al. 2020, Eq. 1).

    The anchors are the ``2N`` rows of ``[z1; z2]``. The candidates are the ``2M`` rows of
    ``[z1_all; z2_all]`` (``candidates``; by default ``z1, z2`` themselves, ``M = N``), where this
    batch sits at rows ``offset ... offset + N − 1`` of each half. An anchor's own row is masked
    to −∞; its positive is the other view of its image.

    Returns:
        ``(logits, labels)``: ``2N×2M`` logits and the column of each anchor's positive.
    """
    z1_all, z2_all = candidates if candidates is not None else (z1, z2)
    n, m = z1.shape[0], z1_all.shape[0]
    anchors = torch.cat([z1, z2], dim=0)  # 2N×C
    cands = torch.cat([z1_all, z2_all], dim=0)  # 2M×C
    logits = anchors @ cands.T / temperature  # 2N×2M
    own = torch.arange(n, device=z1.device) + offset  # this batch's rows within each half
    rows = torch.arange(2 * n, device=z1.device)
    self_col = torch.cat([own, own + m])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_col] = True
    logits = logits.masked_fill(is_self, float("-inf"))  # an anchor is not its own candidate
    labels = torch.cat([own + m, own])  # view 1's positive is its view 2, and back
    return logits, labels


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    candidates: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Eq. 1):

    ``ℓ(i, j) = −log( exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ) )``

    over the ``2N`` views of a batch, where ``(i, j)`` are the two views of one image and the
    other ``2N − 2`` views are the negatives; the loss is the mean of ``ℓ`` over all ``2N``
    anchors (both orders of each pair). ``z1, z2`` (``N×C``) must be L2-normalised, so ``sim``
    is the cosine. See :func:`nt_xent_logits` for ``candidates`` (views gathered from all ranks).
    """
    logits, labels = nt_xent_logits(z1, z2, temperature, candidates, offset)
    return F.cross_entropy(logits.float(), labels)


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's normalised mean squared error (Grill et al. 2020, Eq. 2):

    ``L = ‖p̄ − z̄‖² = 2 − 2·⟨p, z⟩ / (‖p‖·‖z‖)``, averaged over the batch.

    The target carries no gradient (it comes from the EMA target network; it is detached here
    as well).
    """
    p = F.normalize(prediction.float(), dim=1)
    z = F.normalize(target.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def simsiam_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """SimSiam's negative cosine similarity with stop-gradient (Chen & He 2021, Eq. 1 and 3):

    ``D(p, stopgrad(z)) = −⟨p, z⟩ / (‖p‖·‖z‖)``, averaged over the batch.
    """
    return -F.cosine_similarity(prediction.float(), target.detach().float(), dim=1).mean()


def nce_normalizer(scores: Tensor, num_instances: int) -> Tensor:
    """InstDisc's Monte-Carlo estimate of the partition constant (Wu et al. 2018, Eq. 8):
    ``Z ≈ n · mean_j exp(v_jᵀ f / τ)`` over the sampled entries ``scores = vᵀf/τ`` of a batch
    (computed once, on the first batch, then held fixed)."""
    return scores.detach().float().exp().mean() * num_instances


def nce_loss(
    scores: Tensor, num_instances: int, normalizer: Tensor | float, eps: float = 1e-7
) -> Tensor:
    """Noise-contrastive estimation of InstDisc (Wu et al. 2018, §3.2, Eq. 5–7).

    With ``P(i|v) = exp(v_iᵀ f/τ) / Z`` and uniform noise ``P_n = 1/n``, the probability that a
    sample is data rather than one of ``m`` noise samples is ``h(i, v) = P(i|v) / (P(i|v) + m·P_n)``;
    the loss is

    ``J = −E[ log h(i, v_i) ] − m·E[ log(1 − h(i, v′)) ]``, i.e. per query
    ``−log h(positive) − Σ_k log(1 − h(negative_k))``, averaged over the queries.

    Args:
        scores: ``N×(1+m)`` values ``vᵀf/τ``, the positive (the query's own bank entry) first,
            then the ``m`` sampled noise entries.
        num_instances: n, the number of training images (instances).
        normalizer: Z (see :func:`nce_normalizer`).
        eps: added to the denominators, as the official code does.
    """
    m = scores.shape[1] - 1
    p = scores.float().exp() / normalizer  # P(i|v): N×(1+m)
    noise = m / num_instances  # m·P_n
    log_h_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))  # N
    log_not_h_neg = torch.log(noise / (p[:, 1:] + noise + eps))  # N×m: log(1 − h)
    return -(log_h_pos + log_not_h_neg.sum(dim=1)).mean()


def margin_contrastive_loss(x1: Tensor, x2: Tensor, similar: Tensor, margin: float = 1.0) -> Tensor:
    """The contrastive loss of Hadsell, Chopra & LeCun 2006 (DrLIM, Eq. 4), with
    ``d = ‖x1 − x2‖₂``:

    ``L = y·d² + (1 − y)·max(0, m − d)²``, averaged over the pairs,

    where ``y = 1`` for similar pairs (pulled together) and ``0`` for dissimilar ones (pushed
    beyond the margin ``m``). The paper's ½ factors are dropped (a constant scale).
    """
    y = similar.float()
    d = (x1.float() - x2.float()).norm(dim=1)
    return (y * d.pow(2) + (1 - y) * F.relu(margin - d).pow(2)).mean()


def invaspread_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    candidates: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> Tensor:
    """Invariant and spreading instance features (Ye et al. 2019, Eq. 2–6), with the batch as
    the instance classifier.

    For an anchor ``x`` among the ``2N`` views and any other view ``j``,
    ``P(j|x) = exp(f_jᵀ f_x/τ) / Σ_{k≠x} exp(f_kᵀ f_x/τ)``. Its positive ``x̂`` (the other view of
    its image) should be recognised as it and every other view should not:

    ``J = −1/(2N) Σ_x [ log P(x̂|x) + Σ_{j≠x, x̂} log(1 − P(j|x)) ]``.

    As in the official code (``BatchCriterion``), the candidate side ``f_j`` is a constant (only
    the anchor receives the gradient). Arguments as :func:`nt_xent_logits`; ``z1, z2``
    L2-normalised.
    """
    if candidates is None:
        candidates = (z1.detach(), z2.detach())
    else:
        candidates = (candidates[0].detach(), candidates[1].detach())
    logits, labels = nt_xent_logits(z1, z2, temperature, candidates, offset)
    prob = F.softmax(logits.float(), dim=1)  # P(j|x), the anchor's own column is 0
    rows = torch.arange(logits.shape[0], device=logits.device)
    p_pos = prob[rows, labels]
    log_not = torch.log1p(-prob.clamp(max=1 - 1e-7))  # log(1 − P(j|x)): 0 in the own column
    log_not_neg = log_not.sum(dim=1) - log_not[rows, labels]  # without the positive
    return -(torch.log(p_pos) + log_not_neg).mean()


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over ranks, in place (identity on one process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp soft assignment of samples to prototypes with equal partition (SwAV,
    Caron et al. 2020, §3.1, Eq. 3 and Alg. 1 of the paper's code).

    Solves ``max_Q Tr(Qᵀ Cᵀ Z) + ε·H(Q)`` over the transportation polytope where every sample
    has mass 1 and every prototype the same mass ``B/K``: starting from ``Q = exp(Cᵀz / ε)``
    (``K×B``), alternately normalise the rows (prototypes) to ``1/K`` and the columns (samples)
    to ``1/B``, ``iterations`` times, then scale by ``B``. Under ``torch.distributed`` the sums
    over samples are all-reduced, so ``B`` is the global batch.

    Args:
        scores: ``B×K`` prototype scores ``zᵀc`` of this rank's samples.
        epsilon: ε (0.05; DINOv2's teacher centring: the teacher temperature).
        iterations: Sinkhorn iterations (3).

    Returns:
        ``B×K`` assignments (codes) ``q``: each row sums to 1; with enough iterations each
        column sums to ``B_global/K``.

    DINOv2's ``SinkhornKnoppTeacher`` (``dinov2/loss/dino_clstoken_loss.py``
    ``sinkhorn_knopp_teacher``: ``exp(t/τ_t)``, 3 iterations, sums all-reduced) is this with
    ``epsilon`` = τ_t (its patch version, ``ibot_patch_loss.py``, all-reduces the masked patches'
    count for ``B``: a scale that the column normalisation cancels, so the result is the same).
    """
    return sinkhorn_knopp(torch.exp(scores.float() / epsilon), iterations)


@torch.no_grad()
def sinkhorn_knopp(q: Tensor, iterations: int = 3) -> Tensor:
    """The Sinkhorn-Knopp iterations of :func:`sinkhorn` on a positive ``B×K`` matrix ``q``
    (SwAV starts from ``exp(zᵀc/ε)``; MSN's ``distributed_sinkhorn`` in ``src/losses.py`` from its
    sharpened targets): scaled to total mass 1, then ``iterations`` times each prototype's column
    to ``1/K`` and each sample's row to ``1/B``; returned ×B (each row sums to 1). The sums over
    samples are all-reduced across ranks."""
    q = q.float().T.clone()  # K×B
    k, b = q.shape[0], q.shape[1] * world_size()
    q /= _all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: total mass 1/B
        q /= b
    return (q * b).T


def swav_loss(
    scores: list[Tensor],
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    assign_views: tuple[int, ...] = (0, 1),
    queue_scores: list[Tensor] | None = None,
) -> Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, Eq. 1–2, with multi-crop §3.2):

    ``L = 1/|A| Σ_{i∈A} 1/(V−1) Σ_{v≠i} ℓ(z_v, q_i)``,  ``ℓ(z, q) = −Σ_k q^(k) log p^(k)``,
    ``p = softmax(zᵀC / τ)``,

    where ``q_i = sinkhorn(z_iᵀC)`` are the codes of the assignment views ``A`` (the large crops,
    without gradient) and every other view predicts them; ``ℓ`` is averaged over the batch.

    Args:
        scores: ``V`` tensors ``N×K`` of prototype scores ``zᵀC`` (normalised ``z`` and ``C``),
            one per view, the large crops first.
        queue_scores: optional, one ``Q×K`` tensor per assignment view: scores of stored past
            features of that view (SwAV §4, small batches). The codes then come from Sinkhorn
            over ``[queue; batch]`` and only the batch's ``N`` rows are kept: the queue widens
            the equipartition, it is never predicted.
    """
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for j, i in enumerate(assign_views):
        s_i = scores[i].detach()
        if queue_scores is not None:
            s_i = torch.cat([queue_scores[j].detach().to(s_i.dtype), s_i])  # (Q+N)×K
        q = sinkhorn(s_i, epsilon, iterations)[-scores[i].shape[0] :]  # N×K, no gradient
        sub = 0.0
        for v, s in enumerate(scores):
            if v != i:
                sub = sub - (q * F.log_softmax(s.float() / temperature, dim=1)).sum(dim=1).mean()
        loss = loss + sub / (len(scores) - 1)
    return loss / len(assign_views)


def self_distillation_loss(
    student: list[Tensor], teacher_probs: list[Tensor], student_temperature: float
) -> Tensor:
    """The cross-view cross-entropy of DINO's family (Caron et al. 2021, Eq. 3; iBOT's
    ``L_[CLS]``; DINOv2's ``DINOLoss``) given the teacher's distributions:

    ``L = 1/T Σ_{i ∈ global} Σ_{v ≠ i} H(P_t(x_i), P_s(x_v))``,  ``P_s = softmax(g_s / τ_s)``,
    ``H(a, b) = −Σ_k a_k log b_k`` averaged over the batch and ``T`` the number of (teacher
    view, student view) pairs: the teacher sees the global views, the student every view,
    never the same one. How ``P_t`` is made is the method's (DINO and iBOT: a centred,
    sharpened softmax, :func:`dino_loss`; DINOv2: Sinkhorn-Knopp, :func:`sinkhorn`).

    Args:
        student: ``V`` tensors ``N×K`` of student outputs, the global views first.
        teacher_probs: ``G`` tensors ``N×K``, the teacher's distributions of the global views
            (no gradient).
        student_temperature: τ_s (0.1).
    """
    log_p_s = [F.log_softmax(s.float() / student_temperature, dim=1) for s in student]
    loss, terms = student[0].new_zeros((), dtype=torch.float32), 0
    for i, p_t in enumerate(teacher_probs):
        for v, log_p in enumerate(log_p_s):
            if v != i:
                loss = loss - (p_t.detach() * log_p).sum(dim=1).mean()
                terms += 1
    return loss / terms


def dino_loss(
    student: list[Tensor],
    teacher: list[Tensor],
    center: Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> Tensor:
    """DINO's cross-entropy between teacher and student distributions (Caron et al. 2021,
    Eq. 1–3 and Alg. 1):

    ``P_t = softmax((g_t(x) − c) / τ_t)`` (centred and sharpened, no gradient),
    ``P_s = softmax(g_s(x′) / τ_s)``,

    ``L = 1/T Σ_{x ∈ global} Σ_{x′ ≠ x} H(P_t(x), P_s(x′))`` with ``H(a, b) = −Σ a log b``
    averaged over the batch and ``T`` the number of (teacher view, student view) pairs: the
    teacher sees only the global views, the student every view, never the same view
    (:func:`self_distillation_loss`).

    Args:
        student: ``V`` tensors ``N×K`` of student outputs, the global views first.
        teacher: ``G`` tensors ``N×K`` of teacher outputs of the global views.
        center: ``1×K`` (or ``K``) center ``c``.
    """
    probs = [F.softmax((t.detach().float() - center) / teacher_temperature, dim=1) for t in teacher]
    return self_distillation_loss(student, probs, student_temperature)


def ibot_patch_loss(
    student: Tensor, teacher_probs: Tensor, masks: Tensor, student_temperature: float
) -> Tensor:
    """iBOT's masked image modelling by self-distillation (Zhou et al. 2022, §3.1, ``L_MIM``;
    ``main_ibot.py`` ``iBOTLoss``; DINOv2's ``iBOTPatchLoss.forward_masked``): each masked
    patch of the student's (masked) view predicts the teacher's distribution of the same patch
    of the unmasked view,

    ``L = 1/N Σ_n 1/max(M_n, 1) Σ_{l : m_nl = 1} H(P_t(u_nl), P_s(û_nl))``,
    ``P_s = softmax(g_s / τ_s)``, ``H(a, b) = −Σ_k a_k log b_k``,

    over the ``N`` images of the global views (an image without masked patches counts with
    0), ``M_n`` the masked patches of image ``n``.

    Args:
        student: ``M×K`` the student's outputs at the masked patches, in the order of
            ``masks.nonzero()`` (image by image, row-major: ``tokens[masks]``).
        teacher_probs: ``M×K`` the teacher's distributions at the same patches (no gradient;
            centred and sharpened, or Sinkhorn-Knopp's).
        masks: ``N×L`` booleans, the masked patches; ``M = masks.sum()``.
        student_temperature: τ_s (0.1).

    Examples:
        Two patches masked in one image: the mean of their cross-entropies over one image
        (a uniform student of K = 2 outputs: ``log 2`` each):

        >>> masks = torch.tensor([[True, True]])
        >>> t = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
        >>> round(ibot_patch_loss(torch.zeros(2, 2), t, masks, 0.1).item(), 4)
        0.6931
    """
    counts = masks.sum(dim=1).clamp(min=1)  # N: M_n
    weight = (1.0 / counts.float()).unsqueeze(1).expand(masks.shape)[masks]  # M: 1/M_n
    log_p_s = F.log_softmax(student.float() / student_temperature, dim=-1)
    cross_entropy = -(teacher_probs.detach().float() * log_p_s).sum(dim=-1)  # M
    return (cross_entropy * weight).sum() / masks.shape[0]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko differential-entropy regulariser of DINOv2 (Oquab et al. 2023,
    §4; Sablayrolles et al. 2019, §3.3; ``dinov2/loss/koleo_loss.py``), which spreads the
    features of a batch apart:

    ``L = −1/n Σ_i log(ρ_i + ε)``, ``ρ_i = ‖x̂_i − x̂_{j(i)} + ε‖₂`` (torch's
    ``pairwise_distance``, as the code's ``nn.PairwiseDistance(2, eps=1e-8)``),
    ``x̂ = x / max(‖x‖, ε)`` and ``j(i) = argmax_{j ≠ i} x̂_i · x̂_j`` the nearest neighbour of
    ``i`` in the batch (no gradient through the choice).

    Computed in float32 (the code turns autocast off).

    Args:
        features: ``n×D`` (DINOv2: the student's [CLS] backbone features of one global view).
        eps: ε (1e-8).

    Examples:
        Three points on the unit circle at 0°, 90° and 180°: each one's nearest neighbour is
        at distance √2 (the 90° point), so ``L ≈ −log √2``:

        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> round(koleo_loss(x).item(), 4)
        -0.3466
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), eps=eps, dim=-1)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-1.0)  # not its own neighbour
            nearest = dots.argmax(dim=1)  # max inner product = min distance
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # n
        return -torch.log(distances + eps).mean()


def off_diagonal(x: Tensor) -> Tensor:
    """The ``n(n − 1)`` off-diagonal entries of a square ``n×n`` matrix, row by row (the
    official Barlow Twins and VICReg ``off_diagonal``)."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def off_diagonal_square_sum(x: Tensor) -> Tensor:
    """``Σ_{i≠j} x_ij²`` of a square matrix: the official ``off_diagonal(x).pow_(2).sum()``
    without copying the ``n(n − 1)`` entries out (a 268 MB copy for an 8192×8192 float32).

    >>> off_diagonal_square_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor(13.)
    """
    squares = x.pow(2)
    squares.diagonal().zero_()
    return squares.sum()


def barlow_twins_loss(c: Tensor, off_diagonal_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, Eq. 1–2):

    ``L = Σ_i (1 − C_ii)² + λ·Σ_i Σ_{j≠i} C_ij²``,

    with ``C = z̃1ᵀ z̃2 / N`` the ``D×D`` cross-correlation of the two views' projections, each
    standardised over the batch (``z̃ = (z − mean) / std``, BN without affine parameters):
    the invariance term pulls the diagonal to 1, the redundancy-reduction term the rest to 0.

    Args:
        c: ``D×D`` cross-correlation matrix (summed over processes, each dividing by the
            global batch, as the official ``main.py``).
        off_diagonal_weight: λ (0.0051 in the official code).

    Returns:
        ``(L, invariance, redundancy)``: the loss, ``Σ_i (1 − C_ii)²`` and ``Σ_{i≠j} C_ij²``.

    Examples:
        Two images, two features: ``z̃1 = [[1, 1], [−1, −1]]``, ``z̃2 = [[1, −1], [−1, 1]]``
        give ``C = [[1, −1], [1, −1]]``; ``(1 − 1)² + (1 + 1)² = 4`` on the diagonal and
        ``(−1)² + 1² = 2`` off it:

        >>> z1 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
        >>> z2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        >>> loss, on, off = barlow_twins_loss(z1.T @ z2 / 2, off_diagonal_weight=0.5)
        >>> on.item(), off.item(), loss.item()
        (4.0, 2.0, 5.0)
    """
    c = c.float()
    invariance = (torch.diagonal(c) - 1).pow(2).sum()
    redundancy = off_diagonal_square_sum(c)
    return invariance + off_diagonal_weight * redundancy, invariance, redundancy


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    candidates: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """VICReg's variance-invariance-covariance loss (Bardes, Ponce & LeCun 2022, Eq. 1–6) as the
    official ``main_vicreg.py`` computes it:

    - invariance ``s = 1/(N·d) Σ_i ‖z1_i − z2_i‖²`` (``F.mse_loss``; the paper's Eq. 5 has
      ``1/N``: the code also averages over the ``d`` dimensions);
    - variance ``v = ½·[1/d Σ_j max(0, 1 − √(Var(z1^j) + ε)) + the same for z2]`` (Eq. 1–2
      with γ = 1; the code halves the sum of the two views' terms, Eq. 6 adds them);
    - covariance ``c = 1/d Σ_{i≠j} Cov(z1)_ij² + 1/d Σ_{i≠j} Cov(z2)_ij²`` (Eq. 3–4), with the
      unbiased covariance ``Cov(z) = (z − z̄)ᵀ(z − z̄)/(N − 1)``;

    ``L = λ·s + μ·v + ν·c`` (Eq. 6). The variances are unbiased (``torch.var``), as the code's.

    Args:
        z1: ``N×d`` expander outputs of the first view (not normalised).
        z2: the same for the second view.
        invariance_weight: λ (25).
        variance_weight: μ (25).
        covariance_weight: ν (1).
        candidates: the two views' outputs gathered from every process (with gradient), over
            which the variance and covariance are taken (the official ``FullGatherLayer``);
            the invariance stays on this process's pairs. Default: ``z1, z2``.
        eps: ε inside the square root (1e-4).

    Returns:
        ``(L, s, v, c)``.
    """
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    x, y = candidates if candidates is not None else (z1, z2)
    x, y = x.float(), y.float()
    n, d = x.shape
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + eps), torch.sqrt(y.var(dim=0) + eps)
    variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)  # d×d
    covariance = off_diagonal_square_sum(cov_x) / d + off_diagonal_square_sum(cov_y) / d
    loss = (
        invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    )
    return loss, invariance, variance, covariance


def nnclr_loss(
    neighbours: Tensor,
    predictions: Tensor,
    temperature: float,
    candidates: Tensor | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """NNCLR's contrastive loss with nearest-neighbour positives (Dwibedi et al. 2021, Eq. 2 and
    the function ``L`` of Algorithm 1):

    ``L_i = −log( exp(NN(z_i)·p_i⁺/τ) / Σ_k exp(NN(z_i)·p_k⁺/τ) )``, averaged over ``i``,

    where ``NN(z_i)`` is the nearest neighbour of view 1's projection in the support set (no
    gradient), ``p⁺`` the predictions of view 2, and the softmax runs over the batch's
    predictions: image ``i``'s own is the positive, the others the negatives. Both are
    L2-normalised here.

    Args:
        neighbours: ``N×C`` nearest neighbours ``NN(z_i, Q)``.
        predictions: ``N×C`` predictions of the other view.
        temperature: τ (0.1).
        candidates: the predictions of every process (with gradient; solo-learn's
            ``nnclr_loss_func`` gathers them too), this batch at rows ``offset ...``.

    Returns:
        ``(loss, logits)``: the scalar loss and the ``N×M`` logits.
    """
    nn = F.normalize(neighbours.float().detach(), dim=1)
    p = F.normalize(predictions.float(), dim=1)
    p_all = p if candidates is None else F.normalize(candidates.float(), dim=1)
    logits, labels = in_batch_logits(nn, p_all, temperature, offset)  # N×M
    return F.cross_entropy(logits, labels), logits


@torch.no_grad()
def dense_correspondence(query_features: Tensor, key_features: Tensor) -> Tensor:
    """DenseCL's correspondence between two views' feature maps (Wang et al. 2021, §3.3; the
    official ``densecl.py``): each location of the query map is matched to the location of
    the key map whose backbone feature is most similar by cosine,

    ``c(i) = argmax_j cos(f_q,i, f_k,j)``.

    Args:
        query_features: ``N×S×D`` backbone features of the query view, ``S = H·W`` locations.
        key_features: ``N×S′×D`` backbone features of the key view.

    Returns:
        ``N×S`` long: for each query location, the key location it corresponds to.

    Examples:
        A 2×2 map (``S = 4``) whose key view is the query flipped left-right: location
        ``(row, col)`` finds ``(row, 1 − col)``, i.e. index ``0 ↔ 1`` and ``2 ↔ 3``:

        >>> fq = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
        >>> dense_correspondence(fq, fq[:, [1, 0, 3, 2]])
        tensor([[1, 0, 3, 2]])
    """
    q = F.normalize(query_features.float(), dim=2)
    k = F.normalize(key_features.float(), dim=2)
    return (q @ k.transpose(1, 2)).argmax(dim=2)  # N×S×S′ similarities → N×S


def dense_info_nce(
    query: Tensor,
    keys: Tensor,
    correspondence: Tensor,
    negative_keys: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """DenseCL's dense contrastive loss (Wang et al. 2021, Eq. 2): InfoNCE at every location
    ``s`` of the query's dense projection, its positive the key's dense projection at the
    corresponding location ``c(s)`` (:func:`dense_correspondence`) and its negatives the dense
    queue (pooled dense keys of earlier batches):

    ``L = 1/(N·S) Σ_n Σ_s −log( exp(r_s·t_c(s)/τ) / (exp(r_s·t_c(s)/τ) + Σ_k exp(r_s·t_k/τ)) )``.

    Args:
        query: ``N×S×C`` L2-normalised dense projections of the query view.
        keys: ``N×S′×C`` L2-normalised dense projections of the key view (no gradient).
        correspondence: ``N×S`` key location of each query location.
        negative_keys: ``K×C`` dense queue.
        temperature: τ (0.2).

    Returns:
        ``(loss, logits)``: the mean over the ``N·S`` locations and the ``N·S×(1+K)`` logits.
    """
    c = query.shape[2]
    positive = keys.gather(1, correspondence.unsqueeze(2).expand(-1, -1, c))  # N×S×C
    return info_nce(query.reshape(-1, c), positive.reshape(-1, c), negative_keys, temperature)


# --- masked-image modelling -------------------------------------------------------------------


def mae_loss(
    prediction: Tensor, target: Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> Tensor:
    """MAE's reconstruction loss (He et al. 2022, §3 "Reconstruction target"; ``models_mae.py``
    ``forward_loss``), on the masked patches only:

    ``t̂ = (t − mean(t)) / √(var(t) + ε)`` per patch when ``norm_pix`` (the pixels of each patch
    normalised by their own mean and unbiased variance, ``--norm_pix_loss``), else ``t̂ = t``;
    ``L = 1/M Σ_patches 1/P Σ_j (p_j − t̂_j)²``.

    Args:
        prediction: ``N×M×P`` the decoder's pixels of the ``M`` masked patches.
        target: ``N×M×P`` those patches of the input (:func:`mocolab.vit.patchify`).
        norm_pix: per-patch normalised targets (the paper's default for representations).
        eps: ε (1e-6).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + eps) ** 0.5
    return (prediction.float() - target).pow(2).mean()


def ijepa_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """I-JEPA's loss between the predicted and the target encoder's representations of the
    target patches. The paper (Assran et al. 2023, Eq. 1) writes the average squared L2
    distance; the official code (``src/train.py`` ``loss_fn``) uses ``F.smooth_l1_loss``, which
    is followed here: with ``d = p − t`` per element,

    ``ℓ(d) = d²/2`` when ``|d| < 1``, else ``|d| − 1/2``;  ``L`` = the mean of ``ℓ`` over every
    element of ``N×T×D``.

    The target is the layer-normed output of the target encoder (no gradient).
    """
    return F.smooth_l1_loss(prediction.float(), target.detach().float())


def msn_loss(
    anchor: Tensor,
    target: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
    sharpen_temperature: float = 0.25,
    me_max_weight: float = 1.0,
    sinkhorn_targets: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """MSN's loss (Assran et al. 2022, §3, Eq. 3–4; ``src/losses.py`` ``init_msn_loss``):

    ``p = softmax(ẑ_a Ĉᵀ / τ)`` for every anchor (masked) view, ``ẑ`` and the prototypes ``Ĉ``
    L2-normalised; the target ``q = sharpen(softmax(ẑ_t Ĉᵀ / τ), T)`` of the unmasked view,
    ``sharpen(q, T)_k = q_k^{1/T} / Σ_j q_j^{1/T}``, without gradient, optionally balanced by
    Sinkhorn-Knopp (:func:`sinkhorn_knopp`, 3 iterations; the released ViT-S/16 config's
    ``use_sinkhorn: true``) and repeated for each of the ``V`` anchor views of an image;

    ``L = 1/(V·N) Σ H(q, p) + λ·(log K − H(p̄))``, ``H(q, p) = −Σ_k q_k log p_k``, with the
    mean-entropy-maximisation regulariser (me-max) on ``p̄``, the mean of ``p`` over the anchors
    (of every rank: the value is the global mean, the gradient flows to this rank's rows, as
    the code's ``AllReduce``).

    Args:
        anchor: ``(V·N)×d`` the anchor views' projections, view-major (view 0's N rows first).
        target: ``N×d`` the target view's projections (target encoder).
        prototypes: ``K×d`` (learnable).
        temperature: τ (0.1).
        sharpen_temperature: T (0.25).
        me_max_weight: λ (1).
        sinkhorn_targets: balance the targets with Sinkhorn-Knopp.

    Returns:
        ``(L, cross-entropy term, me-max term)``.
    """
    c = F.normalize(prototypes.float(), dim=1)
    log_p = F.log_softmax(F.normalize(anchor.float(), dim=1) @ c.T / temperature, dim=1)
    with torch.no_grad():
        q = F.softmax(F.normalize(target.float(), dim=1) @ c.T / temperature, dim=1)
        q = q ** (1.0 / sharpen_temperature)
        q = q / q.sum(dim=1, keepdim=True)
        if sinkhorn_targets:
            q = sinkhorn_knopp(q)
        q = q.repeat(anchor.shape[0] // target.shape[0], 1)  # one per anchor view
    cross_entropy = -(q * log_p).sum(dim=1).mean()
    mean_p = log_p.exp().mean(dim=0)
    mean_p = mean_p + (all_reduce_mean(mean_p.detach()) - mean_p).detach()  # global value
    me_max = torch.special.xlogy(mean_p, mean_p).sum() + math.log(len(mean_p))  # log K − H(p̄)
    return cross_entropy + me_max_weight * me_max, cross_entropy, me_max
