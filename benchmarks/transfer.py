"""Transfer beyond classification, measured: does a MoCo v2 encoder transfer to detection and
segmentation better than the same network trained with labels (MoCo §4.2, Tables 2–6)?

On the offline scenes benchmark (``mocolab data scenes``: Fashion-MNIST garments pasted on
canvases), three starts of the same ResNet are compared with the very commands a user runs:

(a) MoCo v2 — ``mocolab pretrain --preset mocov2-fashion-mnist`` (the demo's preset; fewer
    epochs when ``--epochs`` says so, to fit a CPU budget of minutes);
(b) supervised — the same network trained from scratch with the labels of the Fashion-MNIST
    train split for the same number of epochs (``mocolab eval finetune --from-scratch
    --fraction 1 --save``);
(c) random — the same network, randomly initialised (``--from-scratch --epochs 0 --save``).

Each is evaluated by the per-stage linear probe on Fashion-MNIST (``eval linear --layer all``),
semantic segmentation of the scenes (``eval segment``: FCN head, mIoU) and, when the installed
mocolab has it, detection (``eval detect``: Faster R-CNN + FPN, COCO AP by pycocotools).
Prints a Markdown table with the date, the machine and its load (for docs/transfer.md).

Usage: OMP_NUM_THREADS=1 python benchmarks/transfer.py [--out runs/transfer] [--steps 250]
[--seg-iters 300] [--pretrain-args '--no-compile --compile-views off --no-final-eval'] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def mocolab(*args: str) -> float:
    """Run ``python -m mocolab ARGS`` (stdout and stderr shown); its wall time in seconds."""
    cmd = [sys.executable, "-m", "mocolab", *args]
    print("$ mocolab " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def has_command(*args: str) -> bool:
    """Whether this mocolab knows ``mocolab ARGS --help``."""
    return subprocess.run([sys.executable, "-m", "mocolab", *args, "--help"], check=False,
                          capture_output=True).returncode == 0


def load() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/transfer", help="runs and scenes go here")
    p.add_argument("--moco", help="an existing MoCo run to use as (a) instead of pretraining")
    p.add_argument("--steps", type=int, default=250,
                   help="MoCo pretraining steps of 128 images (default 250, about half an "
                        "epoch; the demo trains 13 epochs = 6084 steps)")
    p.add_argument("--probe-fraction", type=float, default=0.1,
                   help="share of the Fashion-MNIST train split the probes train on")
    p.add_argument("--pretrain-args", default="",
                   help="more pretraining options, e.g. '--no-compile --compile-views off'")
    p.add_argument("--scene-size", type=int, default=64, help="canvas side (default 64)")
    p.add_argument("--scenes-train", type=int, default=1000)
    p.add_argument("--scenes-test", type=int, default=200)
    p.add_argument("--probe-epochs", type=int, default=10, help="linear probe epochs")
    p.add_argument("--seg-iters", type=int, default=300, help="segmentation SGD steps")
    p.add_argument("--seg-batch", type=int, default=8)
    p.add_argument("--seg-lr", type=float, default=0.02)
    p.add_argument("--head-channels", type=int, default=64, help="FCN head width")
    p.add_argument("--detect-args",
                   default="--masks --epochs 12 --rois-per-image 64 --proposals 200",
                   help="arguments of eval detect (default: Mask R-CNN, 12 epochs = 300 "
                        "iterations of 8 on 200 scenes, 64 RoIs, 200 proposals; about 2.5 "
                        "minutes a start on 2 idle cores)")
    p.add_argument("--detect-train", type=int, default=200, help="detection train scenes")
    p.add_argument("--detect-test", type=int, default=100, help="detection test scenes")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    loads = [load()]
    seconds: dict[str, float] = {}

    scenes = out / f"scenes-{args.scene_size}"
    if not scenes.exists():
        seconds["scenes"] = mocolab("data", "scenes", str(scenes), "--from", "fashion-mnist",
                                    "--train", str(args.scenes_train), "--test",
                                    str(args.scenes_test), "--size", str(args.scene_size),
                                    "--seed", "0", "--no-progress")
    runs = {"MoCo v2": Path(args.moco) if args.moco else out / "runs" / "moco",
            "supervised": out / "runs" / "supervised", "random": out / "runs" / "random"}
    if not (runs["MoCo v2"] / "checkpoint.pt").exists():
        seconds["pretrain MoCo v2"] = mocolab(
            "pretrain", "--preset", "mocov2-fashion-mnist", "--max-steps", str(args.steps),
            "--out-dir", str(out / "runs"), "--run-name", "moco", "--no-progress",
            *args.pretrain_args.split())
    moco = str(runs["MoCo v2"])
    # the supervised baseline sees as many images as MoCo did: one pass over a class-balanced
    # share of the train split (MoCo: steps x 128 images, two views each)
    fraction = min(1.0, args.steps * 128 / 60000)
    if not (runs["supervised"] / "checkpoint.pt").exists():
        seconds["train supervised"] = mocolab(
            "eval", "finetune", moco, "--from-scratch", "--fraction", f"{fraction:.4f}",
            "--epochs", "1", "--save", str(runs["supervised"]), "--no-progress")
    if not (runs["random"] / "checkpoint.pt").exists():
        mocolab("eval", "finetune", moco, "--from-scratch", "--fraction", "1", "--epochs", "0",
                "--save", str(runs["random"]), "--no-progress")
    detect = has_command("eval", "detect")
    loads.append(load())

    results: dict[str, dict] = {name: {} for name in runs}
    for name, run in runs.items():
        r = results[name]
        seconds[f"{name}: probes"] = mocolab("eval", "linear", str(run), "--layer", "all",
                                             "--epochs", str(args.probe_epochs),
                                             "--train-fraction", str(args.probe_fraction),
                                             "--no-progress")
        r["layers"] = json.loads((run / "eval_linear_layers.json").read_text())["stages"]
        seconds[f"{name}: segment"] = mocolab(
            "eval", "segment", str(run), "--data", str(scenes), "--iters", str(args.seg_iters),
            "--train-batch", str(args.seg_batch), "--lr", str(args.seg_lr), "--head-channels",
            str(args.head_channels), "--no-progress")
        r["segment"] = json.loads((run / "eval_segment.json").read_text())
        loads.append(load())
    if detect:  # last: the most expensive, on a smaller set of scenes
        det_scenes = out / f"scenes-{args.scene_size}-detect"
        if not det_scenes.exists():
            mocolab("data", "scenes", str(det_scenes), "--from", "fashion-mnist", "--train",
                    str(args.detect_train), "--test", str(args.detect_test), "--size",
                    str(args.scene_size), "--seed", "1", "--no-progress")
        for name, run in runs.items():
            seconds[f"{name}: detect"] = mocolab("eval", "detect", str(run), "--data",
                                                 str(det_scenes), "--no-progress",
                                                 *args.detect_args.split())
            results[name]["detect"] = json.loads((run / "eval_detect.json").read_text())
            loads.append(load())

    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}; load averages "
          f"(1/5/15 min) along the run: {' → '.join(loads)}")
    print(f"scenes: {scenes} ({args.scenes_train} train / {args.scenes_test} test, "
          f"{args.scene_size} px); MoCo v2 {args.steps} steps of 128, supervised one pass over "
          f"{fraction:.1%} of the train split; "
          f"segmentation {args.seg_iters} steps of {args.seg_batch}, lr {args.seg_lr}, FCN head "
          f"{args.head_channels} channels; probes {args.probe_epochs} epochs on "
          f"{args.probe_fraction:.0%} of the train split"
          + (f"; detection on {args.detect_train} / {args.detect_test} other scenes (seed 1), "
             f"eval detect {args.detect_args}" if detect else "") + "\n")
    head = "| start | seg. mIoU % | pixel acc. % |"
    rule = "|---|---|---|"
    if detect:
        head += " box AP | AP50 | AP75 | mask AP |"
        rule += "---|---|---|---|"
    print(head)
    print(rule)
    for name, r in results.items():
        s = r["segment"]
        row = f"| {name} | {s['miou']:.2f} | {s['pixel_acc']:.2f} |"
        if detect:
            box, mask = r["detect"]["bbox"], r["detect"].get("segm", {})
            row += (f" {box['AP']:.1f} | {box['AP50']:.1f} | {box['AP75']:.1f} | "
                    f"{mask.get('AP', float('nan')):.1f} |")
        print(row)
    print("\n| start | " + " | ".join(results["MoCo v2"]["layers"]) + " |")
    print("|---|" + "---|" * len(results["MoCo v2"]["layers"]))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{v['top1']:.2f}" for v in r["layers"].values())
              + " |")
    dims = results["MoCo v2"]["layers"]
    print("\nfeatures per stage: " + ", ".join(f"{k} {v['dims']} ({v['grid']} grid)"
                                               for k, v in dims.items()))
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    (out / "transfer.json").write_text(json.dumps(
        {"started": started.isoformat(), "loads": loads, "seconds": seconds,
         "args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
