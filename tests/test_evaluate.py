"""kNN against the InstDisc weighted vote computed by hand; the linear probe on separable data."""

import math

import torch

from mocolab.evaluate.knn import knn_accuracy, knn_predict, topk_accuracy
from mocolab.evaluate.linear import linear_probe


def test_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    scores = knn_predict(query, bank, labels, num_classes=3, k=3, temperature=0.5)
    # similarities 1.0, 0.8, 0.0, -1.0 → top-3: indices 0, 1, 2 with weights e^{s/τ}
    expected = torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(0.0), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_k_larger_than_bank_is_clamped_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g)
    query = torch.randn(17, 5, generator=g)
    a = knn_predict(query, bank, labels, 4, k=500, temperature=0.1, chunk_size=4)
    b = knn_predict(query, bank, labels, 4, k=30, temperature=0.1, chunk_size=1000)
    torch.testing.assert_close(a, b)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert abs(acc["top1"] - 100 / 3) < 1e-4  # only the first is right
    assert abs(acc["top2"] - 200 / 3) < 1e-4  # the second's label is its 2nd best


def test_knn_on_clustered_features_is_perfect():
    centers = torch.eye(4) * 10
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat(25)
    feats = centers[labels] + torch.randn(100, 4, generator=g)
    acc = knn_accuracy(feats, labels, feats[:40] + 0.1, labels[:40], 4, k=10, temperature=0.1)
    assert acc["top1"] == 100.0


def test_linear_probe_learns_separable_classes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    x = torch.randn(600, 8, generator=g)
    y = (x @ w).argmax(1)
    acc = linear_probe(x[:500], y[:500], x[500:], y[500:], 3, epochs=30, lr=0.1)
    assert acc["top1"] > 90.0


def test_moco_step_schedule_matches_torch_multisteplr():
    from mocolab.evaluate.linear import LINEAR_RECIPES, probe_lr

    r = LINEAR_RECIPES["moco"]
    assert r["lr"] == 30.0 and r["weight_decay"] == 0.0 and not r["standardize"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=30.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[60, 80], gamma=0.1)
    for epoch in range(100):  # one step per epoch: steps are epochs
        expected = opt.param_groups[0]["lr"]
        assert math.isclose(probe_lr(30.0, epoch, 100, "step", r["milestones"]), expected)
        opt.step()
        sched.step()


def test_moco_recipe_learns_on_raw_features():
    from mocolab.evaluate.linear import LINEAR_RECIPES

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    x = torch.randn(600, 8, generator=g).relu() * 0.2  # small, non-negative: like pooled ReLU features
    y = (x @ w).argmax(1)
    opts = {**LINEAR_RECIPES["moco"], "epochs": 20}
    acc = linear_probe(x[:500], y[:500], x[500:], y[500:], 3, **opts)
    assert acc["top1"] > 80.0


def test_augmented_features_are_ordered_copy_major():
    from mocolab.evaluate.features import extract_augmented_features, extract_features

    # Flat images (one grey level each): any crop or flip has the same mean, so a mean-pooling
    # "backbone" gives every augmented copy the plain view's feature, row c·N + i ↔ image i.
    levels = torch.tensor([10, 80, 160, 240], dtype=torch.uint8)
    images = levels.view(4, 1, 1, 1).expand(4, 1, 12, 12).contiguous()
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    kw = dict(size=8, mean=(0.5,), std=(0.5,))
    plain = extract_features(pool, images, **kw)
    aug = extract_augmented_features(pool, images, copies=3, **kw)
    assert aug.shape == (12, 1)
    torch.testing.assert_close(aug, plain.repeat(3, 1), atol=1e-5, rtol=1e-5)


def test_kept_features_do_not_keep_the_backbone_output_they_are_cut_from():
    # a ViT's [CLS] token is a view into its N×T×D output: kept as it is, every batch's whole
    # output stays alive until the end (50× the features on 7×7 patches)
    import weakref

    from mocolab.evaluate.features import extract_augmented_features, extract_features

    outputs: list[weakref.ref] = []

    class TokenBackbone(torch.nn.Module):
        def forward(self, x):
            assert all(ref() is None for ref in outputs), "an earlier batch's tokens are alive"
            tokens = x.flatten(1)[:, None, :4].repeat(1, 50, 1)  # N×T×D
            outputs.append(weakref.ref(tokens))
            return tokens[:, 0]  # the [CLS] token: a view

    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    kw = dict(size=8, mean=[0.5], std=[0.25], batch_size=3)
    feats = extract_features(TokenBackbone(), images, **kw)
    x = (images.float() / 255 - 0.5) / 0.25  # the evaluation view at its own size
    torch.testing.assert_close(feats, x.flatten(1)[:, :4])
    outputs.clear()
    aug = extract_augmented_features(TokenBackbone(), images, copies=2, **kw)
    assert aug.shape == (20, 4) and len(outputs) == 8
