"""Shared by the speed benchmarks: run ``mocolab pretrain`` and read its throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def pretrain_throughput(flags: Sequence[str], out_dir: Path, name: str, *, warmup: int,
                        nproc: int = 1, threads: int | None = None) -> float:
    """Images per second of ``mocolab pretrain FLAGS`` (under ``torchrun`` when ``nproc > 1``),
    from its per-step log after the first ``warmup`` steps (start-up excluded)."""
    cmd = ["-m", "mocolab", "pretrain", *flags, "--log-every", "1", "--no-progress",
           "--no-final-eval", "--out-dir", str(out_dir), "--run-name", name]
    if threads:
        cmd += ["--threads", str(threads)]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + cmd
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, *cmd], check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > warmup]
    if not rates:
        raise SystemExit(f"{name}: no steps after the first {warmup}; raise --steps")
    return len(rates) / sum(1.0 / r for r in rates)  # images / total time
