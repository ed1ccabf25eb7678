"""DenseCL: the correspondence of a hand-made 2×2 feature map, the dense loss by hand, the whole
loss against the official ``densecl.py`` formulas (1×1 convolutions for the dense head), both
queues after the step, presets, and a tiny run with exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import resume_after_ctrl_c_continues_exactly, tiny_config

from mocolab.backbones import resnet, stage_maps
from mocolab.checkpoint import load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.losses import dense_correspondence, dense_info_nce
from mocolab.methods import DenseCL

pytestmark = pytest.mark.usefixtures("one_thread")


def as_locations(fmap: torch.Tensor) -> torch.Tensor:
    """N×D×H×W → N×(H·W)×D, locations in row-major order (as the official ``view(N, D, -1)``)."""
    return fmap.flatten(2).transpose(1, 2)


def test_correspondence_of_a_two_by_two_map_is_by_cosine():
    # a query map and a key map, one feature vector (D = 2) per location (h, w)
    query = torch.zeros(1, 2, 2, 2)
    query[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    query[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    query[0, :, 1, 0] = torch.tensor([-1.0, 0.0])
    query[0, :, 1, 1] = torch.tensor([1.0, 1.0])
    key = torch.zeros(1, 2, 2, 2)
    key[0, :, 0, 0] = torch.tensor([5.0, 4.0])  # long, but not the best-aligned for (1, 0)
    key[0, :, 0, 1] = torch.tensor([0.9, 0.1])
    key[0, :, 1, 0] = torch.tensor([-2.0, 0.1])
    key[0, :, 1, 1] = torch.tensor([0.0, 3.0])
    # cosines by hand (query rows, key columns 0..3):
    #   (1, 0):   0.781,  0.994, −0.999, 0      → key 1 (a dot product would pick key 0: 5)
    #   (0, 1):   0.625,  0.110,  0.050, 1      → key 3 (a dot product: key 0, 4 > 3)
    #   (−1, 0): −0.781, −0.994,  0.999, 0      → key 2
    #   (1, 1):   0.994,  0.781, −0.671, 0.707  → key 0
    match = dense_correspondence(as_locations(query), as_locations(key))
    assert match.tolist() == [[1, 3, 2, 0]]


def test_dense_loss_by_hand():
    # one image, two locations; query dense r0 = (1, 0), r1 = (0, 1); key dense t0 = (0, 1),
    # t1 = (0.6, 0.8); r0 corresponds to t1 and r1 to t0; one negative (−1, 0); τ = 0.5:
    # ℓ0 = −log(e^{1.2} / (e^{1.2} + e^{−2})) = log(1 + e^{−3.2}),
    # ℓ1 = −log(e^{2} / (e^{2} + e^{0})) = log(1 + e^{−2})
    r = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.6, 0.8]]])
    loss, logits = dense_info_nce(r, t, torch.tensor([[1, 0]]), torch.tensor([[-1.0, 0.0]]), 0.5)
    expected = (math.log(1 + math.exp(-3.2)) + math.log(1 + math.exp(-2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(logits, torch.tensor([[1.2, -2.0], [2.0, 0.0]]))


def model(shuffle_bn=True):
    torch.manual_seed(0)
    return DenseCL(
        resnet("resnet18", in_channels=1, stem="compact", width=8),
        dim=8,
        hidden_dim=16,
        queue_size=12,
        temperature=0.2,
        dense_weight=0.3,
        shuffle_bn=shuffle_bn,
    ).train()


def views(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)  # compact stem: a 2×2 map at layer4
    return [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]


def official_neck(encoder, x):
    """The official DenseCLNeck on the ResNet's stage-5 map: fc-ReLU-fc on the pooled map,
    1×1 conv-ReLU-1×1 conv on the map (the convolutions' weights: the dense MLP's), the dense
    output pooled for the second queue. Returns (q, q_grid N×C×S, q2, q_b N×D×S)."""
    q_b = stage_maps(encoder.backbone, x, ("layer4",))["layer4"]
    fc1, _, fc2 = encoder.dense_head
    y = F.conv2d(q_b, fc1.weight[:, :, None, None], fc1.bias)
    y = F.conv2d(F.relu(y), fc2.weight[:, :, None, None], fc2.bias)
    q = encoder.head(F.adaptive_avg_pool2d(q_b, 1).flatten(1))
    q2 = F.adaptive_avg_pool2d(y, 1).flatten(1)
    return q, y.flatten(2), q2, q_b.flatten(2)


def official_loss(m, x_q, x_k, lam, tau):
    """densecl.py forward_train (one process) with this model's weights and queues."""
    n = F.normalize
    q, q_grid, _, q_b = official_neck(m.query_encoder, x_q)
    q, q_grid, q_b = n(q, dim=1), n(q_grid, dim=1), n(q_b, dim=1)
    with torch.no_grad():
        k, k_grid, k2, k_b = official_neck(m.key_encoder.module, x_k)
        k, k_grid, k2, k_b = n(k, dim=1), n(k_grid, dim=1), n(k2, dim=1), n(k_b, dim=1)
    queue, queue2 = m.queue.keys().T, m.dense_queue.keys().T  # C×K, as the official buffers
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    backbone_sim_matrix = torch.matmul(q_b.permute(0, 2, 1), k_b)
    densecl_sim_ind = backbone_sim_matrix.max(dim=2)[1]
    indexed_k_grid = torch.gather(
        k_grid, 2, densecl_sim_ind.unsqueeze(1).expand(-1, k_grid.size(1), -1)
    )
    l_pos_dense = (q_grid * indexed_k_grid).sum(1).view(-1).unsqueeze(-1)
    q_grid = q_grid.permute(0, 2, 1).reshape(-1, q_grid.size(1))
    l_neg_dense = torch.einsum("nc,ck->nk", q_grid, queue2)

    def head(pos, neg):  # ContrastiveHead
        logits = torch.cat((pos, neg), dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    return (1 - lam) * head(l_pos, l_neg) + lam * head(l_pos_dense, l_neg_dense), k, k2


@pytest.mark.parametrize("shuffle_bn", [False, True])
def test_loss_is_the_official_densecl_and_both_queues_take_their_keys(shuffle_bn):
    m = model(shuffle_bn)
    x_q, x_k = views()
    # the key encoder away from the query encoder, so that the two branches differ
    with torch.no_grad():
        for p in m.key_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    out = m([x_q, x_k], torch.Generator().manual_seed(1), index=torch.arange(4))
    expected, k, k2 = official_loss(m, x_q, x_k, lam=0.3, tau=0.2)
    # a shuffled key batch goes through the same plain BN: equal up to rounding
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"acc", "dense_acc", "loss_global", "loss_dense"} <= set(out.metrics)
    out.loss.backward()
    assert all(p.grad is not None for p in m.query_encoder.dense_head.parameters())
    assert all(not p.requires_grad for p in m.key_encoder.parameters())
    m.on_step_end(out, 0, 10)
    torch.testing.assert_close(m.queue.ordered()[-4:], k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.dense_queue.ordered()[-4:], k2, atol=1e-5, rtol=1e-5)
    assert m.dictionary is m.queue and m.momentum_encoder is m.key_encoder


def test_query_encoder_gives_the_global_projection_and_the_backbone_evaluates():
    m = model().eval()
    x = views()[0]
    g, r, f = m.query_encoder.dense(x)
    torch.testing.assert_close(m.query_encoder(x), g, atol=1e-5, rtol=1e-5)  # what MoCo's gives
    assert r.shape == (4, 4, 8) and f.shape == (4, 4, m.backbone.num_features)  # 2×2 locations


def test_presets_and_options(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"densecl-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "densecl"
    cfg = build_config("densecl-imagenet")
    assert (cfg.queue_size, cfg.key_momentum, cfg.temperature, cfg.dense_weight, cfg.dim) == (
        65536,
        0.999,
        0.2,
        0.5,
        128,
    )
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.augment, cfg.optimizer) == (
        256,
        0.03,
        1e-4,
        200,
        "mocov2",
        "sgd",
    )
    defaults = build_config(method="densecl")
    assert (defaults.queue_size, defaults.temperature, defaults.dense_weight) == (65536, 0.2, 0.5)
    with pytest.raises(ConfigError, match="--dense-weight"):
        build_config(method="densecl", dense_weight=1.5)
    with pytest.raises(ConfigError, match="ResNet"):
        build_config(method="densecl", arch="vit_tiny")


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    tiny = {**tiny_config("densecl", dim=8, queue_size=32), "crop_size": 32}  # 2×2 maps
    run_dir = resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
    state = load_checkpoint(run_dir)["model"]
    assert {"queue.queue", "dense_queue.queue", "key_encoder.module.dense_head.0.weight"} <= set(
        state
    )
