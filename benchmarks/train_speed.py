"""End-to-end pretraining speed of MoCo v2 with ResNet-18 for both view backends: mocolab's
batched views on the training device, and torchvision per image in DataLoader workers
(``--augment-backend torchvision``), the same model, batch and data.

Throughput is read from the training log after the first ``--warmup`` steps.

Usage:
    python benchmarks/train_speed.py                          # the CPU demo's model on Fashion-MNIST
    python benchmarks/train_speed.py --device cuda --width 64 --batch-size 256 --data cifar10
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None, help="where built-in datasets are looked for")
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64: torchvision's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader processes of the per-image backend")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    args = p.parse_args()

    flags = ["--data", args.data, "--width", str(args.width), "--batch-size", str(args.batch_size),
             "--max-steps", str(args.steps), "--device", args.device]
    if args.data_root:
        flags += ["--data-root", args.data_root]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("torchvision", "batched"):
            results[backend] = pretrain_throughput(
                flags + ["--augment-backend", backend, "--workers", str(args.workers)],
                Path(tmp), backend, warmup=args.warmup)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"{date.today()} · {machine} · torch {torch.__version__} · MoCo v2 ResNet-18 width "
          f"{args.width}, batch {args.batch_size}, {args.data}, steps {args.warmup + 1}–{args.steps}\n")
    print("| views | images/s | relative |")
    print("|---|---|---|")
    base = results["torchvision"]
    print(f"| torchvision per image, {args.workers} workers | {base:.0f} | 1.00 |")
    print(f"| mocolab batched | {results['batched']:.0f} | {results['batched'] / base:.2f} |")


if __name__ == "__main__":
    main()
