"""A user's first run on their own photos, timed end to end: build a folder of ~10,000 real
photos of varied sizes (Fashion-MNIST garments, tinted, resized and saved as JPEG or PNG in one
subfolder per class, no train/test split), then run ``mocolab pretrain --data FOLDER`` with its
defaults, and ``mocolab report`` on the run, and print the wall-clock times.

Usage:
    python benchmarks/own_folder.py                    # 10,000 photos in /tmp/mocolab-photos
    python benchmarks/own_folder.py --images 1200 --folder /tmp/photos --build-only
    python benchmarks/own_folder.py --images 3000 --folder /tmp/colours --build-only --class-colours
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

SIZES = (40, 56, 72, 96, 128, 160)  # shorter sides; the longer is 1-1.5× that


def class_colour(label: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (0-255) typical of class ``label``, as objects have in photos: a hue of its
    own (label/10 of the circle, spread by σ 0.03), saturation 0.5-1, value 0.6-1."""
    import colorsys

    hue = (label / 10 + rng.normal(0, 0.03)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.6, 1))) * 255


def build_folder(folder: Path, images: int, seed: int = 0, class_colours: bool = False) -> None:
    """``images`` Fashion-MNIST train garments as RGB photos in ``folder/<class>/``: each one
    tinted by a random colour on a random background, resized to a random size and aspect,
    saved as JPEG (quality 85-95) or PNG. ``class_colours``: each garment in a colour typical
    of its class (:func:`class_colour`) on a gray background, so that colour can be predicted
    from shape (the colorization benchmark; with random tints it cannot)."""
    from PIL import Image

    from mocolab.data import load_dataset

    ds = load_dataset("fashion-mnist", "train")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(ds))[:images]
    for n, i in enumerate(pick):
        gray = ds.images[i, 0].numpy().astype(np.float32) / 255  # 28×28, garment bright
        if class_colours:
            fg, bg = class_colour(int(ds.labels[i]), rng), np.full(3, rng.uniform(0, 255))
        else:
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = (gray[..., None] * fg + (1 - gray[..., None]) * bg).clip(0, 255).astype(np.uint8)
        short = int(rng.choice(SIZES))
        long = int(short * rng.uniform(1.0, 1.5))
        size = (long, short) if rng.random() < 0.5 else (short, long)
        im = Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC)
        cls = folder / ds.classes[int(ds.labels[i])].replace("/", "-").replace(" ", "_")
        cls.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.7:
            im.save(cls / f"photo_{n:05d}.jpg", quality=int(rng.integers(85, 96)))
        else:
            im.save(cls / f"photo_{n:05d}.png")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd`` (its output shown), return its wall-clock seconds; raise if it fails."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default="/tmp/mocolab-photos")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--out-dir", default="/tmp/mocolab-photos-runs")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--class-colours", action="store_true",
                   help="garments in colours typical of their class (for colorization)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more pretrain flags (after everything else)")
    args = p.parse_args()
    folder = Path(args.folder)
    if not folder.exists():
        t = time.perf_counter()
        build_folder(folder, args.images, class_colours=args.class_colours)
        print(f"built {args.images} photos in {folder} in {time.perf_counter() - t:.0f} s")
    if args.build_only:
        return
    env = dict(os.environ)
    load = os.getloadavg()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = Path(args.out_dir) / "own"
    mocolab = [sys.executable, "-m", "mocolab"]
    t_pre = timed(mocolab + ["pretrain", "--data", str(folder), "--out-dir", args.out_dir,
                             "--run-name", run.name, "--no-progress", *args.extra], env)
    t_rep = timed(mocolab + ["report", str(run), "--no-progress"], env)
    print(f"\n{when}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"pretrain (defaults, incl. decoding and the final kNN): {t_pre / 60:.1f} min; "
          f"report: {t_rep:.0f} s")


if __name__ == "__main__":
    main()
