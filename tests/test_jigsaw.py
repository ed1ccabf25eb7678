"""Jigsaw: the shuffled tile order and its label by hand, the loss as the cross-entropy of the
logits and those labels, a tiny run through the loop, exact resume, the evaluated backbone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import losses, resume_after_ctrl_c_continues_exactly
from torch import nn

from mocolab.checkpoint import load_backbone_and_info, load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods import Jigsaw
from mocolab.methods.jigsaw import shuffle_tiles
from mocolab.methods.tiles import permutation_set
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """A backbone that keeps what it was given and returns a few linear features of it."""

    def __init__(self, channels: int = 1, num_features: int = 6) -> None:
        super().__init__()
        self.num_features = num_features
        self.fc = nn.Linear(channels, num_features)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))


def marked_images(n: int) -> torch.Tensor:
    """12×12 images of nine 4 px tiles (a 3×3 grid, no gap); tile k of image n has its one
    bright pixel at (k // 4, k % 4) of the tile, so a tile's origin reads off any copy of it."""
    x = torch.zeros(n, 1, 12, 12)
    for k in range(9):
        y0, x0 = 4 * (k // 3), 4 * (k % 3)
        x[:, 0, y0 + k // 4, x0 + k % 4] = 1.0 + torch.arange(n)  # brighter in later images
    return x


def origin(tile: torch.Tensor) -> int:
    """Which tile of :func:`marked_images` ``tile`` (``C×4×4``) is."""
    flat = int(tile[0].argmax())
    return (flat // 4) * 4 + flat % 4


# --- the task ----------------------------------------------------------------------------------


def test_shuffle_tiles_puts_tile_perm_t_at_position_t():
    tiles = torch.arange(2 * 9).view(2, 9, 1, 1, 1).float()  # tile k of image n holds 9n + k
    perms = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [2, 0, 1, 5, 3, 4, 8, 6, 7]])
    out = shuffle_tiles(tiles, perms, torch.tensor([1, 0]))
    assert out.view(2, 9).tolist() == [
        [2, 0, 1, 5, 3, 4, 8, 6, 7],  # image 0 by permutation 1
        [9, 10, 11, 12, 13, 14, 15, 16, 17],  # image 1 by the identity
    ]


def test_the_tiles_reach_the_backbone_in_the_order_of_their_label_and_the_loss_is_its_ce():
    torch.manual_seed(0)
    perms = permutation_set(10, seed=2)
    backbone = Recorder()
    model = Jigsaw(backbone, perms, tile_size=4, tile_gap=0, tile_jitter=0, dim=8, hidden_dim=8)
    logits = []
    model.classifier.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
    x = marked_images(12)
    model.eval()  # no random stream: image n gets permutation n mod 10
    out = model([x])
    seen = backbone.seen[-1].view(12, 9, 1, 4, 4)
    for n in range(12):
        label = n % 10
        # built by hand: position t holds tile perm[label][t]
        want = [int(perms[label, t]) for t in range(9)]
        assert [origin(seen[n, t]) for t in range(9)] == want
    labels = torch.arange(12) % 10
    by_hand = -torch.stack([torch.log_softmax(logits[-1][n], 0)[labels[n]] for n in range(12)])
    torch.testing.assert_close(out.loss, by_hand.mean())

    # training: each image's label is drawn from the generator; it is the index of the order
    # in which its tiles arrived, and the loss is the cross-entropy against it
    model.train()
    out = model([x], torch.Generator().manual_seed(5))
    seen = backbone.seen[-1].view(12, 9, 1, 4, 4)
    rows = [tuple(p) for p in perms.tolist()]
    labels = torch.tensor(
        [rows.index(tuple(origin(seen[n, t]) for t in range(9))) for n in range(12)]
    )
    assert len(set(labels.tolist())) > 3  # drawn, not fixed
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[-1], labels))
    acc = (logits[-1].argmax(1) == labels).float().mean()
    torch.testing.assert_close(out.metrics["acc"], acc)


def test_each_tile_is_normalised_on_its_own_per_channel_as_the_port():
    backbone = Recorder()
    model = Jigsaw(backbone, permutation_set(4, seed=0), tile_size=4, tile_gap=0, tile_jitter=0)
    model.eval()
    model([marked_images(3) * 50 + 7])
    seen = backbone.seen[-1]
    torch.testing.assert_close(seen.mean(dim=(1, 2, 3)), torch.zeros(27), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen.std(dim=(1, 2, 3)), torch.ones(27), atol=1e-5, rtol=0)
    # colour: a gain of 1.2 / 1.0 / 0.8 on the channels of the images leaves no trace
    backbone = Recorder(channels=3)
    model = Jigsaw(backbone, permutation_set(4, seed=0), tile_size=4, tile_gap=0, tile_jitter=0)
    model.eval()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    model([x])
    model([x * torch.tensor([1.2, 1.0, 0.8]).view(1, 3, 1, 1)])
    torch.testing.assert_close(backbone.seen[-1], backbone.seen[-2], atol=1e-5, rtol=0)
    # --tile-norm tile: one mean and std per tile, which keeps the colour balance
    backbone = Recorder(channels=3)
    model = Jigsaw(backbone, permutation_set(4, seed=0), tile_size=4, tile_gap=0, tile_jitter=0,
                   tile_norm="tile")  # fmt: skip
    model.eval()
    model([x])
    model([x * torch.tensor([1.2, 1.0, 0.8]).view(1, 3, 1, 1)])
    assert (backbone.seen[-1] - backbone.seen[-2]).abs().max() > 0.1


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_a_fraction_of_the_puzzles_is_grayscale(fraction):
    """The port makes 30 % of the images gray (``np.random.rand() < 0.30``), the Caffe code
    50 %: every tile of such a puzzle has three equal channels (after the jitter, cancelled by
    the per-channel normalisation)."""
    n = 600
    rgb = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    rgb = rgb + 0.1 * torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    backbone = Recorder(channels=3)
    model = Jigsaw(backbone, permutation_set(4, seed=0), tile_size=4, tile_gap=0, tile_jitter=0,
                   grayscale=fraction, mean=mean, std=std).train()  # fmt: skip
    model([x], torch.Generator().manual_seed(3))
    seen = backbone.seen[-1].view(n, 9, 3, 4, 4)
    spread = (seen - seen.mean(dim=2, keepdim=True)).abs().amax(dim=(1, 2, 3, 4))  # N
    gray = spread < 1e-4
    assert ((spread < 1e-4) | (spread > 0.05)).all()  # gray puzzles, or clearly coloured ones
    # 600 draws: within 3 standard deviations of the fraction
    sd = (fraction * (1 - fraction) / n) ** 0.5
    assert abs(gray.float().mean().item() - fraction) < 3 * sd
    model.eval()  # no colour change in evaluation
    model([x])
    seen = backbone.seen[-1].view(n, 9, 3, 4, 4)
    assert (seen - seen.mean(dim=2, keepdim=True)).abs().amax(dim=(1, 2, 3, 4)).min() > 0.05


# --- configuration -----------------------------------------------------------------------------


def test_presets_and_defaults(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"jigsaw-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "jigsaw"
    imagenet = build_config("jigsaw-imagenet")
    assert (imagenet.tile_size, imagenet.tile_gap, imagenet.tile_jitter) == (64, 11, 5)
    assert (imagenet.crop_size, imagenet.permutations) == (225, 1000)
    # the PyTorch port's colour handling
    assert (imagenet.tile_norm, imagenet.tile_grayscale, imagenet.tile_projection) == (
        "channel",
        0.3,
        0.0,
    )
    cfg = build_config(method="jigsaw")
    assert (cfg.tile_size, cfg.tile_gap, cfg.tile_jitter, cfg.permutations) == (8, 1, 1, 1000)
    assert (cfg.tile_norm, cfg.tile_grayscale, cfg.tile_projection) == ("channel", 0.3, 0.0)
    assert (cfg.dim, cfg.hidden_dim, cfg.head_layers, cfg.augment) == (128, 512, 2, "cpc")


def test_bad_options_are_one_clear_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"--permutations must be in 2\.\.362880"):
        build_config(method="jigsaw", permutations=1)
    with pytest.raises(ConfigError, match="--tile-norm must be channel or tile"):
        build_config(method="jigsaw", tile_norm="pixel")
    with pytest.raises(ConfigError, match=r"--tile-grayscale must be in \[0, 1\]"):
        build_config(method="jigsaw", tile_grayscale=1.5)
    # 16 px views cannot hold a 3×3 grid of 8 px tiles: one line, exit status 2
    argv = ["pretrain", "--method", "jigsaw", "--data", "synthetic", "--crop-size", "16",
            "--width", "8", "--batch-size", "8", "--bn-splits", "1", "--threads", "1",
            "--no-progress", "--out-dir", str(tmp_path), "--run-name", "bad"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--tile-size 8 px tiles with --tile-gap 1 is 26 px wide" in err
    assert len(err.strip().splitlines()) == 1


# --- tiny runs ---------------------------------------------------------------------------------

TINY = dict(data="synthetic", method="jigsaw", width=8, stem="compact", batch_size=32, bn_splits=2,
            crop_size=16, tile_size=4, tile_gap=1, tile_jitter=1, permutations=8, dim=16,
            hidden_dim=32, optimizer="adamw", lr=0.04, epochs=4, progress=False, threads=1,
            log_every=1, diagnostics_every=0)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("jigsaw")
    cfg = build_config(**TINY, max_steps=60, out_dir=str(out), run_name="run")
    return Path(pretrain(cfg, final_eval=False)["run_dir"])


def test_tiny_run_learns_and_its_backbone_encodes_whole_images(run):
    curve = losses(run)
    assert len(curve) == 60 and all(math.isfinite(v) for v in curve)
    assert abs(curve[0] - math.log(8)) < 0.5  # starts near chance over 8 permutations
    late = sum(curve[-10:]) / 10
    assert late < math.log(8) - 0.05 and late < sum(curve[:5]) / 5 - 0.1, curve
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = [r["acc"] for r in rows if "acc" in r][-10:]
    assert sum(acc) / 10 > 0.2  # chance: 1/8
    backbone, info = load_backbone_and_info(run)
    assert info["config"]["method"] == "jigsaw"
    images = torch.randn(3, 3, 16, 16)  # the whole (normalised) image, not tiles
    assert backbone.eval()(images).shape == (3, backbone.num_features)
    assert load_checkpoint(run)["model"]["permutations"].shape == (8, 9)


def test_eval_knn_on_a_jigsaw_run(run, capsys):
    assert main(["eval", "knn", str(run), "--k", "10", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    resume_after_ctrl_c_continues_exactly(TINY, tmp_path, steps=6)
