"""Retrieval metrics against values worked out by hand, self-exclusion against brute force."""

import pytest
import torch

from mocolab.evaluate.knn import nearest_neighbours
from mocolab.evaluate.retrieval import retrieval_metrics, retrieve


def test_metrics_by_hand():
    # Bank on the unit circle at angles 0°, 10°, 20°, 90°, 100°; classes 0, 1, 0, 1, 1.
    angles = torch.tensor([0.0, 10.0, 20.0, 90.0, 100.0]).deg2rad()
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    bank_labels = torch.tensor([0, 1, 0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])  # at 0°: ranking 0°, 10°, 20°, 90°, 100°
    m = retrieval_metrics(query, torch.tensor([0]), bank, bank_labels, ks=(1, 2, 3))
    # relevance along the ranking: 1, 0, 1; R = 2 relevant images of class 0
    assert m["precision@1"] == pytest.approx(100.0)
    assert m["precision@2"] == pytest.approx(50.0)
    assert m["precision@3"] == pytest.approx(200 / 3)
    assert m["recall@1"] == pytest.approx(50.0) and m["recall@3"] == pytest.approx(100.0)
    assert m["hit@2"] == pytest.approx(100.0)
    # AP@3 = (P@1·1 + P@3·1) / min(3, 2) = (1 + 2/3) / 2
    assert m["mAP@3"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["mAP@2"] == pytest.approx(100 * 1 / 2)  # (P@1) / min(2, 2)


def test_exclude_self_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 6, generator=g)
    _, idx = retrieve(feats, feats, 5, exclude_self=True)
    f = torch.nn.functional.normalize(feats, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    expected = sim.topk(5, dim=1).indices
    assert torch.equal(idx, expected)


def test_k_larger_than_bank_is_an_error():
    bank = torch.randn(10, 4)
    with pytest.raises(ValueError, match="larger than the bank"):
        retrieve(bank[:3], bank, 11)
    with pytest.raises(ValueError, match="larger than the bank"):
        retrieve(bank, bank, 10, exclude_self=True)


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(200, 16, generator=g), torch.randn(30, 16, generator=g)
    s1, i1 = nearest_neighbours(query, bank, 7, backend="torch")
    s2, i2 = nearest_neighbours(query, bank, 7, backend="faiss")
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
