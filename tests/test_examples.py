"""The scripts of examples/ run as a user runs them, at their tiny size (``--tiny``): from a
folder to nearest neighbours, a method in the user's own file, evaluation on the user's own
labels, export and loading in torchvision, timm and ONNX Runtime."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, tmp_path: Path, monkeypatch, capsys) -> str:
    """``python examples/NAME.py --tiny`` in ``tmp_path``, in this process; what it printed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), "--tiny"])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as python puts the script's folder first
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    tested = set(re.findall(r'run_example\("(\w+\.py)"', Path(__file__).read_text()))
    assert scripts == tested, scripts ^ tested


def test_folder_to_neighbours(tmp_path, monkeypatch, capsys, one_thread):
    out = run_example("folder_to_neighbours.py", tmp_path, monkeypatch, capsys)
    assert "36 images embedded in 64 dimensions" in out  # 3 classes × 12 images, width 8 → 64
    rows = [line for line in out.splitlines() if " → " in line]
    assert len(rows) == 5
    for row in rows:  # three neighbours, never the image itself, similarities at most 1
        image, found = row.split(" → ")
        neighbours = re.findall(r"(\S+) \((-?[\d.]+)\)", found)
        assert len(neighbours) == 3 and image not in {n for n, _ in neighbours}
        assert all(float(s) <= 1.0 + 1e-6 for _, s in neighbours)
    assert (tmp_path / "neighbours" / "embeddings.paths.txt").read_text().count("\n") == 36


def test_custom_method_in_the_users_own_file(tmp_path, monkeypatch, capsys, one_thread):
    from mocolab.methods.registry import _REGISTRY

    try:
        out = run_example("custom_method.py", tmp_path, monkeypatch, capsys)
        assert "plainclr" in _REGISTRY
        assert re.search(r"plainclr: 2 steps, kNN top-1 [\d.]+ %", out), out
    finally:
        _REGISTRY.pop("plainclr", None)


def test_evaluate_own_labels(tmp_path, monkeypatch, capsys, one_thread):
    out = run_example("evaluate_own_labels.py", tmp_path, monkeypatch, capsys)
    # 3 classes × 12 images; a class-balanced 80 % trains: round(0.8 · 12) = 10 of each class,
    # so 3 × 2 are held out
    assert "36 images, 3 classes, 6 held out" in out, out
    knn, linear = map(
        float, re.search(r"kNN \(k=20\) top-1 ([\d.]+) %\s+linear top-1 ([\d.]+) %", out).groups()
    )
    assert 0 <= knn <= 100 and 0 <= linear <= 100


def test_export_and_load(tmp_path, monkeypatch, capsys, one_thread):
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    out = run_example("export_and_load.py", tmp_path, monkeypatch, capsys)
    differences = re.findall(
        r"(torchvision resnet18|timm resnet18|ONNX Runtime): max difference (\S+)", out
    )
    assert [name for name, _ in differences] == [
        "torchvision resnet18",
        "timm resnet18",
        "ONNX Runtime",
    ]
    assert all(float(d) < 1e-4 for _, d in differences), differences
