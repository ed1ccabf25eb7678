"""NNCLR: the nearest-neighbour look-up in a hand-made support set, the loss of Algorithm 1 by
hand, the support set's update after the step, presets, and a tiny run with exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import resume_after_ctrl_c_continues_exactly, tiny_config

from mocolab.backbones import resnet
from mocolab.checkpoint import load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.dictionaries import nearest_neighbours
from mocolab.losses import nnclr_loss
from mocolab.methods import NNCLR

pytestmark = pytest.mark.usefixtures("one_thread")

N = 6
SUPPORT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]])  # a 3-entry support set


def test_nearest_neighbour_of_each_query_in_a_three_entry_support_set():
    queries = torch.tensor([[2.0, 0.1], [0.3, 5.0], [-1.0, -1.0], [0.6, -0.8], [-1.0, 0.2]])
    # cosines by hand, per query (rows) and key (columns):
    #   (2, 0.1):   0.999,  0.050, −0.639  → key 0
    #   (0.3, 5):   0.060,  0.998, −0.834  → key 1
    #   (−1, −1):  −0.707, −0.707,  0.990  → key 2
    #   (0.6, −0.8): 0.6,  −0.8,    0.28   → key 0
    #   (−1, 0.2): −0.981,  0.196,  0.431  → key 2
    index, nn = nearest_neighbours(queries, SUPPORT)
    assert index.tolist() == [0, 1, 2, 0, 2]
    assert torch.equal(nn, SUPPORT[[0, 1, 2, 0, 2]])  # the stored keys themselves


def paper_l(nn, p, tau):
    """L of Algorithm 1 with explicit sums: row i's positive is p_i, the softmax runs over p."""
    nn, p = F.normalize(nn, dim=1), F.normalize(p, dim=1)
    total = 0.0
    for i in range(nn.shape[0]):
        scores = [float(nn[i] @ p[k]) / tau for k in range(p.shape[0])]
        total += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    return total / nn.shape[0]


def test_nnclr_loss_is_algorithm_1s_l():
    g = torch.Generator().manual_seed(0)
    nn, p = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    loss, logits = nnclr_loss(nn, p, temperature=0.5)
    assert loss.item() == pytest.approx(paper_l(nn, p, 0.5), rel=1e-5)
    assert logits.shape == (4, 4)
    # a hand case: two neighbours equal to their own prediction, orthogonal to the other's:
    # logits [[2, 0], [0, 2]] at τ = 0.5, loss log(1 + e⁻²)
    loss, _ = nnclr_loss(torch.eye(2), torch.eye(2), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def model():
    torch.manual_seed(0)
    m = NNCLR(
        resnet("resnet18", in_channels=1, stem="compact", width=8),
        dim=2,
        hidden_dim=16,
        predictor_hidden_dim=16,
        queue_size=3,
        temperature=0.2,
    )
    m.support_set.queue.copy_(SUPPORT)
    return m.train()


def views(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 16, 16, generator=g)
    return [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]


def test_forward_is_algorithm_1_and_the_support_set_takes_z1_after_the_step():
    m = model()
    x1, x2 = views()
    out = m([x1, x2], index=torch.arange(10, 10 + N))
    with torch.no_grad():
        z1, z2 = m.query_encoder(x1), m.query_encoder(x2)
        p1, p2 = m.predictor(z1), m.predictor(z2)

    def nn_of(z):  # NN(z, Q) by hand: the support entry of the largest cosine
        cos = [
            [float(F.normalize(z[i], dim=0) @ F.normalize(q, dim=0)) for q in SUPPORT]
            for i in range(N)
        ]
        return SUPPORT[[max(range(3), key=row.__getitem__) for row in cos]]

    expected = paper_l(nn_of(z1), p2, 0.2) / 2 + paper_l(nn_of(z2), p1, 0.2) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # the positives come from the support set, never with gradient into it
    out.loss.backward()
    assert m.support_set.queue.grad is None and torch.equal(m.support_set.keys()[:3], SUPPORT)
    assert all(p.grad is not None for p in m.backbone.parameters())
    # update_queue(Q, z1): after the step the newest entries are view 1's normalised projections
    m.on_step_end(out, 0, 10)
    torch.testing.assert_close(m.support_set.ordered(), F.normalize(z1, dim=1)[-3:])
    assert m.support_set.index.tolist() == [13, 14, 15]  # the images they came from
    assert m.dictionary is m.support_set and m.momentum_encoder is None


def test_heads_are_the_papers():
    m = model()
    head = m.query_encoder.head  # [hidden, hidden, d] with BN after every layer, ReLU but last
    assert [type(x).__name__ for x in head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + [
        "Linear",
        "BatchNorm1d",
    ]
    assert [type(x).__name__ for x in m.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.predictor[0].out_features == 16 and m.predictor[-1].out_features == 2


def test_presets_and_options(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"nnclr-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "nnclr"
    cfg = build_config("nnclr-imagenet")
    assert (cfg.dim, cfg.hidden_dim, cfg.predictor_hidden_dim, cfg.queue_size, cfg.temperature) == (
        256,
        2048,
        4096,
        98304,
        0.1,
    )
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.epochs, cfg.augment) == (
        4096,
        "lars",
        0.3,
        1000,
        "byol-view1,byol-view2",
    )
    defaults = build_config(method="nnclr")
    assert (
        defaults.queue_size,
        defaults.temperature,
        defaults.predictor_hidden_dim,
        defaults.dim,
    ) == (98304, 0.1, 4096, 256)
    with pytest.raises(ConfigError, match="--queue-size"):
        build_config(method="nnclr", queue_size=0)


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    run_dir = resume_after_ctrl_c_continues_exactly(
        tiny_config("nnclr", dim=8, hidden_dim=16, predictor_hidden_dim=16, queue_size=24), tmp_path
    )
    state = load_checkpoint(run_dir)["model"]
    assert int(state["support_set.filled"]) == 24  # 4 steps of 16 keys filled the 24 entries
