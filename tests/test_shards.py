"""WebDataset shards: `mocolab data pack`, the per-rank order, resume, bad input, training.

- packing writes every readable image once (longer side capped), labels, an index; a bad file
  is skipped with a count;
- the order of an epoch is a function of (seed, epoch): the same with or without worker
  processes, different across epochs; ranks read disjoint shards that together cover them;
  starting at batch p gives exactly the tail of the epoch;
- a truncated shard or a non-image member still gives every batch (repeats, a warning); a
  missing shard or an unreachable URL is a one-line error naming it;
- GPU decoding's function (run here on the CPU) matches the workers' PIL decoding;
- 2 gloo processes train from shards and resume mid-epoch exactly; one process trains from
  a folder of non-square JPEGs with whole-image crops, and from its shards;
- a folder that changes while it is packed: the vanished file and the added one are counted;
- in one process, Ctrl-C mid-epoch and --resume repeat the run bit for bit, for a whole-image
  folder and for shards decoded in 2 DataLoader workers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocolab.checkpoint import load_checkpoint
from mocolab.data import DatasetError, load_dataset
from mocolab.data.shards import (
    ShardIndex,
    ShardStream,
    SkippedSamplesWarning,
    decode_jpeg_batch,
    decode_sample,
    is_shards,
    pack_folder,
    parse_size,
)

SHAPES = [(30, 50), (50, 30), (40, 40), (24, 64)]  # (h, w)


def _folder(root: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        c = root / "src" / "ab"[i % 2]
        c.mkdir(parents=True, exist_ok=True)
        h, w = SHAPES[i % len(SHAPES)]
        base = rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(c / f"{i:03d}.jpg", quality=92)
    return root / "src"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    src = _folder(root)
    big = np.zeros((120, 200, 3), np.uint8)
    big[:, :100] = 255
    Image.fromarray(big).save(src / "a" / "zz-big.jpg")  # capped at --max-side 64
    (src / "b" / "zz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(SkippedSamplesWarning, match="skipped 1 unreadable"):
        pack_folder(src, root / "sh", max_side=64, shard_size="12KB", progress=False)
    return src, root / "sh"


def test_pack_writes_every_image_once_with_labels_and_an_index(packed):
    src, out = packed
    index = ShardIndex.load(out)
    meta = json.loads((out / "index.json").read_text())
    assert is_shards(out) and is_shards(out / "index.json") and not is_shards(src)
    assert index.total == 49 == sum(index.counts) and meta["skipped"] == 1
    assert len(index.urls) >= 4 and index.classes == ["a", "b"] and index.channels == 3
    seen = {}
    for url in index.urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert sorted(seen) == [f"{k:09d}" for k in range(49)]
    files = sorted(p.relative_to(src) for p in src.rglob("*.jpg") if "broken" not in p.name)
    for k, rel in enumerate(files):
        assert int(seen[f"{k:09d}"]["cls"]) == "ab".index(rel.parts[0])
    big = Image.open(io.BytesIO(seen[f"{files.index(Path('a/zz-big.jpg')):09d}"]["jpg"]))
    assert big.size == (64, 38)  # 200×120 with its longer side capped at 64
    small = (src / files[0]).read_bytes()
    assert seen["000000000"]["jpg"] == small  # small JPEGs are copied byte for byte


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("64KiB") == 65536
    assert parse_size("500mb") == 5 * 10**8
    with pytest.raises(DatasetError, match="--shard-size"):
        parse_size("lots")


def test_order_is_a_function_of_seed_and_epoch_and_resume_gives_the_tail(packed):
    _, out = packed
    index = ShardIndex.load(out)
    s = ShardStream(index, side=32, batch_size=3, seed=5, streams=2, epochs=2)
    epoch0 = [b.index.tolist() for b in s.batches(0, workers=False)]
    assert epoch0 == [b.index.tolist() for b in s.batches(0, workers=True)]  # 2 processes
    assert epoch0 != [b.index.tolist() for b in s.batches(1, workers=False)]
    again = ShardStream(index, side=32, batch_size=3, seed=5, streams=2, epochs=2)
    assert epoch0 == [b.index.tolist() for b in again.batches(0, workers=False)]
    for p in (1, 2, 5):
        assert [b.index.tolist() for b in s.batches(0, p, workers=True)] == epoch0[p:]
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == s.steps_per_epoch * 3  # no sample twice
    # two ranks: disjoint shards covering all, the same number of batches, disjoint samples
    ranks = [ShardStream(index, side=32, batch_size=3, seed=5, rank=r, world=2, epochs=2)
             for r in range(2)]
    shards = [set(r.stream_shards(0, 0)) for r in ranks]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(index.urls)))
    seen = [{i for b in r.batches(0) for i in b.index.tolist()} for r in ranks]
    assert not seen[0] & seen[1]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch > 0


def test_bad_shards_give_every_batch_with_a_warning_or_a_clear_error(packed, tmp_path):
    _, out = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    first = bad / "shard-000000.tar"
    first.write_bytes(first.read_bytes()[:1500])  # truncated inside its first member
    with tarfile.open(bad / "shard-000001.tar", "a") as tar:  # a member that is not an image
        info = tarfile.TarInfo("999999999.jpg")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    meta = json.loads((bad / "index.json").read_text())
    meta["shards"][1]["count"] += 1
    (bad / "index.json").write_text(json.dumps(meta))
    index = ShardIndex.load(bad)
    s = ShardStream(index, side=32, batch_size=3, seed=0, epochs=1)
    good = ShardStream(ShardIndex.load(out), side=32, batch_size=3, seed=0, epochs=1)
    with pytest.warns(SkippedSamplesWarning, match="shard-00000[01].tar"):
        batches = list(s.batches(0))
    assert len(batches) == s.steps_per_epoch >= good.steps_per_epoch - 1
    assert all(b.images.shape == (3, 3, 32, 32) for b in batches)
    (bad / "shard-000002.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard-000002.tar"):
        ShardIndex.load(bad)
    with pytest.raises(DatasetError, match=r"cannot read the shard index http://127.0.0.1:9/"):
        ShardIndex.load("http://127.0.0.1:9/index.json")
    with pytest.raises(DatasetError, match="streamed for pretraining only"):
        load_dataset(str(out), "train")


def test_gpu_decoding_function_matches_the_workers_decoding(packed):
    src, _ = packed
    files = sorted(src.rglob("0*.jpg"))[:4]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    images, sizes = decode_jpeg_batch(data, 32, "cpu")  # the CUDA path's function, on the CPU
    for n, f in enumerate(files):
        ref, size = decode_sample(f.read_bytes(), 32, 3)
        assert tuple(sizes[n].tolist()) == size
        assert np.abs(images[n].numpy().astype(float) - ref).mean() < 6  # two decoders, of 255


# --- the command line, one and two processes ---------------------------------------------

RUN = ["--image-size", "32", "--width", "4", "--stem", "compact", "--batch-size", "8",
       "--queue-size", "32", "--threads", "1", "--no-progress", "--diagnostics-every", "0",
       "--log-every", "1", "--lr-schedule", "cosine", "--seed", "2"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


_STOPPER = """
import sys
from mocolab.cli import main
from mocolab import train
real = train.pretrain
def stopping(*a, **k):
    def on_step(step, row):
        if step == {stop}:
            raise SystemExit(3)  # every rank dies at the same step, after the checkpoint
    return real(*a, **{{**k, "on_step": on_step}})
train.pretrain = stopping
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_two_processes_train_and_resume_mid_epoch_exactly(packed, tmp_path, source):
    """Under torchrun with 2 processes, from shards (each rank its own) or from a folder of
    non-square JPEGs with whole-image crops: a run stopped at step 2 and resumed repeats the
    uninterrupted run bit for bit."""
    src, out = packed
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    data = [str(out)] if source == "shards" else [str(src), "--crops", "whole"]
    args = ["pretrain", "--data", *data, "--epochs", "2", "--num-workers", "0",
            "--checkpoint-every", "1", "--out-dir", str(tmp_path), *RUN]
    env = {**_env(), "MOCOLAB_DATA": str(tmp_path / "cache")}
    stopper = tmp_path / "stopper.py"
    stopper.write_text(_STOPPER.format(stop=3))
    full = subprocess.run(torchrun + ["-m", "mocolab", *args, "--run-name", "full"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    if source == "shards":
        steps_per_epoch = ShardStream(ShardIndex.load(out), side=32, batch_size=4, seed=2,
                                      world=2, epochs=2).steps_per_epoch
    else:  # 49 decodable images (one file is broken), global batch 8
        steps_per_epoch = 49 // 8
        assert list((tmp_path / "cache" / "folder-cache").glob("*-whole.sizes.npy"))
    assert steps_per_epoch > 3  # the stop below is inside the first epoch
    part = subprocess.run(torchrun + [str(stopper), *args, "--run-name", "part"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert part.returncode != 0 and load_checkpoint(tmp_path / "part")["step"] == 2
    resumed = subprocess.run(torchrun + ["-m", "mocolab", "pretrain", "--resume",
                                         str(tmp_path / "part")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(resuming at step 2)" in resumed.stdout
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 2 * steps_per_epoch + 1))
    assert a == b  # bit for bit: the same batches, views and reductions
    wa = load_checkpoint(tmp_path / "full")["model"]
    wb = load_checkpoint(tmp_path / "part")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_one_process_trains_from_a_folder_of_non_square_jpegs_or_its_shards(packed, tmp_path,
                                                                             source):
    src, out = packed
    data = ["--data", str(src), "--crops", "whole"] if source == "folder" else ["--data", str(out)]
    run = subprocess.run([sys.executable, "-m", "mocolab", "pretrain", *data, "--epochs", "1",
                          "--num-workers", "0", "--out-dir", str(tmp_path), "--run-name", "w",
                          *RUN],
                         env={**_env(), "MOCOLAB_DATA": str(tmp_path / "cache")},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if source == "folder":
        assert len(_losses(tmp_path / "w")) == 49 // 8
        assert list((tmp_path / "cache" / "folder-cache").glob("*-whole.sizes.npy"))
    else:
        steps = ShardStream(ShardIndex.load(out), side=32, batch_size=8, seed=2).steps_per_epoch
        assert len(_losses(tmp_path / "w")) == steps > 0
        assert "(shards)" in run.stdout


def test_a_folder_changing_while_packed_is_counted(tmp_path, monkeypatch):
    from mocolab.data import shards

    src = _folder(tmp_path, n=6)
    real, calls = shards._encode, []

    def changing(path, *a, **k):
        if not calls:  # while the first image is packed, one vanishes and one is added
            (src / "b" / "005.jpg").unlink()
            (src / "b" / "new.jpg").write_bytes((src / "a" / "000.jpg").read_bytes())
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(shards, "_encode", changing)
    with pytest.warns(SkippedSamplesWarning, match=r"packed 5 of 6 .* skipped 1 .*005.jpg.* 1 added"):
        index = pack_folder(src, tmp_path / "out", progress=False)
    meta = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index.total == 5 and meta["skipped"] == 1


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_ctrl_c_mid_epoch_and_resume_repeat_the_run_exactly(packed, tmp_path, monkeypatch,
                                                            source):
    """In one process: whole images from a folder, and shards decoded in 2 DataLoader workers;
    stopped by Ctrl-C after step 3 (inside the first epoch) and resumed."""
    import signal

    from mocolab.config import build_config
    from mocolab.train import pretrain

    src, out = packed
    monkeypatch.setenv("MOCOLAB_DATA", str(tmp_path / "cache"))
    data = {"data": str(src), "crops": "whole", "num_workers": 0} if source == "folder" else {
        "data": str(out), "num_workers": 2}

    def cfg(name: str):
        return build_config(**data, image_size=32, width=4, stem="compact", batch_size=8,
                            queue_size=32, epochs=2, threads=1, progress=False,
                            diagnostics_every=0, log_every=1, seed=4, out_dir=str(tmp_path),
                            run_name=name)

    def interrupt(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    full = pretrain(cfg("full"), final_eval=False)
    part = pretrain(cfg("part"), on_step=interrupt, final_eval=False)
    assert part.get("interrupted") and part["step"] == 3 < full["total_steps"] // 2
    pretrain(resume=part["run_dir"], final_eval=False)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == full["total_steps"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
