"""The masking samplers against the official samplers, ported here line by line: MAE's
``random_masking`` (the same noise gives the same masks), BEiT/iBOT/DINOv2's blockwise
``MaskingGenerator`` and I-JEPA's ``MaskCollator`` (the same distributions over many draws:
counts, block sizes, aspect ranges, overlap rules)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mocolab.masking import (
    block_masks,
    dinov2_mask_counts,
    ibot_mask_counts,
    jepa_block_size,
    multiblock_masks,
    num_kept,
    random_masking,
)

# --- (1) MAE / MSN ----------------------------------------------------------------------------


def mae_random_masking(x, mask_ratio, noise):
    """``models_mae.py`` ``MaskedAutoencoderViT.random_masking`` (facebookresearch/mae@efb2a80),
    with the noise passed in."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def test_random_masking_is_maes_on_the_same_noise():
    x = torch.randn(5, 49, 3)
    ours = random_masking(5, 49, 0.75, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(5, 49, generator=torch.Generator().manual_seed(3))
    x_masked, mask, ids_restore = mae_random_masking(x, 0.75, noise)
    assert torch.equal(ours.mask, mask) and torch.equal(ours.restore, ids_restore)
    assert torch.equal(torch.gather(x, 1, ours.keep[..., None].expand(-1, -1, 3)), x_masked)
    assert ours.keep.shape == (5, 12) and ours.masked.shape == (5, 37)  # int(49 · 0.25) = 12
    # the removed ones are exactly the mask's ones
    assert torch.equal(torch.zeros(5, 49).scatter_(1, ours.masked, 1.0), mask)


def test_kept_counts_follow_mae_and_msn():
    assert num_kept(196, 0.75) == 49  # MAE: the visible 25 % of ViT-B/16's 14×14
    assert num_kept(196, 0.15) == math.floor(196 * 0.85) == 166  # MSN's patch_drop 0.15
    assert num_kept(49, 0.75) == 12


def test_shared_masking_drops_the_same_patches_in_every_image_like_msn():
    m = random_masking(6, 49, 0.15, generator=torch.Generator().manual_seed(0), shared=True)
    assert (m.keep == m.keep[0]).all() and m.keep.shape == (6, 41)
    per_image = random_masking(6, 49, 0.15, generator=torch.Generator().manual_seed(0))
    assert not (per_image.keep.sort(1).values == per_image.keep[0].sort().values).all()


def test_random_masking_is_uniform_over_patches():
    m = random_masking(4000, 16, 0.75, generator=torch.Generator().manual_seed(1))
    freq = 1 - m.mask.mean(0)  # how often each patch is kept: 4/16
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.03)


# --- (2) BEiT / iBOT / DINOv2 blockwise masks -----------------------------------------------


def beit_mask(rng, height, width, num_masking_patches, min_num_patches=4, max_num_patches=None,
              min_aspect=0.3, max_aspect=None):
    """``MaskingGenerator.__call__`` of facebookresearch/dinov2 ``dinov2/data/masking.py``
    (BEiT's, which iBOT's ``loader.py`` inlines), with its ``random`` module passed in."""
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    mask = [[0] * width for _ in range(height)]

    def _mask(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
        delta = _mask(max_mask_patches)
        if delta == 0:
            break
        mask_count += delta
    return torch.tensor(mask, dtype=torch.bool)


def _histogram(values, bins):
    return torch.bincount(values.long().clamp(0, bins - 1), minlength=bins).float() / len(values)


@pytest.mark.parametrize("grid,count,kwargs", [
    (14, 59, {}),                                             # BEiT: 40 % of 14×14, blocks >= 4
    (14, 0.3 * 196, {"min_patches": 16}),                     # iBOT: (14 // 3)² = 16, float count
    (16, 100, {"max_patches": 128}),                          # DINOv2: blocks <= half the grid
    (7, 20, {}),                                              # a small grid
])
def test_block_masks_have_the_official_distribution(one_thread, grid, count, kwargs):
    n = 2000
    ours = block_masks(torch.full((n,), float(count)), grid, generator=torch.Generator().manual_seed(0),
                       **kwargs)
    rng = random.Random(0)
    ref_kwargs = {"min_num_patches": kwargs.get("min_patches", 4),
                  "max_num_patches": kwargs.get("max_patches")}
    theirs = torch.stack([beit_mask(rng, grid, grid, count, **ref_kwargs) for _ in range(n)])
    a, b = ours.flatten(1).sum(1), theirs.flatten(1).sum(1)
    assert (a <= math.ceil(count)).all() and (b <= math.ceil(count)).all()
    assert abs(a.float().mean() - b.float().mean()) < 0.01 * count + 0.3
    tv = 0.5 * (_histogram(a, grid * grid + 1) - _histogram(b, grid * grid + 1)).abs().sum()
    assert tv < 0.08, f"masked-count histograms differ (total variation {tv:.3f})"
    # where the patches fall: the same coverage map (blocks avoid no region)
    assert torch.allclose(ours.float().mean(0), theirs.float().mean(0), atol=0.08)


def test_one_block_has_the_area_and_aspect_ranges():
    """A count that one block can meet: that block's area is in [4, count] and its sides'
    ratio within the aspect range (0.3, 1/0.3) up to rounding."""
    g = torch.Generator().manual_seed(1)
    masks = block_masks(torch.full((2000,), 12.0), 14, attempts=10, generator=g)
    h, w = masks.any(2).sum(1), masks.any(1).sum(1)  # rows and columns touched
    one = h * w == masks.flatten(1).sum(1)  # a single rectangle (no second block added)
    sides = list(zip(h[one].tolist(), w[one].tolist()))
    assert len(sides) > 200
    for h, w in sides:
        assert 4 <= h * w <= 12 + 3  # the area drawn in [4, 12], then rounded sides
        assert 0.3 / 2.5 < h / w < 2.5 / 0.3
    assert (masks.flatten(1).sum(1) <= 12).all()
    assert {h > w for h, w in sides} == {True, False}  # both orientations


def test_unmasked_images_stay_unmasked_and_no_image_exceeds_its_count():
    counts = torch.tensor([0.0, 4.0, 30.0, 98.0])
    masks = block_masks(counts, 14, generator=torch.Generator().manual_seed(2))
    got = masks.flatten(1).sum(1).float()
    assert got[0] == 0 and (got <= counts).all() and got[1] >= 2  # it may stop short, as BEiT


def test_ibot_mask_counts_half_unmasked_half_ten_to_fifty_percent():
    counts = ibot_mask_counts(20000, 196, generator=torch.Generator().manual_seed(0))
    zero = counts == 0
    assert abs(zero.float().mean() - 0.5) < 0.02  # random.choice over (0, 0.3)
    ratio = counts[~zero] / 196
    assert ratio.min() >= 0.1 - 1e-6 and ratio.max() <= 0.5 + 1e-6
    assert abs(ratio.mean() - 0.3) < 0.01 and abs(ratio.std() - 0.4 / math.sqrt(12)) < 0.01
    single = ibot_mask_counts(100, 196, (0.3,), (0.0,), generator=torch.Generator())
    assert torch.allclose(single, torch.full((100,), 0.3 * 196))
    with pytest.raises(ValueError):
        ibot_mask_counts(4, 196, (0.1,), (0.2,))


def test_dinov2_mask_counts_spread_the_ratios_over_the_masked_half():
    n, length = 64, 256
    counts = dinov2_mask_counts(n, length, (0.1, 0.5), 0.5, generator=torch.Generator().manual_seed(0))
    masked = counts[counts > 0].sort().values
    assert len(masked) == 32 and (counts == 0).sum() == 32
    probs = torch.linspace(0.1, 0.5, 33)  # collate_data_and_cast: image i in [p_i, p_i+1)
    assert ((masked >= (length * probs[:-1]).floor() - 1) & (masked <= length * probs[1:])).all()
    assert not torch.equal(counts[:32], torch.sort(counts, descending=True).values[:32])  # shuffled


# --- (3) I-JEPA multi-block -----------------------------------------------------------------


def ijepa_block_size(_rand, height, width, scale, aspect_ratio_scale):
    """``MaskCollator._sample_block_size`` (facebookresearch/ijepa@52c1ae9,
    ``src/masks/multiblock.py``) given its uniform ``_rand``."""
    min_s, max_s = scale
    mask_scale = min_s + _rand * (max_s - min_s)
    max_keep = int(height * width * mask_scale)
    min_ar, max_ar = aspect_ratio_scale
    aspect_ratio = min_ar + _rand * (max_ar - min_ar)
    h = int(round(math.sqrt(max_keep * aspect_ratio)))
    w = int(round(math.sqrt(max_keep / aspect_ratio)))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return (h, w)


def ijepa_collate_masks(B, height, width, npred=4, pred_scale=(0.15, 0.2), enc_scale=(0.85, 1.0),
                        aspect=(0.75, 1.5), min_keep=10, g=None):
    """``MaskCollator.__call__``'s masks (nenc = 1, allow_overlap False), with the block sizes'
    uniforms from ``g`` and the corners from torch's global generator, as the original."""
    p_size = ijepa_block_size(torch.rand(1, generator=g).item(), height, width, pred_scale, aspect)
    e_size = ijepa_block_size(torch.rand(1, generator=g).item(), height, width, enc_scale, (1.0, 1.0))

    def sample_block_mask(b_size, acceptable_regions=None):
        h, w = b_size

        def constrain_mask(mask, tries=0):
            N = max(int(len(acceptable_regions) - tries), 0)
            for k in range(N):
                mask *= acceptable_regions[k]
        tries, timeout = 0, 20
        valid_mask = False
        while not valid_mask:
            top = torch.randint(0, height - h, (1,))
            left = torch.randint(0, width - w, (1,))
            mask = torch.zeros((height, width), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if acceptable_regions is not None:
                constrain_mask(mask, tries)
            mask = torch.nonzero(mask.flatten())
            valid_mask = len(mask) > min_keep
            if not valid_mask:
                timeout -= 1
                if timeout == 0:
                    tries += 1
                    timeout = 20
        mask = mask.squeeze()
        mask_complement = torch.ones((height, width), dtype=torch.int32)
        mask_complement[top:top + h, left:left + w] = 0
        return mask, mask_complement

    preds, encs = [], []
    min_keep_pred = min_keep_enc = height * width
    for _ in range(B):
        masks_p, masks_C = [], []
        for _ in range(npred):
            mask, mask_C = sample_block_mask(p_size)
            masks_p.append(mask)
            masks_C.append(mask_C)
            min_keep_pred = min(min_keep_pred, len(mask))
        preds.append(masks_p)
        mask, _ = sample_block_mask(e_size, acceptable_regions=masks_C)
        encs.append(mask)
        min_keep_enc = min(min_keep_enc, len(mask))
    return [m[:min_keep_enc] for m in encs], [[m[:min_keep_pred] for m in p] for p in preds]


def test_block_sizes_are_ijepas():
    for u in torch.linspace(0, 1, 501).tolist():
        for grid in (14, 16, 7):
            assert jepa_block_size(u, grid, (0.15, 0.2), (0.75, 1.5)) == ijepa_block_size(
                u, grid, grid, (0.15, 0.2), (0.75, 1.5))
            assert jepa_block_size(u, grid, (0.85, 1.0), (1.0, 1.0)) == ijepa_block_size(
                u, grid, grid, (0.85, 1.0), (1.0, 1.0))


def _rectangle(indices, width):
    rows, cols = indices // width, indices % width
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return h, w, int(rows.min()), int(cols.min())


def test_multiblock_targets_scale_aspect_and_context_rules(one_thread):
    grid = 14
    official_sizes = {ijepa_block_size(u, grid, grid, (0.15, 0.2), (0.75, 1.5))
                      for u in torch.linspace(0, 1, 2001).tolist()}
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        m = multiblock_masks(8, grid, generator=g)
        n, blocks, kt = m.targets.shape
        assert blocks == 4 and m.context.shape[0] == 8
        for b in range(n):
            for t in range(blocks):
                idx = m.targets[b, t]
                h, w, top, left = _rectangle(idx, grid)
                assert h * w == kt == len(idx.unique())  # a full rectangle, row-major
                assert torch.equal(idx, idx.sort().values)
                assert top + h <= grid - 1 and left + w <= grid - 1  # never the last row/column
                seen.add((h, w))
            ctx = m.context[b]
            assert torch.equal(ctx, ctx.sort().values) and len(ctx.unique()) == len(ctx) > 10
            assert not torch.isin(ctx, m.targets[b]).any()  # the targets are removed
    assert seen <= official_sizes and len(seen) >= 3
    for h, w in seen:  # scale 0.15-0.2 and aspect 0.75-1.5, up to the sides' rounding
        assert 0.15 * 196 - 4 <= h * w <= 0.2 * 196 + 4
        assert 0.75 - 0.2 <= h / w <= 1.5 + 0.25


def test_multiblock_context_counts_match_the_official_collator(one_thread):
    torch.manual_seed(0)
    g_ref = torch.Generator().manual_seed(1)
    ref_ctx, ref_tgt = [], []
    for _ in range(150):
        enc, pred = ijepa_collate_masks(8, 14, 14, g=g_ref)
        ref_ctx.append(len(enc[0]))
        ref_tgt.append(len(pred[0][0]))
    g = torch.Generator().manual_seed(2)
    ours_ctx, ours_tgt = [], []
    for _ in range(150):
        m = multiblock_masks(8, 14, generator=g)
        ours_ctx.append(m.context.shape[1])
        ours_tgt.append(m.targets.shape[2])
    ref_c, our_c = torch.tensor(ref_ctx, dtype=torch.float), torch.tensor(ours_ctx, dtype=torch.float)
    ref_t, our_t = torch.tensor(ref_tgt, dtype=torch.float), torch.tensor(ours_tgt, dtype=torch.float)
    assert abs(ref_t.mean() - our_t.mean()) < 1.0  # 29-39 patches per target block
    # the context after removing 4 targets and truncating to the batch's smallest (~ 55-110)
    se = math.sqrt(ref_c.var() / len(ref_c) + our_c.var() / len(our_c))
    assert abs(ref_c.mean() - our_c.mean()) < 4 * se + 1, (ref_c.mean(), our_c.mean())


def test_multiblock_relaxes_the_constraint_and_allows_overlap():
    # a context that 4 large targets leave too little of: tries drop targets from the constraint
    g = torch.Generator().manual_seed(0)
    m = multiblock_masks(16, 8, target_scale=(0.4, 0.4), target_aspect=(1.0, 1.0), min_keep=8,
                         generator=g)
    assert m.context.shape[1] > 8
    g = torch.Generator().manual_seed(0)
    over = multiblock_masks(16, 8, allow_overlap=True, min_keep=4, generator=g)
    assert torch.isin(over.context[0], over.targets[0]).any()
    with pytest.raises(ValueError, match="min_keep"):
        multiblock_masks(2, 7, min_keep=10, generator=torch.Generator())  # 7×7: targets of 6-9


def test_samplers_repeat_with_the_generator():
    a = multiblock_masks(4, 14, generator=torch.Generator().manual_seed(5))
    b = multiblock_masks(4, 14, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    c = block_masks(torch.full((4,), 50.0), 14, generator=torch.Generator().manual_seed(5))
    d = block_masks(torch.full((4,), 50.0), 14, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c, d)
