"""TFLOP/s, MFU and the data wait of the demo's model with each view path (docs/utilisation.md).

Runs, one after the other, the three ``mocolab pretrain`` commands of the page's example — the
demo's MoCo v2 (ResNet-18 width 16, batch 128, Fashion-MNIST) with the batched views (the
default), with the per-image views in two DataLoader workers, and with the per-image views
made in the training process — and prints a Markdown table of the medians of each run's
logged rows after the first (which holds the warm-up), with the peak the MFU is of, the date,
the machine and the load average before the runs, and ``--peaks`` measurements of the CPU's
peak one after the other (:func:`mocolab.utilisation.measure_peak`), to show how much it varies.

Usage: python benchmarks/utilisation.py [--out-dir DIR] [--steps 100] [--peaks 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from mocolab.utilisation import device_name, measure_peak

RUNS = (
    ("batched, in the training process (default)", []),
    ("per image, 2 DataLoader workers", ["--augment-backend", "torchvision", "--workers", "2"]),
    (
        "per image, in the training process (`--workers 0`)",
        ["--augment-backend", "torchvision", "--workers", "0"],
    ),
)
KEYS = ("images_per_s", "tflops", "mfu", "data_wait")


def run(flags: list[str], steps: int, out_dir: Path, name: str) -> dict[str, float]:
    """One run of the demo's model for ``steps`` steps; the medians of its rows after the first."""
    log_every = max(steps // 5, 1)
    cmd = [sys.executable, "-m", "mocolab", "pretrain", "--preset", "mocov2-fashion-mnist"]
    cmd += ["--no-compile", "--no-final-eval", "--no-progress", "--max-steps", str(steps)]
    cmd += ["--log-every", str(log_every), "--out-dir", str(out_dir), "--run-name", name]
    # one peak for the three runs, measured afresh by the first (not the user's kept one)
    env = {**os.environ, "MOCOLAB_CACHE": str(out_dir / "cache")}
    subprocess.run(cmd + flags, check=True, stdout=subprocess.DEVNULL, env=env)
    lines = (out_dir / name / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "loss" in r][1:]
    medians = {k: statistics.median(r[k] for r in rows) for k in KEYS}
    facts = json.loads((out_dir / name / "utilisation.json").read_text())
    medians["peak"] = facts["peak"]["flops"]
    medians["step_flops"] = facts["step_flops"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--steps", type=int, default=100, help="steps of each run")
    parser.add_argument("--peaks", type=int, default=5, help="measurements of the peak")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    cpu_ = torch.device("cpu")
    peaks = [measure_peak(cpu_) / 1e9 for _ in range(args.peaks)]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        results = [
            (label, run(flags, args.steps, out, f"util{i}"))
            for i, (label, flags) in enumerate(RUNS)
        ]
    cpu = device_name(cpu_)
    print(
        f"{date.today().isoformat()}, {platform.machine()} ({cpu}), {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average "
        f"{load:.1f} before the runs; {args.steps} steps each. One step: "
        f"{results[0][1]['step_flops'] / 1e9:.2f} GFLOP; peak "
        f"{results[0][1]['peak'] / 1e9:.1f} GFLOP/s. Medians of the logged rows after the first:"
    )
    if peaks:
        print(f"\nThe peak measured {len(peaks)} times: " + ", ".join(f"{p:.0f}" for p in peaks))
    print()
    print("| views | images/s | TFLOP/s | MFU | data wait |")
    print("|---|---|---|---|---|")
    for label, m in results:
        print(
            f"| {label} | {m['images_per_s']:.0f} | {m['tflops']:.3f} | "
            f"{100 * m['mfu']:.1f} % | {100 * m['data_wait']:.1f} % |"
        )


if __name__ == "__main__":
    main()
