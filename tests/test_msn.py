"""MSN: the loss by hand and against ``src/losses.py``'s (written out here), the anchor's dropped
patches, the prototypes spared by weight decay, the stretched EMA ramp, the views, the presets,
and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import resume_after_ctrl_c_continues_exactly

from mocolab.config import ConfigError, build_config
from mocolab.losses import msn_loss
from mocolab.masking import random_masking
from mocolab.methods import MSN
from mocolab.optim import build_optimizer
from mocolab.vit import vit

pytestmark = pytest.mark.usefixtures("one_thread")


def official_msn_loss(anchor_views, target_views, prototypes, num_views, tau=0.1, T=0.25,
                      use_sinkhorn=True):
    """``init_msn_loss(...)(...)`` of facebookresearch/msn@4388dc1 ``src/losses.py`` on one
    process (label smoothing 0: one-hot prototype labels), with ``distributed_sinkhorn``."""
    proto_labels = torch.eye(len(prototypes))

    def sharpen(p, T):
        sharp_p = p ** (1.0 / T)
        sharp_p /= torch.sum(sharp_p, dim=1, keepdim=True)
        return sharp_p

    def snn(query, supports, support_labels, temp=tau):
        query = torch.nn.functional.normalize(query)
        supports = torch.nn.functional.normalize(supports)
        return torch.softmax(query @ supports.T / temp, dim=1) @ support_labels

    def distributed_sinkhorn(Q, num_itr=3):
        Q = Q.T
        B, K = Q.shape[1], Q.shape[0]
        Q /= torch.sum(Q)
        for _ in range(num_itr):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.T

    probs = snn(anchor_views, prototypes, proto_labels)
    with torch.no_grad():
        targets = sharpen(snn(target_views, prototypes, proto_labels), T=T)
        if use_sinkhorn:
            targets = distributed_sinkhorn(targets)
        targets = torch.cat([targets for _ in range(num_views)], dim=0)
    loss = torch.mean(torch.sum(torch.log(probs ** (-targets)), dim=1))
    avg_probs = torch.mean(probs, dim=0)
    rloss = -torch.sum(torch.log(avg_probs ** (-avg_probs))) + math.log(float(len(avg_probs)))
    return loss, rloss


def test_loss_of_two_prototypes_by_hand():
    # anchor = target = e1, prototypes e1 and e2, τ = 1: p = softmax(1, 0); q = sharpen(p, ½)
    p1 = math.e / (math.e + 1)
    p = [p1, 1 - p1]
    q = [p[0] ** 2 / (p[0] ** 2 + p[1] ** 2), p[1] ** 2 / (p[0] ** 2 + p[1] ** 2)]
    ce = -(q[0] * math.log(p[0]) + q[1] * math.log(p[1]))
    me_max = p[0] * math.log(p[0]) + p[1] * math.log(p[1]) + math.log(2)  # log K − H(p̄)
    e1 = torch.tensor([[1.0, 0.0]])
    loss, got_ce, got_me = msn_loss(e1, e1, torch.eye(2), temperature=1.0, sharpen_temperature=0.5,
                                    me_max_weight=2.0, sinkhorn_targets=False)
    assert got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert got_me.item() == pytest.approx(me_max, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 2 * me_max, rel=1e-5)


@pytest.mark.parametrize("sinkhorn", [True, False])
def test_loss_is_the_official_code(sinkhorn):
    g = torch.Generator().manual_seed(0)
    anchor, target = torch.randn(3 * 8, 16, generator=g), torch.randn(8, 16, generator=g)
    protos = torch.randn(12, 16, generator=g)
    a = anchor.clone().requires_grad_(True)
    b = anchor.clone().requires_grad_(True)
    _, ce, me = msn_loss(a, target, protos, 0.1, 0.25, 1.0, sinkhorn)
    want_ce, want_me = official_msn_loss(b, target, protos, num_views=3, use_sinkhorn=sinkhorn)
    torch.testing.assert_close(ce, want_ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(me, want_me, rtol=1e-4, atol=1e-5)
    (ce + me).backward()
    (want_ce + want_me).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6)


def small_msn(**kwargs) -> MSN:
    torch.manual_seed(0)
    backbone = vit("vit_tiny", image_size=16, patch_size=4, in_channels=1, depth=1)
    return MSN(backbone, dim=16, hidden_dim=32, num_prototypes=10, num_focal=2, **kwargs)


def test_the_anchor_drops_the_same_patches_of_every_image_and_focal_views_are_smaller():
    model = small_msn().train()
    assert model.num_views == 4 and model.view_recipes("msn-rand,msn-rand,msn-focal") == [
        "msn-rand", "msn-rand", "msn-focal", "msn-focal"]
    keep = random_masking(6, 16, 0.15, generator=torch.Generator().manual_seed(3), shared=True).keep
    assert keep.shape == (6, 13) and (keep == keep[0]).all()  # floor(16 · 0.85) = 13
    x = torch.randn(6, 1, 16, 16)
    dropped = sorted(set(range(16)) - set(keep[0].tolist()))
    y = x.clone()
    for i in dropped:  # change only the dropped patches of the anchor view
        y[:, :, (i // 4) * 4:(i // 4) * 4 + 4, (i % 4) * 4:(i % 4) * 4 + 4] += 3.0
    focal = [torch.randn(6, 1, 8, 8) for _ in range(2)]
    target = torch.randn(6, 1, 16, 16)
    a = model([target, x, *focal], torch.Generator().manual_seed(3))
    b = model([target, y, *focal], torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.loss, b.loss)
    c = model([target, x + 3.0, *focal], torch.Generator().manual_seed(3))
    assert not torch.allclose(a.loss, c.loss)
    a.loss.backward()
    assert model.prototypes.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_prototypes_get_no_weight_decay_and_the_ema_ramp_is_stretched():
    model = small_msn()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("adamw", params, lr=1e-3, momentum=0.9, weight_decay=0.04,
                          no_decay=model.no_weight_decay())
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.prototypes.weight) not in decayed
    assert id(model.query_encoder.head[0].weight) in decayed
    # src/msn_train.py: m_i = 0.996 + i·(1 − 0.996)/(ipe·epochs·1.25)
    out = model([torch.randn(4, 1, 16, 16)] * 2 + [torch.randn(4, 1, 8, 8)] * 2, None)
    assert model.on_step_end(out, 40, 80)["momentum"] == pytest.approx(0.996 + 0.004 * 40 / 100)
    # prototypes start as nn.Linear's U(±1/√d), not normalised (MSN normalises in the loss)
    assert model.prototypes.weight.abs().max() <= 1 / math.sqrt(16)


def test_msn_options_and_presets():
    with pytest.raises(ConfigError, match="--method msn masks a ViT"):
        build_config(method="msn")
    with pytest.raises(ConfigError, match="--patch-drop"):
        build_config(method="msn", arch="vit_tiny", patch_drop=1.0)
    cfg = build_config("msn-imagenet")  # configs/pretrain/msn_vits16.yaml, 16 GPUs × 64
    assert (cfg.arch, cfg.patch_size, cfg.pos_embed, cfg.dim, cfg.hidden_dim, cfg.head_layers) == (
        "vit_small", 16, "learned", 256, 2048, 3)
    assert (cfg.num_prototypes, cfg.patch_drop, cfg.num_local_crops, cfg.temperature,
            cfg.sharpen_temperature, cfg.me_max_weight, cfg.sinkhorn) == (
        1024, 0.15, 10, 0.1, 0.25, 1.0, True)
    assert (cfg.batch_size, cfg.lr * cfg.batch_size / 256, cfg.weight_decay, cfg.weight_decay_end,
            cfg.warmup_epochs, cfg.epochs, cfg.clip_grad) == (1024, 0.001, 0.04, 0.4, 15, 800, 3.0)
    assert build_config("msn-fashion-mnist").method == "msn"


def test_exact_resume_after_ctrl_c(tmp_path):
    tiny = dict(data="synthetic", method="msn", arch="vit_tiny", vit_depth=1, patch_size=4,
                num_local_crops=2, num_prototypes=16, dim=16, hidden_dim=32, batch_size=16,
                crop_size=16, epochs=1, optimizer="adamw", lr=1e-3, progress=False, threads=1,
                log_every=1, diagnostics_every=0)
    resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
