"""Few-label fine-tuning: class-balanced subsets, and learning on an easy task."""

import torch
from torch import nn

from mocolab.evaluate.finetune import balanced_subset, finetune


def test_balanced_subset_counts_and_seed():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 7)
    idx = balanced_subset(labels, 0.1, seed=3)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [10, 5, 1]  # round(0.1 · n_c), at least one
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, balanced_subset(labels, 0.1, seed=3))
    assert not torch.equal(idx, balanced_subset(labels, 0.1, seed=4))
    assert len(balanced_subset(labels, 1.0)) == len(labels)


def _colour_data(n: int, seed: int):
    """Each class is a flat colour plus noise: crops and flips keep it recognisable."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]])
    labels = torch.arange(n) % 4
    img = colours[labels].view(n, 3, 1, 1).float() + 25 * torch.randn(n, 3, 16, 16, generator=g)
    return img.clamp(0, 255).to(torch.uint8), labels


class _Tiny(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 8


def test_finetune_on_ten_percent_learns_and_leaves_the_backbone_alone():
    torch.manual_seed(0)
    xtr, ytr = _colour_data(400, 0)
    xte, yte = _colour_data(100, 1)
    backbone = _Tiny()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    kw = dict(size=16, mean=(0.5,), std=(0.25,), fraction=0.1, epochs=40, lr=0.1, batch_size=20)
    acc = finetune(backbone, xtr, ytr, xte, yte, 4, **kw)
    assert acc["train_images"] == 40
    assert acc["top1"] > 90.0
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's backbone is not modified
    head = finetune(backbone, xtr, ytr, xte, yte, 4, head_only=True, **kw)
    assert head["train_images"] == 40 and 0 <= head["top1"] <= 100


def test_finetune_trains_the_weights_pretraining_froze(monkeypatch):
    # MoCo v3 keeps the ViT's patch projection random during pretraining; fine-tuning (DeiT's
    # recipe in MoCo v3) trains every weight: the copy's patch projection must be optimised.
    from mocolab.vit import vit

    backbone = vit("vit_tiny", image_size=16, patch_size=8, depth=1, in_channels=3, freeze_patch_embed=True)
    assert not any(p.requires_grad for p in backbone.patch_embed.parameters())
    optimised = []
    real_sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda params, **kw: optimised.extend(params) or real_sgd(params, **kw))
    xtr, ytr = _colour_data(40, 0)
    finetune(backbone, xtr, ytr, xtr[:8], ytr[:8], 4, size=16, mean=(0.5,), std=(0.25,), fraction=0.5,
             epochs=1, batch_size=20)
    assert len(optimised) == len(list(backbone.parameters())) + 2  # the backbone's and the head's
    assert all(p.requires_grad for p in optimised)
    assert not any(p.requires_grad for p in backbone.patch_embed.parameters())  # the caller's stays frozen
