"""Scaling efficiency of data-parallel pretraining: one process against ``torchrun`` with N
processes, the same global batch and model (MoCo v2, the demo's ResNet-18 width 16 on
Fashion-MNIST unless told otherwise).

Each configuration pretrains ``--steps`` steps; throughput is measured from the training
log between step ``--warmup`` and the last step (start-up and the first steps excluded).
On a CPU, one process uses all ``--cores`` threads and each of N processes uses cores/N, so
the comparison is at equal hardware; on GPUs, each process takes one GPU and the efficiency
is ``throughput(N) / (N · throughput(1))`` with the per-GPU batch held fixed.

Usage:
    python benchmarks/scaling.py                      # CPU: 1 process × 2 threads vs 2 × 1
    python benchmarks/scaling.py --device cuda --nproc 1 2 4 --batch-size 256
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


def run(nproc: int, args: argparse.Namespace, out_dir: Path) -> float:
    """Images per second of one configuration."""
    threads = max(1, args.cores // nproc) if args.device == "cpu" else 4
    batch = args.batch_size * (nproc if args.device == "cuda" else 1)
    flags = ["--data", args.data, "--width", str(args.width), "--batch-size", str(batch),
             "--bn-splits", str(args.bn_splits), "--max-steps", str(args.steps), "--device", args.device]
    return pretrain_throughput(flags, out_dir, f"p{nproc}", warmup=args.warmup, nproc=nproc,
                               threads=threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch on the CPU; per-GPU batch on CUDA")
    p.add_argument("--bn-splits", type=int, default=2,
                   help="BN sub-batches of the global batch (the same in every run)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            results[n] = run(n, args, Path(tmp))
    base = results[args.nproc[0]] / args.nproc[0]
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {args.cores} cores")
    print(f"{date.today()} · {machine} · torch {torch.__version__} · MoCo v2 ResNet-18 width "
          f"{args.width} on {args.data}, {args.steps} steps (first {args.warmup} excluded)\n")
    print("| processes | threads or GPUs each | global batch | images/s | efficiency |")
    print("|---|---|---|---|---|")
    for n, ips in results.items():
        each = max(1, args.cores // n) if args.device == "cpu" else 1
        batch = args.batch_size * (n if args.device == "cuda" else 1)
        eff = ips / (base * n) if args.device == "cuda" else ips / results[args.nproc[0]]
        print(f"| {n} | {each} | {batch} | {ips:.0f} | {eff:.2f} |")
    if args.device == "cpu":
        print("\n(CPU: the same cores in every row, so efficiency = throughput / 1-process throughput)")


if __name__ == "__main__":
    main()
