"""Fault injection (issue #15): full disks, read-only run directories, two runs in one
directory, hostile YAML, a torn metrics log, corrupt and foreign checkpoints, SIGTERM.

Each test injects the fault and asserts the message's key words, the exit code, and that no
traceback is printed. A full or read-only disk is a real tmpfs mount when the tests run as
root and ``mount`` works (as here and in CI); elsewhere (or with MOCOLAB_TEST_NO_MOUNT=1) the
same tests patch the write calls to raise ENOSPC / EROFS (:func:`_patch_writes`), so no test
is skipped.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from mocolab.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from mocolab.cli import main
from mocolab.config import ConfigError, PretrainConfig, build_config, config_from_dict
from mocolab.methods.moco import MoCo
from mocolab.safeio import EXIT_PREEMPTED, EXIT_WRITE_FAILED, LOCK_NAME
from mocolab.train import MetricsLog, pretrain
from mocolab.typecheck import check_types

TINY = ["--data", "synthetic", "--width", "8", "--stem", "compact", "--batch-size", "32",
        "--bn-splits", "4", "--queue-size", "96", "--log-every", "1", "--threads", "1",
        "--knn-k", "20", "--diagnostics-every", "0", "--no-progress", "--no-channels-last"]


def pretrain_args(out: Path, name: str, *extra: str) -> list[str]:
    tiny = TINY
    if "--method" in extra and extra[extra.index("--method") + 1] not in ("mocov1", "mocov2"):
        i = TINY.index("--queue-size")  # the queue's size is an option of MoCo's alone
        tiny = TINY[:i] + TINY[i + 2:]
    return ["pretrain", *tiny, "--out-dir", str(out), "--run-name", name, *extra]


def one_clean_error(err: str, *needles: str) -> str:
    """The error line of a failed command: one ``mocolab: error:`` line holding ``needles``,
    and no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mocolab: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- full and read-only disks ---------------------------------------------------------------


def _can_mount() -> bool:
    if os.environ.get("MOCOLAB_TEST_NO_MOUNT") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/mocolab-mount-probe-{uuid.uuid4().hex[:8]}")
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True, check=False).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


MOUNT = _can_mount()


def _patch_writes(monkeypatch, root: Path, code: int, active=lambda: True) -> None:
    """Without a mount: every write under ``root`` raises ``OSError(code)`` while
    ``active()`` (opening for writing, creating, mkdir, fallocate, torch.save's file)."""
    root = root.resolve()

    def under(path) -> bool:
        try:
            return active() and Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    def fail(path) -> None:
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
    real_fallocate = os.posix_fallocate

    def open_(file, mode="r", *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and under(file):
            fail(file)
        return real_open(file, mode, *a, **kw)

    def os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            fail(path)
        return real_os_open(path, flags, *a, **kw)

    def mkdir(path, *a, **kw):
        if under(path) and not Path(os.fsdecode(path)).exists():
            fail(path)
        return real_mkdir(path, *a, **kw)

    def fallocate(fd, offset, length):
        if under(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)


class Disk:
    """A small disk at ``path``: a tmpfs mount (root), else a folder whose writes are patched
    to fail while it is "full" or "read-only"."""

    def __init__(self, path: Path, monkeypatch, size_mb: int) -> None:
        self.path, self.monkeypatch, self.mounted = path, monkeypatch, MOUNT
        self.full = self.readonly = False
        path.mkdir(parents=True)
        if self.mounted:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                           check=True)
        else:
            _patch_writes(monkeypatch, path, errno.ENOSPC, lambda: self.full)

    def fill(self, leave: int = 0) -> None:
        """Fill the disk but about ``leave`` bytes."""
        self.full = True
        if self.mounted:
            fill_disk(str(self.path), True, leave)

    def unfill(self) -> None:
        self.full = False
        (self.path / ".filler").unlink(missing_ok=True)

    def make_readonly(self) -> None:
        self.readonly = True
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)
        else:
            _patch_writes(self.monkeypatch, self.path, errno.EROFS)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch, size_mb=8)
    yield d
    d.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny MoCo v2 run: 6 steps, one checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=1, max_steps=6, log_every=1, knn_k=20,
                       progress=False, threads=1, diagnostics_every=0, out_dir=str(out),
                       run_name="r")
    return Path(pretrain(cfg, final_eval=False)["run_dir"])


def test_pretrain_on_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(disk, capsys,
                                                                             monkeypatch):
    """The disk fills after the checkpoint of step 8: the run stops with one line naming the
    file it could not write and the space, that checkpoint stays intact, no temporary file is
    left, and after space is freed ``--resume`` finishes the run."""
    log = MetricsLog.log

    def fill_at_step_10(self, row):
        log(self, row)
        if row.get("step") == 10:
            disk.fill(leave=48 * 1024)  # room for metric rows, not for a checkpoint

    monkeypatch.setattr(MetricsLog, "log", fill_at_step_10)
    code = main(pretrain_args(disk.path, "full", "--epochs", "1", "--checkpoint-every", "8",
                              "--no-final-eval"))
    err = capsys.readouterr().err
    assert code == EXIT_WRITE_FAILED
    line = one_clean_error(err, "could not write", "disk is full",
                           "last good checkpoint", CHECKPOINT_NAME)
    if disk.mounted:
        assert "free" in line and "needed" in line  # the space there is and the space needed
    run_dir = disk.path / "full"
    assert load_checkpoint(run_dir)["step"] == 8
    assert not list(run_dir.glob(".*.tmp"))
    disk.unfill()
    monkeypatch.setattr(MetricsLog, "log", log)
    assert main(["pretrain", "--resume", str(run_dir), "--no-final-eval"]) == 0
    assert load_checkpoint(run_dir)["step"] == 16


def test_pretrain_into_a_full_disk_fails_in_one_line(disk, capsys):
    disk.fill()
    assert main(pretrain_args(disk.path, "x", "--max-steps", "2")) == EXIT_WRITE_FAILED
    one_clean_error(capsys.readouterr().err, "could not write", "disk is full")


def test_a_checkpoint_that_does_not_fit_says_how_much_space_it_needs(disk):
    state = {"format": "mocolab", "model": {"w": torch.zeros(256, 1024)}}  # 1 MB
    save_atomic(state, disk.path / CHECKPOINT_NAME)
    disk.fill(leave=64 * 1024)
    with pytest.raises(Exception, match=r"could not write .*checkpoint.pt: the disk is full") as e:
        save_atomic({**state, "step": 2}, disk.path / CHECKPOINT_NAME)
    assert "last good checkpoint" in str(e.value)
    if disk.mounted:
        assert "about 1.0 MB needed" in str(e.value)
    assert load_checkpoint(disk.path)["model"]["w"].shape == (256, 1024)
    assert [p.name for p in disk.path.iterdir() if p.name != ".filler"] == [CHECKPOINT_NAME]


def test_export_and_report_to_a_full_disk_fail_in_one_line(run, disk, capsys):
    disk.fill()
    assert main(["export", str(run), "--format", "safetensors",
                 "--out", str(disk.path / "b.safetensors")]) == EXIT_WRITE_FAILED
    one_clean_error(capsys.readouterr().err, "could not write", "b.safetensors", "disk is full")
    assert not list(disk.path.glob(".*.tmp"))
    assert main(["report", str(run), "--out", str(disk.path / "rep"), "--no-diagnostics",
                 "--no-progress", "--queries", "2", "--k", "2",
                 "--max-points", "20"]) == EXIT_WRITE_FAILED
    one_clean_error(capsys.readouterr().err, "could not write", "disk is full")


EMBED_UNDER_FULL_DISK = textwrap.dedent("""
    import sys
    from mocolab import embed
    sys.path.insert(0, {tests!r})
    import test_faults
    assemble = embed._assemble

    def full_then_assemble(parts, num_chunks, out, dim):
        test_faults.fill_disk({disk!r}, {mounted!r})
        return assemble(parts, num_chunks, out, dim)

    embed._assemble = full_then_assemble
    if not {mounted!r}:
        import errno, pytest
        from pathlib import Path
        mp = pytest.MonkeyPatch()
        test_faults._patch_writes(mp, Path({disk!r}), errno.ENOSPC,
                                  lambda: Path({disk!r}, ".filler").exists())
    from mocolab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def fill_disk(path: str, mounted: bool, leave: int = 0) -> None:
    """Fill the disk at ``path`` (a tmpfs mount) but about ``leave`` bytes; without a mount,
    leave the ``.filler`` marker that :func:`_patch_writes` reads."""
    with open(Path(path) / ".filler", "ab") as f:
        if mounted:
            free = shutil.disk_usage(path).free - leave
            if free > 0:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, free)


def test_embed_onto_a_full_disk_fails_in_one_line_and_continues_after(run, disk, tmp_path):
    """The final .npy is written through a memory map: on a full tmpfs that was a SIGBUS
    (exit 135). Now: one line, no temporary file, the finished chunks kept; the same command
    finishes once there is space."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = disk.path / "emb.npy"
    script = EMBED_UNDER_FULL_DISK.format(tests=str(Path(__file__).parent), disk=str(disk.path),
                                          mounted=disk.mounted)
    cmd = [sys.executable, "-c", script, "embed", str(run), "--data", str(folder), "--out",
           str(out), "--no-progress", "--num-workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == EXIT_WRITE_FAILED, proc.stderr
    one_clean_error(proc.stderr, "could not write", "emb.npy", "disk is full",
                    "run the same command")
    assert not list(disk.path.glob(".*.tmp")) and not out.exists()
    assert (disk.path / "emb.npy.parts").is_dir()
    disk.unfill()
    assert main(cmd[3:]) == 0
    assert np.load(out).shape[0] == 5


def test_commands_on_a_read_only_run_print_their_results_and_warn(run, disk, tmp_path, capsys):
    """``eval knn`` prints its accuracy and warns that eval_knn.json could not be saved (exit
    0); ``report --out`` elsewhere writes everything there; without --out it says to pass one."""
    ro = disk.path / "r"
    shutil.copytree(run, ro)
    disk.make_readonly()
    with pytest.warns(UserWarning, match=r"could not write .*eval_knn.json: .*read-only"):
        assert main(["eval", "knn", str(ro), "--k", "5", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "top-1" in captured.out and "Traceback" not in captured.err
    rep = tmp_path / "rep"
    assert main(["report", str(ro), "--out", str(rep), "--no-progress", "--queries", "2",
                 "--k", "2", "--max-points", "20"]) == 0
    assert (rep / "index.html").exists() and (rep / "eval_diagnostics.json").exists()
    assert not (ro / "eval_diagnostics.json").exists()
    capsys.readouterr()
    assert main(["report", str(ro), "--no-progress"]) == EXIT_WRITE_FAILED
    one_clean_error(capsys.readouterr().err, "could not write", "read-only", "--out")
    assert main(["export", str(ro), "--format", "safetensors"]) == EXIT_WRITE_FAILED
    one_clean_error(capsys.readouterr().err, "could not write", "read-only", "--out")


# --- two runs, one directory ----------------------------------------------------------------


def test_two_runs_started_under_one_name_cannot_share_the_directory(tmp_path):
    """Two ``pretrain --run-name same`` 0.5 s apart (MoCo v2, then BYOL): one runs, the other
    stops with one line; the directory holds one run (config and checkpoint agree, one log)."""
    cmd = [sys.executable, "-m", "mocolab"]
    procs = []
    for method in ("mocov2", "byol"):
        procs.append(subprocess.Popen(
            cmd + pretrain_args(tmp_path, "same", "--method", method, "--epochs", "1",
                                "--max-steps", "8", "--no-final-eval"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another mocolab process" in loser or "already holds a run" in loser, loser
    one_clean_error(loser, "same")
    run_dir = tmp_path / "same"
    method = load_checkpoint(run_dir)["config"]["method"]
    assert f"method: {method}" in (run_dir / "config.yaml").read_text()
    log = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == list(range(1, 9))


def test_a_run_directory_in_use_is_refused_at_once(tmp_path, capsys):
    """A live process holds the directory's lock: a new run and a resume are both refused,
    naming its pid; once it ends, the lock is free again (kernel lock: no stale file)."""
    run_dir = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mocolab.safeio import claim_run_dir
        claim_run_dir({str(run_dir)!r})
        print("claimed", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert main(pretrain_args(tmp_path, "busy", "--max-steps", "2")) == 2
        one_clean_error(capsys.readouterr().err, "in use by another mocolab process",
                        f"pid {holder.pid}", "--run-name")
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / LOCK_NAME).exists()  # left behind by the killed holder: harmless
    assert main(pretrain_args(tmp_path, "busy", "--max-steps", "2", "--no-final-eval")) == 0


# --- YAML and option types --------------------------------------------------------------------


@pytest.mark.parametrize("text, needles", [
    ('batch_size: "thirty-two"', ["batch_size", "'thirty-two'", "an integer"]),
    ("batch_size: 32.0", ["batch_size", "32.0", "an integer"]),
    ("crop_scale: 0.5", ["crop_scale", "0.5", "a list of finite numbers"]),
    ("seed: 'abc'", ["seed", "'abc'", "an integer"]),
    ("max_steps: 2.5", ["max_steps", "2.5", "an integer or null"]),
    ('shuffle_bn: "no"', ["shuffle_bn", "'no'", "true or false"]),
    ("lr: .inf", ["lr", "inf", "a finite number"]),
    ("temperature: .nan", ["temperature", "nan", "a finite number"]),
    ("lr: 0.1\nepochs: 2\nlr: 0.2", ["duplicate key 'lr'", "lines 1 and 3"]),
])
def test_a_preset_with_a_wrong_type_or_a_duplicate_key_is_one_line(tmp_path, capsys, text,
                                                                   needles):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text + "\n")
    assert main(["pretrain", "--preset", str(preset), "--print-config"]) == 2
    one_clean_error(capsys.readouterr().err, str(preset), *needles)


def test_preset_values_of_the_right_type_are_conformed(tmp_path):
    preset = tmp_path / "ok.yaml"
    preset.write_text("lr: 1\ncrop_scale: [0.2, 1]\nshuffle_bn: false\nmax_steps: 3\n")
    cfg = build_config(str(preset))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.crop_scale == (0.2, 1.0) and cfg.shuffle_bn is False and cfg.max_steps == 3


@pytest.mark.parametrize("flag", ["--lr", "--temperature"])
def test_infinite_lr_or_temperature_on_the_command_line_is_refused(capsys, flag):
    assert main(["pretrain", flag, "inf", "--print-config"]) == 2
    one_clean_error(capsys.readouterr().err, flag[2:], "inf", "a finite number")


@dataclass
class OtherOptions:
    """Any options dataclass (a method's own, say) is checked the same way."""

    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, str] = (0.5, "a")
    flag: bool = False
    names: list[str] = field(default_factory=list)
    ratio: float | None = None


@pytest.mark.parametrize("values, needle", [
    ({"mode": "medium"}, "mode: expected one of 'fast', 'slow', got 'medium'"),
    ({"sizes": [1, 2.5]}, "sizes: expected a list of integers, got [1, 2.5]"),
    ({"pair": [0.5]}, "pair: expected"),
    ({"flag": "yes"}, "flag: expected true or false, got 'yes' (a str) (write true or false"),
    ({"flag": 1}, "flag: expected true or false, got 1"),
    ({"names": ["a", 3]}, "names: expected a list of strings"),
    ({"ratio": "0.5"}, "ratio: expected a finite number or null (unset), got '0.5'"),
    ({"ratoi": 0.5}, "unknown option 'ratoi'; did you mean 'ratio'?"),
])
def test_check_types_works_for_any_options_dataclass(values, needle):
    with pytest.raises(ConfigError) as e:
        check_types(OtherOptions, values, "method.yaml")
    assert str(e.value).startswith("method.yaml: ") and needle in str(e.value), str(e.value)


def test_check_types_conforms_good_values():
    got = check_types(OtherOptions, {"mode": "slow", "sizes": [3], "pair": [1, "b"],
                                     "flag": True, "names": ["x"], "ratio": 2}, "m")
    assert got == {"mode": "slow", "sizes": (3,), "pair": (1.0, "b"), "flag": True,
                   "names": ["x"], "ratio": 2.0}
    assert isinstance(got["ratio"], float) and isinstance(got["pair"][0], float)
    # the whole default PretrainConfig passes its own check
    defaults = PretrainConfig().to_dict()
    assert check_types(PretrainConfig, defaults, "defaults").keys() == defaults.keys()


# --- torn log, stale temporaries, evaluation rows ---------------------------------------------


def test_resume_after_a_torn_metrics_line_drops_it_with_a_warning(tmp_path, capsys):
    """A crash mid-write left half a JSON line and a checkpoint's temporary file: resume
    drops the half line (warning), removes the temporary file and continues the log."""

    def crash(step, row):
        if step == 13:
            raise RuntimeError("crash")

    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=2, max_steps=20, log_every=1, checkpoint_every=10,
                       diagnostics_every=0, progress=False, threads=1, out_dir=str(tmp_path),
                       run_name="torn", channels_last=False)
    with pytest.raises(RuntimeError, match="crash"):
        pretrain(cfg, on_step=crash, final_eval=False)
    run_dir = tmp_path / "torn"
    log = run_dir / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert load_checkpoint(run_dir)["step"] == 10 and json.loads(lines[-1])["step"] == 13
    log.write_text("".join(lines[:-1]) + lines[-1][:25])  # row 13 cut off mid-write
    stale = run_dir / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="dropped a cut-off last line"):
        assert main(["pretrain", "--resume", str(run_dir), "--no-final-eval"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_a_damaged_line_inside_the_log_is_named(tmp_path, capsys):
    run_dir = tmp_path / "bad"
    assert main(pretrain_args(tmp_path, "bad", "--max-steps", "4", "--no-final-eval")) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    assert main(["pretrain", "--resume", str(run_dir)]) == 2
    one_clean_error(capsys.readouterr().err, "metrics.jsonl", "line 2", "not JSON")


def test_epoch_evaluation_rows_are_logged_before_the_epochs_checkpoint(tmp_path, monkeypatch):
    """A kill right after the epoch's checkpoint must not lose its kNN and diagnostics rows:
    at the moment each end-of-epoch checkpoint is written, its rows are in the log."""
    from mocolab import train

    seen = []

    def spy(state, path):
        log = (Path(path).parent / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(r) for r in log]
        at_step = {k for r in rows if r["step"] == state["step"] for k in r}
        diag = any(k.startswith("diag_") for k in at_step)
        seen.append((state["step"], "knn_top1" in at_step, diag))
        save_atomic(state, path)

    monkeypatch.setattr(train, "save_atomic", spy)
    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=2, log_every=4, knn_k=5, knn_every=1,
                       knn_bank=64, knn_queries=32, diagnostics_every=1, progress=False,
                       threads=1, out_dir=str(tmp_path), run_name="ev", channels_last=False)
    pretrain(cfg, final_eval=False)
    assert seen == [(16, True, True), (32, True, True)]


# --- corrupt and foreign checkpoints --------------------------------------------------------


def _png(path: Path) -> Path:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind", ["random", "png", "empty"])
def test_a_corrupt_file_as_a_checkpoint_is_named_without_hints_to_unpickle(tmp_path, capsys,
                                                                           kind):
    bad = tmp_path / ("c.png" if kind == "png" else "checkpoint.pt")
    if kind == "png":
        _png(bad)
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(5000) if kind == "random" else b"")
    for argv in (["pretrain", "--resume", str(bad)], ["eval", "knn", str(bad), "--no-progress"],
                 ["export", str(bad), "--format", "torchvision", "--out", str(tmp_path / "x")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        one_clean_error(err, "not a mocolab checkpoint", "corrupt")
        assert "weights_only" not in err


def test_random_bytes_of_every_kind_are_not_a_checkpoint(tmp_path):
    """Byte strings that once gave UnicodeDecodeError or torch's "retry with weights_only=False"
    hint all read as one CheckpointError."""
    from mocolab.checkpoint import CheckpointError

    g = np.random.default_rng(1)
    for i in range(30):
        bad = tmp_path / f"{i}.pt"
        bad.write_bytes(b"\x80\x02" + g.bytes(int(g.integers(1, 400))) if i % 2 else g.bytes(300))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(bad)
        assert "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1


def test_resume_with_another_methods_weights_names_both(run, tmp_path, capsys):
    """The checkpoint's config says BYOL but its weights are MoCo v2's; and a run directory
    whose config.yaml names another method than its checkpoint."""
    ckpt = load_checkpoint(run)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    cfg = config_from_dict({**ckpt["config"], "method": "byol", "key_momentum": None,
                            "momentum_schedule": None, "dim": None, "augment": None,
                            "temperature": None, "head_layers": None})  # MoCo's own: dropped
    save_atomic({**ckpt, "config": cfg.to_dict()}, foreign / CHECKPOINT_NAME)
    assert main(["pretrain", "--resume", str(foreign)]) == 2
    one_clean_error(capsys.readouterr().err, "config says byol / resnet18", "another method",
                    "missing", "unknown")
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    (mixed / "config.yaml").write_text((mixed / "config.yaml").read_text()
                                       .replace("method: mocov2", "method: byol"))
    assert main(["pretrain", "--resume", str(mixed)]) == 2
    one_clean_error(capsys.readouterr().err, "mixes two runs", "mocov2 / resnet18",
                    "byol / resnet18")


# --- signals and non-finite losses ----------------------------------------------------------


def test_sigterm_saves_and_exits_with_the_preemption_code(tmp_path, capsys, monkeypatch):
    log = MetricsLog.log

    def term_at_step_5(self, row):
        log(self, row)
        if row.get("step") == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "log", term_at_step_5)
    assert main(pretrain_args(tmp_path, "pre", "--epochs", "1")) == EXIT_PREEMPTED == 143
    assert "Stopped at step 5" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "pre")["step"] == 5
    monkeypatch.setattr(MetricsLog, "log", log)
    assert main(["pretrain", "--resume", str(tmp_path / "pre"), "--no-final-eval"]) == 0


def test_a_non_finite_first_step_does_not_name_a_checkpoint(tmp_path, capsys, monkeypatch):
    forward = MoCo.forward

    def poisoned(self, views, generator=None, index=None):
        out = forward(self, views, generator, index=index)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoCo, "forward", poisoned)
    assert main(pretrain_args(tmp_path, "nan", "--max-steps", "3")) == 2
    line = one_clean_error(capsys.readouterr().err, "non-finite at step 1 ",
                           "no checkpoint had been written yet")
    assert "last good checkpoint" not in line
    assert not (tmp_path / "nan" / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("code, needle", [
    (errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk is full"),
    (errno.EROFS, "the folder is on a read-only file system"),
    (errno.EACCES, "permission denied"),
])
def test_a_failed_write_is_named_by_its_cause(tmp_path, code, needle):
    from mocolab.safeio import OutputError, writing

    target = tmp_path / "run" / "metrics.jsonl"
    target.parent.mkdir()
    with pytest.raises(OutputError) as e, writing(target, need=3_500_000):
        raise OSError(code, os.strerror(code), str(target))
    assert str(e.value).startswith(f"could not write {target}: {needle}")
    assert ("about 3.5 MB needed" in str(e.value)) == (needle == "the disk is full")
    with pytest.raises(ValueError), writing(target):  # not a write error: passes unchanged
        raise ValueError("other")
