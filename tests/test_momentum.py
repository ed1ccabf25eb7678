"""The momentum update θk ← m·θk + (1−m)·θq and the cosine momentum schedule."""

import math

import pytest
import torch
from torch import nn

from mocolab.momentum import MomentumEncoder, cosine_momentum, momentum_update


def test_momentum_update_by_hand():
    q = nn.Linear(2, 1)
    k = nn.Linear(2, 1)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[1.0, 2.0]])); q.bias.fill_(3.0)
        k.weight.copy_(torch.tensor([[5.0, -1.0]])); k.bias.fill_(0.0)
    momentum_update(k, q, m=0.9)
    # 0.9·5 + 0.1·1 = 4.6 ; 0.9·(−1) + 0.1·2 = −0.7 ; 0.9·0 + 0.1·3 = 0.3
    torch.testing.assert_close(k.weight, torch.tensor([[4.6, -0.7]]))
    torch.testing.assert_close(k.bias, torch.tensor([0.3]))


def test_m_zero_copies_and_m_one_freezes():
    q = nn.Linear(3, 3)
    k = MomentumEncoder(q)
    with torch.no_grad():
        q.weight.add_(1.0)
    before = k.module.weight.clone()
    k.update(q, 1.0)
    torch.testing.assert_close(k.module.weight, before)
    k.update(q, 0.0)
    torch.testing.assert_close(k.module.weight, q.weight)


def test_key_encoder_starts_identical_and_has_no_gradient():
    q = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    k = MomentumEncoder(q)
    for a, b in zip(q.state_dict().values(), k.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert all(not p.requires_grad for p in k.parameters())
    # buffers are the key encoder's own, not averaged
    k.module[1].running_mean.fill_(7.0)
    k.update(q, 0.5)
    assert torch.all(k.module[1].running_mean == 7.0)


def test_cosine_momentum_endpoints():
    assert cosine_momentum(0.99, 0, 100) == 0.99
    assert abs(cosine_momentum(0.99, 100, 100) - 1.0) < 1e-12
    # halfway: 1 − 0.01·(cos(π/2)+1)/2 = 0.995
    assert abs(cosine_momentum(0.99, 50, 100) - (1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)) < 1e-12


def test_scheduled_momentum_constant_cosine_or_linear():
    from mocolab.momentum import scheduled_momentum

    assert scheduled_momentum(0.99, "constant", 50, 100) == 0.99
    # BYOL §3.2: τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2 — half-way: 1 − 0.004·0.5
    assert scheduled_momentum(0.996, "cosine", 50, 100) == pytest.approx(0.998)
    # I-JEPA's src/train.py: m_i = ema[0] + i·(ema[1] − ema[0])/(ipe·epochs), i from 0
    ijepa = [0.996 + i * (1.0 - 0.996) / 40 for i in range(41)]
    assert [scheduled_momentum(0.996, "linear", i, 40) for i in range(41)] == pytest.approx(ijepa)
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        scheduled_momentum(0.99, "step", 0, 10)


def test_momentum_encoder_step_uses_its_schedule():
    """The one scheduled update every momentum method calls: m from BYOL's cosine ramp
    1 − (1 − m_base)·(cos(πk/K) + 1)/2, then θk ← m·θk + (1−m)·θq."""
    source = nn.Linear(2, 2)
    ema = MomentumEncoder(source, momentum=0.5, schedule="cosine")
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    m = ema.step(source, 5, 10)  # halfway: 1 − 0.5·(cos(π/2) + 1)/2 = 0.75
    assert m == pytest.approx(1 - 0.5 * (math.cos(math.pi / 2) + 1) / 2) == pytest.approx(0.75)
    for e, s in zip(ema.parameters(), source.parameters()):
        torch.testing.assert_close(e, 0.25 * s.detach())  # 0.75·0 + 0.25·θq
    assert MomentumEncoder(source, 0.9).step(source, 5, 10) == 0.9  # constant by default
