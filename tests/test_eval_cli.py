"""Every evaluation protocol and picture through the command line, on one tiny run; the HTML
report opened in headless Chromium; bad input answered with one clear line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocolab.cli import main
from mocolab.config import build_config
from mocolab.train import pretrain

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=1, max_steps=6, log_every=1, knn_k=20, progress=False,
                       threads=1, out_dir=str(out), run_name="r")
    return Path(pretrain(cfg)["run_dir"])


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """A folder of images without class sub-folders: data without labels."""
    folder = tmp_path_factory.mktemp("flat")
    g = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _json(run: Path, name: str) -> dict:
    return json.loads((run / f"eval_{name}.json").read_text())


def test_knn_with_faiss_equals_torch(run, capsys):
    pytest.importorskip("faiss")
    assert main(["eval", "knn", str(run), "--k", "10", "--no-progress"]) == 0
    plain = _json(run, "knn")
    assert (plain["k"], plain["t"], plain["train_images"], plain["test_images"]) == (10, 0.1, 512, 256)
    assert main(["eval", "knn", str(run), "--k", "10", "--faiss", "--no-progress"]) == 0
    assert _json(run, "knn")["top1"] == pytest.approx(plain["top1"])


def test_linear_moco_recipe(run, capsys):
    assert main(["eval", "linear", str(run), "--recipe", "moco", "--epochs", "3",
                 "--augment-copies", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "moco recipe" in out and "lr 30.0" in out and "2 augmented copies" in out
    res = _json(run, "linear")
    assert 0 <= res["top1"] <= res["top5"] <= 100


def test_finetune_fraction(run, capsys):
    assert main(["eval", "finetune", str(run), "--fraction", "0.02", "--epochs", "1",
                 "--no-progress"]) == 0
    res = _json(run, "finetune")
    assert res["train_images"] == 10  # round(0.02 · 51) = 1 of each of the 10 classes
    assert 0 <= res["top1"] <= 100


def test_retrieval(run, capsys):
    assert main(["eval", "retrieval", str(run), "--k", "1", "5", "--no-progress"]) == 0
    res = _json(run, "retrieval")
    assert set(res) >= {"precision@1", "recall@5", "mAP@5", "hit@5"}
    assert res["hit@5"] >= res["precision@1"]  # a hit at 1 is a hit at 5


def test_diagnostics(run, capsys):
    assert main(["eval", "diagnostics", str(run), "--max-images", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "uniformity" in out and "key encoder agreement" in out
    res = _json(run, "diagnostics")
    assert res["images"] == 64
    emb = res["embedding"]
    assert emb["dim"] == 128 and 1 <= emb["effective_rank"] <= 64
    assert -4.0 <= emb["uniformity"] <= 0.0 and 0.0 <= emb["alignment"] <= 4.0
    assert res["queue"]["size"] == 96
    cons = res["queue"]["consistency"]  # the queue records each key's image: measurable
    assert -1.0 <= cons["mean"] <= 1.0 and len(cons["by_age"]) == 4


def test_diagnostics_of_a_memory_bank_method(tmp_path, capsys):
    # InstDisc's bank is sized by the training set: the run's info carries it, so the whole
    # method can be rebuilt for its diagnostics.
    cfg = build_config(method="instdisc", data="synthetic", width=8, stem="compact", batch_size=32,
                       nce_k=64, epochs=1, max_steps=2, progress=False, threads=1,
                       out_dir=str(tmp_path), run_name="bank")
    run = Path(pretrain(cfg, final_eval=False)["run_dir"])
    assert main(["eval", "diagnostics", str(run), "--max-images", "64", "--no-progress"]) == 0
    assert _json(run, "diagnostics")["embedding"]["dim"] == 128


@pytest.mark.parametrize("argv,needle", [
    (["eval", "knn", "{run}", "--k", "5000"], "--k 5000 is larger than the bank"),
    (["eval", "retrieval", "{run}", "--k", "1", "513"], "--k 513 is larger than the bank"),
    (["eval", "finetune", "{run}", "--fraction", "0"], "--fraction must be in (0, 1]"),
    (["eval", "finetune", "{run}", "--data", "{flat}"], "has no labels, so it cannot be evaluated by finetune"),
    (["eval", "finetune", "{run}", "--recipe", "mae"], "layer-wise LR decay needs a ViT backbone"),
    (["eval", "finetune", "{run}", "--layer-decay", "0.5"], "--layer-decay needs --recipe mae"),
    (["report", "{run}", "--layer", "nope", "--no-diagnostics"], "no layer 'nope'"),
])
def test_bad_input_is_one_clear_line(run, flat, capsys, argv, needle):
    argv = [a.format(run=run, flat=flat) for a in argv]
    assert main([*argv, "--no-progress"] if argv[0] == "eval" else argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("change,needle", [
    ("method", "has no query-encoder backbone"),
    ("arch", "backbone weights do not match a resnet34"),
    ("vit", "backbone weights do not match a vit_small"),
    ("unknown", "cannot build the checkpoint's backbone"),
])
def test_checkpoint_of_another_method_or_architecture(run, tmp_path, capsys, change, needle):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    if change == "method":  # e.g. a SimCLR checkpoint: one encoder, other key names
        ckpt["config"]["method"] = "simclr"
        ckpt["model"] = {k.replace("query_encoder.", "encoder."): v for k, v in ckpt["model"].items()}
    else:
        ckpt["config"]["arch"] = {"arch": "resnet34", "vit": "vit_small"}.get(change, "swin_t")
    torch.save(ckpt, tmp_path / "other.pt")
    assert main(["eval", "knn", str(tmp_path / "other.pt"), "--k", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_report_is_self_contained_and_renders(run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out), "--queries", "3", "--k", "4",
                 "--max-points", "60", "--no-progress"]) == 0
    page = out / "index.html"
    assert f"Report: {page}" in capsys.readouterr().out
    html = page.read_text()
    for png in ("curves", "retrieval", "embedding", "kernels", "feature_maps"):
        assert Image.open(out / f"{png}.png").size[0] > 100
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "precision@1" in html and "uniformity" in html and "queue_size" in html
    # the headline: kNN at the end against the encoder at the start, the utilisation
    head = html[html.index("<div class='headline'>") : html.index("<table class='facts'>")]
    assert "kNN top-1" in head and "encoder at the start" in head and "utilisation" in head
    assert html.count("<h3>kNN</h3>") == 1 and "start of training" in html  # one kNN table
    assert "Speed and utilisation" in html and "waiting for data" in html
    assert html.index("<details>") > html.index("Feature maps")  # the options, collapsed, last
    # the measured diagnostics are kept: in the run (eval diagnostics), else beside the page
    assert any((d / "eval_diagnostics.json").exists() for d in (run, out))

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the page was not rendered")
    # Move the page away from its PNGs: it must not need them.
    alone = tmp_path / "alone"
    alone.mkdir()
    probe = alone / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.addEventListener('load', () => "
                                  "document.body.setAttribute('data-images', [...document.images]"
                                  ".map(i => i.complete && i.naturalWidth > 0 ? '1' : '0').join('')))"
                                  "</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    status = re.search(r'data-images="([01]*)"', dom)
    assert status is not None, "the probe script did not run"
    assert status.group(1) == "11111", f"broken images: {status.group(1)}"
    shot = tmp_path / "shot.png"
    shutil.copy(page, alone / "page.html")
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,2000", f"--screenshot={shot}",
                    (alone / "page.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not blank


def test_report_on_unlabelled_data(run, flat, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(run), "--data", str(flat), "--out", str(out), "--queries", "2",
                 "--k", "3", "--no-diagnostics", "--no-progress"]) == 0
    html = (out / "index.html").read_text()
    assert "their nearest other images" in html and "retrieval (test" not in html
    assert len(re.findall(r"<img src='data:image/png;base64,", html)) == 5


def test_dictionary_consistency_of_a_run_when_the_queue_records_its_images(run, monkeypatch):
    """run_diagnostics re-encodes each key's image (the queue's index buffer) with the current
    key encoder and compares: keys made by that encoder from the same views score 1."""
    from mocolab.evaluate import diagnostics

    load = diagnostics.load_method

    def with_index(run_dir, device="cpu"):
        model, info = load(run_dir, device)
        index = torch.full((model.queue.size,), -1, dtype=torch.long)
        index[:40] = torch.arange(40)  # 40 slots hold keys of train images 0..39
        model.queue.register_buffer("index", index)
        # make the stored keys exactly the current key encoder's keys of those images' plain
        # views, so a consistent dictionary must score 1
        from mocolab.augment import eval_view
        from mocolab.data import load_dataset

        x = load_dataset("synthetic", "train").images[:40]
        with torch.no_grad():
            keys = model.key_encoder(eval_view(x, info["crop_size"], info["mean"], info["std"]))
            model.queue.queue[:40] = torch.nn.functional.normalize(keys, dim=1)
        return model, info

    monkeypatch.setattr(diagnostics, "load_method", with_index)
    res = diagnostics.run_diagnostics(run, max_images=32, device="cpu")
    cons = res["queue"]["consistency"]
    assert cons["mean"] == pytest.approx(1.0, abs=1e-4)
    assert len(cons["by_age"]) == 4


def test_faiss_missing_is_one_clear_line(run, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed
    assert main(["eval", "knn", str(run), "--k", "5", "--faiss", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install faiss-cpu" in err and "Traceback" not in err
