"""RotNet: the four rotations and their labels by hand, the loss as the paper's cross-entropy,
and tiny runs through the loop (resume, evaluation, presets)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from run_helpers import resume_after_ctrl_c_continues_exactly, tiny_config
from torch import nn

from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import build_config
from mocolab.methods.rotation import RotNet, rotations

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rotations_of_a_2x2_image_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    rotated, labels = rotations(x)
    # counter-clockwise quarter turns (the official rotate_img: flipud(transpose) for 90°)
    want = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]
    assert rotated.shape == (4, 1, 2, 2)
    assert rotated[:, 0].tolist() == want
    assert labels.tolist() == [0, 1, 2, 3]


def test_every_image_in_all_four_rotations_of_a_3x3_batch():
    a = torch.arange(9.0).view(3, 3)
    x = torch.stack([a, 10 + a]).unsqueeze(1)  # N = 2
    rotated, labels = rotations(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # rows k·N .. k·N + N − 1: label k
    ccw90 = [
        [2, 5, 8],
        [1, 4, 7],
        [0, 3, 6],
    ]  # the top row read right to left becomes the left column
    assert rotated[2, 0].tolist() == ccw90 and rotated[3, 0].tolist() == [
        [10 + v for v in r] for r in ccw90
    ]
    assert rotated[4, 0].tolist() == [[8, 7, 6], [5, 4, 3], [2, 1, 0]]
    assert rotated[6, 0].tolist() == [[6, 3, 0], [7, 4, 1], [8, 5, 2]]
    with pytest.raises(ValueError, match="square"):
        rotations(torch.zeros(1, 1, 3, 4))


class MeanColour(nn.Module):
    """A backbone whose features are known: the mean of each quadrant (4 numbers)."""

    num_features = 4

    def forward(self, x):
        h = x.shape[-1] // 2
        return torch.stack(
            [
                x[..., :h, :h].mean((1, 2, 3)),
                x[..., :h, h:].mean((1, 2, 3)),
                x[..., h:, :h].mean((1, 2, 3)),
                x[..., h:, h:].mean((1, 2, 3)),
            ],
            dim=1,
        )


def test_loss_is_the_mean_cross_entropy_over_the_four_rotations():
    model = RotNet(MeanColour())
    with torch.no_grad():
        model.query_encoder.head.weight.copy_(torch.eye(4))
        model.query_encoder.head.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = model([x])
    # features of rotation k are its four pixels (row-major); logits = the pixels; label k
    pixels = [[1, 2, 3, 4], [2, 4, 1, 3], [4, 3, 2, 1], [3, 1, 4, 2]]
    want = sum(math.log(sum(math.exp(v) for v in p)) - p[k] for k, p in enumerate(pixels)) / 4
    assert abs(out.loss.item() - want) < 1e-5
    # the argmax positions 3, 1, 0, 2 against the labels 0, 1, 2, 3: rotation 1 only is right
    assert abs(out.metrics["acc"].item() - 0.25) < 1e-6


TINY = tiny_config("rotation")


def test_resume_after_ctrl_c_continues_exactly_and_the_run_evaluates(tmp_path, capsys):
    run = resume_after_ctrl_c_continues_exactly(TINY, tmp_path)
    backbone, info = load_backbone_and_info(run)
    assert info["config"]["method"] == "rotation"
    x = torch.randn(2, 3, 16, 16)
    assert backbone(x).shape == (2, backbone.num_features)
    assert main(["eval", "knn", run, "--k", "10", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_presets_and_defaults(capsys):
    for preset in ("rotation-imagenet", "rotation-fashion-mnist"):
        assert main(["pretrain", "--preset", preset, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "rotation"
    imagenet = build_config("rotation-imagenet")  # the official ImageNet_RotNet_AlexNet.py
    assert (imagenet.batch_size, imagenet.weight_decay, imagenet.epochs, imagenet.lr_schedule) == (
        192,
        5e-4,
        50,
        "step",
    )
    assert [round(s * 50) for s in imagenet.lr_steps] == [15, 30, 45]
    cfg = build_config(method="rotation")
    assert (cfg.augment, cfg.head_layers) == ("crop-flip", 1)
