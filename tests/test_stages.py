"""Inside a ResNet: per-stage pooled features, freezing the stem and the first stages,
re-initialising a network (the supervised and random baselines of transfer)."""

from __future__ import annotations

import pytest
import torch

from mocolab.backbones import resnet
from mocolab.config import ConfigError
from mocolab.evaluate.finetune import finetune, reinitialise
from mocolab.evaluate.stages import (
    STAGES,
    extract_stage_features,
    frozen_parts,
    pool_grid,
    pool_stage,
)


def test_pool_grid_keeps_at_most_dims_features():
    assert pool_grid(64, 14, 4096) == 8  # 64·8² = 4096
    assert pool_grid(256, 56, 9216) == 6  # Goyal et al.'s res2: 256×6×6 = 9216
    assert pool_grid(1024, 14, 9216) == 3  # res4: 1024×3×3
    assert pool_grid(2048, 7, 9216) == 2  # res5: 2048×2×2 = 8192
    assert pool_grid(64, 4, 4096) == 4  # never more cells than the map has
    assert pool_grid(8192, 7, 4096) == 1  # at least one cell
    h = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    pooled = pool_stage(h, 12)  # 3·2² = 12 → 2×2 cells of 2×2 pixels
    assert pooled.shape == (2, 12)
    assert pooled[0, 0] == h[0, 0, :2, :2].mean() and pooled[1, 11] == h[1, 2, 2:, 2:].mean()


def test_stage_features_match_the_backbone_and_its_pooled_output():
    torch.manual_seed(0)
    net = resnet("resnet18", 1, "compact", width=4).eval()
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    feats = extract_stage_features(net, images, STAGES, dims=10**6, size=16, mean=(0.5,),
                                   std=(0.25,), batch_size=2)
    assert [f.shape for f in feats.values()] == [(5, 4 * 8 * 8), (5, 8 * 4 * 4), (5, 16 * 2 * 2),
                                                 (5, 32 * 1 * 1)]
    # layer4 pooled to one cell is the backbone's own global-average-pooled output
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(feats["layer4"], net(x))
    one = extract_stage_features(net, images, ("layer2",), dims=8, size=16, mean=(0.5,),
                                 std=(0.25,))
    torch.testing.assert_close(one["layer2"], feats["layer2"].view(5, 8, 16).mean(-1))


def test_frozen_parts_follow_mmdetection_frozen_stages():
    net = resnet("resnet18", 1, "compact", width=4)
    assert frozen_parts(net, -1) == []
    assert frozen_parts(net, 0) == [net.conv1, net.bn1, net.relu, net.maxpool]
    assert frozen_parts(net, 2)[-2:] == [net.layer1, net.layer2]
    with pytest.raises(ConfigError, match="--freeze-stages must be -1"):
        frozen_parts(net, 5)
    from mocolab.vit import vit

    with pytest.raises(ConfigError, match="needs a ResNet backbone"):
        frozen_parts(vit("vit_tiny", image_size=16, patch_size=8, depth=1, in_channels=1), 1)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    img = (60 + 70 * labels).view(n, 1, 1, 1).float() + 20 * torch.randn(n, 1, 16, 16, generator=g)
    return img.clamp(0, 255).to(torch.uint8), labels


def test_freeze_stages_keeps_frozen_weights_and_bn_statistics_and_trains_the_rest():
    torch.manual_seed(0)
    net = resnet("resnet18", 1, "compact", width=4)
    with torch.no_grad():  # BN statistics that differ from a fresh BN's, to see them kept
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    xtr, ytr = _data(60, 0)
    trained = []
    finetune(net, xtr, ytr, xtr[:12], ytr[:12], 3, size=16, mean=(0.5,), std=(0.25,),
             fraction=1.0, epochs=2, batch_size=20, lr=0.1, freeze_stages=2,
             on_trained=trained.append)
    before, after = net.state_dict(), trained[0].state_dict()
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    for k, v in before.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith(frozen):  # weights, BN affine and running statistics as loaded
            assert torch.equal(after[k], v), k
        else:
            assert not torch.equal(after[k], v), k  # layer3 and layer4 trained, BN updated
    assert not any(p.requires_grad for n in ("conv1", "bn1", "layer1", "layer2")
                   for p in getattr(trained[0], n).parameters())


def test_reinitialise_draws_a_fresh_network():
    torch.manual_seed(0)
    net = resnet("resnet18", 1, "compact", width=4)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
        net.bn1.running_mean.fill_(3.0)
    torch.manual_seed(1)
    reinitialise(net)
    assert net.bn1.running_mean.abs().max() == 0 and torch.all(net.bn1.weight == 1)
    w = net.layer3[0].conv1.weight  # Kaiming normal, fan_out: std = sqrt(2 / (out · 3 · 3))
    assert w.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.15)
    assert net.layer3[0].bn1.weight.eq(1).all() and net.layer3[0].bn1.bias.eq(0).all()
