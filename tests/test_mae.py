"""MAE: the loss by hand and against ``models_mae.py``'s (its grid-order decoder and masked mean
written out here), patchify as MAE's, an encoder blind to the masked patches, the presets, and
exact resume."""

from __future__ import annotations

import pytest
import torch
from run_helpers import resume_after_ctrl_c_continues_exactly

from mocolab.config import ConfigError, build_config
from mocolab.losses import mae_loss
from mocolab.masking import random_masking
from mocolab.methods import MAE
from mocolab.vit import patchify, unpatchify, vit

pytestmark = pytest.mark.usefixtures("one_thread")


def small_mae(**kwargs) -> MAE:
    torch.manual_seed(0)
    backbone = vit("vit_tiny", image_size=16, patch_size=4, in_channels=3, depth=1)
    return MAE(backbone, decoder_dim=32, decoder_depth=1, decoder_heads=4, **kwargs)


def test_loss_of_one_patch_by_hand():
    # pixels 1, 2, 3, 4: mean 2.5, unbiased variance 5/3; a zero prediction leaves
    # mean(((x − 2.5)²) / (5/3 + 1e-6)) = (5 / (5/3)) / 4 = 0.75
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    expected = 5 / (5 / 3 + 1e-6) / 4
    assert mae_loss(torch.zeros(1, 1, 4), target) == pytest.approx(expected, rel=1e-6)
    assert mae_loss(torch.zeros(1, 1, 4), target, norm_pix=False) == pytest.approx(30 / 4)


def test_patchify_is_maes():
    imgs = torch.randn(2, 3, 8, 8)
    p, h = 4, 2  # models_mae.py patchify
    ref = torch.einsum("nchpwq->nhwpqc", imgs.reshape(2, 3, h, p, h, p)).reshape(2, h * h, p * p * 3)
    assert torch.equal(patchify(imgs, 4), ref)
    assert torch.equal(unpatchify(ref, 4, 3), imgs)


def official_decoder_loss(model: MAE, x: torch.Tensor, m, norm_pix: bool = True) -> torch.Tensor:
    """``forward_decoder`` + ``forward_loss`` of ``models_mae.py`` (facebookresearch/mae@efb2a80)
    on our modules: the mask tokens unshuffled into grid order, [CLS] first with a zero position,
    every patch predicted, the loss masked to the removed ones."""
    dec = model.decoder
    latent = model.backbone.forward_features(x, keep=m.keep)
    y = dec.embed(latent)
    ids_restore = m.restore
    mask_tokens = dec.mask_token.repeat(y.shape[0], ids_restore.shape[1] + 1 - y.shape[1], 1)
    y_ = torch.cat([y[:, 1:, :], mask_tokens], dim=1)
    y_ = torch.gather(y_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1, :], y_], dim=1)
    pos = torch.cat([torch.zeros(1, 1, y.shape[2]), dec.pos_embed], dim=1)  # cls row: 0
    y = y + pos
    y = dec.norm(dec.blocks(y))
    pred = dec.head(y)[:, 1:, :]
    target = patchify(x, 4)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * m.mask).sum() / m.mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_the_official_models_on_the_same_mask(norm_pix):
    model = small_mae(norm_pix_loss=norm_pix).train()
    x = torch.randn(4, 3, 16, 16)
    out = model([x], torch.Generator().manual_seed(5))
    m = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(5))  # the same draw
    torch.testing.assert_close(out.loss, official_decoder_loss(model, x, m, norm_pix),
                               rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_the_encoder_sees_only_the_visible_patches():
    model = small_mae().eval()
    x = torch.randn(2, 3, 16, 16)
    m = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    assert m.keep.shape == (2, 4)  # 25 % of the 4×4 grid
    changed = patchify(x, 4).clone()
    rows = torch.arange(2)[:, None]
    changed[rows, m.masked] += 5.0  # only the removed patches
    y = unpatchify(changed, 4, 3)
    with torch.no_grad():
        a = model.backbone.forward_features(x, keep=m.keep)
        b = model.backbone.forward_features(y, keep=m.keep)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 1 + 4, 192)


def test_mae_needs_a_vit_and_checks_its_options():
    with pytest.raises(ConfigError, match="--method mae masks a ViT"):
        build_config(method="mae")  # the default ResNet-18
    with pytest.raises(ConfigError, match="--mask-ratio"):
        build_config(method="mae", arch="vit_tiny", mask_ratio=1.0)
    with pytest.raises(ConfigError, match="--decoder-dim"):
        build_config(method="mae", arch="vit_tiny", decoder_dim=30, decoder_heads=4)


def test_presets_are_the_official_recipe():
    cfg = build_config("mae-imagenet")  # PRETRAIN.md / App. A.1 with mae_vit_base_patch16
    assert (cfg.arch, cfg.patch_size, cfg.crop_size, cfg.vit_heads or 12) == ("vit_base", 16, 224, 12)
    assert (cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
            cfg.norm_pix_loss) == (0.75, 512, 8, 16, True)
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.adamw_betas,
            cfg.warmup_epochs, cfg.epochs, cfg.augment) == (
        4096, "adamw", 1.5e-4, 0.05, (0.9, 0.95), 40, 800, "crop-flip")
    small = build_config("mae-fashion-mnist")
    assert small.method == "mae" and small.arch == "vit_tiny" and small.data == "fashion-mnist"


def test_exact_resume_after_ctrl_c(tmp_path):
    tiny = dict(data="synthetic", method="mae", arch="vit_tiny", vit_depth=1, patch_size=4,
                decoder_dim=32, decoder_depth=1, decoder_heads=4, batch_size=16, crop_size=16,
                epochs=1, optimizer="adamw", lr=1e-3, progress=False, threads=1, log_every=1,
                diagnostics_every=0)
    resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
