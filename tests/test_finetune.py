"""Few-label fine-tuning: class-balanced subsets, and learning on an easy task."""

import math

import pytest
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


def test_layer_decay_groups_are_maes_param_groups_lrd():
    # MAE's util/lr_decay.py on a 2-block ViT: patch embedding, [CLS] and position embedding are
    # layer 0, block i layer i + 1, the final norm and the head layer 3; scale = d ** (3 − layer).
    # Weight decay on ≥ 2-D weights except cls_token and pos_embed (timm's no_weight_decay).
    from mocolab.evaluate.finetune import layer_decay_groups
    from mocolab.vit import VisionTransformer

    vit = VisionTransformer(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2, pos_embed="learned")
    head = nn.Linear(8, 3)
    groups = layer_decay_groups(vit, head, weight_decay=0.05, layer_decay=0.5)
    got = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected_scale = {"patch_embed": 0.125, "cls_token": 0.125, "pos_embed": 0.125,
                      "blocks.0": 0.25, "blocks.1": 0.5, "norm": 1.0}
    named = [*vit.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    assert len(got) == len(named)  # every parameter exactly once
    for name, p in named:
        scale = next((v for k, v in expected_scale.items() if name.startswith(k)), 1.0)
        decay = 0.05 if name in ("patch_embed.proj.weight", "head.weight") or (
            name.endswith("weight") and p.ndim == 2) else 0.0
        assert got[id(p)] == (scale, decay), name
    assert got[id(vit.cls_token)] == (0.125, 0.0) and got[id(vit.pos_embed)] == (0.125, 0.0)
    assert got[id(vit.blocks[1].norm1.weight)] == (0.5, 0.0)  # a norm: no decay
    ones = layer_decay_groups(_Tiny(), head, 0.05, 1.0)  # no decay of the LR: any model
    assert {g["lr_scale"] for g in ones} == {1.0}
    with pytest.raises(ValueError, match="needs a ViT"):
        layer_decay_groups(_Tiny(), head, 0.05, 0.65)


def test_mae_recipe_warms_up_then_decays_each_layer_by_its_scale(monkeypatch):
    # 40 images, batch 20: 2 steps an epoch, 3 epochs, 1 warmup epoch (MAE's util/lr_sched.py):
    # lr_t = lr·t/2 for t < 2, then lr·(1 + cos(π(t − 2)/4))/2; each group's lr × its scale.
    from mocolab.evaluate.finetune import FINETUNE_RECIPES
    from mocolab.vit import vit

    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        seen.append(sorted({(g["lr_scale"], g["lr"]) for g in self.param_groups}))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    backbone = vit("vit_tiny", image_size=16, patch_size=8, depth=1, in_channels=3)
    xtr, ytr = _colour_data(80, 0)
    recipe = {**FINETUNE_RECIPES["mae"], "lr": 0.01, "layer_decay": 0.5, "warmup_epochs": 1}
    assert FINETUNE_RECIPES["mae"]["optimizer"] == "adamw"
    finetune(backbone, xtr, ytr, xtr[:8], ytr[:8], 4, size=16, mean=(0.5,), std=(0.25,),
             fraction=0.5, epochs=3, batch_size=20, **recipe)
    base = [0.0, 0.005] + [0.005 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert len(seen) == 6
    for lrs, b in zip(seen, base, strict=True):
        assert [s for s, _ in lrs] == [0.25, 0.5, 1.0]  # 1 block: layers 0, 1, 2
        for s, got in lrs:
            assert got == pytest.approx(b * s, abs=1e-12)


def test_mae_recipe_learns_the_colours():
    torch.manual_seed(0)
    from mocolab.evaluate.finetune import FINETUNE_RECIPES
    from mocolab.vit import vit

    backbone = vit("vit_tiny", image_size=16, patch_size=8, depth=1, in_channels=3)
    xtr, ytr = _colour_data(400, 0)
    xte, yte = _colour_data(100, 1)
    recipe = {**FINETUNE_RECIPES["mae"], "lr": 2e-3}
    acc = finetune(backbone, xtr, ytr, xte, yte, 4, size=16, mean=(0.5,), std=(0.25,),
                   fraction=0.1, epochs=20, batch_size=20, **recipe)
    assert acc["top1"] > 90.0


def test_layer_decay_with_sgd_is_refused():
    xtr, ytr = _colour_data(40, 0)
    with pytest.raises(ValueError, match="needs optimizer='adamw'"):
        finetune(_Tiny(), xtr, ytr, xtr, ytr, 4, size=16, mean=(0.5,), std=(0.25,), epochs=1,
                 layer_decay=0.5)
