"""Training speed of the demo's MoCo v2 under the execution modes of ``mocolab pretrain``:
eager or ``--compile`` (torch.compile, inductor), views eager or compiled (``--compile-views``),
channels-last or not, bf16 autocast or fp32.

Throughput is read from the training log after the first ``--warmup`` steps, so compilation
time is left out (it is paid once per run: about a minute on a 2-core CPU).

Usage:
    python benchmarks/step_modes.py                      # the demo preset on this machine's CPU
    python benchmarks/step_modes.py --device cuda --preset mocov2-cifar10 --data cifar10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _throughput import pretrain_throughput

MODES = {
    "eager, channels-last": ["--no-compile", "--channels-last", "--amp", "off"],
    "eager": ["--no-compile", "--no-channels-last", "--amp", "off"],
    "eager, bf16": ["--no-compile", "--no-channels-last", "--amp", "bf16"],
    "compile, channels-last": ["--compile", "--compile-views", "off", "--channels-last", "--amp", "off"],
    "compile": ["--compile", "--compile-views", "off", "--no-channels-last", "--amp", "off"],
    "compile, bf16": ["--compile", "--compile-views", "off", "--no-channels-last", "--amp", "bf16"],
    "compile, compiled views (the preset)": ["--compile", "--compile-views", "on", "--no-channels-last",
                                              "--amp", "off"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mocov2-fashion-mnist")
    p.add_argument("--data", default=None, help="dataset (default: the preset's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE")
    args = p.parse_args()

    flags = ["--preset", args.preset, "--max-steps", str(args.steps), "--device", args.device,
             "--knn-every", "0", "--diagnostics-every", "0"]
    if args.data:
        flags += ["--data", args.data]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(args.modes):
            results[mode] = pretrain_throughput(flags + MODES[mode], Path(tmp), f"m{i}",
                                                warmup=args.warmup)
            print(f"{mode}: {results[mode]:.0f} images/s", file=sys.stderr, flush=True)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"{date.today()} · {machine} · torch {torch.__version__} · preset {args.preset}, "
          f"steps {args.warmup + 1}–{args.steps}\n")
    print("| mode | images/s | relative |")
    print("|---|---|---|")
    base = results[args.modes[0]]
    for mode, rate in results.items():
        print(f"| {mode} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
