"""``benchmarks/compare.py`` at a toy size (``--tiny``), so that the comparison with lightly and
the official MoCo code keeps running: every contender trains, each row has its numbers,
the contenders alternate, and one that cannot run gets its line while the others go on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """The speed run (the gpu recipe, tiny) and the epochs run (demo-cpu, tiny, with the
    official contender, which needs an image folder), side by side: (output, rows) of each."""
    out = tmp_path_factory.mktemp("compare")
    common = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--workers", "1"]
    commands = {
        "speed": [*common, "--json", str(out / "speed.json")],
        "epochs": [*common, "--recipe", "demo-cpu", "--contenders", "mocolab", "lightly",
                   "official", "--json", str(out / "epochs.json")],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        text = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, text[-3000:]
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
        results[name] = (text, {row["contender"]: row for row in rows})
    return results


def test_every_contender_trains_and_reports_its_speed_wait_and_memory(runs):
    text, rows = runs["speed"]
    for name in ("mocolab", "lightly", "official"):
        row = rows[name]
        assert row["error"] is None, row
        assert row["images_per_s"] > 0 and 0 <= row["wait_share"] <= 1 and row["peak_mib"] > 0
        assert row["images_per_cpu_s"] > 0  # (the CPU seconds of the process and its workers)
        assert len(row["segments"]) == 2  # one timed segment per round
    # the contenders alternate: round 1 of each before round 2 of any
    order = [line.split()[1:3] for line in text.splitlines() if line.strip().startswith("round")]
    assert order == [["1:", "mocolab"], ["1:", "lightly"], ["1:", "official"],
                     ["2:", "mocolab"], ["2:", "lightly"], ["2:", "official"]]  # fmt: skip
    dali = importlib.util.find_spec("solo") is None
    if dali:
        assert rows["solo-dali"]["error"].startswith("not installed (solo-learn")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| contender | images/s |") and len(table) == 1 + 4  # + its rows


def test_the_epochs_run_gives_wall_time_speed_and_knn_and_a_failure_is_one_row(runs):
    text, rows = runs["epochs"]
    for name in ("mocolab", "lightly"):
        row = rows[name]
        assert row["error"] is None, row
        assert row["steps"] == 3 and row["wall_s"] > 0 and row["images_per_s"] > 0
        assert 0 <= row["knn_top1"] <= 100
    # the official data path reads an image folder: its row says so, the run went on
    assert "not applicable" in rows["official"]["error"] and "images_per_s" not in rows["official"]
    assert (
        "| official `main_moco.py` (ImageFolder + DataLoader workers) | RuntimeError: not "
        "applicable" in text
    )
    assert "| contender | wall time (s) | images/s | images per CPU second | data wait |" in text


@pytest.fixture
def compare(monkeypatch):
    """benchmarks/compare.py as a module."""
    spec = importlib.util.spec_from_file_location("compare_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_bench", module)  # (its dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def test_an_epoch_without_a_batch_stops_the_contender_instead_of_looping(compare):
    epochs = []

    def epoch(e: int) -> list[str]:  # two epochs of two batches, then empty ones
        assert e < 10, "it went on over empty epochs"
        return [f"{e}a", f"{e}b"] if e < 2 else []

    batches = compare._epochs(epoch, epochs.append)
    assert [next(batches) for _ in range(4)] == ["0a", "0b", "1a", "1b"]
    with pytest.raises(RuntimeError, match="epoch 2 gave no batch"):
        next(batches)
    assert epochs == [0, 1, 2]  # the hook ran once per epoch, before its batches


def test_a_contender_whose_package_is_missing_is_named_not_installed(compare, monkeypatch):
    assert compare.not_installed("official") is None  # torch and torchvision only
    assert compare.not_installed("lightly") is None  # installed here
    monkeypatch.setitem(
        compare.PACKAGES,
        "lightly",
        (("lightly", "lightly"), ("no_such_module_here", "no-such-package")),
    )
    assert compare.not_installed("lightly") == "not installed (no-such-package)"
    # a dotted module whose parent package is missing (nvidia.dali without nvidia)
    monkeypatch.setitem(
        compare.PACKAGES,
        "solo-dali",
        (("no_such_parent_here.dali", "nvidia-dali"), ("no_such_module_here", "solo-learn")),
    )
    assert compare.not_installed("solo-dali") == "not installed (nvidia-dali, solo-learn)"
