"""--optimizer: LARS against a single step computed by hand; SGD stays the default."""

import math

import pytest
import torch
from torch import nn

from mocolab.config import ConfigError, build_config
from mocolab.optim import LARS, build_optimizer


def test_lars_single_step_by_hand_as_the_official_code():
    """MoCo v3's moco/optimizer.py and SimCLR's lars_optimizer.py: dp = g + wd·w first, then
    trust η‖w‖/‖dp‖: here u = (0.6 + 0.3, 0.8 + 0.4) = (0.9, 1.2), ‖u‖ = 1.5."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))  # a bias: excluded
    w.grad = torch.tensor([[0.6, 0.8]])  # ‖g‖ = 1
    b.grad = torch.tensor([0.5, 0.25])
    lr, eta, wd = 0.5, 0.01, 0.1
    LARS([w, b], lr=lr, momentum=0.9, weight_decay=wd, eta=eta).step()
    trust = 0.01 * 5.0 / 1.5  # η‖w‖ / ‖g + wd·w‖
    expected_w = [3.0 - lr * trust * 0.9, 4.0 - lr * trust * 1.2]
    expected_b = [1.0 - lr * 0.5, -1.0 - lr * 0.25]  # no adaptation, no decay
    assert w.detach().flatten().tolist() == pytest.approx(expected_w, rel=1e-6)
    assert b.detach().tolist() == pytest.approx(expected_b, rel=1e-6)


def test_lars_official_trust_where_only_the_decay_moves_the_weight():
    """g = 0, wd > 0: the official code's update norm is wd‖w‖ > 0, so trust = η/wd."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    w.grad = torch.zeros(1, 2)
    LARS([w], lr=1.0, momentum=0.0, weight_decay=0.5, eta=0.01).step()
    # u = 0.5·w = (1.5, 2), trust = 0.01·5 / 2.5 = 0.02, step = 0.02·u = (0.03, 0.04)
    assert w.detach().flatten().tolist() == pytest.approx([2.97, 3.96], rel=1e-6)


def test_lars_paper_trust_single_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))  # a bias: excluded
    w.grad = torch.tensor([[0.6, 0.8]])  # ‖g‖ = 1
    b.grad = torch.tensor([0.5, 0.25])
    lr, eta, wd = 0.5, 0.01, 0.1
    LARS([w, b], lr=lr, momentum=0.9, weight_decay=wd, eta=eta, trust="you").step()
    trust = eta * 5.0 / (1.0 + wd * 5.0)  # η‖w‖ / (‖g‖ + wd‖w‖), You et al. Alg. 1
    expected_w = [3.0 - lr * trust * (0.6 + wd * 3.0), 4.0 - lr * trust * (0.8 + wd * 4.0)]
    expected_b = [1.0 - lr * 0.5, -1.0 - lr * 0.25]  # no adaptation, no decay
    assert w.detach().flatten().tolist() == pytest.approx(expected_w, rel=1e-6)
    assert b.detach().tolist() == pytest.approx(expected_b, rel=1e-6)


def test_lars_second_step_uses_momentum_and_zero_norms_fall_back():
    w = nn.Parameter(torch.zeros(2, 2))  # ‖w‖ = 0: trust ratio 1
    opt = LARS([w], lr=1.0, momentum=0.5, weight_decay=0.0, eta=0.001)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(w.detach(), -torch.ones(2, 2))
    w.grad = torch.zeros(2, 2)  # ‖g‖ = 0: trust 1, the step is the momentum alone
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -1.5))


def test_build_optimizer_kinds_and_config():
    params = [nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))]
    sgd = build_optimizer("sgd", params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["weight_decay"] == 1e-4
    adamw = build_optimizer("adamw", params, lr=0.1, momentum=0.9, weight_decay=0.05)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert isinstance(build_optimizer("lars", params, lr=0.1, momentum=0.9, weight_decay=0), LARS)
    assert build_config(data="synthetic").optimizer == "sgd"
    with pytest.raises(ConfigError, match="--optimizer"):
        build_config(optimizer="adam")
    assert not math.isnan(build_config(optimizer="lars").lars_eta)
    assert build_config(optimizer="lars").lars_trust == "update"  # the official codes
    with pytest.raises(ConfigError, match="--lars-trust"):
        build_config(optimizer="lars", lars_trust="norm")
    with pytest.raises(ValueError, match="trust"):
        LARS(params, trust="norm")
    lars = build_optimizer("lars", params, lr=0.1, momentum=0.9, weight_decay=0, lars_trust="you")
    assert lars.defaults["trust"] == "you"


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_a_methods_no_weight_decay_parameters_and_adamw_betas(name):
    w, b, c = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3, 2))
    opt = build_optimizer(name, [w, b, c], lr=0.1, momentum=0.9, weight_decay=0.5, no_decay=[c],
                          betas=(0.9, 0.95))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(c)] == 0.0 and decay[id(w)] == 0.5  # MSN's prototypes spared
    if name == "adamw":  # MAE's AdamW(betas=(0.9, 0.95)); biases spared as before
        assert decay[id(b)] == 0.0 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert build_config(data="synthetic").adamw_betas == (0.9, 0.999)
    with pytest.raises(ConfigError, match="--adamw-betas"):
        build_config(adamw_betas=[0.9, 1.5])


@pytest.mark.parametrize("name", ["lars", "adamw"])
def test_tiny_pretrain_with_optimizer(name, tmp_path):
    from mocolab.train import pretrain

    cfg = build_config(data="synthetic", method="simclr", optimizer=name, width=8, stem="compact",
                       batch_size=32, bn_splits=4, epochs=1, max_steps=2, progress=False, threads=1,
                       diagnostics_every=0, out_dir=str(tmp_path), run_name="r")
    assert pretrain(cfg, final_eval=False)["step"] == 2
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["optimizer"] == name and ckpt["optimizer"]["state"]
