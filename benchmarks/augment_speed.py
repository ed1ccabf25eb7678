"""Views per second: torchvision per image in DataLoader workers against mocolab's batched
view generator, MoCo v2 recipe, at 28, 32, 96 and 224 px.

Source images are random uint8: 28 px 1-channel (Fashion-MNIST), 32 px (CIFAR), 96 px
(STL-10) and 256 px cropped to 224-px views (ImageNet), 3 channels. A "pair" is the two views
of one image that a MoCo step needs. The per-image pipeline uses ``--workers`` processes (all
the cores by default); the batched one runs in the main process with all the cores as torch
threads, and on CUDA when available (timed with synchronisation, views made from uint8
images already on the GPU). ``--compile-views off on graphs`` measures the batched views
eager, as one compiled program and as a CUDA graph; ``--profile PX`` prints the GPU time per
kernel at one size.

Usage: python benchmarks/augment_speed.py [--sizes 28 32 96 224] [--workers 2] [--batch 256]
       python benchmarks/augment_speed.py --cuda-only --compile-views off on --profile 224
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


MODES = {"off": False, "on": True, "graphs": "reduce-overhead"}  # --compile-views → ViewGenerator(compile=)


def batched_pairs_per_s(images: torch.Tensor, size: int, batch: int, batches: int, device: str,
                        mode: str = "off") -> float:
    cfg = recipe("mocov2", size, mean=(0.5,) * images.shape[1], std=(0.25,) * images.shape[1])
    gen = ViewGenerator(cfg, compile=MODES[mode])
    x = images[:batch].to(device)
    g = torch.Generator().manual_seed(0)  # parameters drawn on the host, as the training loop does
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # (compiles a compiled mode, and records its CUDA graph)
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
    p.add_argument("--compile-views", nargs="+", default=["off"], choices=list(MODES),
                   help="batched modes to measure: eager (off), one torch.compile program (on), "
                        "also a CUDA graph (graphs)")
    p.add_argument("--profile", type=int, default=None, metavar="PX",
                   help="CUDA: print the GPU time per kernel of each mode at this view size")
    args = p.parse_args()
    modes = args.compile_views
    name = {"off": "eager", "on": "compiled", "graphs": "compiled + CUDA graph"}

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cuda = torch.cuda.is_available()
    if args.cuda_only:
        if not cuda:
            raise SystemExit("--cuda-only: CUDA is not available")
        print(f"{date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"MoCo v2 views, batch {args.batch}, images on the GPU\n")
        print("| view px |" + "".join(f" mocolab batched, CUDA, {name[m]} (pairs/s) |" for m in modes))
        print("|---|" + "---|" * len(modes))
        for size in args.sizes:
            channels, side = SOURCES.get(size, (3, size))
            images = torch.randint(0, 256, (args.batch, channels, side, side), dtype=torch.uint8)
            print(f"| {size} |" + "".join(f" {batched_pairs_per_s(images, size, args.batch, 50, 'cuda', m):.0f} |"
                                          for m in modes), flush=True)
        if args.profile:
            profile(args.profile, args.batch, modes)
        return
    print(f"{date.today()} · {platform.machine()}, {cores} cores"
          f"{' · ' + torch.cuda.get_device_name() if cuda else ''} · torch {torch.__version__} · "
          f"MoCo v2 views, batch {args.batch}\n")
    head = (
        "| view px | torchvision per image, {w} workers (pairs/s) "
        "| mocolab batched, CPU {c} threads (pairs/s) | speed-up |"
    )
    head = head.format(w=args.workers, c=cores)
    head += "".join(f" batched, CPU, {name[m]} (pairs/s) |" for m in modes[1:])
    head += "".join(f" batched, CUDA, {name[m]} (pairs/s) |" for m in modes) if cuda else ""
    print(head)
    print("|---|---|---|---|" + "---|" * (len(modes) - 1 + (len(modes) if cuda else 0)))
    for size in args.sizes:
        channels, side = SOURCES.get(size, (3, size))
        images = torch.randint(0, 256, (4 * args.batch, channels, side, side), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(size))
        # size the number of batches from a quick first timing
        probe = batched_pairs_per_s(images, size, args.batch, 1, "cpu", modes[0])
        n_batched = max(2, int(args.seconds * probe / args.batch))
        batched = [batched_pairs_per_s(images, size, args.batch, n_batched, "cpu", m) for m in modes]
        probe = per_image_pairs_per_s(images, size, args.workers, args.batch, 1)
        per_image = per_image_pairs_per_s(images, size, args.workers, args.batch,
                                          max(2, int(args.seconds * probe / args.batch)))
        row = f"| {size} | {per_image:.0f} | {batched[0]:.0f} | {batched[0] / per_image:.1f}× |"
        row += "".join(f" {b:.0f} |" for b in batched[1:])
        if cuda:
            row += "".join(f" {batched_pairs_per_s(images, size, args.batch, 50, 'cuda', m):.0f} |" for m in modes)
        print(row, flush=True)


def profile(size: int, batch: int, modes: list[str]) -> None:
    """GPU time per kernel of 10 view pairs at ``size`` px, for each mode (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    channels, side = SOURCES.get(size, (3, size))
    x = torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8, device="cuda")
    cfg = recipe("mocov2", size, mean=(0.5,) * channels, std=(0.25,) * channels)
    for m in modes:
        gen, g = ViewGenerator(cfg, compile=MODES[m]), torch.Generator().manual_seed(0)
        for _ in range(3):
            gen(x, g)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                gen(x, g)
            torch.cuda.synchronize()
        print(f"\n{size} px, {m}: GPU time of 10 view pairs, batch {batch}")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
