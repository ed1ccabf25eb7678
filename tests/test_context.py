"""Context prediction: the pairs of patches and their 8 relative positions by hand, the loss as
the cross-entropy of the logits and those labels, colour dropping, a tiny run through the loop,
exact resume, the evaluated backbone."""

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

from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods import Context
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """A backbone of 4 px patches that keeps what it was given and returns a linear map of
    its pixels (different patches, different features)."""

    def __init__(self, channels: int = 1, num_features: int = 6) -> None:
        super().__init__()
        self.num_features = num_features
        self.fc = nn.Linear(channels * 16, num_features)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def marked_images(n: int, channels: int = 1) -> torch.Tensor:
    """12×12 images of nine 4 px patches (a 3×3 grid, no gap); patch k has its one bright
    pixel at (k // 4, k % 4) of the patch, so a patch's place reads off any copy of it."""
    x = torch.zeros(n, channels, 12, 12)
    for k in range(9):
        x[:, :, 4 * (k // 3) + k // 4, 4 * (k % 3) + k % 4] = 1.0
    return x


def place(patch: torch.Tensor) -> int:
    flat = int(patch.sum(0).argmax())
    return (flat // 4) * 4 + flat % 4


# 0 1 2
# 3 · 4     the class of the second patch's position relative to the first (Doersch et al.,
# 5 6 7     Fig. 2; pos2lbl of their code)
BY_HAND = {
    (-1, -1): 0,
    (-1, 0): 1,
    (-1, 1): 2,
    (0, -1): 3,
    (0, 1): 4,
    (1, -1): 5,
    (1, 0): 6,
    (1, 1): 7,
}


@pytest.mark.parametrize("pairs, count", [("centre", 8), ("all", 40)])
def test_each_pair_is_classified_by_the_position_of_its_second_patch(pairs, count):
    torch.manual_seed(0)
    backbone = Recorder()
    model = Context(backbone, tile_size=4, tile_gap=0, tile_jitter=0, pairs=pairs, dim=5,
                    hidden_dim=8).eval()  # fmt: skip
    fused = []
    model.classifier.fc.register_forward_hook(lambda m, i, o: fused.append((i[0], o)))
    x = marked_images(3)
    out = model([x])
    seen = backbone.seen[-1].view(3, 9, 1, 4, 4)
    assert [place(seen[0, k]) for k in range(9)] == list(range(9))  # each patch encoded once
    e = model.classifier.embed(backbone.fc(seen.flatten(2)))  # N×9×5: fc6 of each patch
    inputs, logits = fused[-1]
    assert inputs.shape == (3 * count, 2 * 5) and logits.shape == (3 * count, 8)
    labels, seen_pairs = [], set()
    for row in range(3 * count):  # find which two patches each row of the pair MLP holds
        n = row // count
        a = next(k for k in range(9) if torch.allclose(inputs[row, :5], e[n, k]))
        b = next(k for k in range(9) if torch.allclose(inputs[row, 5:], e[n, k]))
        offset = (b // 3 - a // 3, b % 3 - a % 3)
        assert offset in BY_HAND  # adjacent (diagonals too)
        labels.append(BY_HAND[offset])
        seen_pairs.add((a, b))
    assert len(seen_pairs) == count
    if pairs == "centre":
        assert {a for a, _ in seen_pairs} == {4}
    want = -torch.stack([torch.log_softmax(logits[i], 0)[labels[i]] for i in range(3 * count)])
    torch.testing.assert_close(out.loss, want.mean())
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.tensor(labels)))


def test_training_drops_the_colour_of_each_patch_and_evaluation_does_not():
    backbone = Recorder(channels=3)
    model = Context(backbone, tile_size=4, tile_gap=0, tile_jitter=0)
    x = marked_images(4, channels=3) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    model.train()
    model([x], torch.Generator().manual_seed(0))
    seen = backbone.seen[-1]  # 36 patches, standardised after the drop
    spread = seen.std(dim=(2, 3))  # 36×3: the kept channel carries the image, the others noise
    assert ((spread > 0.5).sum(dim=1) == 1).all()
    assert len(set(spread.argmax(dim=1).tolist())) > 1  # the kept channel varies
    model.eval()
    model([x])
    ratio = backbone.seen[-1].std(dim=(2, 3))
    torch.testing.assert_close(ratio / ratio[:, :1], torch.tensor([1.0, 2.0, 3.0]).expand(36, 3))


# --- configuration -----------------------------------------------------------------------------


def test_presets_and_defaults(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"context-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "context"
    imagenet = build_config("context-imagenet")
    assert (imagenet.tile_size, imagenet.tile_gap, imagenet.tile_jitter) == (96, 48, 7)
    cfg = build_config(method="context")
    assert (cfg.tile_size, cfg.tile_gap, cfg.tile_jitter, cfg.context_pairs) == (8, 2, 1, "all")
    assert (cfg.dim, cfg.hidden_dim, cfg.head_layers, cfg.augment) == (128, 512, 3, "cpc")


def test_bad_options_are_one_clear_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match="--context-pairs must be all or centre"):
        build_config(method="context", context_pairs="ring")
    argv = ["pretrain", "--method", "context", "--data", "synthetic", "--crop-size", "24",
            "--width", "8", "--batch-size", "8", "--bn-splits", "1", "--threads", "1",
            "--no-progress", "--out-dir", str(tmp_path), "--run-name", "bad"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--tile-size 8 px tiles with --tile-gap 2 is 28 px wide" in err
    assert len(err.strip().splitlines()) == 1


# --- tiny runs ---------------------------------------------------------------------------------

# the synthetic gratings repeat themselves: the task is hard on them, so larger patches, the
# centre's 8 pairs (balanced classes: chance is log 8) and more steps than for other methods
TINY = dict(data="synthetic", method="context", width=8, stem="compact", batch_size=32,
            bn_splits=2, crop_size=32, tile_size=10, tile_gap=1, tile_jitter=1,
            context_pairs="centre", dim=16, hidden_dim=32, optimizer="adamw", lr=0.02,
            epochs=5, progress=False, threads=1, log_every=1, diagnostics_every=0)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("context")
    cfg = build_config(**TINY, max_steps=80, out_dir=str(out), run_name="run")
    return Path(pretrain(cfg, final_eval=False)["run_dir"])


def test_tiny_run_learns_and_its_backbone_encodes_whole_images(run):
    curve = losses(run)
    assert len(curve) == 80 and all(math.isfinite(v) for v in curve)
    late = sum(curve[-10:]) / 10
    assert late < math.log(8) - 0.05 and late < sum(curve[:5]) / 5 - 0.1, curve
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = [r["acc"] for r in rows if "acc" in r][-10:]
    assert sum(acc) / 10 > 0.17  # chance: 1/8
    backbone, info = load_backbone_and_info(run)
    assert info["config"]["method"] == "context"
    images = torch.randn(3, 3, 32, 32)  # the whole (normalised) image, not patches
    assert backbone.eval()(images).shape == (3, backbone.num_features)


def test_eval_knn_on_a_context_run(run, capsys):
    assert main(["eval", "knn", str(run), "--k", "10", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    resume_after_ctrl_c_continues_exactly(TINY, tmp_path, steps=6)
