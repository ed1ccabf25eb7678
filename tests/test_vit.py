"""Vision Transformers: timm equivalence, shapes, [CLS] attention by hand, MoCo v3's frozen
patch projection, evaluation and report of a ViT run, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocolab.backbones import vit_backbone
from mocolab.checkpoint import load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods.moco import MoCoV3
from mocolab.momentum import momentum_update
from mocolab.train import pretrain
from mocolab.visualize.attention import cls_attention_maps
from mocolab.vit import sincos_position_embedding, vit

TINY_VIT = dict(data="synthetic", method="mocov3", arch="vit_tiny", vit_depth=1, dim=32,
                hidden_dim=64, batch_size=32, epochs=1, max_steps=3, optimizer="adamw", lr=1e-3,
                progress=False, threads=1, knn_k=20)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 3-step MoCo v3 run of a 1-block vit_tiny with a frozen patch projection (32 px, p 4)."""
    cfg = build_config(**TINY_VIT, freeze_patch_embed=True,
                       out_dir=str(tmp_path_factory.mktemp("runs")), run_name="vit")
    return Path(pretrain(cfg, final_eval=False)["run_dir"])


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_state_dict_loads_strictly_into_timm_with_the_same_features(one_thread, pos_embed):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = vit("vit_small", pos_embed=pos_embed).eval()
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [None, 6])  # timm's 3 heads, and --vit-heads 6
def test_small_image_vit_matches_timm_built_alike(one_thread, heads):
    timm = pytest.importorskip("timm")
    ours = vit_backbone("vit_tiny", in_channels=1, image_size=28, depth=2, heads=heads).eval()
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False, img_size=28,
                               patch_size=4, in_chans=1, depth=2, num_heads=heads or 3).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side, patch, arch, dim, heads", [
    (28, 4, "vit_tiny", 192, 3), (224, 16, "vit_small", 384, 6), (224, 16, "vit_base", 768, 12)])
def test_shapes_and_default_patch_size(one_thread, side, patch, arch, dim, heads):
    model = vit_backbone(arch, in_channels=3, image_size=side, depth=1)
    grid = side // patch
    assert model.patch_embed.proj.kernel_size == (patch, patch)  # the default for this side
    assert model.num_features == dim and model.blocks[0].attn.num_heads == heads
    assert model.pos_embed.shape == (1, 1 + grid * grid, dim)
    if arch != "vit_base":  # the forward of the largest is slow on a CPU; its sizes suffice
        x = torch.randn(2, 3, side, side)
        assert model(x).shape == (2, dim)
        assert model.forward_features(x).shape == (2, 1 + grid * grid, dim)
        assert cls_attention_maps(model, x).shape == (2, heads, grid, grid)
    if arch == "vit_tiny":  # the arch's own depth when none is asked
        assert len(vit(arch, image_size=side, patch_size=patch).blocks) == 12


def test_sincos_position_embedding_by_formula():
    pe = sincos_position_embedding(grid=3, dim=8)[0]  # (1+9)×8
    assert pe[0].abs().sum() == 0  # [CLS] has none
    row, col, omega = 1, 2, [1.0, 1.0 / 100.0]  # token 1 + 3·1 + 2; ω_i = 1/10000^(i/2)
    want = [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega] \
        + [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    torch.testing.assert_close(pe[1 + 3 * row + col], torch.tensor(want))


def test_cls_attention_equals_a_hand_computation(one_thread):
    torch.manual_seed(0)
    model = vit_backbone("vit_tiny", in_channels=1, image_size=28, depth=2).eval()
    last = model.blocks[-1]
    torch.nn.init.normal_(last.attn.qkv.weight, std=0.3)  # peaked attention, not near-uniform
    torch.nn.init.normal_(last.norm1.weight, mean=1.0, std=0.5)
    x = torch.randn(2, 1, 28, 28)
    seen = []
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    h = seen[0]  # the last block's input: N×50×192
    # LayerNorm, q and k of each head, softmax(q·kᵀ/√d): written out
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    hn = (h - mu) / torch.sqrt(var + 1e-6) * last.norm1.weight + last.norm1.bias
    w, b = last.attn.qkv.weight, last.attn.qkv.bias
    heads, d = 3, 64
    want = torch.empty(2, heads, 50, 50)
    for i in range(heads):
        q = hn @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d]
        k = hn @ w[192 + i * d:192 + (i + 1) * d].T + b[192 + i * d:192 + (i + 1) * d]
        logits = q @ k.transpose(1, 2) / math.sqrt(d)
        want[:, i] = logits.exp() / logits.exp().sum(-1, keepdim=True)
    got = model.last_attention(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, heads, 50))
    maps = cls_attention_maps(model, x)  # [CLS] → 49 patches, renormalised, 7×7
    cls = want[:, :, 0, 1:]
    torch.testing.assert_close(maps, (cls / cls.sum(-1, keepdim=True)).view(2, heads, 7, 7),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, heads))
    assert maps.amax() > 3 / 49  # not uniform: the check above has teeth


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_patch_projection_stays_at_init_and_the_key_encoder_follows(one_thread, freeze):
    torch.manual_seed(0)
    backbone = vit("vit_tiny", image_size=16, patch_size=4, depth=1, freeze_patch_embed=freeze)
    method = MoCoV3(backbone, dim=16, hidden_dim=32, temperature=0.2)
    init = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    for step in range(3):
        out = method([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.on_step_end(out, step, 10)
    key = method.key_encoder.module.backbone
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        moved = not torch.equal(backbone.state_dict()[name], init[name])
        assert moved != freeze, name
        if freeze:  # the key encoder's copy is bit-identical to the frozen query one
            assert torch.equal(key.state_dict()[name], init[name])
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, init["blocks.0.attn.qkv.weight"])


def test_momentum_update_leaves_frozen_parameters_bit_identical():
    source, target = torch.nn.Linear(50, 50), torch.nn.Linear(50, 50)
    target.load_state_dict(source.state_dict())
    source.weight.requires_grad_(False)
    with torch.no_grad():
        source.bias.add_(1.0)
    momentum_update(target, source, 0.99)
    assert torch.equal(target.weight, source.weight)
    torch.testing.assert_close(target.bias, source.bias - 0.99)


def test_tiny_mocov3_run_keeps_its_random_patch_projection(run):
    ckpt = load_checkpoint(run)
    model = ckpt["model"]
    torch.manual_seed(0)  # the run's seed: the same random initialisation
    fresh = vit_backbone("vit_tiny", in_channels=3, image_size=32, depth=1,
                           freeze_patch_embed=True).state_dict()
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert torch.equal(model[f"query_encoder.backbone.{name}"], fresh[name])
        assert torch.equal(model[f"key_encoder.module.backbone.{name}"], fresh[name])
    assert not torch.equal(model["query_encoder.backbone.blocks.0.mlp.fc1.weight"],
                           fresh["blocks.0.mlp.fc1.weight"])
    assert ckpt["step"] == 3


def test_knn_and_encoder_on_a_vit_run(run, capsys):
    assert main(["eval", "knn", str(run), "--k", "10", "--no-progress"]) == 0
    result = json.loads((run / "eval_knn.json").read_text())
    assert 0.0 <= result["top1"] <= 100.0
    import mocolab

    encoder = mocolab.load_encoder(run)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    assert encoder(images).shape == (2, 192)


def test_report_shows_the_attention_maps_of_a_vit_run(run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out), "--queries", "2", "--k", "3",
                 "--max-points", "20", "--no-diagnostics", "--no-progress"]) == 0
    html = (out / "index.html").read_text()
    assert "[CLS] attention maps" in html and Image.open(out / "attention.png").size[0] > 100
    assert not (out / "feature_maps.png").exists()  # no stack of maps in a ViT


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--freeze-patch-embed.*ResNet"):
        build_config(arch="resnet18", freeze_patch_embed=True)
    with pytest.raises(ConfigError, match="--patch-size 4 does not divide --crop-size 30"):
        build_config(arch="vit_tiny", patch_size=4, crop_size=30)
    with pytest.raises(ConfigError, match="--patch-size is a ViT"):
        build_config(arch="resnet18", patch_size=4)
    for method in ("cpc", "cmc"):
        with pytest.raises(ConfigError, match=f"--method {method} builds on ResNets"):
            build_config(method=method, arch="vit_tiny")
    assert build_config(method="cpc", patch_size=8).patch_size == 8  # CPC's own patches
    with pytest.raises(ConfigError, match="--patch-size 5 does not divide the 32 px images"):
        vit_backbone("vit_tiny", in_channels=3, image_size=32, patch_size=5)
    args = ["pretrain", "--data", "synthetic", "--arch", "vit_tiny", "--patch-size", "5",
            "--out-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 2
    assert "does not divide the 32 px images" in capsys.readouterr().err
    assert main(["pretrain", "--arch", "resnet18", "--freeze-patch-embed"]) == 2
    assert "--freeze-patch-embed" in capsys.readouterr().err


def test_vit_exports_load_strictly_into_timm_and_torchvision_with_the_same_features(run, tmp_path, capsys):
    """The run's 1-block vit_tiny (32 px, patches of 4, 3 heads): torchvision's and timm's
    VisionTransformer, built here as a user would, take the exported weights strictly and give
    mocolab's features on the same normalised input."""
    from torchvision.models.vision_transformer import VisionTransformer

    from mocolab.checkpoint import load_backbone_and_info

    backbone, _ = load_backbone_and_info(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = backbone.eval()(x)
    out = tmp_path / "tv.pth"
    assert main(["export", str(run), "--format", "torchvision", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "VisionTransformer(image_size=32, patch_size=4, num_layers=1, num_heads=3" in printed
    assert "checked: loads strictly" in printed
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=1, num_heads=3, hidden_dim=192,
                              mlp_dim=768)
    model.heads = nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want, atol=1e-5, rtol=1e-4)

    timm = pytest.importorskip("timm")
    out = tmp_path / "timm.pth"
    assert main(["export", str(run), "--format", "timm", "--out", str(out)]) == 0
    assert 'create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=1, ' \
           'num_heads=3)' in capsys.readouterr().out
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              patch_size=4, depth=1, num_heads=3)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want, atol=1e-5, rtol=1e-4)


def test_a_torchvision_vit_state_dict_is_read_as_a_backbone():
    """torchvision's ViT names (conv_proj, encoder.layers.encoder_layer_i.self_attention…,
    heads) are renamed to timm's, and the weights give torchvision's features in mocolab."""
    from torchvision.models.vision_transformer import VisionTransformer

    from mocolab.weights import backbone_from_state

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=192,
                              mlp_dim=768, num_classes=10).eval()
    state, _ = backbone_from_state({"module." + k: v for k, v in model.state_dict().items()})
    ours = vit_backbone("vit_tiny", in_channels=3, image_size=32, patch_size=8, depth=2,
                        pos_embed="learned").eval()
    ours.load_state_dict(state, strict=True)
    model.heads = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), atol=1e-5, rtol=1e-4)


def test_detectron2_refuses_a_vit_and_safetensors_round_trips(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "detectron2"]) == 2
    assert "safetensors" in capsys.readouterr().err
    pytest.importorskip("safetensors")
    import mocolab

    out = tmp_path / "vit.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(mocolab.load_encoder(out)(images), mocolab.load_encoder(run)(images))


def test_vit_presets_resolve():
    cfg = build_config("mocov3-vit-imagenet")
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.temperature) == \
        ("vit_small", "adamw", 1.5e-4, 0.1, 0.2)
    assert cfg.freeze_patch_embed and cfg.batch_size == 4096 and cfg.warmup_epochs == 40
    assert cfg.vit_heads == 12  # MoCo v3's ViT-S (timm's has 6)
    with pytest.raises(ConfigError, match="--vit-heads 5 does not divide"):
        vit_backbone("vit_small", in_channels=3, image_size=32, heads=5)
    small = build_config("mocov3-vit-fashion-mnist")
    assert small.arch == "vit_tiny" and small.patch_size == 4 and 28 % small.patch_size == 0


def test_init_from_an_official_mocov3_style_vit_checkpoint(one_thread, tmp_path):
    """timm names under ``module.base_encoder.`` with a projection head (the official MoCo v3
    ViT layout) initialise a ViT; its RGB patch projection is summed for gray input."""
    timm = pytest.importorskip("timm")
    from mocolab.weights import init_backbone

    source = timm.create_model("vit_tiny_patch16_224", num_classes=8, pretrained=False, img_size=16,
                               patch_size=4, depth=1)
    state = {f"module.base_encoder.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "vit.pth.tar")
    backbone = vit("vit_tiny", image_size=16, patch_size=4, in_channels=1, depth=1)
    method = MoCoV3(backbone, dim=16, hidden_dim=32)
    assert init_backbone(method, tmp_path / "vit.pth.tar") == "MoCo v3 (official)"
    want = source.state_dict()
    torch.testing.assert_close(backbone.blocks[0].mlp.fc2.weight, want["blocks.0.mlp.fc2.weight"])
    torch.testing.assert_close(backbone.patch_embed.proj.weight,
                               want["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(method.key_encoder.module.backbone.cls_token, want["cls_token"])


def test_the_run_banner_names_a_vits_depth_and_patches_not_a_stem_and_width():
    from mocolab.config import build_config
    from mocolab.train import _backbone_text

    cfg = build_config(method="mocov3", arch="vit_tiny", vit_depth=4, patch_size=4)
    assert _backbone_text(cfg, "compact", 28) == "vit_tiny (4 blocks, 4-px patches)"
    assert _backbone_text(build_config(method="mocov3", arch="vit_small"), "imagenet", 224) == \
        "vit_small (12 blocks, 16-px patches)"
    assert _backbone_text(build_config(width=16), "cifar", 32) == "resnet18/cifar width 16"


# --- the token-dropping path (MAE, I-JEPA, MSN), the predictor, patch-averaged features -------

def test_kept_tokens_are_the_full_sequences_tokens_and_the_forward_is_unchanged(one_thread):
    from mocolab.vit import gather_tokens

    torch.manual_seed(0)
    model = vit("vit_tiny", image_size=16, patch_size=4, in_channels=1, depth=2).eval()
    x = torch.randn(3, 1, 16, 16)
    keep = torch.stack([torch.randperm(16)[:5] for _ in range(3)])
    full, kept = model.tokens(x), model.tokens(x, keep)
    torch.testing.assert_close(kept[:, 0], full[:, 0], rtol=0, atol=0)  # [CLS] + its position
    torch.testing.assert_close(kept[:, 1:], gather_tokens(full[:, 1:], keep), rtol=0, atol=0)
    # the timm sequence [CLS; patches] + pos_embed, as before keep existed
    ref = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
    torch.testing.assert_close(full, ref, rtol=0, atol=0)
    assert model.forward_features(x, keep=keep).shape == (3, 6, 192)
    with torch.no_grad():  # a sequence of only the kept tokens, through the same blocks
        torch.testing.assert_close(model(x, keep=keep), model.norm(model.blocks(kept))[:, 0])


def test_smaller_views_get_a_bicubically_resized_position_embedding(one_thread):
    model = vit("vit_tiny", image_size=32, patch_size=4, in_channels=1, depth=1, pos_embed="learned")
    pos = model.patch_position_embedding(4, 4)  # 16 px crops of a 32 px model (multi-crop)
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos, ref.flatten(2).transpose(1, 2))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 192)
    assert torch.equal(model.patch_position_embedding(8, 8), model.pos_embed[:, 1:])


def test_avg_pool_matches_timm_and_torchvision_export_refuses_it(one_thread, tmp_path):
    timm = pytest.importorskip("timm")
    ours = vit_backbone("vit_tiny", in_channels=1, image_size=28, depth=2, global_pool="avg").eval()
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False, img_size=28,
                               patch_size=4, in_chans=1, depth=2, global_pool="avg",
                               fc_norm=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), ours.forward_features(x)[:, 1:].mean(1))
    from mocolab.export import export_backbone

    cfg = build_config(data="synthetic", method="ijepa", arch="vit_tiny", vit_depth=1, patch_size=2,
                       crop_size=16, predictor_dim=32, predictor_depth=1, predictor_heads=4,
                       min_keep=2, batch_size=16, max_steps=1, progress=False, threads=1,
                       out_dir=str(tmp_path), run_name="ijepa")
    run_dir = pretrain(cfg, final_eval=False)["run_dir"]
    result = export_backbone(run_dir, "timm")  # loads into timm with global_pool="avg"
    assert any("checked" in note for note in result.notes)
    assert any('global_pool="avg", fc_norm=False' in note for note in result.notes)
    with pytest.raises(ConfigError, match="mean of its patch tokens"):
        export_backbone(run_dir, "torchvision")


def test_patch_predictor_reads_only_the_targets_and_ignores_the_order_of_visible_tokens(one_thread):
    from mocolab.vit import PatchPredictor

    torch.manual_seed(0)
    pred = PatchPredictor(grid=4, in_dim=8, dim=16, depth=1, num_heads=2, out_dim=5).eval()
    x = torch.randn(2, 6, 8)  # one prefix token, then 5 visible ones
    visible = torch.tensor([[0, 3, 5, 9, 12], [1, 2, 7, 8, 15]])
    targets = torch.tensor([[4, 6, 10], [0, 11, 14]])
    out = pred(x, visible, targets)
    assert out.shape == (2, 3, 5)
    order = torch.tensor([4, 2, 0, 1, 3])  # the visible tokens shuffled with their positions
    with torch.no_grad():
        shuffled = pred(torch.cat([x[:, :1], x[:, 1:][:, order]], 1), visible[:, order], targets)
    torch.testing.assert_close(out, shuffled, rtol=1e-5, atol=1e-6)
