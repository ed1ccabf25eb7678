"""Images per second of decoding + two MoCo v2 views at 224 px, from real JPEG files.

Compared, on one machine in one run, with the same DataLoader workers:

- ``torchvision ImageFolder``: what the official MoCo code runs (``main_moco.py --aug-plus``):
  ``ImageFolder`` + ``DataLoader`` with ``TwoCropsTransform`` of RandomResizedCrop(224,
  scale 0.2–1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale 0.2, the PIL Gaussian
  blur σ ∈ [0.1, 2] p 0.5 (``moco/loader.py``), flip, ToTensor, Normalize; per image, in the
  workers.
- ``mocolab shards``: ``mocolab data pack`` shards streamed by :class:`ShardStream` (the
  workers decode whole images with JPEG draft decoding), views made batched in the main
  process (:class:`ViewGenerator`, whole-image crops).
- ``mocolab folder (whole)``: the whole-image cache of the folder (built once; its build rate
  is reported on its own), batches gathered from the memory map, the same views.
- ``mocolab folder (whole), per-image views``: the same cache, views made image by image by
  torchvision in the DataLoader workers (``--augment-backend torchvision``; each stretched
  image resized back to its true size first).
- on CUDA also ``mocolab shards, GPU decode`` (the workers only read; ``decode_jpeg`` on the
  GPU, views on the GPU) and the share of a ResNet-50 MoCo v2 step that waits for its data.

The JPEGs are made offline from Fashion-MNIST: each 28-px item upscaled (bicubic) to a
random size with its longer side in [300, 500] and aspect w/h in [0.6, 1.8] (ImageNet-like:
mean about 400×350), tinted to colour, with mild noise, JPEG quality 90.

``--rss`` also measures the peak memory (RSS of the main process and of the workers) of one
epoch streamed from shards of 10k and of 100k small images: it must not grow with the set.

``--sizes 28 64 96 128 160 224`` measures instead the two view paths of a folder run at each
view size, as training feeds them to its step: two MoCo v2 views per image made from the
folder's memory-mapped cache, per image by PIL in ``--workers`` DataLoader processes
(``--augment-backend torchvision``) against batched in the main process (eager, and compiled
as a folder run on a CPU makes them), alternating ``--repeats`` times (median kept). The
cache holds each image at ``round(size × 8/7)`` px (256 for 224-px views), as the default
``--crops auto`` stores it: the centre square below 128 px, the whole image from 128. It
prints two Markdown tables, images/s and images per CPU second (of the main process and the
workers, from ``/proc``: what a shared machine's load changes least), and the
``CPU_VIEW_RATES`` table of ``mocolab/device_defaults.py`` (``--code-rates``).

Usage: python benchmarks/data_path.py [--images 1024] [--workers 2] [--batch 64] [--rss]
       [--threads 1]  (one torch thread: on a shared CPU, OpenMP teams lose most of their time)
       python benchmarks/data_path.py --sizes 28 64 96 128 160 224 [--images 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def fashion_items(n: int) -> np.ndarray:
    with gzip.open(FMNIST) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return raw.reshape(-1, 28, 28)[:n]


def make_jpegs(root: Path, n: int, long_side: tuple[int, int] = (300, 500), seed: int = 0,
               quality: int = 90, items: np.ndarray | None = None) -> Path:
    """``n`` colour JPEGs of varied size and aspect in 10 class folders under ``root``, drawn
    from ``items`` (gray ``M×h×w`` uint8; default: Fashion-MNIST's training images)."""
    rng = np.random.default_rng(seed)
    if items is None:
        items = fashion_items(n)  # 60,000 at most: larger sets reuse them at other sizes, tints
    for i in range(n):
        item = items[i % len(items)]
        side = int(rng.integers(*long_side))
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.8))))  # w / h
        w, h = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
        im = Image.fromarray(item).resize((w, h), Image.Resampling.BICUBIC)
        tint = rng.uniform(0.4, 1.0, 3)
        a = np.asarray(im, dtype=np.float32)[..., None] * tint + rng.normal(0, 6, (h, w, 3))
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg",
                                                                  quality=quality)
    return root


# --- the official MoCo v2 data path ------------------------------------------------------------


class GaussianBlur:
    """The official MoCo v2 blur (``moco/loader.py``): PIL's, σ uniform in ``sigma``."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
    """Two views of one image (``moco/loader.py``)."""

    def __init__(self, base) -> None:
        self.base = base

    def __call__(self, x):
        return [self.base(x), self.base(x)]


def torchvision_rate(root: Path, workers: int, batch: int, batches: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    aug = T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    ds = ImageFolder(str(root), TwoCropsTransform(aug))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    return _timed(iter(loader), batch, batches)


def _timed(it, batch: int, batches: int, each=lambda b: b) -> float:
    each(next(it))  # start the workers
    t = time.perf_counter()
    for _ in range(batches):
        each(next(it))
    return batches * batch / (time.perf_counter() - t)


# --- mocolab ---------------------------------------------------------------------------------


def _views(device: str):
    from mocolab.augment import ViewGenerator, recipe

    gen = ViewGenerator(recipe("mocov2", 224, mean=(0.485, 0.456, 0.406),
                               std=(0.229, 0.224, 0.225)))
    g = torch.Generator().manual_seed(0)

    def make(x: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(device, non_blocking=True)
        views = [gen(x, g, sizes), gen(x, g, sizes)]
        if device == "cuda":
            torch.cuda.synchronize()
        return views
    return make


def shards_rate(shards: Path, workers: int, batch: int, batches: int, device: str = "cpu",
                gpu_decode: bool = False) -> float:
    from mocolab.data.shards import ShardIndex, ShardStream, device_batches

    stream = ShardStream(ShardIndex.load(shards), side=256, batch_size=batch, seed=0,
                         streams=workers)
    make = _views(device)
    if gpu_decode:
        it = device_batches(stream, 0, 0, batches + 1, torch.device("cuda"))
        return _timed(it, batch, batches, lambda b: make(b[1], b[2]))
    it = stream.batches(0, 0, batches + 1, pin_memory=device == "cuda")
    return _timed(it, batch, batches, lambda b: make(b.images, b.sizes))


def folder_rates(root: Path, cache: Path, workers: int, batch: int,
                 batches: int) -> tuple[float, float]:
    """(build rate of the whole-image cache, images/s of views from it)."""
    from mocolab.data.prefetch import BatchPrefetcher
    from mocolab.data.whole import load_folder_whole

    t = time.perf_counter()
    ds = load_folder_whole(root, side=256, cache_dir=cache, num_workers=workers)
    build = len(ds) / (time.perf_counter() - t)
    ds = load_folder_whole(root, side=256, cache_dir=cache)  # memory-mapped, as training reads it
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    index = [order[(i * batch) % (len(ds) - batch):][:batch] for i in range(batches + 1)]
    make = _views("cpu")
    with BatchPrefetcher(ds.images, index) as it:
        rate = _timed(zip(it, index), batch, batches, lambda b: make(b[0], ds.sizes[b[1]]))
    return build, rate


def folder_per_image_rate(root: Path, cache: Path, workers: int, batch: int,
                          batches: int) -> float:
    """Images/s of two MoCo v2 views made per image by torchvision in ``workers`` processes
    from the whole-image cache (``--crops whole --augment-backend torchvision``)."""
    from mocolab.augment import recipe
    from mocolab.augment.per_image import per_image_loader
    from mocolab.data.whole import load_folder_whole

    ds = load_folder_whole(root, side=256, cache_dir=cache)  # built by folder_rates
    cfg = recipe("mocov2", 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    index = [order[(i * batch) % (len(ds) - batch):][:batch] for i in range(batches + 1)]
    loader = per_image_loader(ds.images, [cfg, cfg], index, workers, seed=0, sizes=ds.sizes)
    return _timed(iter(loader), batch, batches)


def data_wait_share(shards: Path, workers: int, batch: int, steps: int) -> float:
    """Share of a ResNet-50 MoCo v2 step (CUDA, bf16, channels-last) spent waiting for data:
    1 − (time of steps on a resident batch) / (time of steps fed from the shards)."""
    from mocolab.config import build_config
    from mocolab.data.shards import ShardIndex, ShardStream, device_batches
    from mocolab.methods import build_method

    cfg = build_config("mocov2-imagenet", bn_splits=1)
    model = build_method(cfg, 3, "imagenet", num_images=10**6, mean=[0.5] * 3, std=[0.25] * 3,
                         image_size=224).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    from mocolab.augment import ViewGenerator, recipe

    gen = ViewGenerator(recipe("mocov2", 224, mean=(0.5,) * 3, std=(0.25,) * 3), compile=True)

    def step(x, sizes) -> None:
        views = [v.contiguous(memory_format=torch.channels_last) for v in (gen(x, g, sizes),
                                                                           gen(x, g, sizes))]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(views, g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.on_step_end(0, 1)

    stream = ShardStream(ShardIndex.load(shards), side=256, batch_size=batch, seed=0,
                         streams=workers)
    batches = list(device_batches(stream, 0, 0, 4, torch.device("cuda")))
    for _, x, s in batches:  # warm up
        step(x, s)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for k in range(steps):
        _, x, s = batches[k % len(batches)]
        step(x, s)
    torch.cuda.synchronize()
    resident = time.perf_counter() - t
    it = device_batches(stream, 0, 0, steps + 1, torch.device("cuda"))
    step(*next(it)[1:])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _, x, s in it:
        step(x, s)
    torch.cuda.synchronize()
    fed = time.perf_counter() - t
    return max(0.0, 1 - resident / fed)


# --- the view path by view size ---------------------------------------------------------------


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PATHS = ("per-image", "batched, eager", "batched, compiled")


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by this process and the processes ``pids`` (``/proc``)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _rate(batches, batch: int, seconds: float, warmup: int = 2,
          pids: list[int] = ()) -> tuple[float, float]:
    """(images/s, images per CPU second of this process and ``pids``) of the iterator
    ``batches`` after ``warmup`` batches (workers started, their queues filled), timed over at
    least ``seconds`` and two batches."""
    for _ in range(warmup):
        next(batches)
    n, t, cpu = 0, time.perf_counter(), _cpu_seconds(list(pids))
    while n < 2 or time.perf_counter() - t < seconds:
        next(batches)
        n += 1
    return (n * batch / (time.perf_counter() - t),
            n * batch / max(_cpu_seconds(list(pids)) - cpu, 1e-9))


def view_rates(ds, size: int, workers: int, batch: int,
               seconds: float) -> dict[str, tuple[float, float]]:
    """(images/s, images per CPU second), two MoCo v2 views each, of each view path on the
    cached images ``ds``."""
    from mocolab.augment import ViewGenerator, recipe
    from mocolab.augment.per_image import per_image_loader
    from mocolab.data.prefetch import BatchPrefetcher

    cfg = recipe("mocov2", size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(size))
    index = [order[(i * batch) % (n - batch):][:batch] for i in range(100_000 // batch)]
    rates = {}
    loader = iter(per_image_loader(ds.images, [cfg, cfg], index, workers, seed=0, sizes=ds.sizes))
    pids = [w.pid for w in getattr(loader, "_workers", [])]  # the DataLoader's processes
    rates["per-image"] = _rate(loader, batch, seconds, pids=pids)
    del loader  # stops the workers
    g = torch.Generator().manual_seed(0)
    for name, compiled in (("batched, eager", False), ("batched, compiled", True)):
        gen = ViewGenerator(cfg, compile=compiled)

        def views(idx: torch.Tensor, x: torch.Tensor, gen=gen) -> list[torch.Tensor]:
            sizes = None if ds.sizes is None else ds.sizes[idx]
            return [gen(x, g, sizes), gen(x, g, sizes)]

        with BatchPrefetcher(ds.images, index) as it:  # as the training loop gathers them
            rates[name] = _rate(map(views, index, it), batch, seconds, warmup=3)  # (compiles)
    return rates


def view_path_table(src: Path, cache: Path, sizes: list[int], workers: int, batch: int,
                    seconds: float, repeats: int) -> dict[int, dict[str, tuple[float, float]]]:
    """For each view size and path, the medians of (images/s, images per CPU second) over
    ``repeats`` alternations."""
    from mocolab.data import WHOLE_CROPS_FROM
    from mocolab.data.folder import load_folder
    from mocolab.data.whole import load_folder_whole

    caches = {}
    for size in sizes:  # built before any timing (decoding once, as a first run does)
        side = round(size * 8 / 7)
        if side >= WHOLE_CROPS_FROM:
            caches[size] = load_folder_whole(src, side=side, cache_dir=cache, num_workers=workers)
        else:
            caches[size] = load_folder(src, image_size=side, cache_dir=cache,
                                       num_workers=workers)
    runs: dict[int, dict[str, list[tuple[float, float]]]] = {
        s: {p: [] for p in PATHS} for s in sizes}
    for r in range(repeats):
        for size in sizes:
            for path, rate in view_rates(caches[size], size, workers, batch, seconds).items():
                runs[size][path].append(rate)
            print(f"  round {r + 1}/{repeats}, {size} px: "
                  + ", ".join(f"{p} {v[-1][0]:.0f}/s ({v[-1][1]:.0f}/CPU s)"
                              for p, v in runs[size].items()), flush=True)
    return {s: {p: (float(np.median([w for w, _ in v])), float(np.median([c for _, c in v])))
                for p, v in runs[s].items()} for s in sizes}


def print_view_path_table(rates: dict[int, dict[str, tuple[float, float]]], workers: int,
                          header: str, code_from: str) -> None:
    """The Markdown tables of :func:`view_path_table` (images/s; images per CPU second) and
    the table in code, from the ``code_from`` ("wall" or "cpu") rates."""
    from mocolab.data import WHOLE_CROPS_FROM

    print(f"\n{header}\n")
    for k, unit in ((0, "images/s"), (1, "images per CPU second")):
        print(f"| view px | cache | per-image, PIL, {workers} worker{'s' * (workers != 1)} "
              f"| batched, eager | batched, compiled | faster ({unit}) |")
        print("|---:|---|---:|---:|---:|---|")
        for size, r in rates.items():
            side = round(size * 8 / 7)
            kind = "whole" if side >= WHOLE_CROPS_FROM else "square"
            per_image, eager, fused = (r[p][k] for p in PATHS)
            best = max(eager, fused)
            faster = (f"per-image ({per_image / best:.2f}×)" if per_image > best
                      else f"batched ({best / per_image:.2f}×)")
            print(f"| {size} | {side} px, {kind} | {per_image:.0f} | {eager:.0f} | {fused:.0f} "
                  f"| {faster} |")
        print()
    k = 0 if code_from == "wall" else 1
    print(f"two MoCo v2 views per image, medians of the rounds; for mocolab/device_defaults.py "
          f"({'images/s' if k == 0 else 'images per CPU second'}):\n")
    print("CPU_VIEW_RATES = {")
    for size, r in rates.items():
        print(f"    {size}: ({', '.join(f'{r[p][k]:.0f}' for p in PATHS)}),")
    print("}")


# --- memory ----------------------------------------------------------------------------------


_RSS_CHILD = """
import resource, sys, time
from mocolab.data.shards import ShardIndex, ShardStream
s = ShardStream(ShardIndex.load(sys.argv[1]), side=64, batch_size=256, seed=0, streams=2)
n = 0
t = time.perf_counter()
for b in s.batches(0):
    n += len(b.index)
self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(n, round(self), round(kids), round(n / (time.perf_counter() - t)))
"""


def rss_row(root: Path, n: int) -> tuple[int, int, int, int]:
    """(images streamed, peak RSS MiB of the main process, of the largest worker, images/s)
    for one epoch of ``n`` 64-px JPEG shards (packed here, 1000 per shard)."""
    from mocolab.data.shards import pack_folder

    src = make_jpegs(root / f"small{n}", n, long_side=(48, 80))
    pack_folder(src, root / f"shards{n}", max_side=64, shard_size=n * 3000 // max(1, n // 1000),
                progress=False)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(root / f"shards{n}")],
                         capture_output=True, text=True, check=True)
    a, b, c, d = map(int, out.stdout.split())
    return a, b, c, d


def _rss_table(work: Path) -> None:
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; load average "
          f"{os.getloadavg()[0]:.1f}; one epoch, 2 workers, batch 256, 64-px whole images\n")
    print("| shards of 48–80 px JPEGs | images streamed | peak RSS main (MiB) "
          "| peak RSS worker (MiB) | images/s |\n|---|---:|---:|---:|---:|", flush=True)
    for n in (10_000, 100_000):
        a, b, c, d = rss_row(work, n)
        print(f"| {n // 1000}k images | {a} | {b} | {c} | {d} |", flush=True)


def _machine_line(args, load: float) -> str:
    """Date, machine, load and settings of a measurement."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{when}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{gpu}; torch {torch.__version__}; load average {load:.1f} at the start; "
            f"{args.workers} DataLoader workers, batch {args.batch}, "
            f"{torch.get_num_threads()} torch threads; "
            f"{args.images} JPEGs")


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    ap.add_argument("--rss", action="store_true", help="also the 10k / 100k memory check")
    ap.add_argument("--rss-only", action="store_true", help="only the memory check")
    ap.add_argument("--keep", help="keep the files in this folder")
    ap.add_argument("--sizes", type=int, nargs="+", metavar="PX",
                    help="instead: the two view paths at these view sizes (see above)")
    ap.add_argument("--repeats", type=int, default=3, help="--sizes: alternations of the paths")
    ap.add_argument("--seconds", type=float, default=4.0, help="--sizes: time per measurement")
    ap.add_argument("--code-rates", choices=("wall", "cpu"), default="wall",
                    help="--sizes: the rates of the table in code: images/s (a quiet machine) "
                         "or images per CPU second (a shared one: the load counts less)")
    args = ap.parse_args()
    if args.sizes and args.images <= args.batch:
        ap.error(f"--sizes needs more --images than --batch ({args.images} <= {args.batch})")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.keep or tempfile.mkdtemp(prefix="mocolab-data-bench-"))
    from mocolab.data.shards import pack_folder

    if args.rss_only:
        _rss_table(work)
        return
    if args.sizes:
        src = work / "jpegs"
        if not src.is_dir():
            make_jpegs(src, args.images)
        header = _machine_line(args, os.getloadavg()[0])
        rates = view_path_table(src, work / "cache", args.sizes, args.workers, args.batch,
                                args.seconds, args.repeats)
        print_view_path_table(rates, args.workers, header, args.code_rates)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return
    t = time.perf_counter()
    src = work / "jpegs"
    if not src.is_dir():
        make_jpegs(src, args.images)
    made = time.perf_counter() - t
    size = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    t = time.perf_counter()
    if not (work / "shards" / "index.json").is_file():
        pack_folder(src, work / "shards", max_side=512, shard_size=size // (4 * args.workers),
                    progress=False)
    pack = args.images / (time.perf_counter() - t)
    load = os.getloadavg()
    rows = [("torchvision ImageFolder + official MoCo v2 transform",
             torchvision_rate(src, args.workers, args.batch, args.batches))]
    rows.append(("mocolab shards (workers decode, batched views)",
                 shards_rate(work / "shards", args.workers, args.batch, args.batches)))
    build, folder = folder_rates(src, work / "cache", args.workers, args.batch, args.batches)
    rows.append(("mocolab folder, whole-image cache (batched views)", folder))
    rows.append(("mocolab folder, whole-image cache, per-image views (`--augment-backend "
                 "torchvision`)", folder_per_image_rate(src, work / "cache", args.workers,
                                                        args.batch, args.batches)))
    extra = [f"whole-image cache build (decode once): {build:.0f} images/s",
             f"mocolab data pack: {pack:.0f} images/s",
             f"JPEGs: {args.images}, {size / args.images / 1e3:.0f} kB each, made in {made:.0f} s"]
    if torch.cuda.is_available():
        rows.append(("mocolab shards, GPU decode + GPU views",
                     shards_rate(work / "shards", args.workers, args.batch, args.batches,
                                 device="cuda", gpu_decode=True)))
        rows.append(("mocolab shards, CPU decode + GPU views",
                     shards_rate(work / "shards", args.workers, args.batch, args.batches,
                                 device="cuda")))
        share = data_wait_share(work / "shards", args.workers, args.batch, 20)
        extra.append(f"ResNet-50 MoCo v2 step waiting for data (GPU decode): {share:.0%}")
    print(f"\n{_machine_line(args, load[0])}; {args.batches} batches\n")
    print("| data path (decode + two MoCo v2 views at 224 px) | images/s |")
    print("|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} |")
    print()
    for line in extra:
        print(f"- {line}")
    if args.rss:
        _rss_table(work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
