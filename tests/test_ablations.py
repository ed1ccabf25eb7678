"""The ablation studies (benchmarks/ablations/) at budget tiny: each writes its CSV, PNG and
markdown with one row per (setting, seed) and the expected columns; bad input is one line."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

ABLATIONS = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations"


def study(name: str):
    """Import a study script as a module (the scripts are not a package)."""
    sys.path.insert(0, str(ABLATIONS))
    spec = importlib.util.spec_from_file_location(f"ablation_{name}", ABLATIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tiny(name: str, tmp_path: Path, *extra: str) -> tuple[list[dict], Path, str]:
    """Run a study at budget tiny into ``tmp_path``; the CSV rows, the PNG and the markdown."""
    out = tmp_path / "out"
    code = study(name).run(["--budget", "tiny", "--threads", "1", "--out", str(out),
                            "--runs-dir", str(tmp_path / "runs"), *extra])
    assert code == 0
    with (out / f"{name}.csv").open() as f:
        rows = list(csv.DictReader(f))
    png = out / f"{name}.png"
    with Image.open(png) as im:  # a real PNG with some size
        assert im.format == "PNG" and im.width > 300 and im.height > 100
    return rows, png, (out / f"{name}.md").read_text()


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the markdown table's body rows."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


COMMON = {"setting", "seed", "knn_top1", "knn_top5", "final_loss", "final_acc", "steps", "images",
          "seconds", "run"}


def test_momentum_study_tiny(tmp_path):
    rows, _, md = run_tiny("momentum", tmp_path)
    assert COMMON | {"momentum", "diag_queue_consistency", "diag_key_agreement"} <= set(rows[0])
    assert [float(r["momentum"]) for r in rows] == [0.0, 0.9, 0.99, 0.999, 0.9999]
    for r in rows:
        assert 0 <= float(r["knn_top1"]) <= 100
        assert int(r["steps"]) == 4 and int(r["images"]) == 4 * 32
        assert -1 <= float(r["diag_queue_consistency"]) <= 1
    body = table_rows(md)
    # the paper's Table 4 beside each m
    assert [(c[0], c[-1]) for c in body] == [("m=0", "fail"), ("m=0.9", "55.2"), ("m=0.99", "57.8"),
                                            ("m=0.999", "59.0"), ("m=0.9999", "58.9")]
    assert "budget `tiny`" in md


def test_dictionary_study_tiny(tmp_path):
    rows, _, md = run_tiny("dictionary", tmp_path)
    assert COMMON | {"mechanism", "K", "consistency"} <= set(rows[0])
    got = [(r["mechanism"], int(r["K"])) for r in rows]
    # end-to-end at batches 16 and 32 has 2N − 2 in-batch negatives
    assert got == [("end-to-end", 30), ("end-to-end", 62), ("memory bank", 32), ("memory bank", 64),
                   ("MoCo queue", 32), ("MoCo queue", 64)]
    # equal compute: every run sees the same number of images (4 steps of 32)
    assert {int(r["images"]) for r in rows} == {128}
    assert [int(r["steps"]) for r in rows[:2]] == [8, 4]
    for r in rows:
        assert -1 <= float(r["consistency"]) <= 1
    assert all(float(r["consistency"]) == 1.0 for r in rows if r["mechanism"] == "end-to-end")
    assert len(table_rows(md)) == 6


def test_shuffle_bn_study_tiny(tmp_path):
    rows, _, md = run_tiny("shuffle_bn", tmp_path, "--seeds", "2")
    assert COMMON | {"shuffle_bn", "diag_queue_consistency"} <= set(rows[0])
    assert [(r["shuffle_bn"], r["seed"]) for r in rows] == [("True", "0"), ("True", "1"),
                                                            ("False", "0"), ("False", "1")]
    body = table_rows(md)
    assert [c[0] for c in body] == ["shuffle-BN on", "shuffle-BN off"]
    assert [c[1] for c in body] == ["2", "2"]  # two seeds each
    assert "±" in body[0][2]  # mean ± sd over the seeds


def test_temperature_study_tiny_and_reuse(tmp_path):
    rows, _, md = run_tiny("temperature", tmp_path)
    assert COMMON | {"part", "temperature", "head_layers", "augment", "lr_schedule"} <= set(rows[0])
    assert [r["setting"] for r in rows] == ["τ=0.1", "τ=0.2", "v1", "v1 + MLP", "v1 + aug+",
                                           "v1 + MLP + aug+", "v2 (+ cosine)"]
    ladder = {r["setting"]: r for r in rows if r["part"] == "v1→v2"}
    assert (ladder["v1"]["head_layers"], ladder["v1"]["augment"], ladder["v1"]["lr_schedule"]) == \
        ("1", "mocov1", "step")
    assert (ladder["v2 (+ cosine)"]["head_layers"], ladder["v2 (+ cosine)"]["augment"],
            ladder["v2 (+ cosine)"]["lr_schedule"]) == ("2", "mocov2", "cosine")
    # the v2 note's numbers beside the ladder
    assert {c[0]: c[-1] for c in table_rows(md)}["v1 + MLP + aug+"] == "67.3"
    # a second call reads the finished runs back instead of training them again
    again, _, _ = run_tiny("temperature", tmp_path)
    assert [r["knn_top1"] for r in again] == [r["knn_top1"] for r in rows]
    assert [r["seconds"] for r in again] == [r["seconds"] for r in rows]


@pytest.mark.parametrize("name", ["momentum", "dictionary", "shuffle_bn", "temperature"])
def test_full_budget_configs_are_valid(name, capsys):
    assert study(name).run(["--budget", "full", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all(": {" in ln for ln in lines)


def test_full_budget_without_imagenet_is_one_line(tmp_path, capsys):
    code = study("momentum").run(["--budget", "full", "--out", str(tmp_path), "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--data" in err


def test_mean_sd_and_cell_by_hand():
    s = study("momentum")
    import _study

    assert _study.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert _study.mean_sd([None, 4.0]) == (4.0, None)
    assert _study.cell([1.0, 3.0]) == "2.00 ± 1.41"
    assert _study.cell([None]) == "–"
    assert s.STUDY == "momentum"
