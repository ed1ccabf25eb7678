"""Denoising autoencoder: the corruption (masking fraction, Gaussian σ, drawn from the
generator), the L2 loss against the clean view by hand, and tiny runs through the loop."""

from __future__ import annotations

import pytest
import torch
import yaml
from run_helpers import resume_after_ctrl_c_continues_exactly, tiny_config
from torch import nn

from mocolab.backbones import resnet
from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods.denoising import DenoisingAutoencoder, corrupt

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
STD = torch.tensor([0.25, 0.2, 0.1]).view(1, 3, 1, 1)


def test_masking_zeroes_exactly_nu_d_components_of_each_image():
    x = torch.randn(4, 3, 10, 10) + 100  # no component is the masked value by chance
    noisy = corrupt(x, "masking", 0.25, torch.Generator().manual_seed(0), MEAN, STD)
    black = (-MEAN / STD).expand_as(x)  # the pixel value 0 after normalisation
    masked = noisy != x
    assert masked.view(4, -1).sum(1).tolist() == [75, 75, 75, 75]  # round(0.25 · 300) each
    assert torch.equal(noisy[masked], black[masked])
    assert torch.equal(noisy[~masked], x[~masked])
    # per pixel and channel: some pixels lose one channel only
    per_pixel = masked.sum(1)
    assert ((per_pixel > 0) & (per_pixel < 3)).any()


def test_corruption_comes_from_the_generator():
    x = torch.randn(2, 3, 8, 8)
    for kind in ("masking", "gaussian"):
        a = corrupt(x, kind, 0.3, torch.Generator().manual_seed(5), MEAN, STD)
        b = corrupt(x, kind, 0.3, torch.Generator().manual_seed(5), MEAN, STD)
        c = corrupt(x, kind, 0.3, torch.Generator().manual_seed(6), MEAN, STD)
        assert torch.equal(a, b) and not torch.equal(a, c)
    # gaussian: σ in pixel units, i.e. σ/std in the normalised input, the generator's normals
    noisy = corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(5), MEAN, STD)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(noisy, x + 0.3 * eps / STD)


def test_without_a_generator_the_draws_come_from_a_fixed_stream_not_the_global_rng():
    x = torch.randn(2, 3, 8, 8)
    for kind in ("masking", "gaussian"):
        state = torch.get_rng_state()
        a = corrupt(x, kind, 0.3, None, MEAN, STD)
        assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG untouched
        torch.manual_seed(123)
        assert torch.equal(corrupt(x, kind, 0.3, None, MEAN, STD), a)  # whatever its seed
        # the fixed stream is a generator seeded 0
        assert torch.equal(a, corrupt(x, kind, 0.3, torch.Generator().manual_seed(0), MEAN, STD))


class Constant(nn.Module):
    """A decoder whose output is known: ``value`` everywhere, at the size asked for."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, h, size):
        return self.scale * torch.full((h.shape[0], 1, *size), self.value)


def test_loss_is_the_mean_squared_error_against_the_clean_view():
    model = DenoisingAutoencoder(resnet("resnet18", 1, "compact", width=8), in_channels=1)
    model.decoder = Constant(0.5)
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0]]).view(1, 1, 2, 2).repeat(2, 1, 4, 4)  # 8×8
    out = model([x], torch.Generator().manual_seed(0))
    # every pixel predicted 0.5: the clean values 0, 1, 2, −1 in equal numbers
    want = ((0 - 0.5) ** 2 + (1 - 0.5) ** 2 + (2 - 0.5) ** 2 + (-1 - 0.5) ** 2) / 4
    assert abs(out.loss.item() - want) < 1e-6
    assert out.metrics["input_mse"].item() > 0  # the input was corrupted, the target was not


def test_decoder_returns_the_input_size_and_gradients_reach_every_stage():
    model = DenoisingAutoencoder(
        resnet("resnet18", 3, "compact", width=8),
        in_channels=3,
        corruption="gaussian",
        corruption_level=0.1,
    )
    x = torch.randn(4, 3, 28, 28)  # layer4 is 2×2: 3 upsamplings to 16, then resized to 28
    out = model([x], torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.layer1.parameters())
    assert model.decoder(torch.zeros(1, 64, 2, 2), (28, 28)).shape == (1, 3, 28, 28)


TINY = tiny_config("denoising", optimizer="adamw", lr=0.002)


def test_resume_after_ctrl_c_continues_exactly_and_the_run_evaluates(tmp_path):
    run = resume_after_ctrl_c_continues_exactly(TINY, tmp_path)
    backbone, info = load_backbone_and_info(run)
    assert info["config"]["method"] == "denoising"
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)


def test_presets_defaults_and_bad_options(capsys):
    for preset in ("denoising-imagenet", "denoising-fashion-mnist"):
        assert main(["pretrain", "--preset", preset, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "denoising"
    cfg = build_config(method="denoising")
    assert (cfg.corruption, cfg.corruption_level, cfg.decoder_stage, cfg.augment) == (
        "masking",
        0.25,
        "layer4",
        "crop-flip",
    )
    with pytest.raises(ConfigError, match="--corruption must be masking or gaussian"):
        build_config(method="denoising", corruption="salt")
    with pytest.raises(ConfigError, match="--corruption-level"):
        build_config(method="denoising", corruption_level=1.5)
    with pytest.raises(ConfigError, match="--decoder-stage"):
        build_config(method="denoising", decoder_stage="layer5")
