"""MoCo: shuffle-BN, split BN, no gradient into keys, queue and key-encoder updates."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocolab.backbones import SplitBatchNorm2d, resnet
from mocolab.distributed import batch_shuffle, batch_unshuffle
from mocolab.methods.moco import MoCo

EPS = 1e-5


def normalise_with(x, group):
    """BN of x by hand with the statistics of the images ``group`` (biased variance)."""
    sub = x[group]
    mean = sub.mean(dim=(0, 2, 3), keepdim=True)
    var = sub.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS)


def test_split_batchnorm_uses_per_sub_batch_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 2, 2, generator=g) * torch.arange(1, 9.0).view(8, 1, 1, 1)
    bn = SplitBatchNorm2d(3, num_splits=2).train()
    out = bn(x)
    for n in range(8):
        group = [j for j in range(8) if j // 4 == n // 4]  # sub-batches: images 0–3 and 4–7
        torch.testing.assert_close(out[n], normalise_with(x, group)[n], atol=1e-5, rtol=1e-4)
    # eval mode is plain BN with running statistics, state dict as nn.BatchNorm2d
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(3).state_dict())


def test_shuffle_is_a_bijection_and_unshuffle_restores_order():
    x = torch.arange(10.0).view(10, 1)
    xs, idx = batch_shuffle(x, torch.Generator().manual_seed(3))
    assert sorted(xs.view(-1).tolist()) == list(range(10))
    assert not torch.equal(xs, x)
    torch.testing.assert_close(batch_unshuffle(xs, idx), x)


class BNOnly(nn.Module):
    """A backbone that is just split BN and flatten, so keys can be computed by hand."""

    def __init__(self, splits):
        super().__init__()
        self.bn = SplitBatchNorm2d(2, num_splits=splits)
        self.num_features = 2 * 2 * 2

    def forward(self, x):
        return self.bn(x).flatten(1)


def make_bn_moco(shuffle):
    model = MoCo(BNOnly(splits=2), dim=8, head_layers=1, queue_size=16, shuffle_bn=shuffle)
    model.query_encoder.head = nn.Identity()
    model.key_encoder.module.head = nn.Identity()
    return model


def test_shuffle_bn_changes_the_statistics_seen_by_the_positive():
    g = torch.Generator().manual_seed(1)
    n = 8
    x_k = torch.randn(n, 2, 2, 2, generator=g) + torch.arange(n).view(n, 1, 1, 1)
    # Without shuffling, key i is normalised with its own half of the batch: the same images
    # whose other views form query i's sub-batch — the leak shuffle-BN removes.
    plain = make_bn_moco(shuffle=False).train()
    k_plain = plain.encode_keys(x_k)
    half = n // 2
    for i in range(n):
        query_group = [j for j in range(n) if j // half == i // half]
        expected = F.normalize(normalise_with(x_k, query_group)[i].flatten(), dim=0)
        torch.testing.assert_close(k_plain[i], expected, atol=1e-5, rtol=1e-4)
    # With shuffling, key i sits at position pos[i] of the shuffled batch, in half pos[i] // 4.
    shuffled = make_bn_moco(shuffle=True).train()
    k_shuf = shuffled.encode_keys(x_k, torch.Generator().manual_seed(7))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    pos = torch.argsort(perm)
    moved = 0
    for i in range(n):
        key_group = [j for j in range(n) if pos[j] // half == pos[i] // half]
        expected = F.normalize(normalise_with(x_k, key_group)[i].flatten(), dim=0)
        torch.testing.assert_close(k_shuf[i], expected, atol=1e-5, rtol=1e-4)
        query_group = [j for j in range(n) if j // half == i // half]
        moved += sorted(key_group) != sorted(query_group)
    assert moved > 0
    assert not torch.allclose(k_plain, k_shuf)


def tiny_moco(**kw):
    torch.manual_seed(0)
    backbone = resnet("resnet18", in_channels=1, stem="compact", bn_splits=2)
    return MoCo(backbone, dim=16, queue_size=32, **kw)


def test_keys_carry_no_gradient_and_query_encoder_does():
    model = tiny_moco(momentum=0.9).train()
    x = torch.randn(4, 1, 16, 16)
    out = model([x, x.flip(3)], torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in model.key_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_encoder.parameters())
    keys = out.carry["keys"]  # enqueued by on_step_end
    assert not keys.requires_grad
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))


def test_step_end_enqueues_keys_and_moves_key_encoder():
    model = tiny_moco(momentum=0.5).train()
    for p in model.key_encoder.parameters():  # start f_k away from f_q to see the EMA
        p.data.zero_()
    x = torch.randn(4, 1, 16, 16)
    out = model([x, x], torch.Generator().manual_seed(0))
    keys = out.carry["keys"].clone()
    theta_q = [p.detach().clone() for p in model.query_encoder.parameters()]
    info = model.on_step_end(out, step=0, total_steps=10)
    assert info["momentum"] == 0.5
    torch.testing.assert_close(model.queue.ordered()[-4:], keys)
    for pk, pq in zip(model.key_encoder.parameters(), theta_q):
        torch.testing.assert_close(pk, 0.5 * pq)  # 0.5·0 + 0.5·θq


def test_logits_use_queue_as_negatives():
    model = tiny_moco(temperature=0.5, shuffle_bn=False).eval()
    x = torch.randn(4, 1, 16, 16)
    out = model([x, x])
    q = F.normalize(model.query_encoder(x), dim=1)
    k = F.normalize(model.key_encoder(x), dim=1)
    torch.testing.assert_close(out.carry["keys"], k)
    neg = model.queue.keys()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ neg.T], 1) / 0.5
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_symmetric_loss_is_both_directions_and_enqueues_both_keys():
    """The official CIFAR-10 demo's symmetrised loss: ctr(q1, k2) + ctr(q2, k1) against the
    same queue, each an explicit log-softmax over [positive, queue]; both key sets enqueued."""
    model = tiny_moco(temperature=0.5, shuffle_bn=False, symmetric=True).eval()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    neg = model.queue.keys().clone()
    out = model([x1, x2])
    with torch.no_grad():
        q1, q2 = (F.normalize(model.query_encoder(x), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(model.key_encoder(x), dim=1) for x in (x1, x2))

    def ctr(q, k):  # -log( exp(q·k/τ) / (exp(q·k/τ) + Σ exp(q·n/τ)) ), mean over the batch
        pos = (q * k).sum(1) / 0.5
        negs = q @ neg.T / 0.5
        return (-(pos - torch.logsumexp(torch.cat([pos[:, None], negs], 1), dim=1))).mean()

    torch.testing.assert_close(out.loss, ctr(q1, k2) + ctr(q2, k1), atol=1e-5, rtol=1e-5)
    model.on_step_end(out, step=0, total_steps=10)
    torch.testing.assert_close(model.queue.ordered()[-8:], torch.cat([k2, k1]))


def test_symmetric_is_refused_for_other_methods():
    import pytest

    from mocolab.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"--symmetric.*not an option of --method simclr.*mocov1"):
        build_config(method="simclr", symmetric=True)


def test_mocov3_predictor_is_the_official_builders():
    """facebookresearch/moco-v3 moco/builder.py: ``_build_mlp(2, dim, mlp_dim, dim)`` makes
    Linear(bias=False) → BN → ReLU → Linear(bias=False) → BN(affine=False)."""
    from mocolab.backbones import resnet
    from mocolab.methods import MoCoV3

    model = MoCoV3(resnet("resnet18", in_channels=1, stem="compact", width=4), dim=8, hidden_dim=16,
                   predictor_hidden_dim=12)
    layers = list(model.predictor)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear,
                                         nn.BatchNorm1d]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == \
        [(8, 12, None), (12, 8, None)]
    assert layers[1].affine and not layers[4].affine
    p = model.predictor.train()(torch.randn(16, 8))  # the output BN: each dimension standardised
    torch.testing.assert_close(p.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)


def test_mocov3_state_with_the_old_predictor_gets_a_clear_message():
    from mocolab.backbones import resnet
    from mocolab.methods import MoCoV3

    model = MoCoV3(resnet("resnet18", in_channels=1, stem="compact", width=4), dim=8, hidden_dim=16)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("predictor.4.")}
    state["predictor.3.bias"] = torch.zeros(8)
    with pytest.raises(RuntimeError, match="before mocolab's predictor followed the official"):
        model.load_state_dict(state)
