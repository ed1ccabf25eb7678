"""kNN against the InstDisc weighted vote computed by hand; the linear probe on separable data."""

import math

import torch

from mocolab.evaluate.knn import knn_accuracy, knn_predict, topk_accuracy
from mocolab.evaluate.linear import linear_probe


def test_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    scores = knn_predict(query, bank, labels, num_classes=3, k=3, temperature=0.5)
    # similarities 1.0, 0.8, 0.0, -1.0 → top-3: indices 0, 1, 2 with weights e^{s/τ}
    expected = torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(0.0), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_k_larger_than_bank_is_clamped_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g)
    query = torch.randn(17, 5, generator=g)
    a = knn_predict(query, bank, labels, 4, k=500, temperature=0.1, chunk_size=4)
    b = knn_predict(query, bank, labels, 4, k=30, temperature=0.1, chunk_size=1000)
    torch.testing.assert_close(a, b)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert abs(acc["top1"] - 100 / 3) < 1e-4  # only the first is right
    assert abs(acc["top2"] - 200 / 3) < 1e-4  # the second's label is its 2nd best


def test_knn_on_clustered_features_is_perfect():
    centers = torch.eye(4) * 10
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat(25)
    feats = centers[labels] + torch.randn(100, 4, generator=g)
    acc = knn_accuracy(feats, labels, feats[:40] + 0.1, labels[:40], 4, k=10, temperature=0.1)
    assert acc["top1"] == 100.0


def test_linear_probe_learns_separable_classes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    x = torch.randn(600, 8, generator=g)
    y = (x @ w).argmax(1)
    acc = linear_probe(x[:500], y[:500], x[500:], y[500:], 3, epochs=30, lr=0.1)
    assert acc["top1"] > 90.0
