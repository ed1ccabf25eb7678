"""Views per second: torchvision per image in DataLoader workers against mocolab's batched
view generator, MoCo v2 recipe, at 28, 32, 96 and 224 px.

Source images are random uint8: 28 px 1-channel (Fashion-MNIST), 32 px (CIFAR), 96 px
(STL-10) and 256 px cropped to 224-px views (ImageNet), 3 channels. A "pair" is the two views
of one image that a MoCo step needs. The per-image pipeline uses ``--workers`` processes (all
the cores by default); the batched one runs in the main process with all the cores as torch
threads, and on CUDA when available (timed with synchronisation, views made from uint8
images already on the GPU).

Usage: python benchmarks/augment_speed.py [--sizes 28 32 96 224] [--workers 2] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import torch

from mocolab.augment import ViewGenerator, recipe
from mocolab.augment.per_image import per_image_loader

SOURCES = {28: (1, 28), 32: (3, 32), 96: (3, 96), 224: (3, 256)}  # view size: channels, source side


def per_image_pairs_per_s(images: torch.Tensor, size: int, workers: int, batch: int, batches: int) -> float:
    cfg = recipe("mocov2", size, mean=(0.5,) * images.shape[1], std=(0.25,) * images.shape[1])
    order = torch.randperm(images.shape[0])
    index = [order[(i * batch) % len(order):][:batch] for i in range(batches + 2)]
    loader = per_image_loader(images, [cfg, cfg], index, workers=workers, seed=0)
    it = iter(loader)
    for _ in range(2):  # start the workers, fill their queues
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def batched_pairs_per_s(images: torch.Tensor, size: int, batch: int, batches: int, device: str) -> float:
    cfg = recipe("mocov2", size, mean=(0.5,) * images.shape[1], std=(0.25,) * images.shape[1])
    gen = ViewGenerator(cfg)
    x = images[:batch].to(device)
    g = torch.Generator().manual_seed(0)  # parameters drawn on the host, as the training loop does
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        gen(x, g), gen(x, g)
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        gen(x, g), gen(x, g)
    sync()
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 32, 96, 224])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0, help="rough time per measurement")
    p.add_argument("--cuda-only", action="store_true", help="measure only the batched views on CUDA")
    args = p.parse_args()

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cuda = torch.cuda.is_available()
    if args.cuda_only:
        if not cuda:
            raise SystemExit("--cuda-only: CUDA is not available")
        print(f"{date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"MoCo v2 views, batch {args.batch}, images on the GPU\n")
        print("| view px | mocolab batched, CUDA (pairs/s) |\n|---|---|")
        for size in args.sizes:
            channels, side = SOURCES.get(size, (3, size))
            images = torch.randint(0, 256, (args.batch, channels, side, side), dtype=torch.uint8)
            print(f"| {size} | {batched_pairs_per_s(images, size, args.batch, 50, 'cuda'):.0f} |", flush=True)
        return
    print(f"{date.today()} · {platform.machine()}, {cores} cores"
          f"{' · ' + torch.cuda.get_device_name() if cuda else ''} · torch {torch.__version__} · "
          f"MoCo v2 views, batch {args.batch}\n")
    head = "| view px | torchvision per image, {w} workers (pairs/s) | mocolab batched, CPU {c} threads (pairs/s) | speed-up |"
    print(head.format(w=args.workers, c=cores) + (" mocolab batched, CUDA (pairs/s) |" if cuda else ""))
    print("|---|---|---|---|" + ("---|" if cuda else ""))
    for size in args.sizes:
        channels, side = SOURCES.get(size, (3, size))
        images = torch.randint(0, 256, (4 * args.batch, channels, side, side), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(size))
        # size the number of batches from a quick first timing
        probe = batched_pairs_per_s(images, size, args.batch, 1, "cpu")
        n_batched = max(2, int(args.seconds * probe / args.batch))
        batched = batched_pairs_per_s(images, size, args.batch, n_batched, "cpu")
        probe = per_image_pairs_per_s(images, size, args.workers, args.batch, 1)
        per_image = per_image_pairs_per_s(images, size, args.workers, args.batch,
                                          max(2, int(args.seconds * probe / args.batch)))
        row = f"| {size} | {per_image:.0f} | {batched:.0f} | {batched / per_image:.1f}× |"
        if cuda:
            on_gpu = batched_pairs_per_s(images, size, args.batch, 50, "cuda")
            row += f" {on_gpu:.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
