"""Embedding a folder: every readable image once, in sorted order, resumable after a stop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import fake_run
from PIL import Image

import mocolab.embed as embed_mod
from mocolab.cli import main
from mocolab.config import ConfigError
from mocolab.embed import embed_folder, index_path, parts_dir

FAST = dict(batch_size=3, chunk_size=4, device="cpu", num_workers=0, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("runs"), "small", width=8, stem="compact", crop_size=32)


def make_folder(root: Path, n: int = 9) -> Path:
    """``n`` 32×32 images (one grayscale, some in a subfolder) and one corrupt file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("b" if i % 3 == 0 else "a")
        sub.mkdir(parents=True, exist_ok=True)
        if i == 4:
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(sub / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    return root


def expected(run: Path, folder: Path, rel_paths: list[str]) -> np.ndarray:
    """Reference: PIL → RGB array → the run's backbone after normalisation, one by one."""
    from mocolab.checkpoint import load_backbone_and_info

    backbone, info = load_backbone_and_info(run)
    mean = torch.tensor(info["mean"]).view(3, 1, 1)
    std = torch.tensor(info["std"]).view(3, 1, 1)
    rows = []
    for rel in rel_paths:
        a = np.asarray(Image.open(folder / rel).convert("RGB"), dtype=np.float32) / 255
        x = (torch.from_numpy(a).permute(2, 0, 1) - mean) / std
        with torch.no_grad():
            rows.append(backbone(x[None])[0].numpy())
    return np.stack(rows)


def test_every_readable_image_is_embedded_in_sorted_order(run, tmp_path):
    folder = make_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="skipped 1 of 10"):
        result = embed_folder(run, folder, tmp_path / "e.npy", **FAST)
    paths = index_path(tmp_path / "e.npy").read_text().splitlines()
    assert paths == ["a/1.png", "a/2.png", "a/4.png", "a/5.png", "a/7.png", "a/8.png",
                     "b/0.png", "b/3.png", "b/6.png"]
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (9, 64) and emb.dtype == np.float32 and result.num_images == 9
    np.testing.assert_allclose(emb, expected(run, folder, paths), rtol=1e-4, atol=1e-5)
    assert not parts_dir(tmp_path / "e.npy").exists()  # the chunks are gone once assembled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "e.paths.txt", "imgs"]


def test_an_interrupted_run_continues_where_it_stopped(run, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    out = tmp_path / "e.npy"
    saved = embed_mod._save_chunk
    calls = {"n": 0}

    def stop_on_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        saved(*args)

    monkeypatch.setattr(embed_mod, "_save_chunk", stop_on_second)
    with pytest.raises(KeyboardInterrupt):
        embed_folder(run, folder, out, **FAST)
    progress = json.loads((parts_dir(out) / "progress.json").read_text())
    assert progress["done"] == [0] and not out.exists()
    monkeypatch.setattr(embed_mod, "_save_chunk", saved)

    decoded = []
    original = embed_mod._DecodeFiles.__getitem__
    monkeypatch.setattr(embed_mod._DecodeFiles, "__getitem__",
                        lambda self, i: decoded.append(self.paths[i].name) or original(self, i))
    with pytest.warns(UserWarning, match="skipped"):
        result = embed_folder(run, folder, out, **FAST)
    assert result.resumed_chunks == 1 and len(decoded) == 10 - 4  # chunk 0 was not redone
    with pytest.warns(UserWarning, match="skipped"):
        embed_folder(run, folder, tmp_path / "clean.npy", **FAST)
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "clean.npy"))
    assert index_path(out).read_text() == index_path(tmp_path / "clean.npy").read_text()


def test_leftover_chunks_of_other_images_are_not_mixed_in(run, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    out = tmp_path / "e.npy"
    monkeypatch.setattr(embed_mod, "_save_chunk", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        embed_folder(run, folder, out, **FAST)
    monkeypatch.undo()
    Image.new("RGB", (32, 32)).save(folder / "a" / "new.png")
    with pytest.raises(ConfigError, match=r"other images or other weights.*--restart"):
        embed_folder(run, folder, out, **FAST)
    with pytest.warns(UserWarning):
        assert embed_folder(run, folder, out, restart=True, **FAST).num_images == 10


def test_parquet_output_matches_npy(run, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    folder = make_folder(tmp_path / "imgs", n=4)
    with pytest.warns(UserWarning):
        embed_folder(run, folder, tmp_path / "e.parquet", **FAST)
        embed_folder(run, folder, tmp_path / "e.npy", **FAST)
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("path").to_pylist() == index_path(tmp_path / "e.npy").read_text().splitlines()
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32),
                                  np.load(tmp_path / "e.npy"))


def test_cli_embed_and_its_errors(run, tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", n=3)
    args = ["embed", str(run), "--data", str(folder), "--no-progress", "--num-workers", "0",
            "--device", "cpu"]
    with pytest.warns(UserWarning):
        assert main([*args, "--out", str(tmp_path / "e.npy")]) == 0
    assert "wrote 3×64 embeddings" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "e.csv")]) == 2
    assert ".npy" in capsys.readouterr().err
    assert main(["embed", str(run), "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
