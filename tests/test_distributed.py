"""Several processes on torch.distributed (gloo on the CPU), spawned by the tests.

- gathers and shuffle-BN across ranks, checked against explicit references in 2 spawned ranks;
- ``torchrun --nproc_per_node 2`` matches one process whose BN is split in 2 sub-batches
  (the same global batch, the same views, the same shuffle): same losses and queue;
- a gather with gradient returns each rank's gradient to it;
- SwAV's Sinkhorn-Knopp and DINO's center reduce over every rank: 2 ranks of B equal one
  process on the 2B samples;
- Ctrl-C under torchrun stops every rank at a step they agree on, with a checkpoint;
- a worker killed under ``torchrun --max-restarts 1``: the job resumes from the last checkpoint
  and finishes with a continuous step count.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mocolab import distributed
from mocolab.checkpoint import load_checkpoint
from mocolab.dictionaries import Queue
from mocolab.losses import sinkhorn, swav_loss
from mocolab.momentum import Center

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, B, C = 2, 8, 4  # ranks, per-rank batch, key dimension


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # Rank r's keys: rows r·B ... r·B + B − 1 of a global key matrix.
        keys = torch.arange(rank * B, (rank + 1) * B, dtype=torch.float32).view(B, 1).repeat(1, C)
        queue = Queue(3 * B, C)
        queue.push(distributed.concat_all_gather(keys))
        # Shuffle-BN: a key batch through a BN without affine parameters (training mode), with
        # the shuffle across ranks; the same generator seed on every rank.
        g = torch.Generator().manual_seed(7)
        x = torch.randn(B, C, 1, 1, generator=torch.Generator().manual_seed(100 + rank))
        shuffled, idx_unshuffle = distributed.batch_shuffle(x, g)
        bn = torch.nn.BatchNorm2d(C, affine=False)
        normalised = distributed.batch_unshuffle(bn(shuffled), idx_unshuffle)
        # Gather with gradient: rank r's loss is (r + 1)·Σ w ⊙ gathered, so the gradient that
        # reaches rank r's rows is Σ_s (s + 1)·w[rows of r] = 3·w[rows of r] for two ranks.
        z = torch.randn(B, C, generator=torch.Generator().manual_seed(200 + rank), requires_grad=True)
        w = torch.randn(WORLD * B, C, generator=torch.Generator().manual_seed(300))
        gathered = distributed.all_gather_with_grad(z)
        ((rank + 1) * (w * gathered).sum()).backward()
        torch.save({"queue": queue.keys().clone(), "ptr": int(queue.ptr), "x": x, "shuffled": shuffled,
                    "idx_unshuffle": idx_unshuffle, "normalised": normalised, "z": z.detach(),
                    "gathered": gathered.detach(), "z_grad": z.grad, "w": w},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(worker, out: Path) -> list[dict]:
    """Run ``worker(rank, port, out_dir)`` on WORLD gloo ranks; the dicts they saved, by rank."""
    mp.spawn(worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return _spawn(_ranks_worker, tmp_path_factory.mktemp("ranks"))


def test_queue_holds_every_ranks_keys_in_rank_order(two_ranks):
    expected = torch.arange(WORLD * B, dtype=torch.float32).view(-1, 1).repeat(1, C)
    for r in two_ranks:
        assert r["ptr"] == WORLD * B
        assert torch.equal(r["queue"][:WORLD * B], expected)  # slots 0.. hold rank 0, then rank 1


def test_gather_with_gradient_returns_each_ranks_gradient_to_it(two_ranks):
    z_all = torch.cat([r["z"] for r in two_ranks])
    for rank, r in enumerate(two_ranks):
        assert torch.equal(r["gathered"], z_all)  # the forward: every rank's rows, in rank order
        expected = sum(s + 1 for s in range(WORLD)) * r["w"][rank * B:(rank + 1) * B]
        torch.testing.assert_close(r["z_grad"], expected)


def test_shuffle_across_ranks_is_a_bijection_and_unshuffle_restores_order(two_ranks):
    x_all = torch.cat([r["x"] for r in two_ranks])  # the global batch in rank order
    shuffled_all = torch.cat([r["shuffled"] for r in two_ranks])
    perm = torch.argsort(two_ranks[0]["idx_unshuffle"])  # the shuffle: shuffled_all = x_all[perm]
    assert torch.equal(two_ranks[0]["idx_unshuffle"], two_ranks[1]["idx_unshuffle"])
    assert sorted(perm.tolist()) == list(range(WORLD * B))
    assert torch.equal(shuffled_all, x_all[perm])


def test_shuffle_bn_takes_key_statistics_from_the_rank_it_was_sent_to(two_ranks):
    x_all = torch.cat([r["x"] for r in two_ranks]).flatten(1)  # (W·B)×C
    normalised = torch.cat([r["normalised"] for r in two_ranks]).flatten(1)
    perm = torch.argsort(two_ranks[0]["idx_unshuffle"])
    position = torch.argsort(perm)  # where each sample sits in the shuffled global batch
    host = position // B  # the rank whose BN normalised it
    # Reference: BN in training mode with the biased variance of the host rank's shard.
    for i in range(WORLD * B):
        shard = x_all[perm.view(WORLD, B)[host[i]]]
        expected = (x_all[i] - shard.mean(0)) / (shard.var(0, unbiased=False) + 1e-5).sqrt()
        torch.testing.assert_close(normalised[i], expected, atol=1e-5, rtol=1e-5)
    owner = torch.arange(WORLD * B) // B
    moved = (host != owner).sum().item()
    assert moved > 0  # some keys are normalised with another rank's statistics than their query's


# --- SwAV's and DINO's reductions across ranks ------------------------------------------------

K, CENTER_M = 5, 0.9  # prototypes / DINO outputs, the center's momentum


def _global_scores() -> torch.Tensor:
    """(W·B)×K prototype scores in [-1, 1]; rank 1's rows lean to other prototypes than rank
    0's, so a Sinkhorn that normalised each rank on its own would give other codes."""
    s = torch.rand(WORLD * B, K, generator=torch.Generator().manual_seed(400)) * 2 - 1
    s[B:, :2] += 0.5
    return s.clamp(-1, 1)


def _global_teacher() -> torch.Tensor:
    return torch.randn(WORLD * B, K, generator=torch.Generator().manual_seed(500)) + torch.arange(K)


def _reductions_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * B, (rank + 1) * B)
        codes = sinkhorn(_global_scores()[rows], epsilon=0.05, iterations=3)
        views = [_global_scores()[rows], _global_scores().flip(0)[rows]]
        center = Center(K, momentum=CENTER_M)
        center.center.fill_(1.0)
        center.update(_global_teacher()[rows])
        # ranks with different numbers of rows (DINOv2's masked patches): 3 rows on rank 0,
        # none on the others
        uneven = Center(K, momentum=CENTER_M)
        uneven.center.fill_(1.0)
        uneven.update(_global_teacher()[: 3 if rank == 0 else 0])
        torch.save({"codes": codes, "swav_loss": swav_loss(views, 0.1, 0.05, 3),
                    "center": center.center.clone(), "uneven": uneven.center.clone()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reductions(tmp_path_factory) -> list[dict]:
    return _spawn(_reductions_worker, tmp_path_factory.mktemp("reductions"))


def test_sinkhorn_over_ranks_equals_one_process_on_the_global_batch(reductions):
    scores = _global_scores()
    expected = sinkhorn(scores, epsilon=0.05, iterations=3)  # one process, all W·B samples
    for rank, r in enumerate(reductions):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(r["codes"], expected[rows], rtol=1e-5, atol=1e-7)
        local = sinkhorn(scores[rows], epsilon=0.05, iterations=3)  # without the all-reduce
        assert not torch.allclose(r["codes"], local, atol=1e-3)  # so the test can tell
    # the swapped prediction: the mean of the ranks' losses (DDP averages their gradients) is
    # one process's loss on the global batch
    views = [scores, scores.flip(0)]
    mean = sum(r["swav_loss"] for r in reductions) / WORLD
    torch.testing.assert_close(mean, swav_loss(views, 0.1, 0.05, 3), rtol=1e-5, atol=1e-6)


def test_dino_center_moves_with_the_mean_over_every_ranks_teacher_outputs(reductions):
    # Eq. 4 by hand: c ← m·c + (1 − m)·(1/(W·B)) Σ_b g_t(x_b), over the whole global batch
    teacher = _global_teacher()
    expected = CENTER_M * torch.ones(1, K) + (1 - CENTER_M) * teacher.sum(0, keepdim=True) / (WORLD * B)
    for r in reductions:
        torch.testing.assert_close(r["center"], expected)
    # uneven rows: the mean of the 3 rows rank 0 holds, on every rank (not the mean of the
    # ranks' means, which an empty rank would make NaN)
    expected = CENTER_M * torch.ones(1, K) + (1 - CENTER_M) * teacher[:3].sum(0, keepdim=True) / 3
    for r in reductions:
        torch.testing.assert_close(r["uneven"], expected)


# --- whole runs under torchrun ---------------------------------------------------------------

RUN_ANY = ["--data", "synthetic", "--width", "8", "--stem", "compact", "--batch-size", "32",
           "--log-every", "1", "--threads", "1", "--no-progress", "--no-final-eval", "--seed", "3"]
RUN = RUN_ANY + ["--queue-size", "96"]  # MoCo v2, the default method


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(WORLD), *args, "-m", "mocolab", "pretrain"]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("method,extra", [
    ("mocov2", ["--queue-size", "96"]),
    # SimCLR's tiny network at the default LR takes steps so large that its loss jumps around
    # (6.2 → 9.9) and rounding differences grow; a smaller LR keeps the comparison meaningful.
    ("simclr", ["--lr", "0.002", "--temperature", "0.5"]),
])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, method, extra):
    """MoCo v2 (split BN in the backbone, shuffle-BN, the queue) and SimCLR (split BN in the
    head too, negatives gathered with their gradient)."""
    steps = ["--max-steps", "6", "--out-dir", str(tmp_path), "--method", method, *extra]
    # --bn-splits counts sub-batches of the global batch: 2 = one per process, or 2 on one process
    subprocess.run(_torchrun() + RUN_ANY + steps + ["--bn-splits", "2", "--run-name", "two"],
                   check=True, env=_env(), capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "mocolab", "pretrain"] + RUN_ANY + steps
                   + ["--bn-splits", "2", "--run-name", "one"],
                   check=True, env=_env(), capture_output=True, timeout=300)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:  # gradients are all-reduced in another order: equal up to rounding
        assert two[step] == pytest.approx(one[step], abs=2e-3), (step, two, one)
    a, b = load_checkpoint(tmp_path / "two"), load_checkpoint(tmp_path / "one")
    assert a["step"] == b["step"] == 6
    if method == "mocov2":
        assert int(a["model"]["queue.ptr"]) == int(b["model"]["queue.ptr"])
        torch.testing.assert_close(a["model"]["queue.queue"], b["model"]["queue.queue"], atol=2e-3, rtol=0)
    w = "query_encoder.backbone.conv1.weight"
    torch.testing.assert_close(a["model"][w], b["model"][w], atol=1e-3, rtol=0)


def _workers(pid: int) -> list[int]:
    """The mocolab worker processes that the torchrun agent ``pid`` started (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and b"mocolab" in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Until the running job ``proc`` has checkpointed ``step`` or later (4 minutes at most)."""
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint.pt").exists() or load_checkpoint(run_dir)["step"] < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"no checkpoint at step {step} in time"
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_killed_worker_restarts_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "elastic"
    total = 40
    proc = subprocess.Popen(
        _torchrun("--max-restarts", "1") + RUN + [
            "--max-steps", str(total), "--checkpoint-every", "4", "--out-dir", str(tmp_path),
            "--run-name", "elastic", "--bn-splits", "2"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(proc, run_dir, 8)
        killed_after = load_checkpoint(run_dir)["step"]
        workers = _workers(proc.pid)
        assert len(workers) == WORLD, workers
        os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-run
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert killed_after < total
    assert "(resuming at step " in output  # torchrun restarted the workers, which resumed
    ckpt = load_checkpoint(run_dir)
    assert ckpt["step"] == total
    steps = sorted(_losses(run_dir))
    assert steps == list(range(1, total + 1))  # no step lost, none repeated in the log


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups (POSIX)")
def test_ctrl_c_under_torchrun_stops_every_rank_with_a_checkpoint(tmp_path):
    """Ctrl-C at a terminal signals the whole foreground group: the torchrun agent (which
    forwards SIGINT to its workers) and the workers themselves. The ranks agree to stop within
    STOP_CHECK_EVERY steps, rank 0 saves, and the run says how to continue."""
    run_dir = tmp_path / "ctrl-c"
    proc = subprocess.Popen(
        _torchrun() + RUN + ["--max-steps", "400", "--epochs", "50", "--log-every", "1000",
                             "--checkpoint-every", "7", "--out-dir", str(tmp_path),
                             "--run-name", "ctrl-c", "--bn-splits", "2"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group, as a job in a terminal
    try:
        _wait_for_checkpoint(proc, run_dir, 7)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Stopped at step" in output, output
    stopped = int(output.split("Stopped at step ")[1].split()[0])
    assert load_checkpoint(run_dir)["step"] == stopped < 400
    from mocolab.train import STOP_CHECK_EVERY  # the steps at which the ranks ask each other
    assert any(stopped % every == 0 for every in (7, 16, STOP_CHECK_EVERY)), stopped
