"""AMDIM: tanh clipping, the score regulariser, the NCE over locations on a hand-computed
2-image case, the positive locations across views, and tiny runs through the training loop."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from run_helpers import losses, resume_after_ctrl_c_continues_exactly

from mocolab.backbones import resnet
from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.infomax import location_nce, tanh_clip
from mocolab.methods.amdim import AMDIM, random_locations
from mocolab.train import pretrain


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_tanh_clip_by_hand():
    s = torch.tensor([0.0, 5.0, 20.0, -40.0, 1000.0])
    want = [0.0, 20 * math.tanh(0.25), 20 * math.tanh(1.0), -20 * math.tanh(2.0), 20.0]
    assert tanh_clip(s, 20.0).tolist() == pytest.approx(want, abs=1e-5)
    assert torch.equal(tanh_clip(s, None), s)


# Two images with 2×2 maps of 1-d features (L = 4 locations), one 1-d query per image.
QUERIES = torch.tensor([[1.0], [2.0]])
MAPS = torch.tensor([[[0.5, -0.5, 1.0, 0.0]], [[0.0, 1.0, -1.0, 0.5]]])


def test_location_nce_on_two_images_with_2x2_maps_by_hand():
    e = math.exp
    # query 0 (q = 1): positives are image 0's 4 locations (scores 0.5, −0.5, 1, 0); its
    # negatives image 1's (0, 1, −1, 0.5). Query 1 (q = 2): positives image 1's (0, 2, −2, 1),
    # negatives image 0's (1, −1, 2, 0). D = 1: no scaling; no clipping.
    neg0 = e(0.0) + e(1.0) + e(-1.0) + e(0.5)
    neg1 = e(1.0) + e(-1.0) + e(2.0) + e(0.0)
    terms = [-(p - math.log(e(p) + neg0)) for p in (0.5, -0.5, 1.0, 0.0)] + [
        -(p - math.log(e(p) + neg1)) for p in (0.0, 2.0, -2.0, 1.0)
    ]
    loss, penalty = location_nce(QUERIES, MAPS, torch.eye(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(sum(terms) / 8, abs=1e-6)
    squares = [0.25, 0.25, 1.0, 0.0, 0.0, 1.0, 1.0, 0.25, 0.0, 4.0, 4.0, 1.0, 1.0, 1.0, 4.0, 0.0]
    assert penalty.item() == pytest.approx(sum(squares) / 16, abs=1e-6)  # mean s² of all 16


def test_location_nce_scales_by_root_d_and_clips_before_the_softmax():
    q, maps = QUERIES.repeat(1, 4), MAPS.repeat(1, 4, 1)  # D = 4: every score ×4, then /√4
    loss4, pen4 = location_nce(q, maps, torch.eye(2, dtype=torch.bool))
    loss2, pen2 = location_nce(2 * QUERIES, MAPS, torch.eye(2, dtype=torch.bool))  # ×2, D = 1
    torch.testing.assert_close((loss4, pen4), (loss2, pen2))
    # clipped at c = 1: the scores become tanh(s); the penalty stays on the raw scores
    clipped, pen = location_nce(QUERIES, MAPS, torch.eye(2, dtype=torch.bool), clip=1.0)
    e = math.exp
    s0 = [math.tanh(v) for v in (0.5, -0.5, 1.0, 0.0)]
    n0 = sum(e(math.tanh(v)) for v in (0.0, 1.0, -1.0, 0.5))
    s1 = [math.tanh(v) for v in (0.0, 2.0, -2.0, 1.0)]
    n1 = sum(e(math.tanh(v)) for v in (1.0, -1.0, 2.0, 0.0))
    want = [-(p - math.log(e(p) + n0)) for p in s0] + [-(p - math.log(e(p) + n1)) for p in s1]
    assert clipped.item() == pytest.approx(sum(want) / 8, abs=1e-6)
    _, raw = location_nce(QUERIES, MAPS, torch.eye(2, dtype=torch.bool))
    assert pen.item() == raw.item()


def test_random_locations_pick_one_location_per_image_from_the_generator():
    maps = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)
    picked = random_locations(maps, torch.Generator().manual_seed(1))
    where = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(picked, torch.stack([maps[0, :, where[0]], maps[1, :, where[1]]]))


def test_views_predict_each_others_locations_and_the_loss_adds_the_regulariser():
    torch.manual_seed(0)
    model = AMDIM(
        resnet("resnet18", 3, "compact", width=8),
        dim=16,
        local_stages=("layer3", "layer2"),
        score_clip=20.0,
        score_penalty=0.5,
    )
    x1, x2 = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    out = model([x1, x2], torch.Generator().manual_seed(3))
    # by hand from the parts: view 1 → view 2 and back, the positives the same image
    (g1, c1, f1), (g2, c2, f2) = model.embed(x1), model.embed(x2)
    gen = torch.Generator().manual_seed(3)
    s1, s2 = random_locations(c1, gen), random_locations(c2, gen)

    def nce(q, maps):  # −mean log-softmax of each positive location, 20·tanh(s/20), s = q·c/√D
        total, squares = [], []
        for n in range(3):
            s = torch.einsum("d,mdl->ml", q[n], maps) / 4.0
            squares.append(s.pow(2).flatten())
            s = 20 * torch.tanh(s / 20)
            negs = torch.cat([s[m] for m in range(3) if m != n])
            for p in s[n]:
                total.append(-(p - torch.logsumexp(torch.cat([p[None], negs]), 0)))
        return torch.stack(total).mean(), torch.cat(squares).mean()

    pairs = {
        "nce_global_coarse": [(g1, c2), (g2, c1)],
        "nce_global_fine": [(g1, f2), (g2, f1)],
        "nce_coarse_coarse": [(s1, c2), (s2, c1)],
    }
    penalty = 0.0
    for name, ((qa, ta), (qb, tb)) in pairs.items():
        (la, pa), (lb, pb) = nce(qa, ta), nce(qb, tb)
        assert out.metrics[name].item() == pytest.approx(0.5 * (la + lb).item(), rel=1e-4)
        penalty += 0.5 * 0.5 * (pa + pb).item()  # λ/2 · Σ mean(s²)
    assert out.metrics["score_penalty"].item() == pytest.approx(penalty, rel=1e-4)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.metrics.values()), rel=1e-5)


def test_the_score_regulariser_weighs_5e_2_as_the_official_code_at_head():
    """``costs.py`` at HEAD: ``lgt_reg = 5e-2 * (raw_scores**2.).mean()`` per prediction, the six
    averaged in pairs: ``0.5·Σ`` — 5e-2/2 times the sum of the six mean squared scores."""
    torch.manual_seed(0)
    model = AMDIM(
        resnet("resnet18", 3, "compact", width=8), dim=16, local_stages=("layer3", "layer2")
    )
    assert model.score_penalty == 5e-2
    x1, x2 = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    out = model([x1, x2], torch.Generator().manual_seed(3))
    (g1, c1, f1), (g2, c2, f2) = model.embed(x1), model.embed(x2)
    gen = torch.Generator().manual_seed(3)
    s1, s2 = random_locations(c1, gen), random_locations(c2, gen)
    squares = [
        (torch.einsum("nd,mdl->nml", q, t) / 4.0).pow(2).mean()  # s = q·c/√16
        for q, t in [(g1, c2), (g2, c1), (g1, f2), (g2, f1), (s1, c2), (s2, c1)]
    ]
    want = 0.5 * 5e-2 * sum(v.item() for v in squares)
    assert out.metrics["score_penalty"].item() == pytest.approx(want, rel=1e-4)


def test_the_fake_rkhs_networks_start_with_their_second_conv_at_zero():
    """``FakeRKHSConvNet.init_weights`` (``model.py``, called from ``train.py``): the block's
    second 1×1 conv is 0, so each embedding starts as BN(shortcut(x)) (plus the block's bias)."""
    torch.manual_seed(0)
    model = AMDIM(
        resnet("resnet18", 3, "compact", width=8), dim=16, local_stages=("layer3", "layer2")
    )
    nets = [model.query_encoder.head, model.coarse_net, model.fine_net]
    for net in nets:
        last = net.block[-1]
        assert torch.equal(last.weight, torch.zeros_like(last.weight))
        first = net.block[0]
        assert first.weight.abs().sum() > 0  # the first conv keeps its (Kaiming) init
        h = torch.randn(4, net.shortcut.in_channels, 3, 3)
        want = net.norm(net.shortcut(h) + last.bias.view(1, -1, 1, 1))
        torch.testing.assert_close(net(h), want)


# --- configuration -----------------------------------------------------------------------------


def test_presets_and_defaults(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"amdim-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "amdim"
    imagenet = build_config("amdim-imagenet")
    assert (imagenet.crop_size, imagenet.dim, imagenet.batch_size) == (128, 1536, 480)
    cfg = build_config(method="amdim")
    assert (cfg.dim, cfg.local_stages, cfg.score_clip, cfg.score_penalty, cfg.augment) == (
        1024,
        "layer4,layer3",
        20.0,
        0.05,
        "amdim",
    )
    assert imagenet.score_penalty == 0.05


def test_bad_options_are_one_clear_line():
    with pytest.raises(ConfigError, match="--local-stages must name two of"):
        build_config(method="amdim", local_stages="layer3")
    with pytest.raises(ConfigError, match="--score-clip"):
        build_config(method="amdim", score_clip=-1.0)


# --- tiny runs ---------------------------------------------------------------------------------

TINY = dict(
    data="synthetic",
    method="amdim",
    width=8,
    stem="compact",
    batch_size=16,
    crop_size=16,
    local_stages="layer3,layer2",
    dim=32,
    optimizer="adamw",
    lr=0.004,
    progress=False,
    threads=1,
    log_every=1,
    diagnostics_every=0,
)


def test_tiny_run_through_the_loop_and_load_backbone(tmp_path):
    res = pretrain(
        build_config(**TINY, max_steps=3, out_dir=str(tmp_path), run_name="run"), final_eval=False
    )
    curve = losses(res["run_dir"])
    assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
    backbone, info = load_backbone_and_info(res["run_dir"])
    assert info["config"]["method"] == "amdim"
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    resume_after_ctrl_c_continues_exactly(TINY, tmp_path, steps=6)
