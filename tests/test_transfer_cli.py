"""Transfer evaluations through the command line on one tiny run: per-stage linear probes,
partial and from-scratch fine-tuning saved as runs that every evaluation loads, semantic
segmentation, and their bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from segment_helpers import write_voc

from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import build_config
from mocolab.train import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=1, max_steps=4, log_every=1, progress=False,
                       threads=1, out_dir=str(out), run_name="r")
    return Path(pretrain(cfg, final_eval=False)["run_dir"])


def test_linear_per_layer_table(run, capsys):
    assert main(["eval", "linear", str(run), "--layer", "all", "--epochs", "2", "--pool-dims",
                 "256", "--no-progress"]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "eval_linear_layers.json").read_text())
    assert list(res["stages"]) == ["layer1", "layer2", "layer3", "layer4"]
    for stage, row in res["stages"].items():
        assert row["dims"] <= 256 and 0 <= row["top1"] <= 100
        assert f"{stage:8s} {row['dims']:6d}" in out
    # width 8: layer4 has 64 channels on a 2×2 map (32 px, output stride 16) → 2×2 cells
    assert res["stages"]["layer4"]["dims"] == 256 and res["stages"]["layer4"]["grid"] == "2x2"
    assert res["stages"]["layer1"]["grid"] == "5x5"  # 8 channels: 8·5² = 200 ≤ 256 < 8·6²
    assert main(["eval", "linear", str(run), "--layer", "layer2", "--epochs", "1",
                 "--train-fraction", "0.25", "--no-progress"]) == 0
    res = json.loads((run / "eval_linear_layers.json").read_text())
    assert list(res["stages"]) == ["layer2"]
    # a quarter of each class of the 512 synthetic images (rounded per class: 128 ± classes)
    assert 118 <= res["train_images"] <= 138
    assert main(["eval", "linear", str(run), "--layer", "all", "--train-fraction", "0"]) == 2


def test_finetune_saves_supervised_and_random_backbones_as_runs(run, tmp_path, capsys):
    sup, rnd = tmp_path / "sup", tmp_path / "rnd"
    assert main(["eval", "finetune", str(run), "--fraction", "0.05", "--epochs", "1",
                 "--from-scratch", "--freeze-stages", "1", "--save", str(sup),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "saved the supervised backbone as a run" in out and "stem + 1 stages frozen" in out
    assert main(["eval", "finetune", str(run), "--fraction", "1", "--epochs", "0",
                 "--from-scratch", "--save", str(rnd), "--no-progress"]) == 0
    pre, _ = load_backbone_and_info(run)
    s_net, s_info = load_backbone_and_info(sup)
    r_net, r_info = load_backbone_and_info(rnd)
    assert s_info["origin"]["kind"] == "supervised" and r_info["origin"]["kind"] == "random"
    assert s_info["step"] == 0 and s_info["mean"] == load_backbone_and_info(run)[1]["mean"]
    for a, b in ((pre, s_net), (pre, r_net)):
        assert not torch.equal(a.layer4[0].conv1.weight, b.layer4[0].conv1.weight)
    assert main(["eval", "knn", str(sup), "--k", "5", "--no-progress"]) == 0  # loads like a run
    assert json.loads((sup / "eval_knn.json").read_text())["top1"] >= 0
    assert main(["pretrain", "--resume", str(sup)]) == 2
    assert "holds a saved backbone, not a pretraining run" in capsys.readouterr().err
    assert main(["eval", "finetune", str(sup), "--epochs", "1", "--save", str(run)]) == 2
    assert "already holds a pretraining run" in capsys.readouterr().err


def test_segment_cli_and_its_errors(run, tmp_path, capsys):
    voc = write_voc(tmp_path / "voc", {"train": 6, "val": 3}, size=24)
    assert main(["eval", "segment", str(run), "--data", str(voc), "--iters", "2",
                 "--train-batch", "2", "--head-channels", "8", "--no-progress"]) == 0
    res = json.loads((run / "eval_segment.json").read_text())
    assert res["num_classes"] == 3 and len(res["iou"]) == 3 and 0 <= res["miou"] <= 100
    assert sum(map(sum, res["confusion"])) == 3 * 24 * 24
    assert "mIoU" in capsys.readouterr().out
    from mocolab.visualize.report import segmentation_figures

    (tmp_path / "report").mkdir()
    [(title, png, caption)] = segmentation_figures(run, tmp_path / "report")
    assert png.exists() and "mIoU" in caption and title.startswith("Segmentation")
    assert main(["eval", "segment", str(run), "--data", str(voc), "--num-classes", "2"]) == 2
    assert "has label 2 but --num-classes is 2" in capsys.readouterr().err
    (voc / "SegmentationClass" / "val_002.png").unlink()
    assert main(["eval", "segment", str(run), "--data", str(voc), "--iters", "1"]) == 2
    err = capsys.readouterr().err
    assert "val_002.png (the label map of 'val_002'" in err and len(err.strip().splitlines()) == 1
