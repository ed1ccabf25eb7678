import pytest
import torch
import torchvision

from mocolab.backbones import SplitBatchNorm2d, default_stem, resnet


def test_standard_width_loads_into_torchvision_strictly():
    ours = resnet("resnet18", in_channels=3, stem="imagenet")
    theirs = torchvision.models.resnet18()
    theirs.fc = torch.nn.Identity()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(); theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("stem,size,expected_map", [("imagenet", 64, 2), ("cifar", 32, 4), ("compact", 28, 2)])
def test_stems_and_feature_shapes(stem, size, expected_map):
    m = resnet("resnet18", in_channels=1, stem=stem, width=16).eval()
    assert m.num_features == 128
    trunk = torch.nn.Sequential(*list(m.children())[:-2])  # up to layer4
    fmap = trunk(torch.randn(2, 1, size, size))
    assert fmap.shape == (2, 128, expected_map, expected_map)
    assert m(torch.randn(2, 1, size, size)).shape == (2, 128)


def test_bn_splits_swap_every_bn():
    m = resnet("resnet18", stem="cifar", bn_splits=4, width=8)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(b, SplitBatchNorm2d) and b.num_splits == 4 for b in bns)


def test_default_stem():
    assert default_stem(224) == "imagenet" and default_stem(32) == "cifar" and default_stem(28) == "compact"


def test_bad_arch_is_named():
    with pytest.raises(ValueError, match="resnet18"):
        resnet("vgg16")
