"""The command line as a user meets it: flags, errors without tracebacks, eval commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from mocolab.cli import main

FAST = ["--data", "synthetic", "--width", "8", "--stem", "compact", "--batch-size", "32",
        "--bn-splits", "4", "--queue-size", "64", "--epochs", "1", "--threads", "1", "--no-progress",
        "--knn-k", "20"]


def test_print_config_resolves_preset_and_flags(capsys):
    assert main(["pretrain", "--preset", "mocov2-imagenet", "--epochs", "3", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["epochs"] == 3 and cfg["queue_size"] == 65536 and cfg["arch"] == "resnet50"
    assert cfg["temperature"] == 0.2 and cfg["head_layers"] == 2


@pytest.mark.parametrize("flags,needle", [
    (["--queue-size", "-1"], "--queue-size"),
    (["--key-momentum", "2"], "--key-momentum"),
    (["--temperature", "0"], "--temperature"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["--preset", "nope"], "available presets"),
])
def test_bad_input_is_one_clear_line(flags, needle, capsys, tmp_path):
    code = main(["pretrain", *FAST, "--out-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_pretrain_then_eval_knn_and_linear(tmp_path, capsys):
    assert main(["pretrain", *FAST, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    out = capsys.readouterr().out
    assert "kNN (k=20" in out and "Run directory:" in out
    run = tmp_path / "r"
    assert main(["eval", "knn", str(run), "--k", "20", "--t", "0.07", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out
    knn = json.loads((run / "eval_knn.json").read_text())
    assert 0 <= knn["top1"] <= 100 and knn["top5"] >= knn["top1"]
    assert main(["eval", "linear", str(run), "--epochs", "5", "--no-progress"]) == 0
    linear = json.loads((run / "eval_linear.json").read_text())
    assert linear["top1"] > 10.0  # above chance on 10 classes


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path)]) == 2
    assert "not a mocolab run directory" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mocolab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
