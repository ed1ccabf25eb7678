"""Untrusted inputs: nothing read from a file or a URL runs a command or exhausts memory.

- a shard index (on disk or served over HTTP) that lists ``pipe:`` commands or shell text in
  an ``s3://`` URL: refused in one line naming the address; no file created, no process
  spawned. A remote index and its shards are read with urllib (no process); ``s3://`` goes
  to the AWS CLI as one argument; a ``pipe:`` typed by the user runs as an argument list;
- a checkpoint whose ``config.data`` is a ``pipe:`` command: ``pretrain --resume`` and
  ``eval`` refuse it, telling the user to pass ``--data``; a preset that sets one likewise;
- architecture fields of weight files (``vit_depth``, ``width``, ``crop_size``…) checked
  against bounds and the weights present before anything is allocated, under a 5 GiB
  address-space limit; malformed files (metadata not JSON, no config, no info, a string
  config or mean, a stride-0 1e6×1e6 tensor, a step "abc", a version 99) one line each;
- damaged run files: a cut ``eval_knn.json`` and a ``[1, 2]`` line in ``metrics.jsonl`` for
  ``report`` and ``--resume``, non-UTF-8 bytes in ``config.yaml``; a shard ``.cls`` that is
  not a class number; an index whose counts lie; data changed before ``--resume``; a
  billion-laughs YAML; a relative ``--data`` stored absolute; ``eval knn`` of a run trained
  from labelled shards.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mocolab.checkpoint import SAFETENSORS_FORMAT, CheckpointError, load_checkpoint, save_atomic
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.data import DatasetError
from mocolab.data.shards import ShardIndex, pack_folder, read_shard, sample_images
from mocolab.train import pretrain

INJECTIONS = ["pipe://x; touch PWNED; cat", "s3://bucket/x.tar; touch PWNED; #"]
TINY = dict(width=4, stem="compact", image_size=16, batch_size=8, bn_splits=2, queue_size=16,
            epochs=1, max_steps=2, num_workers=0, compile=False, threads=1, progress=False,
            diagnostics_every=0, log_every=1, knn_k=3)  # fmt: skip
TINY_ARGS = ["--width", "4", "--stem", "compact", "--image-size", "16", "--batch-size", "8",
             "--bn-splits", "2", "--queue-size", "16", "--num-workers", "0", "--no-compile",
             "--threads", "1", "--no-progress", "--diagnostics-every", "0"]  # fmt: skip


def one_clean_error(err: str, *needles: str) -> str:
    """The one ``mocolab: error:`` line of a failed command, holding ``needles``; no traceback."""
    assert "Traceback" not in err and "MemoryError" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mocolab: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def no_processes(monkeypatch):
    """Every way of starting a process or a shell records the attempt and fails."""
    attempts: list[str] = []

    def refuse(name):
        def run(*args, **kwargs):
            attempts.append(f"{name}{args!r}")
            raise AssertionError(f"{name} was called: {args!r}")

        return run

    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    for name in ("system", "popen", "posix_spawn", "posix_spawnp", "fork", "execv", "execve"):
        monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    yield attempts
    assert attempts == []


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    """``serve(folder)`` → the http://127.0.0.1:PORT URL of ``folder``, served by a thread."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --- data and runs shared by the tests ---------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Decoded folders are cached in a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCOLAB_DATA", str(tmp_path_factory.mktemp("cache")))
        yield


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = folder / "ab"[i % 2]
        c.mkdir(parents=True, exist_ok=True)
        base = np.array([200, 40, 40]) if i % 2 else np.array([40, 40, 200])
        arr = np.clip(base + rng.integers(-30, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(c / f"{i:03d}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``src/`` (16 JPEGs in two classes) and ``sh/`` (its shards, 4 images a shard)."""
    root = tmp_path_factory.mktemp("data")
    _images(root / "src", 16)
    pack_folder(root / "src", root / "sh", max_side=32, shard_size="5KB", progress=False)
    return root


@pytest.fixture(scope="module")
def folder_run(data) -> Path:
    """A finished 2-step run on the folder, started with a relative --data from its parent."""
    before = os.getcwd()
    os.chdir(data)
    try:
        cfg = build_config(data="src", crops="square", out_dir=str(data / "runs"),
                           run_name="folder", **TINY)  # fmt: skip
        return Path(pretrain(cfg, final_eval=False)["run_dir"])
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def shard_run(data) -> tuple[Path, dict]:
    """A finished 2-step run on the labelled shards, with its final kNN evaluation."""
    cfg = build_config(data=str(data / "sh"), out_dir=str(data / "runs"), run_name="shards",
                       **TINY)  # fmt: skip
    results = pretrain(cfg)
    return Path(results["run_dir"]), results


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".mocolab.lock"))
    return to


def _edit_checkpoint(run: Path, **changes) -> None:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for key, value in changes.items():
        node = ckpt
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    save_atomic(ckpt, run / "checkpoint.pt")
    _match_config_yaml(run, ckpt)


def _match_config_yaml(run: Path, ckpt: dict) -> None:
    """config.yaml as the run would have written it for this checkpoint (a resume refuses a
    config.yaml edited apart from its checkpoint)."""
    (run / "config.yaml").write_text(yaml.safe_dump(ckpt["config"], sort_keys=False))


# --- row 1: shard addresses from an index or a URL ------------------------------------------


def _hostile_index(folder: Path, good: Path, injection: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = json.loads((good / "index.json").read_text())
    meta["shards"][0]["name"] = injection
    for s in meta["shards"][1:]:
        s["name"] = str(good / s["name"])
    (folder / "index.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("where", ["disk", "http"])
@pytest.mark.parametrize("injection", INJECTIONS)
def test_an_index_listing_a_shell_command_runs_nothing(
    data, tmp_path, monkeypatch, capsys, no_processes, serve, where, injection
):
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would write
    index = _hostile_index(tmp_path / "hostile", data / "sh", injection)
    spec = str(index) if where == "disk" else serve(index) + "/index.json"
    code = main(["pretrain", "--data", spec, *TINY_ARGS, "--out-dir", str(tmp_path / "runs")])
    assert code == 2
    one_clean_error(capsys.readouterr().err, injection)
    assert not (tmp_path / "PWNED").exists() and not list(tmp_path.rglob("PWNED"))


def _contents(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


def test_a_remote_index_and_its_shards_are_read_without_a_process(data, no_processes, serve):
    url = serve(data / "sh") + "/index.json"
    index, local = ShardIndex.load(url), ShardIndex.load(data / "sh")
    assert index.urls[0] == url.rsplit("/", 1)[0] + "/shard-000000.tar"
    assert index.counts == local.counts and index.fingerprint == local.fingerprint
    samples, errors = read_shard(index.urls[0])
    assert errors == [] and _contents(samples) == _contents(read_shard(local.urls[0])[0])
    missing, errors = read_shard(url.rsplit("/", 1)[0] + "/nope.tar")
    assert missing == [] and "404" in errors[0]  # a shard that does not answer: counted, no crash


def test_s3_shards_go_to_the_aws_cli_as_one_argument(data, tmp_path, monkeypatch):
    """A fake ``aws`` on the PATH serves the local shards: the URL reaches it as one argument
    of an argument list, never through a shell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text('#!/bin/sh\nexec cat "$FAKE_S3/$(basename "$3")"\n')
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_S3", str(data / "sh"))
    meta = json.loads((data / "sh" / "index.json").read_text())
    for s in meta["shards"]:
        s["name"] = f"s3://bucket/{s['name']}"
    (tmp_path / "index.json").write_text(json.dumps(meta))
    calls, real = [], subprocess.Popen

    def spy(args, *rest, **kwargs):
        calls.append((args, kwargs.get("shell", False)))
        return real(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    index = ShardIndex.load(tmp_path)
    samples, errors = read_shard(index.urls[0])
    local = read_shard(str(data / "sh" / "shard-000000.tar"))[0]
    assert errors == [] and _contents(samples) == _contents(local)
    assert calls == [(["aws", "s3", "cp", "s3://bucket/shard-000000.tar", "-"], False)]


def test_a_typed_pipe_runs_as_an_argument_list_and_an_index_read_through_it_is_checked(
    data, tmp_path, monkeypatch
):
    meta = json.loads((data / "sh" / "index.json").read_text())
    for s in meta["shards"]:
        s["name"] = str(data / "sh" / s["name"])  # a pipe: index has no folder: absolute names
    (tmp_path / "abs.json").write_text(json.dumps(meta))
    calls, real = [], subprocess.Popen

    def spy(args, *rest, **kwargs):
        calls.append((args, kwargs.get("shell", False)))
        return real(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    monkeypatch.chdir(tmp_path)
    index = ShardIndex.load(f"pipe:cat {tmp_path / 'abs.json'}")
    assert index.total == 16 and calls == [(["cat", str(tmp_path / "abs.json")], False)]
    # shell syntax is not interpreted: `;` is a character of cat's argument
    with pytest.raises(DatasetError, match=r"cannot read the shard index .*cat exited"):
        ShardIndex.load(f"pipe:cat {tmp_path / 'abs.json'}; touch PWNED")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(DatasetError, match="relative name, but an index read through pipe:"):
        ShardIndex.load(f"pipe:cat {data / 'sh' / 'index.json'}")


@pytest.mark.parametrize(
    "name,needle",
    [
        ("ftp://host/x.tar", "not ftp://"),
        ("file:///etc/passwd", "not file://"),
        ("https://host/x.tar\n; rm -rf ~", "not a valid URL"),
        ("pipe:cat x.tar", "a pipe: command"),
        ("/etc/passwd", "lists the local file"),  # from a remote index
    ],
)
def test_an_address_mocolab_does_not_read_is_named(data, tmp_path, serve, name, needle):
    index = _hostile_index(tmp_path / "i", data / "sh", name)
    meta = json.loads((index / "index.json").read_text())
    for s in meta["shards"][1:]:
        s["name"] = Path(s["name"]).name  # beside the index: served with it
    (index / "index.json").write_text(json.dumps(meta))
    for f in (data / "sh").glob("*.tar"):
        shutil.copy(f, index)
    with pytest.raises(DatasetError, match=needle) as e:
        ShardIndex.load(serve(index) + "/index.json")
    assert len(str(e.value).splitlines()) == 1


def test_shard_counts_read_from_tar_headers_match_tarfile(tmp_path):
    """The header walk that checks an index's counts: pax and GNU long names, webdataset's pax
    headers, members webdataset skips; a cut-off shard is not counted (read later, warned)."""
    from mocolab.data.shards import tar_samples

    counts = {}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in ("a" * 150 + ".jpg", "a" * 150 + ".cls", "d/é.jpg", "k.jpg", "__x__"):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = 3, 1.5  # a float mtime: a pax header, as webdataset's
                tar.addfile(info, io.BytesIO(b"abc"))
        counts[fmt] = tar_samples(path)
        cut = tmp_path / f"{fmt}-cut.tar"
        cut.write_bytes(path.read_bytes()[:1800])
        assert tar_samples(cut) is None
    assert counts == {tarfile.PAX_FORMAT: 3, tarfile.GNU_FORMAT: 3}


# --- row 2: addresses inside a checkpoint or a preset ---------------------------------------

PIPE_IN_CHECKPOINT = "pipe://x; touch PWNED; … #/x.json"


def test_a_checkpoint_naming_a_pipe_is_not_run_by_resume_or_eval(
    folder_run, tmp_path, monkeypatch, capsys, no_processes
):
    monkeypatch.chdir(tmp_path)
    run = _copy_run(folder_run, tmp_path / "run")
    _edit_checkpoint(run, **{"config.data": PIPE_IN_CHECKPOINT})
    assert main(["pretrain", "--resume", str(run)]) == 2
    line = one_clean_error(capsys.readouterr().err, "pipe://x; touch PWNED", "--data")
    assert "typed on the command line" in line
    assert main(["eval", "knn", str(run), "--k", "3", "--no-progress"]) == 2
    one_clean_error(capsys.readouterr().err, "pipe://x; touch PWNED", "--data")
    assert not list(tmp_path.rglob("PWNED"))


def test_a_preset_setting_a_pipe_is_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: 'pipe:sh -c \"touch PWNED\"'\n")
    with pytest.raises(ConfigError, match="typed on the command line"):
        build_config(str(preset))
    assert build_config(str(preset), data="synthetic").data == "synthetic"  # typed: wins


# --- row 3 and malformed weight files: checked before anything is allocated ---------------


def _tiny_resnet_checkpoint(path: Path, **info_changes) -> Path:
    from mocolab.backbones import resnet

    torch.manual_seed(0)
    backbone = resnet("resnet18", in_channels=3, stem="compact", width=4)
    info = {"in_channels": 3, "stem": "compact", "width": 4, "crop_size": 16,
            "mean": [0.5] * 3, "std": [0.25] * 3, "dataset": "synthetic/train",
            "num_images": 512, **info_changes}  # fmt: skip
    ckpt = {"format": "mocolab", "version": 1, "step": 3, "info": info,
            "config": build_config(data="synthetic", width=4, stem="compact").to_dict(),
            "model": {f"query_encoder.backbone.{k}": v for k, v in backbone.state_dict().items()}}  # fmt: skip
    torch.save(ckpt, path)
    return path


def _tiny_vit_export(path: Path, config_changes: dict | None = None,
                     meta_changes: dict | None = None) -> Path:  # fmt: skip
    from mocolab.backbones import vit_backbone
    from mocolab.weights import save_safetensors

    backbone = vit_backbone("vit_tiny", in_channels=3, image_size=16, patch_size=4, depth=1)
    config = {**build_config(data="synthetic", arch="vit_tiny", vit_depth=1, patch_size=4,
                             crop_size=16).to_dict(), **(config_changes or {})}  # fmt: skip
    meta = {"format": SAFETENSORS_FORMAT, "in_channels": 3, "stem": "compact", "width": 16,
            "crop_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "config": config,
            **(meta_changes or {})}  # fmt: skip
    save_safetensors(backbone.state_dict(), path, {k: v for k, v in meta.items() if v is not None})
    return path


def _raw_safetensors_metadata(path: Path, key: str, raw: str) -> None:
    """Replace one metadata value by ``raw`` (not JSON-encoded)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta[key] = raw
    save_file(load_file(str(path)), str(path), metadata=meta)


_UNDER_A_LIMIT = """
import contextlib, io, json, resource, sys
limit = {limit}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from mocolab.cli import main
out = {{}}
for path in sys.argv[1:]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["eval", "knn", path, "--k", "5", "--no-progress", "--device", "cpu"])
    except BaseException as e:
        code = type(e).__name__ + ": " + str(e)[:200]
    out[path] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_weight_files_are_checked_before_anything_is_allocated(tmp_path):
    """Every case runs in one process whose address space is limited to 5 GiB (torch needs
    about 4 to start): a network built from the declared fields would not fit (a ViT-Base of
    500 blocks, a ResNet of width 3000), so a refusal must come before any allocation. A
    sound file evaluates under the same limit."""
    f = tmp_path
    cases = {  # file → the words its one-line refusal holds (None: it evaluates)
        _tiny_resnet_checkpoint(f / "good.pt"): None,
        _tiny_resnet_checkpoint(
            f / "width3000.pt", width=3000
        ): "info.width says 3000 but the first convolution has 4 filters",
        _tiny_resnet_checkpoint(f / "width100000.pt", width=100000): "info.width is 100000",
        _tiny_resnet_checkpoint(f / "crop.pt", crop_size=1_000_000): "info.crop_size is 1000000",
        _tiny_resnet_checkpoint(f / "mean.pt", mean="abc"): "info.mean is 'abc'",
        _tiny_vit_export(
            f / "depth.safetensors", {"arch": "vit_base", "vit_depth": 1_000_000}
        ): "config.vit_depth is 1000000",
        _tiny_vit_export(
            f / "depth500.safetensors", {"vit_depth": 500}
        ): "config.vit_depth says 500 blocks but the file holds 1",
        _tiny_vit_export(
            f / "base.safetensors", {"arch": "vit_base", "vit_depth": 500}
        ): "config.arch says vit_base (768-d tokens) but its tokens are 192-d",
        _tiny_vit_export(
            f / "noconfig.safetensors", meta_changes={"config": None}
        ): "metadata has no config",
        _tiny_vit_export(
            f / "strconfig.safetensors", meta_changes={"config": "abc"}
        ): "metadata has no config",
        _tiny_vit_export(
            f / "vit_crop.safetensors", meta_changes={"crop_size": 32}
        ): "info.crop_size says 32 px (65 tokens) but the position embedding has 17",
    }
    notjson = _tiny_vit_export(f / "notjson.safetensors")
    _raw_safetensors_metadata(notjson, "config", "{not json")
    cases[notjson] = "metadata config is not JSON"
    for name, change, needle in (
        ("noinfo.pt", lambda c: c.pop("info"), "it has no info;"),
        ("strconfig.pt", lambda c: c.update(config="abc"), "its config is a str"),
        ("step.pt", lambda c: c.update(step="abc"), "its step is 'abc'"),
        ("version.pt", lambda c: c.update(version=99), "format version 99"),
        ("stride0.pt", lambda c: c["model"].update(
            {"query_encoder.backbone.conv1.weight": torch.zeros(1).expand(10**6, 10**6)}),
         "shape (1000000, 1000000) is stored in 4 bytes"),
    ):  # fmt: skip
        path = _tiny_resnet_checkpoint(f / name)
        ckpt = torch.load(path, weights_only=True)
        change(ckpt)
        torch.save(ckpt, path)
        cases[path] = needle
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    script = _UNDER_A_LIMIT.format(limit=5 * 2**30)
    run = subprocess.run([sys.executable, "-c", script, *map(str, cases)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for path, needle in cases.items():
        code, err = results[str(path)]
        if needle is None:
            assert code == 0, (path.name, code, err)
        else:
            assert code == 2, (path.name, code, err[-2000:])
            one_clean_error(err, needle)
    # the foreign-weights reader (--init) refuses the stride-0 tensor the same way
    from mocolab.weights import read_weights

    with pytest.raises(CheckpointError, match=r"stored in 4 bytes"):
        read_weights(f / "stride0.pt")


def test_shapes_checked_on_the_meta_device_leave_no_meta_tensor_behind():
    """A memoised tensor made while a network is built on the meta device (the jigsaw's
    permutations) is forgotten afterwards, so the real build that follows gets real ones."""
    from mocolab.checkpoint import expected_shapes
    from mocolab.methods.tiles import _all_permutations

    def build() -> torch.nn.Module:
        return torch.nn.Linear(_all_permutations(4).shape[0], 2)  # 4! = 24 inputs

    _all_permutations.cache_clear()
    assert expected_shapes(build) == {"weight": (2, 24), "bias": (2,)}
    assert _all_permutations(4).device.type == "cpu"
    assert _all_permutations(4).tolist()[1] == [0, 1, 3, 2]  # lexicographic order


# --- rough edges: damaged run files ---------------------------------------------------------


def test_report_and_resume_with_damaged_metrics_and_results(folder_run, tmp_path, capsys):
    run = _copy_run(folder_run, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:], "[1, 2]"]) + "\n")
    (run / "eval_knn.json").write_text('{"top1": 51.2, "top5"')  # cut off
    with pytest.warns(UserWarning) as seen:
        assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--no-diagnostics",
                     "--data", "synthetic", "--queries", "2", "--k", "2",
                     "--max-points", "20"]) == 0  # fmt: skip
    messages = " ".join(str(w.message) for w in seen)
    assert "eval_knn.json is damaged" in messages and "not rows of metrics" in messages
    assert (tmp_path / "rep" / "index.html").exists() and (tmp_path / "rep" / "curves.png").exists()
    capsys.readouterr()
    # resume: a damaged line inside the log is named; the same line last is dropped, warned
    assert main(["pretrain", "--resume", str(run)]) == 2
    one_clean_error(capsys.readouterr().err, "metrics.jsonl: line 2 of", "not JSON")
    (run / "metrics.jsonl").write_text("\n".join([*lines, "[1, 2]"]) + "\n")
    with pytest.warns(UserWarning, match="dropped a cut-off last line"):
        assert main(["pretrain", "--resume", str(run), "--no-final-eval"]) == 0


def test_resume_with_a_config_yaml_that_is_not_utf8_is_one_line(folder_run, tmp_path, capsys):
    run = _copy_run(folder_run, tmp_path / "run")
    (run / "config.yaml").write_bytes(b"method: mocov2\narch: \xff\xfe resnet18\n")
    assert main(["pretrain", "--resume", str(run)]) == 2
    one_clean_error(capsys.readouterr().err, "config.yaml is not UTF-8")


def _laughs(depth: int) -> str:
    """An option whose value nests ``depth + 1`` levels of aliases, 9 of the level below each:
    9^(depth + 1) strings once expanded, from a few hundred bytes of YAML."""
    levels = ['  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, depth + 1):
        levels.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "lr:\n" + "\n".join(levels) + "\n"


def test_a_billion_laughs_yaml_is_refused_at_once_in_a_short_line(tmp_path):
    (tmp_path / "laughs.yaml").write_text(_laughs(9))  # 9^10 strings: minutes to print
    (tmp_path / "small.yaml").write_text(_laughs(2))  # 819 values: read, then a type error
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values") as big:
        build_config(str(tmp_path / "laughs.yaml"))
    with pytest.raises(ConfigError, match="lr: expected a finite number, got") as small:
        build_config(str(tmp_path / "small.yaml"))
    assert time.perf_counter() - start < 5
    assert len(str(big.value)) < 300 and len(str(small.value)) < 400
    (tmp_path / "loop.yaml").write_text("lr: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        build_config(str(tmp_path / "loop.yaml"))


# --- rough edges: shards ----------------------------------------------------------------------


def test_an_index_whose_counts_lie_is_refused(data, tmp_path):
    for count, needle in ((5, "says 5 samples for"), (-17, "count is -17")):
        copy = tmp_path / f"c{count}"
        shutil.copytree(data / "sh", copy)
        meta = json.loads((copy / "index.json").read_text())
        real = meta["shards"][0]["count"]
        meta["shards"][0]["count"] = count
        (copy / "index.json").write_text(json.dumps(meta))
        with pytest.raises(DatasetError, match=needle) as e:
            ShardIndex.load(copy)
        assert count < 0 or f"holds {real}" in str(e.value)


def test_a_cls_member_that_is_not_a_class_number_is_one_line(data, tmp_path):
    copy = tmp_path / "sh"
    shutil.copytree(data / "sh", copy)
    shard = copy / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name == "000000001.cls":
                payload = b"abc"
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    with pytest.raises(DatasetError, match=r"shard-000000.tar: member 000000001.cls holds"):
        sample_images(ShardIndex.load(copy), 16)


# --- rough edges: data that changed before --resume, relative paths, labelled shards ---------


def test_data_changed_before_resume_is_refused(data, folder_run, shard_run, tmp_path, capsys):
    run = _copy_run(folder_run, tmp_path / "run")
    src = tmp_path / "src"
    shutil.copytree(data / "src", src)
    _edit_checkpoint(run, **{"config.data": str(src)})
    _images(src / "new", 4, seed=5)  # 16 → 20 images
    assert main(["pretrain", "--resume", str(run)]) == 2
    one_clean_error(capsys.readouterr().err, "data changed", "20 images now, 16 when")
    shutil.rmtree(src / "new")
    first = sorted(src.rglob("*.jpg"))[0]
    first.write_bytes(first.read_bytes() + b"\0")  # the same names, one file replaced
    assert main(["pretrain", "--resume", str(run)]) == 2
    one_clean_error(capsys.readouterr().err, "data changed", "names or sizes differ")
    # shards packed again from a grown folder
    srun = _copy_run(shard_run[0], tmp_path / "srun")
    _images(src / "new", 8, seed=6)
    pack_folder(src, tmp_path / "sh2", max_side=32, shard_size="5KB", progress=False)
    assert main(["pretrain", "--resume", str(srun), "--data", str(tmp_path / "sh2")]) == 2
    one_clean_error(capsys.readouterr().err, "data changed", "24 images now, 16 when")


def test_a_checkpoint_without_a_fingerprint_still_resumes(folder_run, tmp_path):
    run = _copy_run(folder_run, tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["info"].pop("data_fingerprint")  # an older version wrote none
    ckpt["config"].update(epochs=2, max_steps=3)
    save_atomic(ckpt, run / "checkpoint.pt")
    _match_config_yaml(run, ckpt)
    assert pretrain(resume=run, final_eval=False)["step"] == 3


def test_a_relative_data_path_is_stored_absolute(data, folder_run, tmp_path, monkeypatch):
    ckpt = load_checkpoint(folder_run)
    assert ckpt["config"]["data"] == str(data / "src")  # typed as "src" in data/
    monkeypatch.chdir(tmp_path)  # eval from elsewhere finds it
    assert main(["eval", "knn", str(folder_run), "--k", "3", "--no-progress"]) == 0


def test_a_run_on_labelled_shards_is_evaluated_with_their_labels(shard_run, capsys):
    run, results = shard_run
    knn = results["knn"]  # the final evaluation: 90/10 of the shards' images, with labels
    assert knn["train_images"] + knn["test_images"] == 16 and knn["test_images"] == 1
    assert main(["eval", "knn", str(run), "--k", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kNN (k=3" in out and "on 1 test images of sh (shards)" in out
    saved = json.loads((run / "eval_knn.json").read_text())
    assert saved["top1"] == knn["top1"]  # the same split, labels and features
