"""Fault injection of outputs, runs and signals: every output atomic (a kill or a full disk
mid-write leaves the previous version), files as the umask says, run names that stay inside
--out-dir, what a resume takes, messages that name the right file and number, temporary files
of killed commands removed by the next, pack options, signals (SIGHUP, SIGTERM during the final
evaluation, Ctrl-C twice) and a one-shard pack trained with the default workers.

Full disks are a tmpfs mount where the tests run as root (as in CI), else patched writes
(see :class:`test_faults.Disk`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_faults import Disk, one_clean_error, pretrain_args

from mocolab import train as train_mod
from mocolab.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from mocolab.cli import main
from mocolab.config import ConfigError, build_config
from mocolab.data import folder as folder_mod
from mocolab.embed import index_path, parts_dir
from mocolab.safeio import (
    EXIT_HANGUP,
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    created_mode,
    remove_stale_temporaries,
    staged_folder,
    umask,
    write_text_atomic,
)
from mocolab.train import MetricsLog, pretrain

REPORT = ["--no-diagnostics", "--no-progress", "--queries", "2", "--k", "2", "--max-points", "20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny MoCo v2 run: 6 steps, one checkpoint, no final evaluation."""
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(
        data="synthetic",
        width=8,
        stem="compact",
        batch_size=32,
        bn_splits=4,
        queue_size=96,
        epochs=1,
        max_steps=6,
        log_every=1,
        knn_k=20,
        progress=False,
        threads=1,
        diagnostics_every=0,
        out_dir=str(out),
        run_name="r",
        channels_last=False,
    )
    return Path(pretrain(cfg, final_eval=False)["run_dir"])


@pytest.fixture(scope="module")
def report_a(run, tmp_path_factory) -> Path:
    """A report of ``run`` (copied where a test needs a previous report)."""
    rep = tmp_path_factory.mktemp("report") / "rep"
    assert main(["report", str(run), "--out", str(rep), *REPORT]) == 0
    return rep


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch, size_mb=8)
    yield d
    d.close()


def images(folder: Path, n: int, side: int = 32, classes: int = 0) -> Path:
    """``n`` random RGB PNGs in ``folder`` (in ``classes`` sub-folders when given)."""
    g = np.random.default_rng(n)
    for i in range(n):
        target = folder / f"c{i % classes}" if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        pixels = g.integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target / f"{i:03d}.png")
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# A command killed (SIGKILL) once it has written a file's temporary copy, just before the
# rename: what `kill -9` in the middle of that write leaves.
KILLED_WRITING = textwrap.dedent("""
    import os, signal, sys
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")).startswith({prefix!r}):
            os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = fsync
    from mocolab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def killed_while_writing(name: str, *argv: str) -> subprocess.CompletedProcess:
    script = KILLED_WRITING.format(prefix=f".{name}.")
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --- every output atomic: reports, exports --------------------------------------------------


def test_a_report_killed_while_writing_its_page_leaves_the_previous_report(run, report_a, tmp_path):
    """``kill -9`` while index.html of a second report is written: the first report (page and
    pictures) is as it was; the next report removes the killed one's temporary folder."""
    rep = tmp_path / "rep"
    shutil.copytree(report_a, rep)
    before = contents(rep)
    assert {"index.html", "retrieval.png", "curves.png"} <= before.keys()
    assert before["index.html"].endswith(b"</html>\n")
    proc = killed_while_writing("index.html", "report", str(run), "--out", str(rep), *REPORT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert contents(rep) == before
    assert temporaries(tmp_path)  # the killed report's folder, unlocked since it died
    assert main(["report", str(run), "--out", str(rep), *REPORT]) == 0
    assert temporaries(tmp_path) == [] and temporaries(rep) == []
    assert (rep / "index.html").read_bytes().endswith(b"</html>\n")
    mode = created_mode()  # the umask's permissions, not those of a temporary folder
    assert stat.S_IMODE((rep / "index.html").stat().st_mode) == mode
    assert stat.S_IMODE((rep / "retrieval.png").stat().st_mode) == mode
    assert stat.S_IMODE(rep.stat().st_mode) == created_mode(directory=True)


def test_a_report_onto_a_full_disk_leaves_the_previous_one_and_names_the_page(
    run, report_a, disk, monkeypatch, capsys
):
    """The disk fills while the page is assembled: one line naming index.html and the free
    space of *its* file system; the previous report intact; no temporary left."""
    from mocolab.visualize import report

    rep = disk.path / "rep"
    shutil.copytree(report_a, rep)
    before = contents(rep)
    data_uri = report._data_uri

    def fill_then(path):
        disk.fill(leave=48 * 1024)  # room for the pictures' reading, not for a 150 kB page
        return data_uri(path)

    monkeypatch.setattr(report, "_data_uri", fill_then)
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(rep), *REPORT]) == EXIT_WRITE_FAILED
    line = one_clean_error(
        capsys.readouterr().err,
        f"could not write {rep / 'index.html'}",
        "disk is full",
        f"the previous {rep} is intact",
    )
    if disk.mounted:  # the tmpfs's few kB, not the gigabytes of the disk the tests run from
        assert re.search(r"\(\d+(\.\d)? (B|KB) free", line), line
    assert contents(rep) == before
    assert temporaries(disk.path) == [] and temporaries(rep) == []


def test_a_killed_export_leaves_no_temporary_after_the_next(run, tmp_path, capsys):
    """(ONNX, TorchScript and the others are written the same way, only more slowly.)"""
    out = tmp_path / "out.safetensors"
    argv = ["export", str(run), "--format", "safetensors", "--out", str(out)]
    proc = killed_while_writing(out.name, *argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and len(list(tmp_path.glob(f".{out.name}.*.tmp"))) == 1
    assert main(argv) == 0
    assert out.is_file() and temporaries(tmp_path) == []
    assert stat.S_IMODE(out.stat().st_mode) == created_mode()


def test_a_temporary_of_a_live_write_is_not_taken_for_a_stale_one(tmp_path):
    """A temporary file is locked while its writer lives: only an unlocked one is removed."""
    import fcntl

    live, stale = tmp_path / ".x.npy.live.tmp", tmp_path / ".x.npy.dead.tmp"
    live.write_bytes(b"being written")
    stale.write_bytes(b"left by a killed write")
    (tmp_path / ".x.npy.dir.tmp").mkdir()  # a killed staged folder
    with open(live, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        removed = remove_stale_temporaries(tmp_path, ["x.npy"])
        assert sorted(p.name for p in removed) == [".x.npy.dead.tmp", ".x.npy.dir.tmp"]
        assert live.exists()
    assert remove_stale_temporaries(tmp_path, ["x.npy"]) == [live]


def test_a_staged_folder_that_fails_leaves_the_previous_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as stage:
        (stage / "a.txt").write_text("one")
    with pytest.raises(RuntimeError, match="boom"), staged_folder(out) as stage:
        (stage / "a.txt").write_text("two")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "one" and temporaries(tmp_path) == []
    with staged_folder(out, keep_previous=True) as stage:
        (stage / "b.txt").write_text("new")
    assert sorted(contents(out)) == ["a.txt", "b.txt"]
    (out / "mine.txt").write_text("not ours")
    with staged_folder(out, replace=False, last="b.txt") as stage:
        (stage / "b.txt").write_text("newer")
    assert contents(out) == {"a.txt": b"one", "b.txt": b"newer", "mine.txt": b"not ours"}
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(ConfigError, match="is a file, not a folder"),
        staged_folder(tmp_path / "file"),
    ):
        pass


# --- permissions: as the umask says ------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_permissions_the_umask_gives(run, tmp_path, mask):
    """Checkpoints, exports, embeddings, their .paths.txt, shards and their index.json are
    created as open() would create them under the umask (tempfile makes 0600 files)."""
    from mocolab.data.shards import pack_folder
    from mocolab.embed import embed_folder
    from mocolab.export import export_backbone

    previous = os.umask(mask)
    try:
        assert umask() == mask
        want = 0o666 & ~mask
        save_atomic({"format": "mocolab", "model": {}}, tmp_path / CHECKPOINT_NAME)
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
        export_backbone(run, "safetensors", tmp_path / "b.safetensors", check=False)
        src = images(tmp_path / "imgs", 3)
        embed_folder(run, src, tmp_path / "e.npy", num_workers=0, progress=False)
        pack_folder(src, tmp_path / "sh", progress=False)
        written = [
            tmp_path / CHECKPOINT_NAME,
            tmp_path / "config.yaml",
            tmp_path / "b.safetensors",
            tmp_path / "e.npy",
            index_path(tmp_path / "e.npy"),
            tmp_path / "sh" / "index.json",
            tmp_path / "sh" / "shard-000000.tar",
        ]
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
        assert modes == {p.name: oct(want) for p in written}
    finally:
        os.umask(previous)


# --- run names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/../../x", "/tmp/abs-run"])
def test_a_run_name_outside_the_out_dir_is_refused(tmp_path, capsys, name):
    out = tmp_path / "runs"
    assert main(pretrain_args(out, name, "--max-steps", "1")) == 2
    one_clean_error(capsys.readouterr().err, "--run-name", "inside --out-dir")
    assert not out.exists() and not Path("/tmp/abs-run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_name_that_is_a_file_or_not_a_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    assert main(pretrain_args(tmp_path, "notes", "--max-steps", "1")) == 2
    one_clean_error(capsys.readouterr().err, "notes is a file", "--run-name")
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("server: {port: 80}\n")
    (project / "results.json").write_text('{"mine": 1}\n')
    assert main(pretrain_args(tmp_path, "project", "--max-steps", "1")) == 2
    one_clean_error(capsys.readouterr().err, "is not a mocolab run", "config.yaml", "--run-name")
    assert (project / "config.yaml").read_text() == "server: {port: 80}\n"
    (project / "config.yaml").unlink()
    (project / "paper.tex").write_text("x")
    assert main(pretrain_args(tmp_path, "project", "--max-steps", "1")) == 2
    one_clean_error(capsys.readouterr().err, "is not a mocolab run", "paper.tex")
    assert sorted(p.name for p in project.iterdir()) == ["paper.tex", "results.json"]


def test_a_run_with_its_evaluations_and_exports_is_still_a_run(run, tmp_path, capsys):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    (copy / "eval_knn.json").write_text("{}\n")
    (copy / "backbone.safetensors").write_bytes(b"x")
    assert main(pretrain_args(tmp_path, "r", "--max-steps", "1")) == 2
    one_clean_error(capsys.readouterr().err, "already holds a run", "--resume")


def test_an_existing_folder_as_out_is_one_line(run, tmp_path, capsys):
    folder = tmp_path / "d.npy"
    folder.mkdir()
    assert main(["export", str(run), "--format", "safetensors", "--out", str(folder)]) == 2
    one_clean_error(capsys.readouterr().err, f"--out {folder} is a folder")
    assert main(["embed", str(run), "--data", str(tmp_path), "--out", str(folder)]) == 2
    one_clean_error(capsys.readouterr().err, f"--out {folder} is a folder")
    (tmp_path / "page").write_text("x")
    assert main(["report", str(run), "--out", str(tmp_path / "page"), *REPORT]) == 2
    one_clean_error(capsys.readouterr().err, "is a file, not a folder")


# --- what a resume takes ----------------------------------------------------------------------


def test_a_resume_takes_only_its_own_options_and_refuses_the_rest(run, tmp_path, capsys):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    for extra, named in (
        (["--lr", "0.5"], "--lr"),
        (["--preset", "mocov2-fashion-mnist"], "--preset"),
        (["--max-steps", "9", "--no-progress"], "--max-steps"),
    ):
        assert main(["pretrain", "--resume", str(copy), *extra]) == 2
        line = one_clean_error(
            capsys.readouterr().err,
            "--resume continues a run",
            "--no-progress, --threads, --num-workers",
            f"not {named}",
        )
        assert "--no-progress" not in line.split(" not ")[1]
    assert (
        main(
            ["pretrain", "--resume", str(copy), "--threads", "2", "--no-progress", "--print-config"]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["threads"] == 2 and printed["progress"] is False and printed["lr"] == 0.12
    with pytest.raises(ConfigError, match="not --lr"):
        pretrain(resume=copy, resume_with={"lr": 1.0})
    # a finished run resumed with the options it takes: nothing to do, and they are recorded
    assert (
        main(
            [
                "pretrain",
                "--resume",
                str(copy),
                "--threads",
                "1",
                "--no-progress",
                "--no-final-eval",
            ]
        )
        == 0
    )
    assert load_checkpoint(copy)["step"] == 6


def test_a_hand_edited_config_yaml_is_named_on_resume(run, tmp_path, capsys):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.12", "lr: 0.5"))
    assert main(["pretrain", "--resume", str(copy)]) == 2
    one_clean_error(
        capsys.readouterr().err,
        f"{config} was edited",
        "lr: 0.12 in the checkpoint",
        "0.5 in config.yaml",
        "--preset",
    )
    assert "lr: 0.5" in config.read_text()  # not overwritten
    config.write_text(config.read_text().replace("lr: 0.5", "lr: 0.12"))
    assert main(["pretrain", "--resume", str(copy), "--no-final-eval"]) == 0


# --- messages -------------------------------------------------------------------------------


def test_a_diverging_run_names_the_step_that_metrics_jsonl_lacks(tmp_path, capsys):
    """--lr 1e6: the message and metrics.jsonl count steps alike (from 1): every logged row
    before the step named is finite, and that step has no row."""
    code = main(
        pretrain_args(tmp_path, "lr", "--lr", "1e6", "--max-steps", "30", "--checkpoint-every", "1")
    )
    assert code == 2
    line = one_clean_error(capsys.readouterr().err, "the loss became non-finite at step")
    bad = int(line.split("non-finite at step ")[1].split()[0])
    rows = [json.loads(r) for r in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]  # step 0: the kNN of the encoder at the start
    assert [r["step"] for r in rows] == list(range(1, bad))
    assert all(np.isfinite(r["loss"]) for r in rows)
    if bad > 1:  # a checkpoint each step: the last good one is the step before
        assert load_checkpoint(tmp_path / "lr")["step"] == bad - 1


def test_pack_onto_a_full_disk_names_the_shard_and_its_space(disk, tmp_path, capsys):
    src = images(tmp_path / "imgs", 4, side=64)
    (disk.path / "sh").mkdir()
    disk.fill()
    code = main(["data", "pack", str(src), str(disk.path / "sh"), "--no-progress"])
    assert code == EXIT_WRITE_FAILED
    line = one_clean_error(
        capsys.readouterr().err,
        f"could not write {disk.path / 'sh' / 'shard-000000.tar'}",
        "disk is full",
        "run it again",
    )
    if disk.mounted:
        assert re.search(r"\(\d+(\.\d)? (B|KB) free", line), line


def test_scenes_onto_a_full_disk_and_after_a_kill(disk, tmp_path, capsys):
    """A full disk: one line naming the folder on that disk; a killed run's temporary folder
    (unlocked) is removed by the next run, which writes the set."""
    argv = ["data", "scenes", "--train", "2", "--test", "1", "--size", "48", "--no-progress"]
    disk.fill(leave=4096)
    assert main([*argv[:2], str(disk.path / "k"), *argv[2:]]) == EXIT_WRITE_FAILED
    line = one_clean_error(
        capsys.readouterr().err, f"could not write {disk.path / 'k'}", "disk is full"
    )
    if disk.mounted:
        assert re.search(r"\(\d+(\.\d)? (B|KB) free", line), line
    assert temporaries(disk.path) == []
    (tmp_path / ".k.x1y2z3.tmp" / "train").mkdir(parents=True)  # what a kill -9 leaves
    assert main([*argv[:2], str(tmp_path / "k"), *argv[2:]]) == 0
    assert temporaries(tmp_path) == [] and (tmp_path / "k" / "scenes.json").is_file()


# --- leftovers, locks and used folders --------------------------------------------------------


def test_a_second_embed_into_the_same_out_is_refused(run, tmp_path, capsys):
    out = tmp_path / "e.npy"
    src = images(tmp_path / "imgs", 2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from mocolab.safeio import claim_run_dir
        claim_run_dir({str(parts_dir(out))!r})
        print("claimed", flush=True)
        time.sleep(120)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert (
            main(
                [
                    "embed",
                    str(run),
                    "--data",
                    str(src),
                    "--out",
                    str(out),
                    "--num-workers",
                    "0",
                    "--no-progress",
                ]
            )
            == 2
        )
        one_clean_error(
            capsys.readouterr().err,
            "in use by another mocolab process",
            f"pid {holder.pid}",
            "--out",
        )
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (
        main(
            [
                "embed",
                str(run),
                "--data",
                str(src),
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.load(out).shape[0] == 2 and not parts_dir(out).exists()


def test_packing_into_a_used_folder_the_source_or_a_run_is_refused(run, tmp_path, capsys):
    src = images(tmp_path / "imgs", 6, side=48, classes=2)
    out = tmp_path / "sh"
    pack = ["data", "pack", str(src), "--no-progress"]
    assert main([*pack, str(out), "--shard-size", "10KB"]) == 0
    assert len(list(out.glob("shard-*.tar"))) >= 3
    assert main([*pack, str(out)]) == 2
    one_clean_error(capsys.readouterr().err, "already holds packed shards", "--overwrite")
    assert main([*pack, str(out), "--overwrite"]) == 0  # one shard now: the old ones removed
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    for target, needle in (
        (src, "inside the image folder"),
        (src / "c0" / "sh", "inside the"),
        (run, "is a run directory"),
    ):
        assert main([*pack, str(target)]) == 2
        one_clean_error(capsys.readouterr().err, needle)
    assert not list(src.rglob("*.tar")) and not list(run.glob("*.tar"))


@pytest.mark.parametrize(
    "option, needle",
    [
        (["--quality", "1000"], "--quality must be between 1 and 100"),
        (["--quality", "-5"], "--quality must be between 1 and 100"),
        (["--max-side", "100000"], "--max-side must be between 8 and 65535"),
        (["--max-side", "20000", "--format", "webp"], "between 8 and 16383"),
        (["--shard-size", "1e400"], "--shard-size '1e400' is not a size"),
        (["--shard-size", "1e30"], "out of range"),
    ],
)
def test_pack_options_are_checked(tmp_path, capsys, option, needle):
    src = images(tmp_path / "imgs", 1)
    assert main(["data", "pack", str(src), str(tmp_path / "sh"), *option]) == 2
    one_clean_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "sh").exists()


# --- signals --------------------------------------------------------------------------------


def _signal_at_step(monkeypatch, sig: int, step: int) -> None:
    log = MetricsLog.log

    def log_then_signal(self, row):
        log(self, row)
        if row.get("step") == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(MetricsLog, "log", log_then_signal)


def test_sighup_saves_and_exits_with_its_own_code(tmp_path, capsys, monkeypatch):
    """SIGHUP (the terminal closed) stops like SIGTERM, with a checkpoint, exit 129; what was
    printed to the closed terminal goes to /dev/null from then on (not tested here: pytest's
    output is no terminal)."""
    hangups = []
    monkeypatch.setattr(train_mod, "_silence_closed_terminal", lambda: hangups.append(1))
    _signal_at_step(monkeypatch, signal.SIGHUP, 4)
    assert main(pretrain_args(tmp_path, "hup", "--epochs", "1")) == EXIT_HANGUP == 129
    assert "Stopped at step 4" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "hup")["step"] == 4 and hangups == [1]
    monkeypatch.undo()
    assert main(["pretrain", "--resume", str(tmp_path / "hup"), "--no-final-eval"]) == 0


def test_sigterm_during_the_final_evaluation_says_so(tmp_path, capsys, monkeypatch):
    final_evaluation = train_mod.final_evaluation

    def terminated(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal's handler ends this sleep
        return final_evaluation(*args, **kw)

    monkeypatch.setattr(train_mod, "final_evaluation", terminated)
    assert main(pretrain_args(tmp_path, "t", "--max-steps", "3")) == EXIT_PREEMPTED
    captured = capsys.readouterr()
    assert "Stopped by SIGTERM during the final kNN evaluation" in captured.out
    assert f"mocolab eval knn {tmp_path / 't'}" in captured.out
    assert "Traceback" not in captured.err
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert results["step"] == 3 and "knn" not in results and results["signal"] == "SIGTERM"


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from mocolab import train
    save = train.Run.save

    def slow_save(self):  # the checkpoint write a second Ctrl-C lands in
        time.sleep(3)
        save(self)

    train.Run.save = slow_save
    from mocolab.cli import main
    sys.argv = ["mocolab", *sys.argv[1:]]
    sys.exit(main())
""")


def test_ctrl_c_twice_exits_130_in_one_line(tmp_path):
    """The first Ctrl-C asks to stop after the step, with a checkpoint; a second one, while
    that checkpoint is written, ends the process at once: exit 130, one line, no traceback.
    (Two signals sent within microseconds are merged by the kernel: one Ctrl-C.)"""
    cmd = [
        sys.executable,
        "-c",
        SLOW_SAVE,
        *pretrain_args(tmp_path, "cc", "--epochs", "50", "--no-final-eval"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cc" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.stat().st_size) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "mocolab: interrupted", err
    assert not (tmp_path / "cc" / CHECKPOINT_NAME).exists()  # interrupted before it was saved


def _two_ctrl_c_during_one_long_call() -> None:
    """Two SIGINTs 20 ms apart (as two key presses; not µs apart, when the kernel merges them)
    sent by another thread while the main thread is inside one long C call, as a training
    step: Python runs the handler once, after the call."""
    import threading

    import torch

    inside = threading.Event()

    def send():
        inside.wait()
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=send)
    sender.start()
    x = torch.randn(800, 800, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inside.set()
    torch.linalg.svd(x)  # a few tenths of a second: both arrive during it
    sender.join()


def test_two_ctrl_c_in_one_step_count_as_two_and_under_torchrun_as_one(monkeypatch):
    with train_mod.StopRequest() as stop, pytest.raises(KeyboardInterrupt):
        _two_ctrl_c_during_one_long_call()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # the agent forwards the terminal's Ctrl-C
    with train_mod.StopRequest() as stop:
        _two_ctrl_c_during_one_long_call()
        assert stop.requested and stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second press at the terminal
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_the_decoding_bar_follows_no_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(folder_mod, "PROGRESS_THRESHOLD", 2)  # a "large" folder of 3 files
    src = images(tmp_path / "imgs", 3)
    capsys.readouterr()
    folder_mod.load_folder(src, cache_dir=tmp_path / "c1", progress=True)
    assert "decoding" in capsys.readouterr().err  # the bar, when it is wanted
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(src),
                "--image-size",
                "16",
                "--width",
                "8",
                "--batch-size",
                "2",
                "--bn-splits",
                "1",
                "--queue-size",
                "4",
                "--max-steps",
                "1",
                "--num-workers",
                "0",
                "--no-compile",
                "--no-channels-last",
                "--diagnostics-every",
                "0",
                "--no-progress",
                "--no-final-eval",
                "--out-dir",
                str(tmp_path / "runs"),
                "--run-name",
                "p",
            ]
        )
        == 0
    )
    assert "decoding" not in capsys.readouterr().err


# --- usability --------------------------------------------------------------------------------


def test_a_one_shard_pack_trains_with_fewer_workers_and_a_note(tmp_path, capsys):
    src = images(tmp_path / "imgs", 8, side=32)
    assert main(["data", "pack", str(src), str(tmp_path / "sh"), "--no-progress"]) == 0
    assert len(list((tmp_path / "sh").glob("shard-*.tar"))) == 1
    capsys.readouterr()
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(tmp_path / "sh"),
                "--image-size",
                "16",
                "--width",
                "8",
                "--batch-size",
                "4",
                "--bn-splits",
                "1",
                "--queue-size",
                "8",
                "--max-steps",
                "2",
                "--no-compile",
                "--no-channels-last",
                "--diagnostics-every",
                "0",
                "--no-progress",
                "--no-final-eval",
                "--out-dir",
                str(tmp_path / "runs"),
                "--run-name",
                "s",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "1 shard, fewer than 1 process × 2 workers" in err and "with 1 worker" in err
    assert load_checkpoint(tmp_path / "runs" / "s")["config"]["num_workers"] == 1
