"""Diagnostics against closed forms (antipodal points, known singular values) and the queue's
own ordering; dictionary consistency on a queue filled while its encoder moves."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocolab.dictionaries import Queue
from mocolab.evaluate.diagnostics import (
    alignment,
    dictionary_consistency,
    dimension_std,
    effective_rank,
    encoder_agreement,
    queue_ages,
    uniformity,
)
from mocolab.momentum import MomentumEncoder


def test_alignment_closed_form():
    z = F.normalize(torch.randn(20, 5), dim=1)
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z, -z) == pytest.approx(4.0)  # ‖2z‖² = 4 for unit z
    assert alignment(z, -z, alpha=1) == pytest.approx(2.0)


def test_uniformity_closed_form():
    two = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])  # antipodal after normalisation: ‖·‖² = 4
    assert uniformity(two, t=2) == pytest.approx(-8.0)
    square = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]])
    # 6 pairs: 4 at squared distance 2, 2 at 4 → log((4e^{-4} + 2e^{-8}) / 6)
    assert uniformity(square) == pytest.approx(math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6))
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0.0, abs=1e-6)  # collapsed


def test_effective_rank_closed_form():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.ones(10, 4)) == pytest.approx(1.0)
    z = torch.diag(torch.tensor([3.0, 1.0]))  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(z) == pytest.approx(math.exp(h))


def test_dimension_std_against_numpy_and_collapse():
    z = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    zn = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(dimension_std(z).numpy(), zn.std(axis=0, ddof=1), rtol=1e-5)
    assert abs(dimension_std(z).mean().item() - 1 / math.sqrt(16)) < 0.02  # spread out
    collapsed = torch.randn(1, 16).repeat(100, 1) + 1e-4 * torch.randn(100, 16)
    assert dimension_std(collapsed).mean().item() < 1e-3


def test_queue_ages_follow_the_ring_buffer():
    q = Queue(7, 2)
    for n in (3, 3, 3):  # wraps around
        q.push(F.normalize(torch.randn(n, 2), dim=1))
    ages = queue_ages(int(q.ptr), q.size)
    # oldest → newest by descending age must be the queue's own ordering
    assert torch.equal(q.queue[ages.argsort(descending=True)], q.ordered())


def _fill_queue(momentum: float, steps: int = 8, batch: int = 4):
    torch.manual_seed(0)
    f_q = nn.Linear(6, 3)
    f_k = MomentumEncoder(f_q)
    queue = Queue(steps * batch, 3)
    sources = torch.zeros(steps * batch, 6)
    for s in range(steps):
        x = torch.randn(batch, 6)
        with torch.no_grad():
            queue.push(F.normalize(f_k(x), dim=1))
            sources[s * batch:(s + 1) * batch] = x
            f_q.weight.add_(0.5 * torch.randn_like(f_q.weight))  # the query encoder moves
            f_k.update(f_q, momentum)
    with torch.no_grad():
        re = F.normalize(f_k(sources), dim=1)
    return queue, re


def test_dictionary_consistency():
    queue, re = _fill_queue(momentum=1.0)  # the key encoder never moves: perfectly consistent
    res = dictionary_consistency(queue.keys(), re, queue_ages(int(queue.ptr), queue.size))
    assert res["mean"] == pytest.approx(1.0, abs=1e-5)
    queue, re = _fill_queue(momentum=0.0)  # no momentum: old keys come from other encoders
    res = dictionary_consistency(queue.keys(), re, queue_ages(int(queue.ptr), queue.size))
    assert res["mean"] < 0.99
    newest, oldest = res["by_age"][0], res["by_age"][-1]
    assert newest > oldest


def test_encoder_agreement():
    f = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    assert encoder_agreement(f, MomentumEncoder(f), x) == pytest.approx(1.0, abs=1e-6)
    g = nn.Linear(4, 3)
    expected = F.cosine_similarity(f(x), g(x), dim=1).mean().item()
    assert encoder_agreement(f, g, x) == pytest.approx(expected)
