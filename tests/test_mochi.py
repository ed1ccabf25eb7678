"""MoCHi hard negative mixing against an explicit construction, and inside MoCo."""

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.backbones import resnet
from mocolab.config import ConfigError, build_config
from mocolab.dictionaries import mochi_negatives
from mocolab.methods import MoCo


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_mochi_negatives_by_explicit_construction():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    keys = F.normalize(torch.randn(10, 4, generator=g), dim=1)
    n, s, s_prime = 4, 5, 3
    out = mochi_negatives(q, keys, n, s, s_prime, torch.Generator().manual_seed(7))
    assert out.shape == (3, s + s_prime, 4) and not out.requires_grad
    # the same draws, in the documented order
    g = torch.Generator().manual_seed(7)
    pairs = torch.randint(n, (3, s, 2), generator=g)
    alpha = torch.rand(3, s, 1, generator=g)
    partner = torch.randint(n, (3, s_prime), generator=g)
    beta = 0.5 * torch.rand(3, s_prime, 1, generator=g)
    for r in range(3):
        sims = [(sum(float(a) * float(b) for a, b in zip(q[r], keys[j])), j) for j in range(10)]
        hard = [j for _, j in sorted(sims, reverse=True)[:n]]  # the n most similar keys
        for m in range(s):
            a = float(alpha[r, m])
            ki, kj = keys[hard[int(pairs[r, m, 0])]], keys[hard[int(pairs[r, m, 1])]]
            expected = _unit([a * float(x) + (1 - a) * float(y) for x, y in zip(ki, kj)])
            assert out[r, m].tolist() == pytest.approx(expected, abs=1e-5)
        for m in range(s_prime):
            b = float(beta[r, m])
            assert 0 <= b < 0.5
            kj = keys[hard[int(partner[r, m])]]
            expected = _unit([b * float(x) + (1 - b) * float(y) for x, y in zip(q[r], kj)])
            assert out[r, s + m].tolist() == pytest.approx(expected, abs=1e-5)


def test_moco_with_mochi_appends_the_synthetic_negatives():
    torch.manual_seed(0)
    model = MoCo(resnet("resnet18", in_channels=1, stem="compact", width=8), dim=8, queue_size=16,
                 temperature=0.2, shuffle_bn=False, mochi_n=6, mochi_s=4, mochi_s_prime=2).train()
    x = torch.randn(4, 1, 16, 16)
    views = [x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)]
    out = model(views, torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = F.normalize(model.query_encoder(views[0]), dim=1)
        k = F.normalize(model.key_encoder(views[1]), dim=1)
        syn = mochi_negatives(q, model.queue.keys(), 6, 4, 2, torch.Generator().manual_seed(3))
    total = 0.0
    for r in range(4):
        pos = math.exp(float(q[r] @ k[r]) / 0.2)
        neg = sum(math.exp(float(q[r] @ key) / 0.2) for key in model.queue.keys())  # noqa: SIM118 (a Queue, not a dict)
        neg += sum(math.exp(float(q[r] @ h) / 0.2) for h in syn[r])
        total += -math.log(pos / (pos + neg))
    assert abs(out.loss.item() - total / 4) < 1e-4
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_mochi_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="--mochi-n"):
        build_config(method="simclr", mochi_n=8, mochi_s=4)
    with pytest.raises(ConfigError, match="--mochi-n"):
        build_config(mochi_n=0, mochi_s=4)
    with pytest.raises(ConfigError, match="--queue-size"):
        build_config(mochi_n=100, queue_size=96)
    from mocolab.train import pretrain

    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, mochi_n=16, mochi_s=8, mochi_s_prime=4, epochs=1, max_steps=2,
                       progress=False, threads=1, diagnostics_every=0, out_dir=str(tmp_path), run_name="r")
    assert pretrain(cfg, final_eval=False)["step"] == 2
