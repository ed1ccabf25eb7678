"""CMC (L ↔ ab): the Lab conversion against reference values, the two memory banks (no
gradient, the momentum update by hand), a tiny run that learns, exact resume, evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mocolab.augment import recipe
from mocolab.backbones import resnet
from mocolab.checkpoint import load_backbone_and_info, load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods import CMC, build_method
from mocolab.methods.cmc import LabSplitBackbone
from mocolab.methods.lab import LAB_MEAN, LAB_STD, rgb_to_lab
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

# sRGB colours and their CIE Lab (D65): white, black, and the sRGB primaries as tabulated
# (e.g. by Bruce Lindbloom's calculator / skimage): red (53.24, 80.09, 67.20).
REFERENCE = {(1.0, 1.0, 1.0): (100.0, 0.0, 0.0), (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
             (1.0, 0.0, 0.0): (53.24, 80.09, 67.20), (0.0, 1.0, 0.0): (87.73, -86.18, 83.18),
             (0.0, 0.0, 1.0): (32.30, 79.19, -107.86)}


def test_rgb_to_lab_matches_reference_colours():
    rgb = torch.tensor(list(REFERENCE)).view(-1, 3, 1, 1)
    lab = rgb_to_lab(rgb).view(-1, 3)
    torch.testing.assert_close(lab, torch.tensor(list(REFERENCE.values())), atol=0.01, rtol=0)


def test_rgb_to_lab_matches_skimage_on_random_images():
    color = pytest.importorskip("skimage.color")
    rgb = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    rgb[0, :, 0, 0] = 0.02  # the linear branch of the sRGB curve and of f(t)
    want = torch.from_numpy(color.rgb2lab(rgb.permute(0, 2, 3, 1).double().numpy())).permute(0, 3, 1, 2)
    torch.testing.assert_close(rgb_to_lab(rgb).double(), want, atol=2e-3, rtol=0)


def test_lab_split_backbone_sees_normalised_l_and_ab_of_the_rgb_image():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    seen = {}

    class Probe(torch.nn.Module):
        num_features = 4

        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, x):
            seen[self.key] = x
            return x.mean(dim=(2, 3)).repeat(1, 4)[:, :4]

    backbone = LabSplitBackbone(Probe("l"), Probe("ab"), mean, std)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x = (red - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = backbone(x)
    assert out.shape == (1, 8) and backbone.num_features == 8
    lab = [(v - m) / s for v, m, s in zip(REFERENCE[(1.0, 0.0, 0.0)], LAB_MEAN, LAB_STD)]
    # the official normalisation: L/50 − 1, a and b by their half-ranges over sRGB
    assert abs(lab[0] - (53.24 / 50 - 1)) < 1e-6 and abs(LAB_MEAN[1] - 6.025) < 1e-9
    torch.testing.assert_close(seen["l"], torch.full((1, 1, 2, 2), lab[0]), atol=2e-4, rtol=0)
    torch.testing.assert_close(seen["ab"][0, :, 0, 0], torch.tensor(lab[1:]), atol=2e-4, rtol=0)


N, IMAGES = 8, 24
INDEX = torch.tensor([3, 0, 7, 21, 12, 5, 9, 16])


def small_cmc(loss: str = "softmax") -> CMC:
    torch.manual_seed(0)
    backbone = LabSplitBackbone(resnet("resnet18", 1, "compact", width=8),
                                resnet("resnet18", 2, "compact", width=8))
    return CMC(backbone, num_images=IMAGES, dim=16, nce_k=10, temperature=0.1, loss=loss)


def rgb_batch() -> torch.Tensor:
    return torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("loss", ["softmax", "nce"])
def test_no_gradient_flows_into_the_memory_banks(loss):
    model = small_cmc(loss).train()
    for bank in (model.bank_l, model.bank_ab):
        bank.bank.requires_grad_(True)  # would receive a gradient if the loss used it undetached
    before = [model.bank_l.bank.detach().clone(), model.bank_ab.bank.detach().clone()]
    out = model([rgb_batch()], torch.Generator().manual_seed(2), index=INDEX)
    out.loss.backward()
    assert model.bank_l.bank.grad is None and model.bank_ab.bank.grad is None
    assert model.backbone.l_encoder.conv1.weight.grad.abs().sum() > 0  # both encoders learn
    assert model.backbone.ab_encoder.conv1.weight.grad.abs().sum() > 0
    assert torch.equal(model.bank_l.bank.detach(), before[0])  # the forward pass writes nothing
    assert torch.equal(model.bank_ab.bank.detach(), before[1])


def test_each_view_is_scored_against_the_other_views_bank():
    """softmax: f_L(x_i)·v^ab / τ and f_ab(x_i)·v^L / τ, positive i, the K drawn entries."""
    model = small_cmc("softmax").train()
    x = rgb_batch()
    out = model([x], torch.Generator().manual_seed(2), index=INDEX)
    noise = torch.randint(IMAGES, (10,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = model.query_encoder(x)
    z_l, z_ab = F.normalize(z[:, :16], dim=1), F.normalize(z[:, 16:], dim=1)

    def ce(f, bank):
        total = 0.0
        for i in range(N):
            logits = [float(f[i] @ bank[INDEX[i]]) / 0.1] + [float(f[i] @ bank[j]) / 0.1 for j in noise]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[0]
        return total / N

    want = ce(z_l, model.bank_ab.bank) + ce(z_ab, model.bank_l.bank)
    assert abs(out.loss.item() - want) < 1e-4


def test_banks_move_by_the_momentum_formula():
    model = small_cmc("nce").train()
    before = {"l": model.bank_l.bank.clone(), "ab": model.bank_ab.bank.clone()}
    x = rgb_batch()
    out = model([x], torch.Generator().manual_seed(2), index=INDEX)
    with torch.no_grad():
        z = model.query_encoder(x)
    feats = {"l": F.normalize(z[:, :16], dim=1), "ab": F.normalize(z[:, 16:], dim=1)}
    model.on_step_end(out, 0, 10)
    m = 0.5
    for name, bank in (("l", model.bank_l.bank), ("ab", model.bank_ab.bank)):
        for row in range(IMAGES):
            if row in INDEX.tolist():
                i = INDEX.tolist().index(row)
                mixed = [m * float(v) + (1 - m) * float(f) for v, f in zip(before[name][row], feats[name][i])]
                norm = math.sqrt(sum(v * v for v in mixed))
                torch.testing.assert_close(bank[row], torch.tensor([v / norm for v in mixed]),
                                           atol=1e-5, rtol=1e-4)
            else:
                assert torch.equal(bank[row], before[name][row])
    z_l, z_ab = float(model.normalizer_l), float(model.normalizer_ab)  # Z per view, fixed
    assert z_l > 0 and z_ab > 0
    model([x], torch.Generator().manual_seed(3), index=INDEX)
    assert (float(model.normalizer_l), float(model.normalizer_ab)) == (z_l, z_ab)


def test_grayscale_data_is_refused_with_a_clear_error():
    cfg = build_config(method="cmc", data="fashion-mnist", width=8)
    with pytest.raises(ConfigError, match=r"cmc needs colour images .*Fashion-MNIST is grayscale.*cifar10"):
        build_method(cfg, 1, "compact", num_images=64)
    with pytest.raises(ConfigError, match="--init"):
        build_config(method="cmc", init="x.pt")


def test_config_defaults_and_presets():
    cfg = build_config(method="cmc")
    assert (cfg.temperature, cfg.nce_k, cfg.bank_momentum, cfg.loss, cfg.augment, cfg.head_layers) == \
        (0.07, 16384, 0.5, "softmax", "cmc", 1)
    imagenet = build_config("cmc-imagenet")
    assert (imagenet.arch, imagenet.width, imagenet.nce_k, imagenet.temperature, imagenet.lr,
            imagenet.batch_size, imagenet.epochs) == ("resnet50", 32, 16384, 0.07, 0.03, 256, 240)
    # the LR drops at epochs 120, 160, 200 of 240
    assert [round(s * 240) for s in imagenet.lr_steps] == [120, 160, 200]
    aug = recipe("cmc", 32)  # CMC's Lab setting: crop (0.2–1) and flip, no colour change
    assert (aug.scale, aug.hflip_p, aug.jitter_p, aug.grayscale_p, aug.blur_p, aug.solarize_p) == \
        ((0.2, 1.0), 0.5, 0.0, 0.0, 0.0, 0.0)
    cifar = build_config("cmc-cifar10")
    assert (cifar.data, cifar.stem, cifar.method) == ("cifar10", "cifar", "cmc")


def tiny(tmp_path: Path, name: str, **kw):
    values = dict(data="synthetic", method="cmc", width=8, stem="compact", batch_size=32, bn_splits=4,
                  nce_k=128, epochs=1, progress=False, threads=1, log_every=1,
                  out_dir=str(tmp_path), run_name=name)
    return build_config(**{**values, **kw})


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_tiny_run_learns_without_collapse_and_evaluates(tmp_path, capsys):
    res = pretrain(tiny(tmp_path, "run", epochs=2, lr=0.1), final_eval=False)
    curve = losses(res["run_dir"])
    assert len(curve) == 32 and all(math.isfinite(v) for v in curve)
    # epoch 2, every bank row a real feature: the loss falls, and ends below chance
    # (2·log(K + 1): both views' softmax over the positive and K = 128 entries)
    start, end = sum(curve[16:20]) / 4, sum(curve[-4:]) / 4
    assert end < start - 1.0 and end < 2 * math.log(129) - 1.0, curve
    # the evaluated backbone takes RGB and gives [f_L, f_ab]; its features do not collapse
    backbone, info = load_backbone_and_info(res["run_dir"])
    assert isinstance(backbone, LabSplitBackbone) and info["in_channels"] == 3
    from mocolab.data import load_dataset
    from mocolab.evaluate.features import extract_features

    images = load_dataset("synthetic", "test").images[:128]
    h = extract_features(backbone, images, size=32, mean=info["mean"], std=info["std"])
    assert h.shape == (128, 2 * 64)
    z = F.normalize(h - h.mean(dim=0), dim=1)
    spectrum = torch.linalg.svdvals(z) ** 2
    p = spectrum / spectrum.sum()
    effective_rank = math.exp(-(p * p.clamp_min(1e-12).log()).sum())
    assert effective_rank > 5, effective_rank
    assert main(["eval", "knn", res["run_dir"], "--k", "20", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_resume_is_exact_with_both_banks(tmp_path):
    full = pretrain(tiny(tmp_path, "full", max_steps=6, loss="nce"), final_eval=False)

    def interrupt(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = pretrain(tiny(tmp_path, "part", max_steps=6, loss="nce"), on_step=interrupt, final_eval=False)
    assert part.get("interrupted") and part["step"] == 3
    pretrain(resume=part["run_dir"], final_eval=False)
    assert losses(part["run_dir"]) == losses(full["run_dir"])
    a, b = load_checkpoint(full["run_dir"])["model"], load_checkpoint(part["run_dir"])["model"]
    assert {"bank_l.bank", "bank_ab.bank", "normalizer_l", "normalizer_ab"} <= set(a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_export_refuses_torchvision_and_keeps_safetensors(tmp_path, capsys):
    run = pretrain(tiny(tmp_path, "r", max_steps=1), final_eval=False)["run_dir"]
    assert main(["export", run, "--format", "torchvision", "--out", str(tmp_path / "x.pt")]) == 2
    assert "two ResNets" in capsys.readouterr().err
    assert main(["export", run, "--format", "torchscript", "--out", str(tmp_path / "b.ts")]) == 0
    pytest.importorskip("safetensors")
    out = tmp_path / "b.safetensors"
    assert main(["export", run, "--format", "safetensors", "--out", str(out)]) == 0
    import mocolab

    encoder = mocolab.load_encoder(out)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    reference = mocolab.load_encoder(run)
    torch.testing.assert_close(encoder(x), reference(x))
