"""The journey a user takes with their own images, end to end, on every folder layout:
``pretrain`` → ``eval knn | linear | finetune | retrieval | diagnostics`` → ``report`` →
``embed`` → ``export`` (every format), for a queue method (MoCo v2), a memory-bank method
(InstDisc) and a method without negatives (BYOL). Every command either works or says in one
line why it does not apply; none prints a traceback.

The data is tiny and generated: 30-36 images of 14-40 px in 2-3 classes, two steps of eight.
One pretrained run per (layout, method) is shared by the tests of that pair.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocolab.cli import main

METHODS = ("mocov2", "instdisc", "byol")
LAYOUTS = ("classes", "train_val", "unlabelled", "mixed")
LABELLED = {"classes", "train_val", "mixed"}
MODES = ("L", "RGB", "RGBA", "P", "CMYK", "I;16")


def _photo(rng: np.random.Generator, cls: int, mode: str = "RGB") -> Image.Image:
    """A random-size picture whose colour depends on its class (so that classes differ)."""
    h, w = (int(v) for v in rng.integers(14, 41, size=2))
    a = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
    a[..., cls % 3] += 150
    im = Image.fromarray(a, "RGB")
    if mode == "I;16":
        return Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    if mode == "P":
        return im.quantize(16)
    return im.convert(mode)


def _save(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def make_layout(root: Path, layout: str, seed: int = 0) -> Path:
    """Write one of :data:`LAYOUTS` under ``root``; returns the folder to pass as ``--data``."""
    rng = np.random.default_rng(seed)
    if layout == "classes":  # class subfolders, no train/test split, JPEG and PNG
        for i in range(36):
            _save(_photo(rng, i % 3), root / f"c{i % 3}" / f"im{i}.{'jpg' if i % 2 else 'png'}")
    elif layout == "train_val":
        for split, n in (("train", 32), ("val", 12)):
            for i in range(n):
                _save(_photo(rng, i % 2), root / split / f"k{i % 2}" / f"{split}{i}.png")
    elif layout == "unlabelled":  # images directly in the folder and nested deeper
        for i in range(32):
            sub = root if i % 2 else root / "nested" / f"d{i % 3}"
            _save(_photo(rng, i % 3), sub / f"u{i}.jpg")
    else:  # every mode PIL saves: gray, RGB, RGBA, palette, CMYK, 16-bit
        for i in range(36):
            mode = MODES[i % len(MODES)]
            ext = "jpg" if mode in ("CMYK", "L") else "png"
            _save(_photo(rng, i % 3, mode), root / f"m{i % 3}" / f"im{i}.{ext}")
    return root


TINY = ["--image-size", "16", "--width", "8", "--batch-size", "8", "--bn-splits", "2",
        "--max-steps", "2", "--knn-k", "5", "--threads", "1", "--log-every", "1",
        "--no-compile", "--num-workers", "0", "--no-progress"]
OWN = {"mocov2": ["--queue-size", "16"], "instdisc": ["--nce-k", "16"], "byol": []}  # each its own


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """``run(layout, method)`` → ``(data folder, run directory)``, pretrained once each."""
    base = tmp_path_factory.mktemp("journey")
    old = os.environ.get("MOCOLAB_DATA")
    os.environ["MOCOLAB_DATA"] = str(base / "cache")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    runs: dict[tuple[str, str], tuple[Path, Path]] = {}

    def run(layout: str, method: str) -> tuple[Path, Path]:
        if (layout, method) not in runs:
            data = base / layout / "data"
            if not data.exists():
                make_layout(data, layout)
            out = base / layout / "runs"
            code = main(["pretrain", "--data", str(data), "--method", method, *TINY, *OWN[method],
                         "--out-dir", str(out), "--run-name", method])
            assert code == 0
            runs[layout, method] = data, out / method
        return runs[layout, method]

    yield run
    torch.set_num_threads(before)
    if old is None:
        os.environ.pop("MOCOLAB_DATA", None)
    else:
        os.environ["MOCOLAB_DATA"] = old


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return code, cap.out, cap.err


def _one_line_error(code: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("mocolab: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_evaluate_report_embed_export(journey, layout, method, capsys, tmp_path):
    data, run = journey(layout, method)
    assert (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").stat().st_size > 0
    labelled = layout in LABELLED

    # --- evaluation protocols: work on labelled folders, one line on unlabelled ones --------
    protocols = {"knn": ["--k", "3"], "linear": ["--epochs", "2"],
                 "finetune": ["--fraction", "0.5", "--epochs", "1"], "retrieval": ["--k", "1", "3"]}
    for protocol, flags in protocols.items():
        code, out, err = _cli(capsys, "eval", protocol, run, *flags, "--no-progress")
        if labelled:
            assert code == 0, err
            res = json.loads((run / f"eval_{protocol}.json").read_text())
            key = "top1" if protocol != "retrieval" else "precision@1"
            assert 0.0 <= res[key] <= 100.0
        else:
            _one_line_error(code, err, "has no labels")

    # --- diagnostics: every layout; the queue's consistency is measured on the run's images -
    code, out, err = _cli(capsys, "eval", "diagnostics", run, "--max-images", "16")
    assert code == 0, err
    diag = json.loads((run / "eval_diagnostics.json").read_text())
    assert diag["backbone"]["effective_rank"] >= 1.0
    if method == "mocov2":
        assert diag["queue"]["consistency"] is not None
        assert -1.0 <= diag["queue"]["consistency"]["mean"] <= 1.0

    # --- the report: the same pictures with or without labels -------------------------------
    code, out, err = _cli(capsys, "report", run, "--queries", "4", "--k", "3",
                          "--max-points", "20", "--no-progress")
    assert code == 0, err
    page = (run / "report" / "index.html").read_text()
    for png in ("curves", "retrieval", "embedding", "kernels", "feature_maps"):
        assert (run / "report" / f"{png}.png").stat().st_size > 0, png
    assert "Diagnostics" in page or "eval diagnostics" in page
    if not labelled:
        assert "coloured by class" not in page

    # --- embed every image of the folder ---------------------------------------------------
    n_files = sum(1 for p in data.rglob("*") if p.is_file())
    out_npy = tmp_path / "emb.npy"
    code, out, err = _cli(capsys, "embed", run, "--data", data, "--out", out_npy,
                          "--num-workers", "0", "--no-progress")
    assert code == 0, err
    emb = np.load(out_npy)
    assert emb.shape[0] == n_files and np.isfinite(emb).all()

    # --- export: every format the backbone fits, each loaded back and compared -------------
    from mocolab.export import FORMATS

    for fmt in FORMATS:
        target = tmp_path / f"export-{fmt}"
        code, out, err = _cli(capsys, "export", run, "--format", fmt, "--out",
                              str(target) + {"onnx": ".onnx", "safetensors": ".safetensors",
                                             "detectron2": ".pkl"}.get(fmt, ".pth"))
        if fmt in ("safetensors", "onnx", "torchscript"):  # every backbone has these
            assert code == 0 and f"({fmt})" in out, (fmt, err)
        elif code != 0:  # e.g. torchvision's ResNets have no width 8: one line saying so
            _one_line_error(code, err, f"--format {fmt}")


# --- what a user's folder really holds ----------------------------------------------------


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A PNG whose header claims ``side × side`` pixels (900 MP, above PIL's decompression-bomb
    limit of 2 × 89 MP), with a tiny body: PIL refuses it when it opens it."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


GOOD_NAMES = ["café photo ü.jpg", "new\nline.png", "plain.png", "with space.png",
              *(f"ok{i}.jpg" for i in range(8))]
NON_UTF8 = b"bad\xffname.png"  # a name that is not UTF-8 (Python holds it as bad\udcffname.png)
BAD = {"corrupt.png": "truncated", "empty.jpg": "zero bytes", "notes.png": "text",
       "bomb.png": "decompression bomb", "dangling.jpg": "dangling symlink",
       "loop_a.jpg": "symlink loop", "loop_b.jpg": "symlink loop"}


def make_messy_folder(root: Path) -> int:
    """Good images under odd names beside every kind of bad file; returns the good count."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for name in GOOD_NAMES:
        _photo(rng, 0).save(root / name, format="JPEG" if name.endswith("jpg") else "PNG")
    with open(os.fsencode(root) + b"/" + NON_UTF8, "wb") as f:
        _photo(rng, 1).save(f, format="PNG")
    png = (root / "plain.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[: len(png) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image, despite the name\n")
    _bomb_png(root / "bomb.png")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.symlink(".", root / "itself")  # a directory loop: the walk must not follow it
    return len(GOOD_NAMES) + 1


def test_messy_folder_pretrain_and_embed_skip_with_a_count(tmp_path, capsys, monkeypatch):
    from mocolab.data import SkippedImagesWarning
    from mocolab.embed import read_paths

    monkeypatch.setenv("MOCOLAB_DATA", str(tmp_path / "cache"))
    data = tmp_path / "messy"
    good = make_messy_folder(data)
    total = good + len(BAD)
    with pytest.warns(SkippedImagesWarning, match=f"skipped {len(BAD)} of {total} image files"):
        code, _, err = _cli(capsys, "pretrain", "--data", data, *TINY, *OWN["mocov2"], "--no-final-eval",
                              "--out-dir", tmp_path / "runs", "--run-name", "r")
    assert code == 0, err
    ckpt = torch.load(tmp_path / "runs" / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["info"]["num_images"] == good

    with pytest.warns(UserWarning, match=f"skipped {len(BAD)} of {total} image files"):
        code, _, err = _cli(capsys, "embed", tmp_path / "runs" / "r", "--data", data,
                              "--out", tmp_path / "e.npy", "--num-workers", "0", "--no-progress")
    assert code == 0, err
    names = read_paths(tmp_path / "e.paths.txt")
    assert np.load(tmp_path / "e.npy").shape[0] == len(names) == good
    expected = sorted([*GOOD_NAMES, os.fsdecode(NON_UTF8)])
    assert sorted(names) == expected  # every good name, the newline and the non-UTF-8 one too
    assert all((data / n).is_file() for n in names)  # each stored name opens its file


def test_too_few_images_and_nothing_readable_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOCOLAB_DATA", str(tmp_path / "cache"))
    few = make_layout(tmp_path / "few", "unlabelled")
    code, _, err = _cli(capsys, "pretrain", "--data", few, *TINY, *OWN["mocov2"], "--batch-size", "64",
                          "--out-dir", tmp_path / "runs")
    _one_line_error(code, err, "larger than the dataset")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("no")
    (junk / "b.png").write_bytes(b"")
    code, _, err = _cli(capsys, "pretrain", "--data", junk, *TINY, *OWN["mocov2"], "--out-dir", tmp_path / "r")
    _one_line_error(code, err, "could be decoded")
