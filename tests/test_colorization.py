"""Colorization: the in-gamut ab bins, the bin of a known colour, the soft encoding, the
class-rebalancing weights and the annealed mean against hand-computed values, the running
prior, the grayscale refusal, and tiny runs through the loop."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from run_helpers import resume_after_ctrl_c_continues_exactly, tiny_config

from mocolab.backbones import resnet
from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods import build_method
from mocolab.methods.colorization import (
    Colorization,
    LightnessBackbone,
    ab_bins,
    annealed_mean,
    colorization_loss,
    nearest_bins,
    nongray_mask,
    rebalance_weights,
    smooth_prior,
    soft_encode,
)
from mocolab.methods.lab import lab_to_rgb, rgb_to_lab

pytestmark = pytest.mark.usefixtures("one_thread")

RED_LAB = (53.24, 80.09, 67.20)  # sRGB (1, 0, 0) in CIE Lab, D65 (tests/test_cmc.py)


def test_in_gamut_bins_are_the_grid_cells_that_hold_some_srgb_colour():
    centres = ab_bins()
    assert centres.shape == (261, 2)  # the official pts_in_hull.npy has 313: see the docstring
    assert torch.equal(centres, torch.round(centres / 10) * 10)  # multiples of 10
    assert torch.equal(centres, ab_bins())  # deterministic
    keys = [tuple(c) for c in centres.tolist()]
    assert keys == sorted(keys) and len(set(keys)) == 261
    assert (0.0, 0.0) in keys and (80.0, 70.0) in keys  # gray, pure red
    # sRGB's extremes: a from −86.18 (green) to 98.23 (magenta), b from −107.86 (blue) to 94.48
    assert centres[:, 0].min() == -90 and centres[:, 0].max() == 100
    assert centres[:, 1].min() == -110 and centres[:, 1].max() == 90
    # the cell of every sRGB colour is a bin: a random colour's nearest centre is ≤ 5 away in a and b
    rgb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ab = rgb_to_lab(rgb)[0, 1:].reshape(2, -1).T
    _, index = nearest_bins(ab, centres, 1)
    d = (ab - centres[index[:, 0]]).abs()
    assert d.max() <= 5 + 1e-4  # every random colour's own cell is a bin


def test_pure_red_falls_in_the_bin_centred_at_80_70():
    red = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).view(1, 3)
    torch.testing.assert_close(red[0], torch.tensor(RED_LAB), atol=0.01, rtol=0)
    centres = ab_bins()
    d2, index = nearest_bins(red[:, 1:], centres, 1)
    keys = [tuple(c) for c in centres.tolist()]
    assert centres[index[0, 0]].tolist() == [80.0, 70.0]
    assert int(index[0, 0]) == keys.index((80.0, 70.0))
    # (80.09 − 80)² + (67.20 − 70)²
    assert abs(float(d2[0, 0]) - (0.09**2 + 2.80**2)) < 0.05


def test_the_official_soft_encoding_spreads_one_colour_over_its_10_nearest_bins():
    """``NNEncLayer``: ``NN = 10``, ``sigma = 5.``, weights ``exp(−d²/(2σ²))`` normalised."""
    centres = ab_bins()
    keys = [tuple(c) for c in centres.tolist()]
    z = soft_encode(torch.tensor([[3.0, 1.0]]), centres)  # the default: 10 bins
    # the 10 bins nearest (3, 1) and their squared distances, by hand; the 11th is 370 away
    d2 = {(0, 0): 10, (10, 0): 50, (0, 10): 90, (0, -10): 130, (10, 10): 130, (-10, 0): 170,
          (10, -10): 170, (-10, 10): 250, (20, 0): 290, (-10, -10): 290}  # fmt: skip
    g = {c: math.exp(-d / (2 * 5.0**2)) for c, d in d2.items()}
    want = torch.zeros(len(keys))
    for c, v in g.items():
        want[keys.index((float(c[0]), float(c[1])))] = v / sum(g.values())
    torch.testing.assert_close(z[0], want, atol=1e-6, rtol=0)
    assert int((z > 0).sum()) == 10
    # the bin (0, 0) gets exp(−0.2)/Σ = 0.5182 (with 5 bins, the paper's text: 0.5457)
    assert abs(float(z[0, keys.index((0.0, 0.0))]) - 0.5182) < 1e-4
    five = soft_encode(torch.tensor([[3.0, 1.0]]), centres, k=5)
    assert abs(float(five[0, keys.index((0.0, 0.0))]) - 0.5457) < 1e-4


def test_soft_encoding_is_a_gaussian_over_the_k_nearest_bins():
    centres = torch.tensor([[a, b] for a in (0.0, 10.0, 20.0) for b in (0.0, 10.0, 20.0)])
    ab = torch.tensor([[3.0, 1.0]])
    z = soft_encode(ab, centres, k=5, sigma=5.0)
    d2 = [(3 - a) ** 2 + (1 - b) ** 2 for a, b in centres.tolist()]
    nearest = sorted(range(9), key=lambda q: d2[q])[:5]  # (0,0) 10, (0,10) 90, (10,0) 50, ...
    assert sorted(nearest) == [0, 1, 3, 4, 6]
    g = {q: math.exp(-d2[q] / (2 * 5.0**2)) for q in nearest}
    want = [g[q] / sum(g.values()) if q in g else 0.0 for q in range(9)]
    torch.testing.assert_close(z[0], torch.tensor(want), atol=1e-6, rtol=0)
    assert abs(float(z.sum()) - 1) < 1e-6 and int((z > 0).sum()) == 5


def test_rebalancing_weights_on_a_hand_made_prior():
    prior = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    w = rebalance_weights(prior, lam=0.5)
    # u = 1/3 on the 3 bins seen; mix = 0.5·p + 0.5·u; w ∝ 1/mix; Σ p·w = 1
    mix = [0.5 * 0.5 + 0.5 / 3, 0.5 * 0.25 + 0.5 / 3, 0.5 * 0.25 + 0.5 / 3]
    raw = [1 / m for m in mix]
    scale = sum(p * r for p, r in zip([0.5, 0.25, 0.25], raw))
    torch.testing.assert_close(
        w, torch.tensor([r / scale for r in raw] + [0.0], dtype=torch.float64)
    )
    assert abs(float((prior * w).sum()) - 1) < 1e-12
    assert w[1] > w[0]  # the rarer colour weighs more
    # λ = 1: uniform mix, every seen bin the same weight (no rebalancing)
    torch.testing.assert_close(
        rebalance_weights(prior, 1.0)[:3], torch.ones(3, dtype=torch.float64)
    )


def test_prior_smoothing_is_a_gaussian_over_the_bins():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 30.0]])
    p = smooth_prior(torch.tensor([2.0, 0.0, 0.0]), centres, sigma=5.0)
    k = [1.0, math.exp(-100 / 50), math.exp(-900 / 50)]
    torch.testing.assert_close(p, torch.tensor([v / sum(k) for v in k], dtype=torch.float64))


def test_annealed_mean_is_the_mean_at_t1_and_the_mode_as_t_goes_to_0():
    centres = torch.tensor([[0.0, 0.0], [10.0, 20.0], [-30.0, 40.0]])
    logits = torch.tensor([0.2, 1.0, 0.5]).view(1, 3, 1, 1)
    p = [math.exp(v) for v in (0.2, 1.0, 0.5)]
    p = [v / sum(p) for v in p]
    mean = [sum(pi * c[j] for pi, c in zip(p, centres.tolist())) for j in (0, 1)]
    torch.testing.assert_close(annealed_mean(logits, centres, 1.0).view(2), torch.tensor(mean))
    torch.testing.assert_close(
        annealed_mean(logits, centres, 1e-3).view(2), torch.tensor([10.0, 20.0])
    )
    # the default is the released network's: its logits scaled by 2.606 before the softmax
    f = [math.exp(2.606 * v) for v in (0.2, 1.0, 0.5)]
    released = [sum(fi * c[j] for fi, c in zip(f, centres.tolist())) / sum(f) for j in (0, 1)]
    torch.testing.assert_close(annealed_mean(logits, centres).view(2), torch.tensor(released))
    # T = 0.38 (the paper's) lies between: nearer the mode than the mean is
    t = annealed_mean(logits, centres, 0.38).view(2)
    assert (t - torch.tensor([10.0, 20.0])).norm() < (
        torch.tensor(mean) - torch.tensor([10.0, 20.0])
    ).norm()


def test_loss_is_the_rebalanced_cross_entropy_of_eq_2():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    w = torch.tensor([2.0, 0.5, 1.5])

    def log_softmax(row):
        s = math.log(sum(math.exp(v) for v in row))
        return [v - s for v in row]

    rows = [(logits[i].tolist(), target[i].tolist()) for i in range(2)]
    # v(Z) = w of the target's argmax bin: bin 0 (2.0) then bin 2 (1.5)
    want = (
        -(
            2.0 * sum(z * q for z, q in zip(rows[0][1], log_softmax(rows[0][0])))
            + 1.5 * sum(z * q for z, q in zip(rows[1][1], log_softmax(rows[1][0])))
        )
        / 2
    )
    assert abs(colorization_loss(logits, target, w).item() - want) < 1e-6


def test_an_image_is_gray_when_no_ab_value_exceeds_5():
    """``NonGrayMaskLayer``: ``thresh = 5``, 1 if any ``|a|`` or ``|b|`` of the image > 5."""
    ab = torch.zeros(4, 2, 3, 3)
    ab[1, 0, 2, 2] = 5.0  # at the threshold: still gray
    ab[2, 1, 0, 1] = -5.01  # one value beyond it in b: colour
    ab[3] = 4.9  # faint everywhere: gray
    assert nongray_mask(ab).tolist() == [False, False, True, False]


def test_a_gray_image_has_loss_weight_zero():
    """The official ``prior_boost_nongray``: a gray image's locations weigh 0 (its logits get no
    gradient); a colour image's weigh their rebalancing weight."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0] = x[0].mean(dim=0, keepdim=True)  # R = G = B: a = b = 0
    seen: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["o"] = output

    for gray_mask, gray_grad in ((True, False), (False, True)):
        torch.manual_seed(0)
        model = Colorization(
            LightnessBackbone(resnet("resnet18", 1, "compact", width=8)), gray_mask=gray_mask
        ).train()
        model.decoder.register_forward_hook(keep)
        out = model([x], torch.Generator())
        out.loss.backward()
        grad = seen["o"].grad  # N×Q×4×4: the logits' gradient
        assert bool(grad[0].abs().sum() > 0) is gray_grad
        assert grad[1].abs().sum() > 0
    torch.manual_seed(0)  # a batch of gray images only: the loss is 0
    model = Colorization(LightnessBackbone(resnet("resnet18", 1, "compact", width=8)))
    assert model([x[[0, 0]]], torch.Generator()).loss.item() == 0.0


def small_model() -> Colorization:
    torch.manual_seed(0)
    return Colorization(LightnessBackbone(resnet("resnet18", 1, "compact", width=8)))


def test_the_prior_is_a_histogram_of_the_hard_bins_smoothed_once():
    """The official prior: the empirical distribution of the quantised colours, smoothed by
    the σ = 5 Gaussian (once), then mixed with the uniform (λ = 0.5)."""
    model = small_model().train()
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    out = model([red], torch.Generator())
    model.on_step_end(out, 0, 10)
    keys = [tuple(c) for c in model.centres.tolist()]
    want = torch.zeros(len(keys), dtype=torch.float64)
    want[keys.index((80.0, 70.0))] = 32  # 2 × 4×4 target locations, all in pure red's bin
    assert torch.equal(model.prior_counts, want)
    weights = model.weights(model.prior_counts)
    torch.testing.assert_close(weights, rebalance_weights(smooth_prior(want, model.centres, 5.0)))


def test_the_prior_histogram_counts_every_target_location_after_the_step():
    model = small_model().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model([x], torch.Generator().manual_seed(0))
    assert float(model.prior_counts.sum()) == 0  # the forward pass writes nothing
    model.on_step_end(out, 0, 10)
    assert abs(float(model.prior_counts.sum()) - 2 * 4 * 4) < 1e-6  # N · (16/4)² soft targets
    out.loss.backward()
    assert model.backbone.encoder.conv1.weight.grad.abs().sum() > 0


def test_the_backbone_sees_the_normalised_l_channel_of_rgb():
    seen = {}

    class Probe(torch.nn.Module):
        num_features = 1

        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(1, 2, 3)).unsqueeze(1)

    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    backbone = LightnessBackbone(Probe(), mean, std)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    backbone((red - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert seen["x"].shape == (1, 1, 2, 2)
    torch.testing.assert_close(
        seen["x"], torch.full((1, 1, 2, 2), 53.24 / 50 - 1), atol=2e-4, rtol=0
    )


def test_colorize_gives_rgb_pictures_and_lab_to_rgb_inverts_rgb_to_lab():
    model = small_model().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # mean 0, std 1 inputs
    rgb = model.colorize(x)
    assert rgb.shape == (2, 3, 16, 16) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    torch.testing.assert_close(
        lab_to_rgb(rgb_to_lab(x.clamp(0, 1))), x.clamp(0, 1), atol=1e-4, rtol=0
    )


def test_grayscale_data_is_refused_with_a_clear_error():
    cfg = build_config(method="colorization", data="fashion-mnist", width=8)
    with pytest.raises(
        ConfigError, match=r"colorization needs colour images .*Fashion-MNIST is grayscale"
    ):
        build_method(cfg, 1, "compact")


TINY = tiny_config("colorization", optimizer="adamw", lr=0.002)


def test_resume_after_ctrl_c_continues_exactly_and_the_run_evaluates(tmp_path):
    run = resume_after_ctrl_c_continues_exactly(TINY, tmp_path)  # the prior histogram too
    backbone, info = load_backbone_and_info(run)
    assert isinstance(backbone, LightnessBackbone) and info["config"]["method"] == "colorization"
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)
    assert main(["export", run, "--format", "torchvision", "--out", str(tmp_path / "x.pt")]) == 2


def test_presets_and_defaults(capsys):
    for preset in ("colorization-imagenet", "colorization-folder"):
        assert main(["pretrain", "--preset", preset, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "colorization"
    imagenet = build_config("colorization-imagenet")  # the paper's §3
    assert (imagenet.batch_size, imagenet.weight_decay, imagenet.crop_size) == (40, 1e-3, 176)
    cfg = build_config(method="colorization")
    # the official code's values (the paper's text: 5 bins, T = 0.38)
    assert (cfg.soft_neighbours, cfg.soft_sigma, cfg.rebalance_lambda, cfg.gray_mask) == (
        10,
        5.0,
        0.5,
        True,
    )
    assert cfg.decode_temperature == pytest.approx(1 / 2.606)
    assert (imagenet.soft_neighbours, imagenet.gray_mask) == (10, True)
    assert imagenet.decode_temperature == pytest.approx(1 / 2.606, abs=1e-4)
    with pytest.raises(ConfigError, match="--rebalance-lambda"):
        build_config(method="colorization", rebalance_lambda=2.0)
