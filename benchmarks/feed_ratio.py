"""Does the model wait for its views? Step time of MoCo v2 pretraining with real views (made
every step by the batched view generator on the training device) against the same run with
pre-made views (the first step's views reused, so no augmentation at all).

    ratio = (images/s with real views) / (images/s with pre-made views)

1.0 means the views cost nothing; the target on a GPU is at least 0.95. The runs go through
``mocolab.train.pretrain`` unchanged (data path, prefetch, AMP, logging), except that for the
pre-made one ``train._slice_views`` returns the views it made at the first step. One
pre-made run is compared with a real-views run for each ``--compile-views`` mode (eager
``off``, one compiled program ``on``, also a CUDA graph ``graphs``). With
``--host-resident`` the training images stay in host memory even when they would fit on the
GPU, so each batch goes through the pinned-memory prefetch thread and a non-blocking copy (the
path of image folders too large for the GPU).

Images are random uint8 (``--random SIZE``, with SIZE the source side; views are ``--crop``
px) or a mocolab dataset (``--data``). On CUDA the script also samples GPU utilisation with
NVML when ``pynvml`` is importable.

Usage:
    python benchmarks/feed_ratio.py --device cuda --random 256 --crop 224 --arch resnet50 --width 64 --batch-size 128
    python benchmarks/feed_ratio.py --device cuda --data fashion-mnist --width 64 --batch-size 256 \
        --compile-views off on graphs
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
import traceback
import warnings
from datetime import date
from pathlib import Path
from unittest import mock

import torch

from mocolab import train
from mocolab.config import PretrainConfig
from mocolab.data import ImageDataset


class _Utilisation:
    """Mean GPU utilisation (NVML, percent of time a kernel ran) sampled every 50 ms."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except Exception:  # no NVML: utilisation is simply not reported
            self._read = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.perf_counter(), self._read()))

    def __enter__(self) -> _Utilisation:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def mean_after(self, t0: float) -> float | None:
        values = [u for t, u in self.samples if t >= t0]
        return sum(values) / len(values) if values else None


def run(cfg: PretrainConfig, *, premade: bool, dataset: ImageDataset | None, host_resident: bool,
        warmup: int, sync_report: dict[str, int] | None = None) -> tuple[float, float | None, float]:
    """``(images/s after the warm-up steps, mean GPU utilisation %, peak GPU memory GiB)``;
    with ``sync_report`` (CUDA), count there the host-GPU synchronisations after the warm-up
    by source line."""
    patches = []
    if dataset is not None:
        patches.append(mock.patch.object(train, "load_dataset", lambda *a, **k: dataset))
    if host_resident:
        patches.append(mock.patch.object(train, "GPU_RESIDENT_BYTES", 0))
    real, cache = train._slice_views, []

    def premade_views(*args, **kwargs):
        if not cache:
            cache.append([v.detach().clone() for v in real(*args, **kwargs)])
        return cache[0]

    first_timed: list[float] = []
    steps = [0]

    def counted_views(*args, **kwargs):  # called once per step: marks the end of the warm-up
        steps[0] += 1
        if steps[0] == warmup + 1:
            first_timed.append(time.perf_counter())
            if sync_report is not None:
                torch.cuda.set_sync_debug_mode("warn")
        return (premade_views if premade else real)(*args, **kwargs)

    patches.append(mock.patch.object(train, "_slice_views", counted_views))
    stacks: dict[str, str] = {}

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if sync_report is None or "synchroniz" not in str(message):
            return
        where = f"{Path(filename).name}:{lineno}"
        sync_report[where] = sync_report.get(where, 0) + 1
        if where not in stacks:  # the mocolab frames that led there, innermost last
            frames = [f for f in traceback.extract_stack()[:-1] if "mocolab" in f.filename]
            stacks[where] = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))

    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for p in patches:
        p.start()
    try:
        with _Utilisation() if cuda else _NoUtilisation() as util, warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            train.pretrain(cfg, final_eval=False)  # no on_step: it would log (and sync) every step
    finally:
        for p in patches:
            p.stop()
        if sync_report is not None:
            torch.cuda.set_sync_debug_mode("default")
    if sync_report is not None:
        sync_report.update({f"{k}  [{v}]": sync_report.pop(k) for k, v in stacks.items()})
    rows = [json.loads(line) for line in
            (Path(cfg.out_dir) / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > warmup]
    rate = len(rates) / sum(1.0 / r for r in rates)
    utilisation = util.mean_after(first_timed[0]) if first_timed else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return rate, utilisation, peak


class _NoUtilisation:
    def __enter__(self) -> _NoUtilisation:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def mean_after(self, t0: float) -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--random", type=int, default=None, metavar="SIZE",
                   help="random uint8 source images of this side instead of --data")
    p.add_argument("--channels", type=int, default=3, help="channels of the --random images")
    p.add_argument("--crop", type=int, default=None, help="view side (default: the source side)")
    p.add_argument("--host-resident", action="store_true",
                   help="keep the images in host memory (pinned prefetch + copy per batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps not timed (start-up, autotuning)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-views", nargs="+", default=["off"], choices=["off", "on", "graphs"],
                   help="view modes to measure with real views (eager, one compiled program, also a "
                        "CUDA graph), each against the same pre-made-views run")
    p.add_argument("--sync-report", action="store_true",
                   help="CUDA: list the host-GPU synchronisations of the real-views run after the "
                        "warm-up, with the mocolab lines that led there (logging every 10 steps "
                        "synchronises by design)")
    args = p.parse_args()

    dataset = None
    if args.random:
        n = args.batch_size * (args.steps + 1)  # one epoch: no epoch-end work inside the timing
        dataset = ImageDataset(torch.randint(0, 256, (n, args.channels, args.random, args.random),
                                             dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                               name=f"random-{args.random}px")
    results = {}
    syncs: dict[str, int] | None = {} if args.sync_report and args.device.startswith("cuda") else None
    sync_reports: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["premade"] + args.compile_views:
            premade = name == "premade"
            cfg = PretrainConfig(
                data=args.data, data_root=args.data_root, crop_size=args.crop, method="mocov2",
                arch=args.arch, width=args.width, batch_size=args.batch_size, max_steps=args.steps,
                device=args.device, compile=args.compile, compile_views="off" if premade else name,
                log_every=10, progress=False, knn_every=0, diagnostics_every=0, out_dir=tmp, run_name=name)
            if syncs is not None and not premade:
                syncs = {}
                sync_reports[name] = syncs
            results[name] = run(cfg, premade=premade, dataset=dataset,
                                host_resident=args.host_resident, warmup=args.warmup,
                                sync_report=None if premade else syncs)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    source = f"random {args.random} px" if args.random else args.data
    print(f"{date.today()} · {machine} · torch {torch.__version__} · MoCo v2 {args.arch} width "
          f"{args.width}, batch {args.batch_size}, {source}"
          f"{f' → {args.crop} px views' if args.crop else ''}, images "
          f"{'in host memory (pinned prefetch)' if args.host_resident else 'where mocolab puts them'}, "
          f"steps {args.warmup + 1}–{args.steps}")
    pre, u_pre, _ = results["premade"]
    util = lambda u: "n/a" if u is None else f"{u:.0f} %"
    label = {"off": "eager", "on": "one compiled program", "graphs": "compiled + CUDA graph"}
    print("| views | images/s | GPU utilisation | ratio | peak GPU memory |")
    print("|---|---|---|---|---|")
    print(f"| pre-made (no augmentation) | {pre:.0f} | {util(u_pre)} | 1.00 | |")
    for name in args.compile_views:
        real, u_real, mem = results[name]
        print(f"| real, batched on the device, {label[name]} | {real:.0f} | {util(u_real)} | {real / pre:.3f} | "
              f"{f'{mem:.1f} GiB' if mem else ''} |")
    for name, syncs in sync_reports.items():
        steps = args.steps - args.warmup
        print(f"host-GPU synchronisations in steps {args.warmup + 1}–{args.steps} (real views, "
              f"{label[name]}): {sum(syncs.values())} ({sum(syncs.values()) / steps:.1f} per step)")
        for where, count in sorted(syncs.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {count:5d}  {where}")


if __name__ == "__main__":
    main()
