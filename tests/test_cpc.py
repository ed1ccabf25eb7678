"""CPC v2: the patch grid, the causal context network, the InfoNCE of the predictions, and tiny
runs through the training loop, evaluation and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import losses, resume_after_ctrl_c_continues_exactly
from torch import nn

from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.evaluate.diagnostics import effective_rank
from mocolab.losses import info_nce
from mocolab.methods.cpc import (
    ROTATIONS,
    ContextNetwork,
    PatchGrid,
    patch_backbone,
    patch_grid,
    prediction_loss,
)
from mocolab.train import pretrain


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# --- parts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("side, patch, stride, g", [(20, 8, 4, 4), (28, 8, 4, 6), (32, 8, 4, 7), (13, 8, 4, 2)])
def test_patch_grid_is_the_hand_slices(side, patch, stride, g):
    x = torch.randn(2, 3, side, side)
    grid = patch_grid(x, patch, stride)
    assert grid.shape == (2, g, g, 3, patch, patch)
    for i in range(g):
        for j in range(g):
            assert torch.equal(grid[:, i, j], x[:, :, i * stride:i * stride + patch, j * stride:j * stride + patch])


def test_patch_grid_backbone_is_the_mean_of_the_patch_encoder_over_hand_slices():
    backbone = patch_backbone("resnet18", 1, "compact", 8, 8, 4).eval()
    x = torch.randn(3, 1, 16, 16)
    want = torch.stack([backbone.encoder(x[:, :, i:i + 8, j:j + 8]) for i in (0, 4, 8) for j in (0, 4, 8)]).mean(0)
    torch.testing.assert_close(backbone(x), want, rtol=1e-5, atol=1e-5)
    assert backbone(x).shape == (3, backbone.num_features)
    # layer norm, not batch norm: a patch's features do not depend on the other patches
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    backbone.train()
    torch.testing.assert_close(backbone.encoder(x[:1, :, :8, :8]), backbone.encoder(x[:, :, :8, :8])[:1])


@pytest.mark.parametrize("i", [0, 2, 4])
def test_context_of_a_row_does_not_see_the_rows_below(i):
    torch.manual_seed(0)
    g = ContextNetwork(in_dim=5, dim=8, blocks=3)
    z = torch.randn(2, 5, 6, 6)
    z2 = z.clone()
    z2[:, :, i + 1:] = torch.randn_like(z2[:, :, i + 1:])  # every row below i changes
    c, c2 = g(z), g(z2)
    assert torch.equal(c[:, :, :i + 1], c2[:, :, :i + 1])
    assert not torch.allclose(c[:, :, i + 1:], c2[:, :, i + 1:])  # (the rows below do see them)
    z3 = z.clone()
    z3[:, :, i] += 1.0  # row i itself is part of c_{i,j}'s context
    assert not torch.allclose(g(z3)[:, :, i], c[:, :, i])


def test_context_of_a_patch_row_ignores_pixels_only_lower_patches_hold():
    """End to end through the patch encoder: pixels below the last row of patch row i."""
    torch.manual_seed(0)
    backbone = patch_backbone("resnet18", 1, "compact", 8, 8, 4).eval()
    g = ContextNetwork(backbone.num_features, 8, blocks=2)
    x = torch.randn(2, 1, 24, 24)  # 5×5 grid; patch row 1 covers pixel rows 4..11
    x2 = x.clone()
    x2[:, :, 12:] = torch.randn_like(x2[:, :, 12:])
    c, c2 = g(backbone.grid(x)), g(backbone.grid(x2))
    torch.testing.assert_close(c[:, :, :2], c2[:, :, :2], rtol=0, atol=0)
    assert not torch.allclose(c[:, :, 2:], c2[:, :, 2:])


# A direction's context, turned back to the image's frame, sees only the patches on the far side
# of the direction: (which grid positions change, which context positions must not).
DIRECTION_CASES = {
    "down": (lambda z: z[:, :, 3:], lambda c: c[:, :, :3]),
    "up": (lambda z: z[:, :, :2], lambda c: c[:, :, 2:]),
    "right": (lambda z: z[:, :, :, 3:], lambda c: c[:, :, :, :3]),
    "left": (lambda z: z[:, :, :, :2], lambda c: c[:, :, :, 2:]),
}


@pytest.mark.parametrize("direction", list(DIRECTION_CASES))
def test_each_direction_predicts_from_the_far_side(direction):
    torch.manual_seed(0)
    g = ContextNetwork(in_dim=4, dim=8, blocks=3)
    r = ROTATIONS[direction]

    def context(z):
        return torch.rot90(g(torch.rot90(z, r, dims=(2, 3))), -r, dims=(2, 3))

    z = torch.randn(1, 4, 5, 5)
    z2 = z.clone()
    changed, kept = DIRECTION_CASES[direction]
    changed(z2).normal_()
    assert torch.equal(kept(context(z)), kept(context(z2)))
    assert not torch.equal(context(z), context(z2))


def test_prediction_loss_is_the_hand_computed_infonce():
    torch.manual_seed(0)
    n, d, c_dim, g = 2, 3, 4, 3
    z = torch.randn(n, d, g, g)
    context = torch.randn(n, c_dim, g, g)
    predictors = [nn.Conv2d(c_dim, d, 1) for _ in range(2)]
    loss, acc = prediction_loss(z, context, predictors, temperature=0.5)
    # by hand: every patch of the batch is a candidate, the positive among them once
    everyone = [z[m, :, a, b] for m in range(n) for a in range(g) for b in range(g)]
    per_k, hits = [], []
    for k, conv in enumerate(predictors, start=1):
        w, bias = conv.weight[:, :, 0, 0], conv.bias
        terms = []
        for m in range(n):
            for i in range(g - k):
                for j in range(g):
                    q = w @ context[m, :, i, j] + bias
                    scores = torch.stack([q @ v / 0.5 for v in everyone])
                    pos = (m * g + i + k) * g + j
                    terms.append(-(scores[pos].exp() / scores.exp().sum()).log())
                    hits.append(float(scores.argmax() == pos))
        per_k.append(torch.stack(terms).mean())
    torch.testing.assert_close(loss, torch.stack(per_k).mean(), rtol=1e-5, atol=1e-5)
    assert acc.item() == pytest.approx(sum(hits[:12]) / 24 + sum(hits[12:]) / 12, abs=1e-6)


def test_info_nce_exclude_leaves_out_one_negative_per_query():
    torch.manual_seed(0)
    q, k_pos, negs = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    exclude = torch.tensor([0, 4, 2])
    loss, _ = info_nce(q, k_pos, negs, 0.2, exclude=exclude)
    want = []
    for a in range(3):
        keep = [negs[b] for b in range(5) if b != exclude[a]]
        s = torch.stack([q[a] @ k_pos[a]] + [q[a] @ v for v in keep]) / 0.2
        want.append(-torch.log_softmax(s, 0)[0])
    torch.testing.assert_close(loss, torch.stack(want).mean())


# --- configuration -------------------------------------------------------------------------------

def test_presets_and_defaults(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"cpc-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "cpc"
    imagenet = build_config("cpc-imagenet")
    assert (imagenet.patch_size, imagenet.patch_stride, imagenet.crop_size) == (64, 32, 256)  # 7×7 grid
    assert imagenet.prediction_directions == "all"
    cfg = build_config(method="cpc")
    assert (cfg.patch_size, cfg.patch_stride, cfg.prediction_steps, cfg.prediction_directions,
            cfg.temperature, cfg.augment) == (8, 4, 3, "down", 1.0, "cpc")


def test_bad_options_are_one_clear_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match="--prediction-directions"):
        build_config(method="cpc", prediction_directions="down,diagonal")
    with pytest.raises(ConfigError, match="--patch-size"):
        build_config(method="cpc", patch_size=0)
    # 16 px views, 8 px patches, stride 4: a 3×3 grid cannot predict 3 rows ahead
    assert main(["pretrain", "--method", "cpc", "--data", "synthetic", "--crop-size", "16",
                 "--width", "8", "--batch-size", "8", "--bn-splits", "1", "--threads", "1",
                 "--no-progress", "--out-dir", str(tmp_path), "--run-name", "bad"]) == 2
    out, err = capsys.readouterr()
    assert "--prediction-steps 3 needs a grid of more rows than 3" in err and len(err.strip().splitlines()) == 1
    assert "kNN" not in out  # said before the kNN of the encoder at the start, not after it


# --- tiny runs ---------------------------------------------------------------------------------

TINY = dict(data="synthetic", method="cpc", width=8, stem="compact", batch_size=32, bn_splits=4,
            crop_size=16, prediction_steps=2, dim=32, optimizer="adamw", lr=0.004, epochs=4,
            progress=False, threads=1, log_every=1, diagnostics_every=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpc")
    res = pretrain(build_config(**TINY, max_steps=40, out_dir=str(out), run_name="run"), final_eval=False)
    return Path(res["run_dir"])


def test_tiny_run_beats_chance_and_does_not_collapse(run):
    curve = losses(run)
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    chance = math.log(32 * 3 * 3)  # 3×3 grid: 288 candidates, the positive one of them
    late = sum(curve[-10:]) / 10
    assert late < chance - 0.05, (late, chance)
    assert late < sum(curve[:5]) / 5
    backbone, info = load_backbone_and_info(run)
    assert isinstance(backbone, PatchGrid) and info["config"]["method"] == "cpc"
    from mocolab.data import load_dataset
    from mocolab.evaluate.features import extract_features

    images = load_dataset("synthetic", "test").images[:128]
    h = extract_features(backbone, images, size=info["crop_size"], mean=info["mean"], std=info["std"])
    h = h - h.mean(0)
    assert h.std(0).mean() > 1e-3 and effective_rank(h) > 4, effective_rank(h)


def test_eval_knn_and_load_encoder_on_a_cpc_run(run, capsys):
    assert main(["eval", "knn", str(run), "--k", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out
    import mocolab

    encoder = mocolab.load_encoder(run)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # resized to the 16 px views
    assert encoder(images).shape == (2, encoder.num_features)


def test_safetensors_export_loads_back(run, tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "cpc.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    a, _ = load_backbone_and_info(run)
    b, _ = load_backbone_and_info(out)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    resume_after_ctrl_c_continues_exactly(TINY, tmp_path, steps=6)
