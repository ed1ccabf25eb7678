"""Deep InfoMax: the MI estimators on hand-computed score matrices, the positive pairs of the
local objective, the prior term, and tiny runs through the training loop (resume, loading)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from run_helpers import losses, resume_after_ctrl_c_continues_exactly
from torch import nn

from mocolab.backbones import resnet, stage_maps
from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.infomax import dv_mi, infonce_mi, jsd_mi, location_scores, mi_estimate, positive_mask
from mocolab.methods.dim import DIM, MINetwork, prior_matching_losses
from mocolab.train import pretrain


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def sp(x: float) -> float:  # softplus
    return math.log1p(math.exp(x))


# A 2×2 case: globals n = 0, 1 against images m = 0, 1 (one location each); the diagonal is
# the positive pairs (scores 1 and 2), the off-diagonal the negatives (−1 and 0).
SCORES = torch.tensor([[[1.0], [-1.0]], [[0.0], [2.0]]])
EYE = torch.eye(2, dtype=torch.bool)


def test_jsd_estimator_on_a_2x2_score_matrix_by_hand():
    log2 = math.log(2)
    e_pos = ((log2 - sp(-1.0)) + (log2 - sp(-2.0))) / 2  # E_P[log 2 − sp(−T)]
    e_neg = ((sp(-1.0) - log2) + (sp(0.0) - log2)) / 2  # E_{P×Ñ}[sp(T) − log 2]
    assert jsd_mi(SCORES, EYE).item() == pytest.approx(e_pos - e_neg, abs=1e-6)
    # the paper's Eq. 4, E_P[−sp(−T)] − E_{P×Ñ}[sp(T)], is the same less 2 log 2
    eq4 = -(sp(-1.0) + sp(-2.0)) / 2 - (sp(-1.0) + sp(0.0)) / 2
    assert jsd_mi(SCORES, EYE).item() == pytest.approx(eq4 + 2 * log2, abs=1e-6)


def test_dv_estimator_on_a_2x2_score_matrix_by_hand():
    want = (1.0 + 2.0) / 2 - math.log((math.exp(-1.0) + math.exp(0.0)) / 2)  # E_P[T] − log E[e^T]
    assert dv_mi(SCORES, EYE).item() == pytest.approx(want, abs=1e-6)


def test_infonce_estimator_on_a_2x2_score_matrix_by_hand():
    row0 = 1.0 - math.log(math.exp(1.0) + math.exp(-1.0))
    row1 = 2.0 - math.log(math.exp(2.0) + math.exp(0.0))
    assert infonce_mi(SCORES, EYE).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert mi_estimate(SCORES, EYE, "infonce") == infonce_mi(SCORES, EYE)
    with pytest.raises(ValueError, match="jsd, infonce, dv"):
        mi_estimate(SCORES, EYE, "mine")


def test_infonce_over_locations_shares_the_negatives_of_every_location():
    # 2 images, 2 locations: query 0's location l competes with every location of image 1
    s = torch.tensor([[[1.0, 3.0], [0.0, -2.0]], [[0.5, 0.5], [2.0, 1.0]]])
    e = math.exp
    terms = [
        1.0 - math.log(e(1.0) + e(0.0) + e(-2.0)),
        3.0 - math.log(e(3.0) + e(0.0) + e(-2.0)),
        2.0 - math.log(e(2.0) + e(0.5) + e(0.5)),
        1.0 - math.log(e(1.0) + e(0.5) + e(0.5)),
    ]
    assert infonce_mi(s, EYE).item() == pytest.approx(sum(terms) / 4, abs=1e-6)


def test_location_scores_and_positive_mask():
    q = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    maps = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])  # 1 image, D = 2, 3 locations
    assert location_scores(q, maps).tolist() == [[[1.0, 2.0, 4.0]], [[0.0, -1.0, -1.0]]]
    # this rank's 2 queries are images 2 and 3 of the 4 gathered ones
    assert positive_mask(2, 4, offset=2).tolist() == [
        [False, False, True, False],
        [False, False, False, True],
    ]


def test_local_mi_pairs_each_location_with_its_own_images_global_vector():
    torch.manual_seed(0)
    model = DIM(
        resnet("resnet18", 1, "compact", width=8),
        dim=8,
        local_stage="layer2",
        mi_units=16,
        prior_weight=0.0,
    )
    x = torch.randn(3, 1, 16, 16)
    out = model([x], torch.Generator().manual_seed(0))
    # by hand: the parts, then the JSD over (global n, image m, location l), positives n = m
    maps = stage_maps(model.backbone, x, ("layer2", "layer4"))
    y = model.query_encoder.head(maps["layer4"].mean(dim=(2, 3)))
    g = model.global_net(y)
    local = model.local_net(maps["layer2"]).flatten(2)
    pos, neg = [], []
    for n in range(3):
        for m in range(3):
            for loc in range(local.shape[2]):
                t = (g[n] @ local[m, :, loc]).item()
                (pos if n == m else neg).append(t)
    want = sum(math.log(2) - sp(-t) for t in pos) / len(pos) - sum(
        sp(t) - math.log(2) for t in neg
    ) / len(neg)
    assert out.metrics["local_mi"].item() == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert out.loss.item() == pytest.approx(-want, rel=1e-4, abs=1e-4)  # β = 1, α = γ = 0


def test_mi_network_starts_as_a_noisy_identity_and_normalises_each_location():
    torch.manual_seed(0)
    net = MINetwork(4, 6)
    w = net.shortcut.weight.detach()[:, :, 0, 0]  # 6×4
    assert torch.equal(w.diagonal(), torch.ones(4)) and (w - torch.eye(6, 4)).abs().max() <= 0.01
    h = net(torch.randn(2, 4, 3, 3))
    assert h.shape == (2, 6, 3, 3)
    torch.testing.assert_close(h.mean(dim=1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    assert net(torch.randn(5, 4)).shape == (5, 6)  # a vector is a 1×1 map


def test_prior_term_pushes_the_encoder_towards_the_prior_and_trains_only_the_discriminator():
    disc = nn.Linear(3, 1)  # D(v) = w·v + b
    with torch.no_grad():
        disc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        disc.bias.fill_(0.25)
    wrapped = nn.Sequential(disc, nn.Flatten(0))
    y = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    enc, dis = prior_matching_losses(wrapped, y, torch.Generator().manual_seed(0))
    d_v = 0.25 + 0.5 * (1.0 - 2.0 + 0.5)  # D(sigmoid(0)) = D(0.5, 0.5, 0.5)
    assert enc.item() == pytest.approx(sp(-d_v), abs=1e-6)  # non-saturating: E[sp(−D(v))]
    u = torch.rand((1, 3), generator=torch.Generator().manual_seed(0))
    d_u = (disc(u)).item()
    assert dis.item() == pytest.approx(sp(-d_u) + sp(d_v), abs=1e-6)  # E_U[sp(−D)] + E_V[sp(D)]
    # the encoder's term: no gradient into D; it moves y along +w (D(v) grows: v looks "real")
    enc.backward(retain_graph=True)
    assert disc.weight.grad is None and disc.bias.grad is None
    assert (y.grad.sign() == -disc.weight.sign()).all()  # descent: y += η·w·(…)
    y.grad = None
    dis.backward()  # the discriminator's term: no gradient into the encoder
    assert y.grad is None and disc.weight.grad is not None


# --- configuration -----------------------------------------------------------------------------


def test_presets_and_defaults(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"dim-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "dim"
    cfg = build_config(method="dim")
    assert (
        cfg.dim,
        cfg.mi_estimator,
        cfg.local_stage,
        cfg.mi_units,
        cfg.global_weight,
        cfg.local_weight,
        cfg.prior_weight,
        cfg.augment,
    ) == (64, "jsd", "layer3", 2048, 0.0, 1.0, 0.1, "dim")


def test_bad_options_are_one_clear_line():
    with pytest.raises(ConfigError, match="--mi-estimator must be one of jsd, infonce, dv"):
        build_config(method="dim", mi_estimator="mine")
    with pytest.raises(ConfigError, match="--local-stage"):
        build_config(method="dim", local_stage="layer5")
    with pytest.raises(ConfigError, match="--global-weight"):
        build_config(method="dim", global_weight=0.0, local_weight=0.0)


# --- tiny runs ---------------------------------------------------------------------------------

TINY = dict(
    data="synthetic",
    method="dim",
    width=8,
    stem="compact",
    batch_size=16,
    crop_size=16,
    local_stage="layer2",
    mi_units=16,
    global_weight=0.5,
    optimizer="adamw",
    lr=0.004,
    progress=False,
    threads=1,
    log_every=1,
    diagnostics_every=0,
)


@pytest.mark.parametrize("estimator", ["jsd", "infonce", "dv"])
def test_tiny_run_through_the_loop_and_load_backbone(estimator, tmp_path):
    res = pretrain(
        build_config(
            **TINY, mi_estimator=estimator, max_steps=3, out_dir=str(tmp_path), run_name="run"
        ),
        final_eval=False,
    )
    curve = losses(res["run_dir"])
    assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
    backbone, info = load_backbone_and_info(res["run_dir"])
    assert info["config"]["method"] == "dim"
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    resume_after_ctrl_c_continues_exactly(TINY, tmp_path, steps=6)
