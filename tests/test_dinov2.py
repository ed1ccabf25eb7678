"""DINOv2: KoLeo and Sinkhorn-Knopp centring by hand, LayerScale (its init, its place, timm's
names), the whole step against ``ssl_meta_arch.py``'s ``forward_backward`` written out here,
the masks, the presets, and exact resume."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from run_helpers import resume_after_ctrl_c_continues_exactly

from mocolab.augment import recipe
from mocolab.config import ConfigError, build_config
from mocolab.export import export_backbone
from mocolab.losses import koleo_loss, sinkhorn
from mocolab.methods import DINOv2, build_method
from mocolab.vit import vit

pytestmark = pytest.mark.usefixtures("one_thread")


def small_dinov2(**kwargs) -> DINOv2:
    torch.manual_seed(0)
    backbone = vit(
        "vit_tiny", image_size=16, patch_size=4, in_channels=1, depth=2, layer_scale=1e-5
    )
    options = dict(dim=8, out_dim=10, hidden_dim=16, num_local=2, drop_path=0.0)
    return DINOv2(backbone, **{**options, **kwargs}).train()


def views(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)
    ]


# --- KoLeo and Sinkhorn-Knopp by hand --------------------------------------------------------


def test_koleo_of_three_points_by_hand():
    # unit vectors at 0°, 60° and 180° (given at other lengths: KoLeo normalises them): the
    # nearest neighbours are 60° / 0° / 60° away, at chord lengths 1, 1 and √3
    x = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2], [-3.0, 0.0]])
    eps = 1e-8
    expected = -(2 * math.log(1 + eps) + math.log(math.sqrt(3) + eps)) / 3  # = −log(3)/6
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)
    # dinov2's eps: PairwiseDistance(2, eps=1e-8) adds ε to the difference, so two equal points
    # are ε·√D apart, and log(ρ + ε): the third point's neighbour is √2 away
    y = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, -1.0]])
    d_same = eps * math.sqrt(2)
    d_far = math.sqrt(2 * (1 - eps) ** 2)  # ‖(0, −1) − (1, 0) + ε‖
    expected = -(2 * math.log(d_same + eps) + math.log(d_far + eps)) / 3
    assert koleo_loss(y).item() == pytest.approx(expected, rel=1e-6)


def test_sinkhorn_knopp_centring_of_a_2x3_score_matrix_by_hand():
    # B = 2 samples, K = 3 prototypes; scores τ·log(A) make exp(scores/τ) = A exactly
    tau = 0.07
    a = [[1, 2, 3], [4, 5, 6]]
    scores = tau * torch.log(torch.tensor(a, dtype=torch.float64)).float()
    # dinov2's sinkhorn_knopp_teacher in exact fractions: Q = Aᵀ (K×B), Q /= ΣQ, then three
    # times: each row (prototype) to 1/K, each column (sample) to 1/B; finally Q·B, transposed
    q = [[Fraction(a[b][k]) for b in range(2)] for k in range(3)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(3):
        q = [[v / sum(row) / 3 for v in row] for row in q]
        cols = [sum(q[k][b] for k in range(3)) for b in range(2)]
        q = [[q[k][b] / cols[b] / 2 for b in range(2)] for k in range(3)]
    expected = torch.tensor([[float(q[k][b] * 2) for k in range(3)] for b in range(2)])
    torch.testing.assert_close(sinkhorn(scores, tau, 3), expected, rtol=1e-5, atol=1e-6)
    # one iteration by hand: the rows of Aᵀ/21 sum to 5/21, 7/21, 9/21, so the first sample's
    # column becomes (1/5, 2/7, 3/9)/3, then normalised to 1 (×B/B)
    first = torch.tensor([1 / 5, 2 / 7, 3 / 9])
    torch.testing.assert_close(sinkhorn(scores, tau, 1)[0], first / first.sum())
    assert sinkhorn(scores, tau, 3).sum(1).tolist() == pytest.approx([1.0, 1.0])


# --- LayerScale ----------------------------------------------------------------------------


def test_layer_scale_starts_at_1e_5_and_scales_each_residual_branch():
    cfg = build_config(method="dinov2", arch="vit_tiny", vit_depth=2, patch_size=4, crop_size=16)
    assert cfg.vit_layer_scale == 1e-5  # student.layerscale of the configs
    model = build_method(cfg, 1, "compact", image_size=16)
    for block in model.backbone.blocks:
        assert torch.equal(block.ls1.gamma, torch.full((192,), 1e-5))
        assert torch.equal(block.ls2.gamma, torch.full((192,), 1e-5))
    # dinov2/layers/block.py: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))
    block = model.backbone.blocks[0]
    with torch.no_grad():
        block.ls1.gamma.uniform_()
        block.ls2.gamma.uniform_()
        x = torch.randn(2, 5, 192)
        h = x + block.attn(block.norm1(x)) * block.ls1.gamma
        expected = h + block.mlp(block.norm2(h)) * block.ls2.gamma
        torch.testing.assert_close(block.eval()(x), expected)  # eval: no dropped paths
    assert not hasattr(vit("vit_tiny", depth=1).blocks[0].ls1, "gamma")  # off by default
    with pytest.raises(ConfigError, match="--vit-layer-scale"):
        build_config(method="mocov2", vit_layer_scale=1e-5)


# --- the step against the official loss -------------------------------------------------------


def official_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """``DINOLoss.sinkhorn_knopp_teacher`` (dinov2@b8931f7), one process."""
    q = torch.exp(teacher_output.float() / teacher_temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def official_koleo(x, eps=1e-8):
    """``KoLeoLoss.forward`` (dinov2/loss/koleo_loss.py)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nn_index = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=eps)(x, x[nn_index])
    return -torch.log(distances + eps).mean()


def dino_loss_official(student_list, teacher_list, student_temp=0.1):
    total = 0
    for s in student_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total -= torch.sum(t * lsm, dim=-1).mean()
    return total


@pytest.mark.parametrize("separate_head", [False, True])
def test_step_is_ssl_meta_arch_forward_backward(separate_head):
    model = small_dinov2(separate_head=separate_head, patch_out_dim=12, koleo_weight=0.3,
                         lambda1=0.9, lambda2=1.2)  # fmt: skip
    model.set_scalar("teacher_temp", 0.05)
    x = views()
    out = model(x, torch.Generator().manual_seed(3))
    masks = model.sample_masks(8, (4, 4), torch.Generator().manual_seed(3), "cpu")
    n_local, n = 2, 4
    teacher, student = model.teacher_encoder.module, model.query_encoder
    t_head = teacher.head.ibot if separate_head else teacher.head.dino
    s_head = student.head.ibot if separate_head else student.head.dino
    with torch.no_grad():
        global_crops, local_crops = torch.cat(x[:2]), torch.cat(x[2:])
        t_tokens = teacher.backbone.forward_features(global_crops)
        t_cls = t_tokens[:, 0].chunk(2)
        t_cls = torch.cat((t_cls[1], t_cls[0]))  # "chunked and cat'd in reverse"
        mask_indices = masks.flatten().nonzero().flatten()
        t_patch = torch.index_select(t_tokens[:, 1:].flatten(0, 1), 0, mask_indices)
        t_dino = official_sinkhorn(teacher.head.dino(t_cls), 0.05).view(2, n, -1)
        t_ibot = official_sinkhorn(t_head(t_patch), 0.05)
        s_tokens = student.backbone.forward_features(global_crops, mask=masks,
                                                     mask_token=model.mask_token)  # fmt: skip
        s_local_cls = student.head.dino(student.backbone(local_crops))
        s_global_cls = student.head.dino(s_tokens[:, 0])
        s_patch = s_head(torch.index_select(s_tokens[:, 1:].flatten(0, 1), 0, mask_indices))
        terms = 2 + n_local * 2  # n_global_crops_loss_terms + n_local_crops_loss_terms
        local_loss = dino_loss_official(s_local_cls.chunk(n_local), t_dino) / terms
        global_loss = dino_loss_official([s_global_cls], [t_dino.flatten(0, 1)]) * 2 / terms
        koleo = 0.3 * sum(official_koleo(p) for p in s_tokens[:, 0].chunk(2))
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        ibot = torch.sum(t_ibot * F.log_softmax(s_patch / 0.1, dim=-1), dim=-1)
        ibot = -(ibot * weights).sum() / masks.shape[0] * 2 * 0.5  # loss_scales · ibot_loss_scale
        expected = 0.9 * (local_loss + global_loss) + koleo + 1.2 * ibot
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["patch"], ibot, rtol=1e-4, atol=1e-5)


def test_centering_mode_uses_the_ema_centres_of_the_masked_patches():
    model = small_dinov2(centering="centering", center_momentum=0.8)
    x = views()
    out = model(x, torch.Generator().manual_seed(1))
    masks = model.sample_masks(8, (4, 4), torch.Generator().manual_seed(1), "cpu")
    teacher = model.teacher_encoder.module
    with torch.no_grad():
        tokens = teacher.backbone.forward_features(torch.cat(x[:2]))
        cls, patch = teacher.head(tokens[:, 0]), teacher.head.patches(tokens[:, 1:][masks])
    model.on_step_end(out, 0, 10)  # the centres start at 0: c = 0.2·mean
    torch.testing.assert_close(model.center.center, 0.2 * cls.mean(0, keepdim=True))
    torch.testing.assert_close(model.patch_center.center, 0.2 * patch.mean(0, keepdim=True))
    sk = small_dinov2()
    sk.on_step_end(sk(x, torch.Generator().manual_seed(1)), 0, 10)
    assert not sk.center.center.any()  # Sinkhorn-Knopp keeps no centre


def test_masks_of_half_the_images_spread_over_the_ratio_range():
    model = small_dinov2()
    masks = model.sample_masks(40, (14, 14), torch.Generator().manual_seed(0), "cpu")
    counts = masks.sum(1)
    assert (counts > 0).sum().item() == 20  # int(B · mask_sample_probability)
    assert counts.max().item() <= int(196 * 0.5)  # int(N · U(p_i, p_i+1)) <= N · 0.5
    # each block at most max_num_patches = 0.5 * 224 // 16 * 224 // 16 = 98; at least 4
    assert counts[counts > 0].min().item() >= 4


def test_dinov2_uses_one_teacher_temperature_and_a_uniform_drop_path():
    model = small_dinov2(drop_path=0.3, teacher_temperature_warmup=0.5)
    assert [b.drop_path for b in model.backbone.blocks] == [0.3, 0.3]
    out = model(views(), torch.Generator().manual_seed(0))
    model.on_step_end(out, 0, 10)
    assert model.scalar("teacher_temp") == model.scalar("teacher_patch_temp")
    assert model.scalar("teacher_temp") == pytest.approx(0.04 + 0.03 / 5)
    head = model.query_encoder.head.dino
    assert head.last_layer_gain is not None  # weight_norm's weight_g, trained


# --- options, presets, resume ---------------------------------------------------------------


def test_dinov2_options_and_presets():
    with pytest.raises(ConfigError, match="--method dinov2 masks a ViT"):
        build_config(method="dinov2")
    with pytest.raises(ConfigError, match="--centering"):
        build_config(method="dinov2", arch="vit_tiny", centering="mean")
    with pytest.raises(ConfigError, match="--mask-ratio-range"):
        build_config(method="dinov2", arch="vit_tiny", mask_ratio_range=[0.5, 0.1])
    cfg = build_config("dinov2-imagenet")  # vitl16_short.yaml on ssl_default_config.yaml
    o = cfg.options
    assert (cfg.arch, cfg.patch_size, cfg.vit_layer_scale, cfg.pos_embed, cfg.dim,
            cfg.hidden_dim) == ("vit_large", 16, 1e-5, "learned", 256, 2048)  # fmt: skip
    assert (o.out_dim, o.separate_head, o.temperature, o.teacher_temperature,
            o.warmup_teacher_temperature, o.teacher_temperature_warmup, o.key_momentum,
            o.num_local_crops, o.koleo_weight, o.mask_probability, tuple(o.mask_ratio_range),
            o.drop_path, o.centering) == (
        65536, False, 0.1, 0.07, 0.04, 0.3, 0.992, 8, 0.1, 0.5, (0.1, 0.5), 0.3,
        "sinkhorn_knopp")  # fmt: skip
    # 0.004·√(2048/1024) at batch 2048; 100 "epochs" of 1250 steps at 2048 = 200 ImageNet epochs
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(0.004 * math.sqrt(2), rel=1e-3)
    assert (
        cfg.batch_size,
        cfg.epochs,
        cfg.warmup_epochs,
        cfg.weight_decay,
        cfg.weight_decay_end,
        cfg.clip_grad,
        o.freeze_last_layer_niters,
    ) == (2048, 200, 20, 0.04, 0.4, 3.0, 1250)
    assert recipe("dinov2-global2", 224).scale == (0.32, 1.0)
    assert recipe("dinov2-local", 224).scale == (0.05, 0.32)
    assert build_config("dinov2-fashion-mnist").method == "dinov2"


def test_exact_resume_after_ctrl_c_and_the_layer_scale_backbone_exports_to_timm(tmp_path):
    tiny = dict(data="synthetic", method="dinov2", arch="vit_tiny", vit_depth=2, patch_size=4,
                pos_embed="learned", num_local_crops=2, out_dim=16, dim=8, hidden_dim=16,
                drop_path=0.2, batch_size=8, crop_size=16, epochs=1, optimizer="adamw", lr=1e-3,
                progress=False, threads=1, log_every=1, diagnostics_every=0)  # fmt: skip
    run_dir = resume_after_ctrl_c_continues_exactly(tiny, tmp_path)
    pytest.importorskip("timm")
    # timm's VisionTransformer(init_values=1e-5) has the same blocks.N.ls1/ls2.gamma: the export
    # loads into it strictly and gives the same features
    result = export_backbone(run_dir, "timm", tmp_path / "b.pth")
    assert any("init_values=1e-05" in line for line in result.notes)
    assert any(line.startswith("checked: loads strictly") for line in result.notes)
    with pytest.raises(ConfigError, match="LayerScale"):
        export_backbone(run_dir, "torchvision", tmp_path / "tv.pth")
