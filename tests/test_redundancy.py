"""Barlow Twins and VICReg: their losses on hand-computed cases and against the official code's
formulas, the sums over processes (two gloo ranks equal one process on the global batch), the
projector's structure, the separate LR of biases (--lr-biases), presets, and tiny runs through
the loop with exact resume."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from run_helpers import resume_after_ctrl_c_continues_exactly, tiny_config

from mocolab import distributed
from mocolab.backbones import resnet
from mocolab.checkpoint import load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.losses import barlow_twins_loss, vicreg_loss
from mocolab.methods import BarlowTwins, VICReg
from mocolab.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8


def views(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    return [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]


def backbone():
    return resnet("resnet18", in_channels=1, stem="compact", width=8)


# --- Barlow Twins ---------------------------------------------------------------------------


def test_barlow_twins_loss_of_a_two_by_two_case_by_hand():
    # Two images, two features. Standardised over the batch (mean 0, std 1, as a BN without
    # affine parameters): z1 = [[3, 1], [1, 2]] → [[1, −1], [−1, 1]], z2 = [[0, 5], [2, 7]] →
    # [[−1, −1], [1, 1]]. C = z̃1ᵀz̃2 / 2 = [[−1, −1], [1, 1]].
    z1 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    z2 = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    c = z1.T @ z2 / 2
    assert c.tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    loss, invariance, redundancy = barlow_twins_loss(c, off_diagonal_weight=0.0051)
    assert invariance.item() == 4.0  # (1 − (−1))² + (1 − 1)²
    assert redundancy.item() == 2.0  # (−1)² + 1²
    assert loss.item() == pytest.approx(4.0 + 0.0051 * 2.0)
    # a perfect pair of views: C = identity, no loss
    assert barlow_twins_loss(torch.eye(3), 1.0)[0].item() == 0.0


def official_barlow_twins(z1, z2, lambd):
    """facebookresearch/barlowtwins main.py, BarlowTwins.forward after the projector, with the
    off-diagonal written as the matrix minus its diagonal."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False)
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambd * off_diag


def test_barlow_twins_forward_is_the_official_loss_of_its_projections():
    torch.manual_seed(0)
    model = BarlowTwins(backbone(), dim=16, hidden_dim=32, off_diagonal_weight=0.02).train()
    x1, x2 = views()
    out = model([x1, x2])
    head = model.query_encoder.head
    # the official projector: Linear (no bias) → BN → ReLU, twice, then Linear (no bias); its
    # self.bn (BN without affine) is the projector's last layer here
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + [
        "Linear",
        "BatchNorm1d",
    ]
    assert all(m.bias is None for m in head if isinstance(m, torch.nn.Linear))
    assert not head[-1].affine
    with torch.no_grad():
        before_bn = torch.nn.Sequential(model.query_encoder.backbone, *list(head)[:-1])
        z1, z2 = before_bn(x1), before_bn(x2)
    expected = official_barlow_twins(z1, z2, 0.02)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


# --- VICReg ---------------------------------------------------------------------------------


def test_vicreg_terms_by_hand():
    z1 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 5.0]])
    z2 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    loss, s, v, c = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    # invariance: mean over the 3×2 entries of (z1 − z2)² = (0 + 0 + 1 + 0 + 4 + 9) / 6
    assert s.item() == pytest.approx(14 / 6)
    # variance: z1's unbiased variances are 1 and 7 (stds ≥ 1: no hinge); z2's first dimension
    # is constant, std √(0 + 1e-4) = 0.01, hinge 0.99, the second has variance 1. v = ½·(0 + 0.99/2)
    assert v.item() == pytest.approx(0.99 / 4)
    # covariance: z1's centred dimensions (−1, 0, 1) and (−2, −1, 3): Cov_01 = (2 + 0 + 3)/2 = 2.5,
    # twice off the diagonal: (2.5² + 2.5²)/d = 6.25; z2's are uncorrelated (one is constant)
    assert c.item() == pytest.approx(6.25)
    assert loss.item() == pytest.approx(25 * 14 / 6 + 25 * 0.99 / 4 + 6.25)


def official_vicreg(x, y, sim, std, cov):
    """facebookresearch/vicreg main_vicreg.py, VICReg.forward after the projector (one process),
    with the off-diagonal written as the matrix minus its diagonal."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x, cov_y = (x.T @ x) / (n - 1), (y.T @ y) / (n - 1)

    def off(m):
        return m - torch.diag(torch.diagonal(m))

    cov_loss = off(cov_x).pow(2).sum() / d + off(cov_y).pow(2).sum() / d
    return sim * repr_loss + std * std_loss + cov * cov_loss


def test_vicreg_forward_is_the_official_loss_of_its_embeddings():
    torch.manual_seed(0)
    model = VICReg(backbone(), dim=16, hidden_dim=32, invariance_weight=20.0).train()
    x1, x2 = views()
    out = model([x1, x2])
    expander = model.query_encoder.head
    # the official Projector: the last Linear has no bias, no BN after it
    assert isinstance(expander[-1], torch.nn.Linear) and expander[-1].bias is None
    with torch.no_grad():
        z1, z2 = model.query_encoder(x1), model.query_encoder(x2)
    expected = official_vicreg(z1, z2, 20.0, 25.0, 1.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert set(out.metrics) == {"invariance", "variance", "covariance"}


# --- over processes: two gloo ranks equal one process on the global batch ------------------

WORLD, B, D = 2, 6, 4


def _inputs():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, D, generator=g)
    return w, torch.randn(WORLD * B, 3, generator=g), torch.randn(WORLD * B, 3, generator=g)


def _bt(z1, z2, batch):
    c = distributed.all_reduce_with_grad(z1.T @ z2 / batch)
    return barlow_twins_loss(c, 0.1)[0]


def _vicreg(z1, z2):
    gathered = (distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2))
    return vicreg_loss(z1, z2, candidates=gathered)[0]


def _ranks_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        w0, x1, x2 = _inputs()
        rows = slice(rank * B, (rank + 1) * B)
        out = {}
        for name in ("bt", "vicreg"):
            w = w0.clone().requires_grad_(True)
            z1, z2 = x1[rows] @ w, x2[rows] @ w
            loss = _bt(z1, z2, WORLD * B) if name == "bt" else _vicreg(z1, z2)
            loss.backward()
            out[name] = (loss.detach(), w.grad)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_ranks_compute_one_process_loss_and_gradient_on_the_global_batch(tmp_path):
    """Barlow Twins sums C over ranks (with gradient), VICReg gathers the embeddings for the
    variance and covariance; DDP then averages the ranks' gradients: the result must be one
    process's loss and gradient on the 2B images (a plain all_reduce, as the official
    Barlow Twins code, would give half the gradient)."""
    mp.spawn(_ranks_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    w0, x1, x2 = _inputs()
    for name in ("bt", "vicreg"):
        w = w0.clone().requires_grad_(True)
        z1, z2 = x1 @ w, x2 @ w
        loss = _bt(z1, z2, WORLD * B) if name == "bt" else _vicreg(z1, z2)
        loss.backward()
        mean_loss = sum(r[name][0] for r in ranks) / WORLD
        mean_grad = sum(r[name][1] for r in ranks) / WORLD  # DDP's average
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean_grad, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["bt"][0], ranks[1]["bt"][0])  # one C, one loss


# --- the LR of biases and BN parameters (Barlow Twins' --learning-rate-biases) --------------


def test_lr_biases_puts_one_dimensional_parameters_in_a_scaled_group():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = list(model.parameters())
    plain = build_optimizer("lars", params, lr=0.1, momentum=0.9, weight_decay=0.0)
    assert len(plain.param_groups) == 1
    opt = build_optimizer(
        "lars", params, lr=0.1, momentum=0.9, weight_decay=0.0, bias_lr_scale=0.024
    )
    weights, others = opt.param_groups
    assert [p.ndim for p in weights["params"]] == [2] and "lr_scale" not in weights
    assert [p.ndim for p in others["params"]] == [1, 1, 1] and others["lr_scale"] == 0.024
    with pytest.raises(ConfigError, match="--lr-biases"):
        build_config(method="barlowtwins", lr_biases=0.0)


# --- presets, tiny runs, exact resume ---------------------------------------------------------


@pytest.mark.parametrize("name", ["barlowtwins", "vicreg"])
def test_presets(name, capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"{name}-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == name
    cfg = build_config(f"{name}-imagenet")
    assert (cfg.arch, cfg.dim, cfg.hidden_dim, cfg.head_layers) == ("resnet50", 8192, 8192, 3)
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.weight_decay) == (2048, "lars", 0.2, 1e-6)
    assert (cfg.warmup_epochs, cfg.epochs, cfg.augment) == (10, 1000, "byol-view1,byol-view2")
    if name == "barlowtwins":
        assert (cfg.off_diagonal_weight, cfg.lr_biases) == (0.0051, 0.0048)
    else:
        assert (cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight) == (25, 25, 1)
    defaults = build_config(method=name)  # the official code's defaults
    assert (defaults.dim, defaults.head_layers, defaults.augment) == (
        8192,
        3,
        "byol-view1,byol-view2",
    )


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--off-diagonal-weight"):
        build_config(method="barlowtwins", off_diagonal_weight=-1.0)
    with pytest.raises(ConfigError, match="--variance-weight"):
        build_config(method="vicreg", variance_weight=-1.0)


def test_barlow_twins_resumes_exactly_and_biases_get_their_own_lr(tmp_path):
    tiny = tiny_config(
        "barlowtwins", dim=16, hidden_dim=16, optimizer="lars", lr=0.2, lr_biases=0.0048
    )
    run_dir = resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
    groups = load_checkpoint(run_dir)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr_scale"] == pytest.approx(0.024)
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.024)
    assert math.isfinite(groups[0]["lr"]) and groups[0]["lr"] > 0


def test_vicreg_resumes_exactly(tmp_path):
    resume_after_ctrl_c_continues_exactly(tiny_config("vicreg", dim=16, hidden_dim=16), tmp_path)
