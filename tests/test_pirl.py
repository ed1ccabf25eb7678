"""PIRL: the paper's NCE (§3) and λ-mixed loss (§3.1) on a hand-made bank, the bank update
from f(v_I), the jigsaw transform's order reaching g, presets, and tiny runs through the loop
(exact resume, the evaluated backbone)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import losses, resume_after_ctrl_c_continues_exactly

from mocolab.augment import recipe, tile_crop_size
from mocolab.backbones import resnet
from mocolab.checkpoint import load_backbone_and_info, load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.dictionaries import MemoryBank
from mocolab.methods.pirl import PIRL, TileHead, permute_tiles, pirl_loss, random_permutations
from mocolab.methods.tiles import grid_side, tile_grid
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the loss against the paper's formulas -----------------------------------------------------


def three_entry_bank() -> MemoryBank:
    bank = MemoryBank(3, dim=2)
    bank.bank.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # m_0, m_1, m_2
    return bank


F_I = torch.tensor([[1.0, 0.0]])  # f(v_I) of image 0: the same direction as m_0
G_T = torch.tensor([[0.6, 0.8]])  # g(v_It) of image 0
TAU, NOISE = 0.5, torch.tensor([1, 2])  # N = 2 negatives, m_1 and m_2, out of |D| = 3


def paper_nce(v: list[float], tau: float = TAU) -> float:
    """L_NCE (§3) with the paper's h(m, v) = exp(cos/τ) / (exp(cos/τ) + N/|D|), positive m_0."""
    m = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]

    def h(i):
        e = math.exp((m[i][0] * v[0] + m[i][1] * v[1]) / tau)
        return e / (e + 2 / 3)

    return -math.log(h(0)) - math.log(1 - h(1)) - math.log(1 - h(2))


def test_each_term_is_the_papers_nce_and_the_loss_mixes_them_by_lambda():
    bank = three_entry_bank()
    index = torch.tensor([0])
    # Z = 1: the paper's h exactly (the official code divides by a Z estimated on the first batch)
    loss, metrics, z = pirl_loss(F_I, G_T, bank, index, NOISE, TAU, "nce", 1.0, jigsaw_weight=0.3)
    jigsaw, image = paper_nce([0.6, 0.8]), paper_nce([1.0, 0.0])
    # by hand: h(m_0, f) = e²/(e² + 2/3), 1 − h(m_1, f) = (2/3)/(1 + 2/3) = 0.4,
    # 1 − h(m_2, f) = (2/3)/(e⁻² + 2/3): the image term 0.0864 + 0.9163 + 0.1848
    assert image == pytest.approx(1.1875, abs=1e-4)
    assert metrics["loss_jigsaw"].item() == pytest.approx(jigsaw, rel=1e-5)
    assert metrics["loss_image"].item() == pytest.approx(image, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * jigsaw + 0.7 * image, rel=1e-5)
    assert z == 1.0


def test_the_normaliser_is_estimated_once_from_the_jigsaw_terms_scores():
    bank = three_entry_bank()
    loss, metrics, z = pirl_loss(F_I, G_T, bank, torch.tensor([0]), NOISE, TAU, "nce", -1.0, 0.5)
    # Z = |D| · mean over the 1 + N scored entries of exp(m·g/τ): g·m = 0.6, 0.8, −0.6
    want = 3 * (math.exp(1.2) + math.exp(1.6) + math.exp(-1.2)) / 3
    assert z == pytest.approx(want, rel=1e-5)

    # both terms with that Z: h = (e/Z) / (e/Z + N/|D|)
    def nce(v):
        s = [v[0], v[1], -v[0]]
        p = [math.exp(x / TAU) / want for x in s]
        return -math.log(p[0] / (p[0] + 2 / 3)) - sum(
            math.log((2 / 3) / (q + 2 / 3)) for q in p[1:]
        )

    assert metrics["loss_jigsaw"].item() == pytest.approx(nce([0.6, 0.8]), rel=1e-5)
    assert metrics["loss_image"].item() == pytest.approx(nce([1.0, 0.0]), rel=1e-5)


def test_softmax_terms_are_infonce_over_the_same_entries():
    bank = three_entry_bank()
    loss, _, _ = pirl_loss(F_I, G_T, bank, torch.tensor([0]), NOISE, TAU, "softmax", -1.0, 0.5)

    def info_nce(s):  # positive first
        return math.log(sum(math.exp(x / TAU) for x in s)) - s[0] / TAU

    want = 0.5 * info_nce([0.6, 0.8, -0.6]) + 0.5 * info_nce([1.0, 0.0, -1.0])
    assert loss.item() == pytest.approx(want, rel=1e-5)


# --- the jigsaw transform ----------------------------------------------------------------------


def test_random_permutations_are_uniform_over_all_orders():
    perms = random_permutations(1200, 3, torch.Generator().manual_seed(0))
    assert torch.equal(perms.sort(dim=1).values, torch.arange(3).expand(1200, 3))
    counts = [
        int((perms == torch.tensor(p)).all(dim=1).sum()) for p in itertools.permutations(range(3))
    ]
    assert all(150 <= c <= 250 for c in counts), counts  # 200 each expected


def test_permute_tiles_puts_tile_perm_k_at_position_k():
    tiles = torch.arange(2 * 4).view(2, 4, 1, 1, 1).float()  # tile k of image n holds 4n + k
    perm = torch.tensor([[2, 0, 3, 1], [1, 2, 3, 0]])
    out = permute_tiles(tiles, perm).view(2, 4)
    assert out.tolist() == [[2, 0, 3, 1], [5, 6, 7, 4]]


def test_tile_head_concatenates_in_the_shuffled_order():
    torch.manual_seed(0)
    head = TileHead(in_dim=3, dim=2, tiles=4, hidden_dim=None, num_layers=1)
    z = torch.randn(1, 4, 3)
    w, b = head.tile.weight, head.tile.bias
    by_hand = torch.cat([w @ z[0, k] + b for k in range(4)])  # 8: tile 0's projection first
    torch.testing.assert_close(head(z)[0], head.concat.weight @ by_hand + head.concat.bias)
    swapped = z[:, [1, 0, 2, 3]]
    assert not torch.allclose(head(z), head(swapped), atol=1e-4)  # g sees where each tile sits


def small_pirl(**kw) -> PIRL:
    torch.manual_seed(0)
    options = dict(
        num_images=24, dim=8, nce_k=10, temperature=0.1, tile_size=4, tile_gap=1, tile_jitter=1
    )
    return PIRL(resnet("resnet18", 1, "compact", width=8), **{**options, **kw})


INDEX = torch.tensor([3, 0, 7, 21, 12, 5])


def views(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 1, 16, 16, generator=g), torch.randn(6, 1, 18, 18, generator=g)]


def test_the_loss_scores_the_tiles_in_the_order_the_generator_drew():
    """Eval mode (no tile jitter or colour): the draws are the permutations, then the noise."""
    model = small_pirl(loss="softmax").eval()
    x, x_t = views()
    out = model([x, x_t], torch.Generator().manual_seed(5), index=INDEX)
    g = torch.Generator().manual_seed(5)
    perm = random_permutations(6, 9, g)
    noise = torch.randint(24, (10,), generator=g)
    tiles = tile_grid(x_t, grid=3, tile=4, gap=1, jitter=1)  # 14 px grid, centred in 18 px
    assert torch.equal(tiles[:, 4], x_t[:, :, 7:11, 7:11])

    def loss_with(order):
        with torch.no_grad():
            f = F.normalize(model.query_encoder(x), dim=1)
            gt = F.normalize(
                model.tile_head(
                    torch.stack([model.backbone(tiles[n, order[n]]) for n in range(6)])
                ),
                dim=1,
            )
        bank = model.memory_bank.bank

        def ce(v):
            total = 0.0
            for i in range(6):
                s = [float(v[i] @ bank[INDEX[i]]) / 0.1] + [
                    float(v[i] @ bank[j]) / 0.1 for j in noise
                ]
                total += math.log(sum(math.exp(a) for a in s)) - s[0]
            return total / 6

        return 0.5 * ce(gt) + 0.5 * ce(f)

    assert out.loss.item() == pytest.approx(loss_with(perm), rel=1e-4)
    assert out.loss.item() != pytest.approx(loss_with(torch.arange(9).expand(6, 9)), rel=1e-3)


def test_no_gradient_into_the_bank_and_it_moves_towards_f_only_after_the_step():
    model = small_pirl().train()
    model.memory_bank.bank.requires_grad_(True)
    before = model.memory_bank.bank.detach().clone()
    x, x_t = views()
    out = model([x, x_t], torch.Generator().manual_seed(2), index=INDEX)
    out.loss.backward()
    assert model.memory_bank.bank.grad is None
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.tile_head.concat.weight.grad.abs().sum() > 0  # the jigsaw branch learns
    assert torch.equal(model.memory_bank.bank.detach(), before)  # the forward pass writes nothing
    with torch.no_grad():
        f = F.normalize(model.query_encoder(x), dim=1)  # f(v_I), train-mode BN as in the step
        model.memory_bank.bank.requires_grad_(False)
    model.on_step_end(out, 0, 10)
    rows = INDEX.tolist()
    for row in range(24):
        if row in rows:
            mixed = [
                0.5 * float(m) + 0.5 * float(v) for m, v in zip(before[row], f[rows.index(row)])
            ]
            norm = math.sqrt(sum(v * v for v in mixed))
            torch.testing.assert_close(
                model.memory_bank.bank[row],
                torch.tensor([v / norm for v in mixed]),
                atol=1e-5,
                rtol=1e-4,
            )
        else:
            assert torch.equal(model.memory_bank.bank[row], before[row])


# --- configuration ------------------------------------------------------------------------------


def test_presets_and_the_papers_geometry(capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"pirl-{data}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["method"] == "pirl"
    imagenet = build_config("pirl-imagenet")
    assert (
        imagenet.arch,
        imagenet.temperature,
        imagenet.nce_k,
        imagenet.bank_momentum,
        imagenet.loss,
        imagenet.jigsaw_weight,
        imagenet.batch_size,
        imagenet.lr * imagenet.batch_size / 256,
        imagenet.epochs,
    ) == ("resnet50", 0.07, 32000, 0.5, "nce", 0.5, 1024, 0.12, 800)
    # VISSL: a 255 px crop cut into 85 px cells holding 64 px tiles
    side = tile_crop_size(imagenet.crop_size)
    assert side == 255 and imagenet.tile_size + imagenet.tile_gap == 85
    assert grid_side(3, imagenet.tile_size, imagenet.tile_gap) + 2 * imagenet.tile_jitter <= side
    view, tiles = recipe("pirl", 224), recipe("pirl-tiles", 224)
    assert (view.scale, view.jitter, view.jitter_p, view.grayscale_p, view.hflip_p) == (
        (0.08, 1.0),
        (0.4, 0.4, 0.4, 0.2),
        1.0,
        0.2,
        0.5,
    )
    assert (tiles.size, tiles.scale, tiles.jitter_p, tiles.grayscale_p, tiles.hflip_p) == (
        255,
        (0.6, 1.0),
        0.0,
        0.0,
        0.0,
    )
    cfg = build_config(method="pirl")
    assert (cfg.nce_k, cfg.temperature, cfg.jigsaw_weight, cfg.augment, cfg.head_layers) == (
        32000,
        0.07,
        0.5,
        "pirl",
        1,
    )


def test_view_recipes_keep_the_tile_crop_unless_both_are_given():
    model = small_pirl()
    assert model.view_recipes("pirl") == ["pirl", "pirl-tiles"]
    assert model.view_recipes("mocov2") == ["mocov2", "pirl-tiles"]
    assert model.view_recipes("simclr, cpc") == ["simclr", "cpc"]
    with pytest.raises(ConfigError, match="names 3 recipes"):
        model.view_recipes("pirl,pirl,pirl")


def test_bad_options_are_one_clear_line():
    with pytest.raises(ConfigError, match="--jigsaw-weight must be in"):
        build_config(method="pirl", jigsaw_weight=1.5)
    with pytest.raises(
        ConfigError,
        match="--tile-size 12 and --tile-gap 2 make a 40 px grid, wider than the 32 px crop",
    ):
        build_config(method="pirl", crop_size=28, tile_size=12, tile_gap=2)


# --- tiny runs ---------------------------------------------------------------------------------

TINY = dict(
    data="synthetic",
    method="pirl",
    width=8,
    stem="compact",
    batch_size=16,
    bn_splits=2,
    crop_size=16,
    tile_size=4,
    tile_gap=1,
    tile_jitter=1,
    nce_k=64,
    dim=16,
    epochs=1,
    progress=False,
    threads=1,
    log_every=1,
    diagnostics_every=0,
)


def test_tiny_run_and_its_backbone_evaluates(tmp_path, capsys):
    res = pretrain(
        build_config(**TINY, max_steps=3, out_dir=str(tmp_path), run_name="r"), final_eval=False
    )
    curve = losses(res["run_dir"])
    assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
    backbone, info = load_backbone_and_info(res["run_dir"])
    assert info["config"]["method"] == "pirl"
    x = torch.randn(2, 3, 16, 16)
    assert backbone.eval()(x).shape == (2, backbone.num_features)  # the ResNet on whole images
    assert main(["eval", "knn", res["run_dir"], "--k", "10", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_resume_after_ctrl_c_continues_exactly(tmp_path):
    run_dir = resume_after_ctrl_c_continues_exactly({**TINY, "loss": "nce"}, tmp_path, steps=6)
    a = load_checkpoint(run_dir)["model"]
    assert {"memory_bank.bank", "normalizer", "tile_head.concat.weight"} <= set(a)
