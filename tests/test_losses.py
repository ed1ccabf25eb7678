"""InfoNCE against an explicit log-softmax formula written out in the test."""

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.losses import contrastive_accuracy, info_nce, info_nce_logits


def test_logits_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    k = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    logits = info_nce_logits(q, k, queue, temperature=0.5)
    # row 0: q·k+ = 0; q·queue = [1, -1, 0]; row 1: q·k+ = 1; q·queue = [0.6, -0.6, -0.8]
    expected = torch.tensor([[0.0, 1.0, -1.0, 0.0], [1.0, 0.6, -0.6, -0.8]]) / 0.5
    torch.testing.assert_close(logits, expected)


def test_loss_matches_explicit_log_softmax():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    tau = 0.2
    loss, _ = info_nce(q, k, queue, tau)
    # L = -1/N Σ_n log( exp(q_n·k_n/τ) / (exp(q_n·k_n/τ) + Σ_j exp(q_n·queue_j/τ)) )
    total = 0.0
    for n in range(5):
        pos = math.exp(float(q[n] @ k[n]) / tau)
        neg = sum(math.exp(float(q[n] @ queue[j]) / tau) for j in range(7))
        total += -math.log(pos / (pos + neg))
    assert abs(loss.item() - total / 5) < 1e-5


def test_loss_invariant_to_permuting_negatives():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    k = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    queue = F.normalize(torch.randn(9, 6, generator=g), dim=1)
    a, _ = info_nce(q, k, queue, 0.07)
    b, _ = info_nce(q, k, queue[torch.randperm(9, generator=g)], 0.07)
    torch.testing.assert_close(a, b)


def test_perfect_separation_has_low_loss_and_full_accuracy():
    q = torch.eye(3)
    loss, logits = info_nce(q, q.clone(), -torch.eye(3), temperature=0.05)
    assert loss.item() < 1e-6
    assert contrastive_accuracy(logits).item() == 1.0


def test_gradient_flows_only_to_queries_when_keys_detached():
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    queue = torch.randn(5, 4, requires_grad=True)
    loss, _ = info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1).detach(), queue.detach(), 0.2)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


# --- the method family's losses, each against an explicit loop over indices -------------------

from mocolab.losses import (  # noqa: E402
    byol_loss,
    in_batch_logits,
    invaspread_loss,
    margin_contrastive_loss,
    nce_loss,
    nce_normalizer,
    nt_xent,
    simsiam_loss,
)


def _unit(n, c, seed):
    return F.normalize(torch.randn(n, c, generator=torch.Generator().manual_seed(seed)), dim=1)


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a.detach(), b.detach()))


def test_nt_xent_matches_the_explicit_2n_view_formula():
    n, tau = 3, 0.5
    z1, z2 = _unit(n, 4, 0), _unit(n, 4, 1)
    views = list(z1) + list(z2)  # 2N views; view i's positive is view (i + N) mod 2N
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(_dot(views[i], views[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(_dot(views[i], views[j]) / tau) / denom)
    assert abs(nt_xent(z1, z2, tau).item() - total / (2 * n)) < 1e-5


def test_nt_xent_of_shards_against_gathered_candidates_averages_to_the_whole_batch():
    # Two "ranks" holding rows 0–1 and 2–3 of a batch of 4, each scored against all 8 views.
    z1, z2 = _unit(4, 5, 2), _unit(4, 5, 3)
    whole = nt_xent(z1, z2, 0.2)
    a = nt_xent(z1[:2], z2[:2], 0.2, candidates=(z1, z2), offset=0)
    b = nt_xent(z1[2:], z2[2:], 0.2, candidates=(z1, z2), offset=2)
    torch.testing.assert_close((a + b) / 2, whole)


def test_in_batch_logits_put_each_positive_at_its_global_row():
    q, k = _unit(2, 3, 4), _unit(6, 3, 5)
    logits, labels = in_batch_logits(q, k, 0.5, offset=4)
    assert labels.tolist() == [4, 5]
    for i in range(2):
        for j in range(6):
            assert abs(float(logits[i, j]) - _dot(q[i], k[j]) / 0.5) < 1e-5


def test_byol_loss_is_the_squared_distance_of_unit_vectors():
    g = torch.Generator().manual_seed(6)
    p, z = torch.randn(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g)
    total = 0.0
    for n in range(4):
        pn = [float(v) / math.sqrt(_dot(p[n], p[n])) for v in p[n]]
        zn = [float(v) / math.sqrt(_dot(z[n], z[n])) for v in z[n]]
        total += sum((a - b) ** 2 for a, b in zip(pn, zn))
    assert abs(byol_loss(p, z).item() - total / 4) < 1e-5


def test_simsiam_loss_is_negative_cosine_and_stops_the_target_gradient():
    g = torch.Generator().manual_seed(7)
    p = torch.randn(4, 3, generator=g, requires_grad=True)
    z = torch.randn(4, 3, generator=g, requires_grad=True)
    loss = simsiam_loss(p, z)
    expected = sum(-_dot(p[n], z[n]) / math.sqrt(_dot(p[n], p[n]) * _dot(z[n], z[n])) for n in range(4)) / 4
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    assert p.grad is not None and z.grad is None


def test_nce_loss_matches_the_explicit_formula_with_uniform_noise():
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(3, 1 + 5, generator=g)  # positive first, then m = 5 noise entries
    n_inst = 50
    z = nce_normalizer(scores, n_inst)
    z_ref = n_inst * sum(math.exp(float(s)) for s in scores.flatten()) / scores.numel()
    assert abs(float(z) - z_ref) < 1e-4 * z_ref
    m, pn = 5, 1.0 / n_inst
    total = 0.0
    for b in range(3):
        p = [math.exp(float(s)) / z_ref for s in scores[b]]
        h = [pi / (pi + m * pn) for pi in p]
        total += -(math.log(h[0]) + sum(math.log(1 - h[j]) for j in range(1, m + 1)))
    assert abs(nce_loss(scores, n_inst, z).item() - total / 3) < 1e-4


def test_margin_contrastive_loss_pulls_similar_and_pushes_dissimilar_beyond_the_margin():
    x1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    x2 = torch.tensor([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]])  # distances 5, 0.5, 5
    y = torch.tensor([1, 0, 0])
    margin = 2.0
    expected = 0.0
    for i in range(3):
        d = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x1[i], x2[i])))
        expected += d ** 2 if y[i] else max(0.0, margin - d) ** 2
    loss = margin_contrastive_loss(x1, x2, y, margin)
    assert abs(loss.item() - expected / 3) < 1e-5
    assert abs(loss.item() - (25 + 1.5 ** 2 + 0) / 3) < 1e-5  # by hand


def test_invaspread_loss_matches_the_explicit_formula():
    n, tau = 3, 0.3
    z1, z2 = _unit(n, 4, 9), _unit(n, 4, 10)
    views = list(z1) + list(z2)
    total = 0.0
    for x in range(2 * n):
        pos = (x + n) % (2 * n)
        denom = sum(math.exp(_dot(views[x], views[k]) / tau) for k in range(2 * n) if k != x)
        prob = {j: math.exp(_dot(views[x], views[j]) / tau) / denom for j in range(2 * n) if j != x}
        total += math.log(prob[pos]) + sum(math.log(1 - prob[j]) for j in prob if j != pos)
    assert abs(invaspread_loss(z1, z2, tau).item() - (-total / (2 * n))) < 1e-5


# --- SwAV and DINO ---------------------------------------------------------------------------

def _sinkhorn_by_hand(scores, eps, iterations):
    """Sinkhorn-Knopp written out with Python loops (SwAV's Alg.): B×K lists."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(k)]  # K×B
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]  # prototypes: 1/K each
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]  # samples: 1/B each
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def test_sinkhorn_marginals_are_equipartitioned():
    from mocolab.losses import sinkhorn

    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    c = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    scores = z @ c.T  # B=12 samples, K=4 prototypes
    q3 = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q3.sum(dim=1), torch.ones(12))  # each sample: mass 1
    torch.testing.assert_close(q3, torch.tensor(_sinkhorn_by_hand(scores.tolist(), 0.05, 3)), rtol=1e-4, atol=1e-6)
    q = sinkhorn(scores, epsilon=0.05, iterations=500)
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 12 / 4), rtol=1e-3, atol=1e-3)  # B/K each
    plain = F.softmax(scores / 0.05, dim=1).sum(dim=0)  # without the constraint: unbalanced
    assert (plain - 3).abs().max() > (q3.sum(dim=0) - 3).abs().max()


def test_swav_loss_by_explicit_formula_and_no_gradient_into_codes():
    from mocolab.losses import swav_loss

    g = torch.Generator().manual_seed(1)
    c = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    z = [F.normalize(torch.randn(5, 4, generator=g), dim=1).requires_grad_() for _ in range(3)]
    scores = [zv @ c.T for zv in z]
    tau = 0.1
    loss = swav_loss(scores, temperature=tau, epsilon=0.05, iterations=3)
    codes = [_sinkhorn_by_hand(scores[i].tolist(), 0.05, 3) for i in (0, 1)]
    total = 0.0
    for i in (0, 1):  # codes of the two large views, predicted by every other view
        sub = 0.0
        for v in range(3):
            if v == i:
                continue
            for n in range(5):
                logits = [float(x) / tau for x in scores[v][n].detach()]
                log_z = math.log(sum(math.exp(x) for x in logits))
                sub += -sum(codes[i][n][k] * (logits[k] - log_z) for k in range(6)) / 5
        total += sub / 2
    assert abs(loss.item() - total / 2) < 1e-4
    loss.backward()
    assert z[2].grad is not None  # a small view only predicts: its gradient is the prediction's
    # the codes carry no gradient: the loss gradient w.r.t. view 2's scores is softmax − mean code
    s2 = scores[2].detach().requires_grad_()
    swav_loss([scores[0].detach(), scores[1].detach(), s2], tau, 0.05, 3).backward()
    expected = (F.softmax(s2.detach() / tau, 1) - (torch.tensor(codes[0]) + torch.tensor(codes[1])) / 2) / tau
    torch.testing.assert_close(s2.grad, expected / 5 / 2, rtol=1e-3, atol=1e-5)


def test_dino_loss_by_explicit_formula():
    from mocolab.losses import dino_loss

    g = torch.Generator().manual_seed(2)
    student = [torch.randn(3, 4, generator=g) for _ in range(4)]
    teacher = [torch.randn(3, 4, generator=g) for _ in range(2)]
    center = torch.randn(1, 4, generator=g)
    ts, tt = 0.1, 0.04
    loss = dino_loss(student, teacher, center, ts, tt)
    total, terms = 0.0, 0
    for i in range(2):
        for v in range(4):
            if v == i:
                continue
            for n in range(3):
                t = [(float(teacher[i][n][k]) - float(center[0][k])) / tt for k in range(4)]
                pt = [math.exp(x) / sum(math.exp(y) for y in t) for x in t]
                s = [float(x) / ts for x in student[v][n]]
                log_z = math.log(sum(math.exp(y) for y in s))
                total += -sum(pt[k] * (s[k] - log_z) for k in range(4)) / 3
            terms += 1
    assert terms == 6 and abs(loss.item() - total / terms) < 1e-4


def test_dino_center_moves_by_its_momentum():
    from mocolab.momentum import Center

    center = Center(3, momentum=0.9)
    center.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    out = torch.tensor([[2.0, 4.0, 0.0], [0.0, 2.0, 2.0]])  # batch mean [1, 3, 1]
    center.update(out)
    expected = [0.9 * 1 + 0.1 * 1, 0.9 * 0 + 0.1 * 3, 0.9 * -1 + 0.1 * 1]
    assert center.center.flatten().tolist() == pytest.approx(expected)
    assert "center" in center.state_dict()
    center.update(out[:0])  # no rows (no masked patch this step): the centre stays
    assert center.center.flatten().tolist() == pytest.approx(expected)
