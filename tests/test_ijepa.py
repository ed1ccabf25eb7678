"""I-JEPA: the smooth-L1 loss by hand, the targets and predictions against ``src/train.py``'s
and ``VisionTransformerPredictor.forward``'s (written out here on our modules), the EMA target
encoder and its linear schedule, patch-averaged features, the presets, and exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from run_helpers import resume_after_ctrl_c_continues_exactly

from mocolab.config import ConfigError, build_config
from mocolab.losses import ijepa_loss
from mocolab.masking import multiblock_masks
from mocolab.methods import IJEPA
from mocolab.vit import vit

pytestmark = pytest.mark.usefixtures("one_thread")


def small_ijepa(**kwargs) -> IJEPA:
    torch.manual_seed(0)
    backbone = vit("vit_tiny", image_size=32, patch_size=4, in_channels=1, depth=2, global_pool="avg")
    return IJEPA(backbone, predictor_dim=48, predictor_depth=2, predictor_heads=4, min_keep=4,
                 **kwargs)


def test_loss_is_smooth_l1_by_hand():
    # |d| < 1: d²/2; else |d| − 1/2 — the code's F.smooth_l1_loss, not the paper's L2
    p = torch.tensor([[[0.5, 2.0, -3.0, 0.0]]])
    expected = (0.125 + 1.5 + 2.5 + 0.0) / 4
    assert ijepa_loss(p, torch.zeros_like(p)).item() == pytest.approx(expected)


# src/masks/utils.py and src/utils/tensors.py (facebookresearch/ijepa@52c1ae9)
def apply_masks(x, masks):
    all_x = []
    for m in masks:
        mask_keep = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        all_x += [torch.gather(x, dim=1, index=mask_keep)]
    return torch.cat(all_x, dim=0)


def repeat_interleave_batch(x, B, repeat):
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B:(i + 1) * B] for _ in range(repeat)], dim=0)
                      for i in range(N)], dim=0)


def test_targets_and_predictions_are_the_codes():
    model = small_ijepa().train()
    x = torch.randn(3, 1, 32, 32)
    masks = multiblock_masks(3, 8, min_keep=4, generator=torch.Generator().manual_seed(0))
    masks_enc, masks_pred = [masks.context], [masks.targets[:, t] for t in range(4)]
    # forward_target: target encoder, layer_norm over the features, apply_masks, repeat
    with torch.no_grad():
        h = model.target_encoder.module.backbone.forward_features(x)[:, 1:]
        h = F.layer_norm(h, (h.size(-1),))
        want_h = repeat_interleave_batch(apply_masks(h, masks_pred), 3, repeat=len(masks_enc))
    torch.testing.assert_close(model.targets(x, masks), want_h)
    # forward_context: encoder(imgs, masks_enc) then VisionTransformerPredictor.forward
    pred = model.predictor
    z = model.backbone.forward_features(x, keep=masks.context)[:, 1:]  # our [CLS] left out
    y = pred.embed(z)
    y = y + apply_masks(pred.pos_embed.repeat(3, 1, 1), masks_enc)
    n_ctxt = y.shape[1]
    pos_embs = apply_masks(pred.pos_embed.repeat(3, 1, 1), masks_pred)
    pos_embs = repeat_interleave_batch(pos_embs, 3, repeat=len(masks_enc))
    pred_tokens = pred.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1) + pos_embs
    y = torch.cat([y.repeat(len(masks_pred), 1, 1), pred_tokens], dim=1)
    y = pred.norm(pred.blocks(y))
    want_z = pred.head(y[:, n_ctxt:])
    got_z = model.predictions(x, masks)
    torch.testing.assert_close(got_z, want_z, rtol=1e-5, atol=1e-5)
    assert got_z.shape == (4 * 3, masks.targets.shape[2], 192)


def test_gradients_reach_encoder_and_predictor_not_the_target_encoder_which_follows_by_ema():
    model = small_ijepa(momentum=0.5).train()
    x = torch.randn(4, 1, 32, 32)
    out = model([x], torch.Generator().manual_seed(1))
    out.loss.backward()
    assert model.predictor.mask_token.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert {"context_patches", "target_patches"} <= set(out.metrics)
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(1.0)
    before = model.target_encoder.module.backbone.norm.bias.clone()  # 0 at init
    m = model.on_step_end(out, step=10, total_steps=40)["momentum"]
    assert m == pytest.approx(0.5 + 0.5 * 10 / 40)  # linear ramp from 0.5 to 1
    after = model.target_encoder.module.backbone.norm.bias
    torch.testing.assert_close(after, m * before + (1 - m) * (before + 1.0))


def test_features_average_the_patch_tokens():
    cfg = build_config(method="ijepa", arch="vit_tiny", crop_size=32, patch_size=4)
    assert cfg.vit_pool == "avg" and cfg.momentum_schedule == "linear" and cfg.augment == "ijepa"
    model = small_ijepa().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x),
                                   model.backbone.forward_features(x)[:, 1:].mean(1))


def test_ijepa_needs_blocks_larger_than_min_keep_and_a_vit():
    with pytest.raises(ConfigError, match="--method ijepa masks a ViT"):
        build_config(method="ijepa")
    with pytest.raises(ConfigError, match="--target-scale"):
        build_config(method="ijepa", arch="vit_tiny", target_scale=[0.3, 0.2])
    from mocolab.methods.ijepa import IJEPAOptions, check_blocks

    with pytest.raises(ConfigError, match="--min-keep 10"):
        check_blocks(7, IJEPAOptions())  # 28 px / 4: targets of 6-9 patches
    check_blocks(7, IJEPAOptions(min_keep=4))


def test_presets_are_the_released_config():
    cfg = build_config("ijepa-imagenet")  # configs/in1k_vith14_ep300.yaml on ViT-B/16
    assert (cfg.arch, cfg.patch_size, cfg.vit_pool, cfg.predictor_dim, cfg.predictor_depth) == (
        "vit_base", 16, "avg", 384, 12)
    assert (cfg.num_targets, cfg.target_scale, cfg.target_aspect, cfg.context_scale,
            cfg.min_keep) == (4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), 10)
    assert (cfg.key_momentum, cfg.momentum_schedule, cfg.weight_decay, cfg.weight_decay_end,
            cfg.lr * 2048 / 256, cfg.warmup_epochs, cfg.epochs) == (
        0.996, "linear", 0.04, 0.4, 0.001, 40, 300)
    assert build_config("ijepa-fashion-mnist").method == "ijepa"


def test_exact_resume_after_ctrl_c(tmp_path):
    tiny = dict(data="synthetic", method="ijepa", arch="vit_tiny", vit_depth=1, patch_size=2,
                predictor_dim=32, predictor_depth=1, predictor_heads=4, min_keep=2, batch_size=16,
                crop_size=16, epochs=1, optimizer="adamw", lr=1e-3, progress=False, threads=1,
                log_every=1, diagnostics_every=0)
    resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
