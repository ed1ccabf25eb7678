"""The method family: tiny forward/backward per method, a property from each paper, per-view
recipes, and one tiny end-to-end ``pretrain`` run per method."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mocolab.backbones import resnet
from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.methods import (
    BYOL,
    DINO,
    InstDisc,
    InvaSpread,
    MoCoV3,
    SimCLR,
    SimSiam,
    SwAV,
    build_method,
    method_names,
)
from mocolab.train import pretrain

N = 8  # batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def backbone():
    return resnet("resnet18", in_channels=1, stem="compact", width=8)


def make(name: str):
    torch.manual_seed(0)
    b = backbone()
    if name == "simclr":
        return SimCLR(b, dim=16, head_layers=2, temperature=0.5)
    if name == "simclr2":
        return SimCLR(b, dim=16, head_layers=3, temperature=0.5)
    if name == "byol":
        return BYOL(b, dim=16, hidden_dim=32, momentum=0.9)
    if name == "simsiam":
        return SimSiam(b, dim=32, hidden_dim=32)
    if name == "mocov3":
        return MoCoV3(b, dim=16, hidden_dim=32, momentum=0.9, temperature=0.5)
    if name == "instdisc":
        return InstDisc(b, num_images=40, dim=16, nce_k=12, temperature=0.1)
    if name == "instdisc-softmax":
        return InstDisc(b, num_images=40, dim=16, nce_k=12, temperature=0.1, loss="softmax")
    if name == "invaspread":
        return InvaSpread(b, dim=16, temperature=0.3)
    if name == "swav":
        return SwAV(b, dim=16, hidden_dim=32, num_prototypes=12, num_local=2, freeze_prototypes_niters=0)
    if name == "dino":
        return DINO(b, dim=16, out_dim=24, hidden_dim=32, num_local=2, momentum=0.9)
    raise AssertionError(name)


def views_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 16, 16, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(model.num_views)]


INDEX = torch.tensor([3, 7, 0, 12, 25, 39, 18, 5])
NAMES = ["simclr", "simclr2", "byol", "simsiam", "mocov3", "instdisc", "instdisc-softmax", "invaspread",
         "swav", "dino"]


def frozen_part(model):
    return model.momentum_encoder


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_the_backbone_and_not_the_ema(name):
    model = make(name).train()
    out = model(views_for(model), torch.Generator().manual_seed(1), index=INDEX)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.metrics.values())
    out.loss.backward()
    assert model.backbone is model.query_encoder.backbone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    ema = frozen_part(model)
    if ema is not None:
        assert all(p.grad is None and not p.requires_grad for p in ema.parameters())
    assert isinstance(model.on_step_end(out, 0, 10), dict)


# --- a property from each paper ----------------------------------------------------------------

def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_simclr_loss_is_nt_xent_of_the_projected_views():
    model = make("simclr").train()
    x1, x2 = views_for(model)
    out = model([x1, x2])
    with torch.no_grad():
        z = F.normalize(torch.cat([model.query_encoder(x1), model.query_encoder(x2)]), dim=1)
    tau, total = 0.5, 0.0
    for i in range(2 * N):  # the 2N − 2 other views are the negatives
        j = (i + N) % (2 * N)
        denom = sum(math.exp(_dot(z[i], z[k]) / tau) for k in range(2 * N) if k != i)
        total += -math.log(math.exp(_dot(z[i], z[j]) / tau) / denom)
    assert abs(out.loss.item() - total / (2 * N)) < 1e-4
    assert len(model.query_encoder.head) == 5 and len(make("simclr2").query_encoder.head) == 8


def test_mocov3_loss_is_two_tau_times_the_symmetrised_in_batch_infonce():
    model = make("mocov3").train()
    x1, x2 = views_for(model)
    out = model([x1, x2])
    with torch.no_grad():
        q1, q2 = (F.normalize(model.predictor(model.query_encoder(x)), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(model.key_encoder(x), dim=1) for x in (x1, x2))
    tau = 0.5

    def ctr(q, k):  # InfoNCE with the batch's keys: key i is query i's positive
        return sum(-math.log(math.exp(_dot(q[i], k[i]) / tau)
                             / sum(math.exp(_dot(q[i], k[j]) / tau) for j in range(N)))
                   for i in range(N)) / N

    expected = 2 * tau * (ctr(q1, k2) + ctr(q2, k1))
    assert abs(out.loss.item() - expected) < 1e-4


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_target_follows_the_cosine_scheduled_ema(name):
    model = make(name).train()
    ema = frozen_part(model)
    for p in ema.parameters():  # start the target away from the online network to see the EMA
        p.data.zero_()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(views_for(model))
    out.loss.backward()
    opt.step()
    online = [p.detach().clone() for p in model.query_encoder.parameters()]
    info = model.on_step_end(out, step=5, total_steps=10)
    base = 0.9
    m = 1 - (1 - base) * (math.cos(math.pi * 5 / 10) + 1) / 2  # BYOL §3.2: halfway = 0.95
    assert info["momentum"] == pytest.approx(m)
    for pt, po in zip(ema.parameters(), online):
        torch.testing.assert_close(pt, (1 - m) * po)  # m·0 + (1 − m)·θ
    assert not any(n.startswith("predictor") for n, _ in ema.named_parameters())


def test_simsiam_target_branch_has_no_gradient():
    model = make("simsiam").train()
    reference = copy.deepcopy(model)
    x1, x2 = views_for(model)
    model([x1, x2]).loss.backward()

    def cos_loss(p, z):  # −cos by hand
        return -((p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))).mean()

    def grads(stop: bool):
        m = copy.deepcopy(reference)
        z1, z2 = m.query_encoder(x1), m.query_encoder(x2)
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        (0.5 * cos_loss(p1, t2) + 0.5 * cos_loss(p2, t1)).backward()
        return [p.grad for p in m.backbone.parameters()]

    got = [p.grad for p in model.backbone.parameters()]
    for a, b in zip(got, grads(stop=True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(got, grads(stop=False)))
    assert not hasattr(model, "target_encoder") and not hasattr(model, "key_encoder")


@pytest.mark.parametrize("name", ["instdisc", "instdisc-softmax"])
def test_instdisc_updates_the_bank_rows_of_the_batch_by_momentum(name):
    model = make(name).train()
    bank_before = model.memory_bank.bank.clone()
    views = views_for(model)
    out = model(views, torch.Generator().manual_seed(2), index=INDEX)
    with torch.no_grad():
        f = F.normalize(model.query_encoder(views[0]), dim=1)
    model.on_step_end(out, 0, 10)
    bank = model.memory_bank.bank
    lam = 0.5
    for row in range(40):
        if row in INDEX.tolist():
            i = INDEX.tolist().index(row)
            mixed = [lam * float(v) + (1 - lam) * float(w) for v, w in zip(bank_before[row], f[i])]
            norm = math.sqrt(sum(v * v for v in mixed))
            torch.testing.assert_close(bank[row], torch.tensor([v / norm for v in mixed]), atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(bank[row], bank_before[row])
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(40))
    if name == "instdisc":  # Z fixed from the first batch
        z = float(model.normalizer)
        assert z > 0
        model(views, torch.Generator().manual_seed(3), index=INDEX)
        assert float(model.normalizer) == z
    with pytest.raises(ValueError, match="index"):
        model(views)


def test_invaspread_loss_follows_the_paper_on_the_batch_features():
    model = make("invaspread").train()
    x1, x2 = views_for(model)
    out = model([x1, x2])
    with torch.no_grad():
        z = F.normalize(torch.cat([model.query_encoder(x1), model.query_encoder(x2)]), dim=1)
    tau, total = 0.3, 0.0
    for x in range(2 * N):
        pos = (x + N) % (2 * N)
        denom = sum(math.exp(_dot(z[x], z[k]) / tau) for k in range(2 * N) if k != x)
        prob = {j: math.exp(_dot(z[x], z[j]) / tau) / denom for j in range(2 * N) if j != x}
        total += math.log(prob[pos]) + sum(math.log(1 - prob[j]) for j in prob if j != pos)
    assert abs(out.loss.item() + total / (2 * N)) < 1e-4


# --- config, recipes, presets ---------------------------------------------------------------

def test_view_recipes_per_view_and_the_augment_override():
    byol = build_method(build_config(method="byol", width=8), 1, "compact")
    assert byol.view_recipes(build_config(method="byol").augment) == ["byol-view1", "byol-view2"]
    assert byol.view_recipes("simclr") == ["simclr", "simclr"]
    with pytest.raises(ConfigError, match="--augment"):
        byol.view_recipes("simclr,mocov2,mocov1")
    instdisc = build_method(build_config(method="instdisc", width=8), 1, "compact", num_images=64)
    assert instdisc.view_recipes("mocov1") == ["mocov1"]
    with pytest.raises(ConfigError, match="--augment"):
        build_config(method="byol", augment="byol-view1,nope")


def test_unknown_method_lists_the_family():
    with pytest.raises(ConfigError, match="--method 'swav2' is not known") as error:
        build_config(method="swav2")
    assert all(name in str(error.value) for name in ("simclr", "byol", "simsiam", "instdisc", "dino"))


NEW = ["simclr", "simclr2", "byol", "simsiam", "mocov3", "instdisc", "invaspread", "swav", "dino"]


@pytest.mark.parametrize("name", NEW)
def test_presets_print_config(name, capsys):
    for data in ("imagenet", "fashion-mnist"):
        assert main(["pretrain", "--preset", f"{name}-{data}", "--print-config"]) == 0
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["method"] == name
    imagenet = build_config(f"{name}-imagenet")
    expected = {"simclr": dict(batch_size=4096, temperature=0.1, head_layers=2, augment="simclr"),
                "simclr2": dict(batch_size=4096, head_layers=3),
                "byol": dict(batch_size=4096, key_momentum=0.996, momentum_schedule="cosine", dim=256,
                             augment="byol-view1,byol-view2"),
                "simsiam": dict(batch_size=512, lr=0.05, dim=2048, predictor_hidden_dim=512),
                "mocov3": dict(temperature=1.0, dim=256, head_layers=3, momentum_schedule="cosine"),
                "instdisc": dict(temperature=0.07, nce_k=4096, bank_momentum=0.5, loss="nce", lr=0.03),
                "invaspread": dict(temperature=0.1, head_layers=1),
                "swav": dict(batch_size=4096, temperature=0.1, prototypes=3000, sinkhorn_epsilon=0.05,
                             sinkhorn_iterations=3, num_local_crops=6, freeze_prototypes_niters=313,
                             optimizer="lars", lr=0.3, weight_decay=1e-6),
                "dino": dict(temperature=0.1, teacher_temperature=0.04, center_momentum=0.9,
                             key_momentum=0.996, out_dim=65536, dim=256, num_local_crops=8)}[name]
    assert {k: getattr(imagenet, k) for k in expected} == expected


# --- one tiny run per method through the training loop ---------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_tiny_pretrain_run(name, tmp_path):
    extra = {"nce_k": 64} if name == "instdisc" else {}
    if name in ("swav", "dino"):  # a small output layer, 2 small views
        extra = {"prototypes": 32, "num_local_crops": 2, "hidden_dim": 32, "freeze_prototypes_niters": 1}
    if name == "byol":  # the per-image backend builds one pipeline per view too
        extra = {"augment_backend": "torchvision", "workers": 0}
    cfg = build_config(data="synthetic", method=name, width=8, stem="compact", batch_size=32,
                       bn_splits=4, epochs=1, max_steps=3, progress=False, threads=1, log_every=1,
                       out_dir=str(tmp_path), run_name="r", **extra)
    res = pretrain(cfg, final_eval=False)
    assert res["step"] == 3
    rows = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("diag_alignment" in r for r in rows)  # diagnostics are logged for every method
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    backbone_, info = load_backbone_and_info(res["run_dir"])  # evaluation finds the trained backbone
    assert info["config"]["method"] == name and sum(p.numel() for p in backbone_.parameters()) > 0


# --- every method from the command line, on a folder of images ------------------------------

@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """48 colour PNGs in nested class folders (CMC needs colour; the others take anything)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for i in range(48):
        folder = root / f"class{i % 3}" / ("deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


CLI_EXTRA = {"mocov1": ["--queue-size", "32"], "mocov2": ["--queue-size", "32"],
             "instdisc": ["--nce-k", "16"], "cmc": ["--nce-k", "16"],
             "swav": ["--prototypes", "16", "--num-local-crops", "2", "--hidden-dim", "32"],
             "dino": ["--prototypes", "16", "--num-local-crops", "2", "--hidden-dim", "32"],
             "barlowtwins": ["--dim", "64"], "vicreg": ["--dim", "64"],
             "nnclr": ["--queue-size", "32"], "densecl": ["--queue-size", "32"],
             **{m: ["--arch", "vit_tiny", "--vit-depth", "1", "--patch-size", "4", *extra]
                for m, extra in {"mae": ["--decoder-dim", "32", "--decoder-depth", "1"],
                                 "ijepa": ["--predictor-dim", "48", "--predictor-depth", "1",
                                           "--min-keep", "4"],
                                 "msn": ["--num-local-crops", "2", "--num-prototypes", "16",
                                         "--hidden-dim", "32"],
                                 **dict.fromkeys(("ibot", "dinov2"), [  # noqa: RUF024 (read only)
                                     "--num-local-crops", "2", "--out-dim", "16",
                                     "--hidden-dim", "32"])}.items()}}


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_from_the_cli_on_an_image_folder(name, colour_folder, tmp_path):
    argv = ["pretrain", "--method", name, "--data", str(colour_folder), "--image-size", "32",
            "--width", "8", "--batch-size", "16", "--bn-splits", "2", "--max-steps", "2",
            "--log-every", "1", "--threads", "1", "--no-progress", "--no-final-eval",
            "--no-compile",  # folder runs on a CPU compile by default: 30 s each, not tested here
            "--out-dir", str(tmp_path), "--run-name", "r", *CLI_EXTRA.get(name, [])]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
