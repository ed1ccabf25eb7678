import dataclasses

import pytest
import torch
import torchvision

from mocolab.backbones import SplitBatchNorm1d, SplitBatchNorm2d, default_stem, resnet
from mocolab.config import build_config
from mocolab.methods import build_method


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


# --- split BN in the heads (--bn-splits counts sub-batches of the global batch) ---------------

def _split_reference(x, splits, weight=None, bias=None, eps=1e-5):
    """BN by hand in training mode: each contiguous sub-batch of ``x`` (N×C) normalised with its
    own mean and biased variance."""
    out = []
    for sub in x.chunk(splits):
        y = (sub - sub.mean(0)) / torch.sqrt(sub.var(0, unbiased=False) + eps)
        out.append(y if weight is None else y * weight + bias)
    return torch.cat(out)


@pytest.mark.parametrize("affine", [True, False])
def test_split_batchnorm_1d_uses_per_sub_batch_statistics(affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g) * torch.arange(1, 13.0).view(12, 1) + 3
    bn = SplitBatchNorm1d(5, num_splits=3, affine=affine).train()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(5, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(5, generator=g))
    out = bn(x)
    expected = _split_reference(x, 3, bn.weight, bn.bias) if affine else _split_reference(x, 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # running statistics: the mean over sub-batches of what each sub-batch's BN would store
    subs = x.chunk(3)
    mean = sum(0.1 * s.mean(0) for s in subs) / 3
    var = sum(0.9 + 0.1 * s.var(0, unbiased=True) for s in subs) / 3
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    with pytest.raises(ValueError, match="not divisible by 3"):
        bn(x[:10])
    bn.eval()  # eval mode is plain BN with the running statistics
    y = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5)
    torch.testing.assert_close(bn(x), y * bn.weight + bn.bias if affine else y)
    assert set(bn.state_dict()) == set(torch.nn.BatchNorm1d(5, affine=affine).state_dict())


@pytest.mark.parametrize("method", ["simclr", "simclr2", "byol", "simsiam", "mocov3", "swav"])
def test_build_method_splits_the_heads_bn_and_keeps_the_checkpoint_keys(method):
    small = {"prototypes": 10} if method == "swav" else {}
    cfg = build_config(method=method, width=8, dim=8, hidden_dim=16, **small)
    torch.manual_seed(0)
    split = build_method(dataclasses.replace(cfg, bn_splits=4), 1, "compact")
    torch.manual_seed(0)
    plain = build_method(dataclasses.replace(cfg, bn_splits=1), 1, "compact")
    heads = [m for m in split.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert heads and all(isinstance(m, SplitBatchNorm1d) and m.num_splits == 4 for m in heads)
    assert not any(isinstance(m, SplitBatchNorm1d) for m in plain.modules())
    # a checkpoint written with plain BatchNorm1d heads loads strictly, and back
    assert split.state_dict().keys() == plain.state_dict().keys()
    split.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(split.state_dict(), strict=True)
    # the parameters are the model's own (EMA copies stay frozen, the optimiser sees the same)
    assert [n for n, p in split.named_parameters() if p.requires_grad] == \
           [n for n, p in plain.named_parameters() if p.requires_grad]


def test_simclr_head_normalises_each_sub_batch_on_its_own():
    cfg = build_config(method="simclr", width=8, dim=4, hidden_dim=6, bn_splits=2)
    head = build_method(cfg, 1, "compact").query_encoder.head.train()
    fc1, _, _, fc2, _ = head  # Linear, BN, ReLU, Linear, BN without affine
    h = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    hidden = _split_reference(fc1(h), 2, head[1].weight, head[1].bias).relu()
    expected = _split_reference(fc2(hidden), 2)
    torch.testing.assert_close(head(h), expected, atol=1e-5, rtol=1e-4)
