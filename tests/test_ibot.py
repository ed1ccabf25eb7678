"""iBOT: the masked patch loss by hand and against ``main_ibot.py``'s ``iBOTLoss``, the ViT's
mask-token path and stochastic depth, the whole step against the official loss written out
here, the centres and temperatures, the presets, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from run_helpers import resume_after_ctrl_c_continues_exactly

from mocolab.augment import recipe
from mocolab.config import ConfigError, build_config
from mocolab.losses import ibot_patch_loss
from mocolab.methods import IBOT
from mocolab.vit import drop_path, vit

pytestmark = pytest.mark.usefixtures("one_thread")


def small_ibot(**kwargs) -> IBOT:
    torch.manual_seed(0)
    backbone = vit("vit_tiny", image_size=16, patch_size=4, in_channels=1, depth=2)
    options = dict(dim=8, out_dim=10, hidden_dim=16, num_local=2, drop_path=0.0)
    return IBOT(backbone, **{**options, **kwargs}).train()


def views(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)
    ]


# --- the masked patch loss ------------------------------------------------------------------


def test_patch_loss_of_two_images_of_two_patches_by_hand():
    # image 0 masks its first patch, image 1 both; τ_s = 0.1 and student logits τ·log(odds)
    # give the student distributions (3/4, 1/4), (1/2, 1/2), (1/4, 3/4)
    tau = 0.1
    masks = torch.tensor([[True, False], [True, True]])
    student = tau * torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [0.0, math.log(3)]])
    teacher = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    ce0 = -math.log(3 / 4)  # image 0: H((1, 0), (3/4, 1/4))
    ce1 = math.log(2)  # H(t, (1/2, 1/2)) = log 2 for any t
    ce2 = -(0.5 * math.log(1 / 4) + 0.5 * math.log(3 / 4))
    expected = (ce0 + (ce1 + ce2) / 2) / 2  # each image's mean over its masked patches, then /N
    assert ibot_patch_loss(student, teacher, masks, tau).item() == pytest.approx(expected, rel=1e-6)
    # an image without a masked patch counts with 0 in the mean over the images
    none = torch.tensor([[True, False], [False, False]])
    assert ibot_patch_loss(student[:1], teacher[:1], none, tau).item() == pytest.approx(ce0 / 2)


def official_patch_loss(student_patch, teacher_patch, masks, student_temp, temp2, center2):
    """``iBOTLoss.forward``'s patch term for one global view (main_ibot.py, bytedance/ibot@da316d8):
    dense N×L×K outputs, the loss masked to the masked patches."""
    s = student_patch / student_temp
    t = F.softmax((teacher_patch - center2) / temp2, dim=-1)
    loss2 = torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1)
    mask = masks.flatten(-2, -1) if masks.ndim == 3 else masks
    loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return loss2.mean()


def test_patch_loss_is_the_official_masked_mean_on_random_outputs():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 6, 7, generator=g), torch.randn(5, 6, 7, generator=g)
    masks = torch.rand(5, 6, generator=g) < 0.4
    masks[0] = False  # one image unmasked
    center2 = torch.randn(1, 1, 7, generator=g)
    probs = F.softmax((t - center2) / 0.05, dim=-1)
    got = ibot_patch_loss(s[masks], probs[masks], masks, 0.1)
    torch.testing.assert_close(got, official_patch_loss(s, t, masks, 0.1, 0.05, center2))


# --- the ViT's mask-token path and stochastic depth -------------------------------------------


def test_masked_patches_are_replaced_by_the_mask_token_before_the_position_embedding():
    model = vit("vit_tiny", image_size=8, patch_size=4, in_channels=1, depth=1, pos_embed="learned")
    x = torch.randn(2, 1, 8, 8)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    token = torch.randn(1, 192)
    emb = model.patch_embed(x)  # iBOT's prepare_tokens: patch_embed, mask_model, [CLS], + pos
    emb = torch.where(mask[..., None], token.expand_as(emb), emb)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), emb], dim=1) + model.pos_embed
    torch.testing.assert_close(model.tokens(x, mask=mask, mask_token=token), expected)
    # a masked patch's pixels reach no output token; an unmasked one's do
    y = x.clone()
    y[0, :, :4, :4] += 5.0  # patch 0 of image 0: masked
    with torch.no_grad():
        a = model.forward_features(x, mask=mask, mask_token=token)
        b = model.forward_features(y, mask=mask, mask_token=token)
        c = model.forward_features(y)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="mask_token"):
        model.tokens(x, mask=mask)


def test_drop_path_keeps_each_sample_with_one_minus_the_rate_and_rescales():
    x = torch.ones(6, 2, 3)
    u = torch.rand(6, 1, 1, generator=torch.Generator().manual_seed(3))
    expected = x * torch.floor(0.6 + u) / 0.6  # DINO's drop_path with keep_prob 0.6
    got = drop_path(x, 0.4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected)
    kept = got[:, 0, 0]
    assert ((kept == 0) | torch.isclose(kept, torch.tensor(1 / 0.6))).all() and kept.any()
    model = vit("vit_tiny", image_size=8, patch_size=4, in_channels=1, depth=4)
    model.set_drop_path(0.3)  # DINO / iBOT: linspace(0, rate, depth)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    model.set_drop_path(0.3, uniform=True)  # DINOv2's drop_path_uniform
    assert [b.drop_path for b in model.blocks] == [0.3] * 4
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a = model.train().forward_features(x, generator=torch.Generator().manual_seed(0))
        b = model.forward_features(x, generator=torch.Generator().manual_seed(0))
        c = model.forward_features(x, generator=torch.Generator().manual_seed(1))
        d, e = model.eval().forward_features(x), model.forward_features(x)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)


# --- the step against the official loss -------------------------------------------------------


def test_step_is_the_official_ibot_loss_and_centres():
    model = small_ibot(lambda1=0.7, lambda2=1.3, center_momentum=0.8)
    with torch.no_grad():  # non-trivial centres and temperatures
        model.center.center.normal_()
        model.patch_center.center.normal_()
    model.set_scalar("teacher_temp", 0.05)
    model.set_scalar("teacher_patch_temp", 0.06)
    x = views()
    out = model(x, torch.Generator().manual_seed(5))
    masks = model.sample_masks(8, (4, 4), torch.Generator().manual_seed(5), "cpu")  # the same draw
    assert masks.any() and not masks.all()
    # main_ibot.py: teacher(images[:2]), student(images[:2], mask=masks), student(local)[0];
    # iBOTHead applies the shared head to every token of the global views
    teacher, student = model.teacher_encoder.module, model.query_encoder
    with torch.no_grad():
        t_all = teacher.head(teacher.backbone.forward_features(torch.cat(x[:2])))
        s_all = student.head(student.backbone.forward_features(
            torch.cat(x[:2]), mask=masks, mask_token=model.mask_token))  # fmt: skip
        s_local = student.head(student.backbone(torch.cat(x[2:])))
    teacher_cls, teacher_patch = t_all[:, 0], t_all[:, 1:]
    student_cls = torch.cat([s_all[:, 0], s_local]) / 0.1
    student_cls_c = student_cls.chunk(4)
    teacher_cls_c = F.softmax((teacher_cls - model.center.center) / 0.05, dim=-1).chunk(2)
    student_patch_c, teacher_patch_c = s_all[:, 1:].chunk(2), teacher_patch.chunk(2)
    masks_c = masks.chunk(2)
    loss1, n1, loss2, n2 = 0.0, 0, 0.0, 0
    for q in range(2):
        for v in range(4):
            if v == q:
                loss2 += official_patch_loss(student_patch_c[v], teacher_patch_c[q], masks_c[v],
                                             0.1, 0.06, model.patch_center.center)  # fmt: skip
                n2 += 1
            else:
                loss1 += torch.sum(
                    -teacher_cls_c[q] * F.log_softmax(student_cls_c[v], -1), -1
                ).mean()
                n1 += 1
    expected = loss1 / n1 * 0.7 + loss2 / n2 * 1.3
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["cls"], loss1 / n1, rtol=1e-4, atol=1e-5)
    # update_center: c ← m·c + (1 − m)·mean, center2 from every patch (teacher_patch.mean(1))
    c, c2 = model.center.center.clone(), model.patch_center.center.clone()
    model.on_step_end(out, 0, 10)
    torch.testing.assert_close(
        model.center.center, 0.8 * c + 0.2 * teacher_cls.mean(0, keepdim=True)
    )
    torch.testing.assert_close(
        model.patch_center.center, 0.8 * c2 + 0.2 * teacher_patch.mean(1).mean(0, keepdim=True)
    )


def test_masks_only_on_the_students_global_views_with_ibots_counts():
    model = small_ibot()
    g = torch.Generator().manual_seed(0)
    masks = model.sample_masks(400, (8, 8), g, "cpu")
    per_image = masks.sum(1).float() / 64
    unmasked = (per_image == 0).float().mean().item()
    assert 0.4 < unmasked < 0.6  # --pred_ratio 0 0.3: half of the images keep every patch
    assert per_image.max() <= 0.5 + 1 / 64  # the others: up to 0.3 + 0.2
    # blocks of at least (8 // 3)² = 4 patches: no masked image has fewer
    assert (masks.sum(1)[masks.sum(1) > 0] >= 4).all()


def test_teacher_temperatures_warm_up_and_the_last_layer_is_frozen():
    model = small_ibot(warmup_teacher_temperature=0.04, teacher_temperature=0.07,
                       warmup_teacher_patch_temperature=0.02, teacher_patch_temperature=0.06,
                       teacher_temperature_warmup=0.5, freeze_last_layer_niters=1)  # fmt: skip
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    v0 = model.query_encoder.head.dino.last_layer.weight.clone()
    out = model(views(), torch.Generator().manual_seed(0))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert torch.equal(model.query_encoder.head.dino.last_layer.weight, v0)
    assert model.query_encoder.head.dino.last_layer_gain is not None  # --norm_last_layer false
    model.on_step_end(out, 0, 10)  # 5 warmup steps: τ rises by a fifth of the gap per step
    assert model.scalar("teacher_temp") == pytest.approx(0.04 + 0.03 / 5)
    assert model.scalar("teacher_patch_temp") == pytest.approx(0.02 + 0.04 / 5)
    model.on_step_end(out, 6, 10)
    assert (model.scalar("teacher_temp"), model.scalar("teacher_patch_temp")) == (0.07, 0.06)
    out = model(views(), torch.Generator().manual_seed(0))
    out.loss.backward()  # after the freeze, the last layer learns
    assert model.query_encoder.head.dino.last_layer.weight.grad.abs().sum() > 0


def test_teacher_has_no_drop_path_and_no_gradient():
    model = small_ibot(drop_path=0.2)
    assert [b.drop_path for b in model.backbone.blocks] == pytest.approx([0.0, 0.2])
    assert [b.drop_path for b in model.teacher_encoder.module.backbone.blocks] == [0.0, 0.0]
    assert not any(p.requires_grad for p in model.teacher_encoder.parameters())
    assert model.momentum_encoder is model.teacher_encoder


# --- options, presets, resume ---------------------------------------------------------------


def test_ibot_options_and_presets():
    with pytest.raises(ConfigError, match="--method ibot masks a ViT"):
        build_config(method="ibot")
    with pytest.raises(ConfigError, match="--pred-ratio"):
        build_config(method="ibot", arch="vit_tiny", pred_ratio=[0.3], pred_ratio_var=[0.4])
    cfg = build_config("ibot-imagenet")  # README: ViT-S/16, 16 GPUs × 64, 800 epochs
    o = cfg.options
    assert (cfg.arch, cfg.patch_size, cfg.pos_embed, cfg.dim, cfg.hidden_dim, cfg.head_layers) == (
        "vit_small",
        16,
        "learned",
        256,
        2048,
        3,
    )
    assert (
        o.out_dim,
        o.norm_last_layer,
        o.num_local_crops,
        o.temperature,
        o.teacher_temperature,
        o.warmup_teacher_temperature,
        o.teacher_patch_temperature,
        o.key_momentum,
    ) == (8192, False, 10, 0.1, 0.07, 0.04, 0.07, 0.996)
    assert o.teacher_temperature_warmup == pytest.approx(30 / 800)
    assert (tuple(o.pred_ratio), tuple(o.pred_ratio_var), o.lambda1, o.lambda2, o.drop_path) == (
        (0.0, 0.3),
        (0.0, 0.2),
        1.0,
        1.0,
        0.1,
    )
    assert (
        cfg.batch_size,
        cfg.lr * cfg.batch_size / 256,
        cfg.weight_decay,
        cfg.weight_decay_end,
        cfg.warmup_epochs,
        cfg.epochs,
        cfg.clip_grad,
        cfg.optimizer,
    ) == (1024, 0.002, 0.04, 0.4, 10, 800, 3.0, "adamw")
    assert cfg.augment == "ibot-global1,ibot-global2,ibot-local"
    assert recipe("ibot-global1", 224).scale == (0.25, 1.0)
    assert recipe("ibot-local", 224).scale == (0.05, 0.25) and recipe("ibot-local", 224).size == 96
    assert build_config("ibot-fashion-mnist").method == "ibot"


def test_exact_resume_after_ctrl_c(tmp_path):
    tiny = dict(data="synthetic", method="ibot", arch="vit_tiny", vit_depth=2, patch_size=4,
                pos_embed="learned", num_local_crops=2, out_dim=16, dim=8, hidden_dim=16,
                drop_path=0.2, batch_size=8, crop_size=16, epochs=1, optimizer="adamw", lr=1e-3,
                progress=False, threads=1, log_every=1, diagnostics_every=0)  # fmt: skip
    resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
