"""InfoNCE against an explicit log-softmax formula written out in the test."""

import math

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
