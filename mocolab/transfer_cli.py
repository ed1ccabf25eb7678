"""The command lines of ``mocolab data scenes`` (:mod:`mocolab.data.scenes`) and ``mocolab eval
detect`` (:mod:`mocolab.evaluate.detection`). Only the standard library is imported here, so
building the parser keeps ``mocolab --help`` fast; the runners import torch when called."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

NORMS = ("frozen", "bn", "syncbn")  # mocolab.evaluate.detection.NORMS
SCHEDULES = ("1x", "2x")  # mocolab.evaluate.detection.SCHEDULES


def add_scenes_parser(sub: Any) -> None:
    """``mocolab data scenes OUT ...`` (``sub``: the ``data`` command's sub-parsers)."""
    p = sub.add_parser(
        "scenes",
        help="write the Fashion-MNIST scenes detection/segmentation set",
        description="Paste Fashion-MNIST garments onto canvases: a deterministic "
        "detection / segmentation dataset as COCO JSON + PNG images + "
        "VOC-style label maps (layout: mocolab.data.scenes).",
    )
    p.add_argument("out", help="the folder to create")
    p.add_argument(
        "--from",
        dest="source",
        default="fashion-mnist",
        choices=("fashion-mnist",),
        help="where the garments come from (default fashion-mnist)",
    )
    p.add_argument("--train", type=int, default=5000, help="train scenes (default 5000)")
    p.add_argument(
        "--test",
        type=int,
        default=1000,
        help="test scenes, drawn from the test split only (default 1000)",
    )
    p.add_argument("--size", type=int, default=128, help="canvas side in px (default 128)")
    p.add_argument("--seed", type=int, default=0, help="the scenes depend only on it (default 0)")
    p.add_argument(
        "--max-objects", type=int, default=6, help="garments per scene are 1..N (default 6)"
    )
    p.add_argument("--data-root", help="where Fashion-MNIST is looked for")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(data_run=run_scenes)


def run_scenes(args: argparse.Namespace) -> int:
    """``mocolab data scenes``: write the set and print its counts."""
    from .data.scenes import SceneOptions, make_scenes

    opts = SceneOptions(size=args.size, max_objects=args.max_objects)
    meta = make_scenes(
        args.out,
        source=args.source,
        train=args.train,
        test=args.test,
        seed=args.seed,
        opts=opts,
        data_root=args.data_root,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(
        f"wrote {args.out}: "
        + ", ".join(
            f"{split} {c['images']} images / {c['instances']} garments"
            for split, c in meta["splits"].items()
        )
    )
    return 0


def add_detect_parser(sub: Any) -> None:
    """``mocolab eval detect`` (``sub``: the ``eval`` command's sub-parsers)."""
    desc = (
        "fine-tune Faster R-CNN / Mask R-CNN (torchvision) with an FPN over the run's ResNet "
        "(ViTs: ViTDet's simple pyramid) on a detection dataset, report COCO box AP (and "
        "mask AP) by pycocotools (MoCo §4.2)"
    )
    q = sub.add_parser(
        "detect", help="transfer to detection: COCO AP of a fine-tuned detector", description=desc
    )
    q.add_argument("run_dir", help="a run directory or checkpoint file")
    q.add_argument(
        "--data",
        required=True,
        help="a detection dataset folder: mocolab data scenes output, COCO "
        "(annotations/instances_*.json + image folders) or PASCAL VOC",
    )
    q.add_argument("--masks", action="store_true", help="Mask R-CNN: mask AP too")
    q.add_argument(
        "--norm",
        choices=NORMS,
        default="syncbn",
        help="syncbn (MoCo: SyncBN in backbone and FPN; one process: BN over the "
        "whole batch), bn, or frozen (standard Mask R-CNN: frozen backbone BN, "
        "no FPN norm)",
    )
    q.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="1x",
        help="1x = 12 epochs, 2x = 24, LR x0.1 after 2/3 and 8/9 (detectron2)",
    )
    q.add_argument("--epochs", type=int, help="another length with the same schedule shape")
    q.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    q.add_argument("--lr", type=float, help="default 0.02 x batch-size / 16")
    q.add_argument(
        "--init",
        choices=("run", "random"),
        default="run",
        help="start from the run's weights or from a random init (the control)",
    )
    q.add_argument("--min-size", type=int, help="resize the short side (default: native)")
    q.add_argument("--fpn-channels", type=int, help="default 4 x the backbone's width")
    q.add_argument(
        "--rois-per-image",
        type=int,
        default=512,
        help="RoIs sampled per image for the box head (detectron2: 512; fewer is faster on a CPU)",
    )
    q.add_argument(
        "--proposals",
        type=int,
        default=1000,
        help="RPN boxes kept per level before and per image after NMS (default 1000, "
        "detectron2's FPN at test time; a few hundred suit small images)",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=0, help="data loading processes")
    q.add_argument(
        "--examples",
        type=int,
        default=6,
        help="test images drawn with predictions into detect_examples.png",
    )
    q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    q.add_argument("--no-progress", dest="progress", action="store_false")
    q.set_defaults(eval_run=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    """``mocolab eval detect``: fine-tune, score, print; ``eval_detect.json`` in the run.
    The dataset's warnings are printed as one ``mocolab: warning:`` line each."""
    from .data.detection import DetectionDataWarning
    from .evaluate.detection import evaluate_detection

    def show_warning(message: Any, *rest: Any, **kw: Any) -> None:  # one line, no source line
        print(f"mocolab: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.simplefilter("always", DetectionDataWarning)
        warnings.showwarning = show_warning
        res = evaluate_detection(
            args.run_dir,
            args.data,
            masks=args.masks,
            norm=args.norm,
            schedule=args.schedule,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            init=args.init,
            min_size=args.min_size,
            fpn_channels=args.fpn_channels,
            rois_per_image=args.rois_per_image,
            proposals=args.proposals,
            device=args.device,
            seed=args.seed,
            workers=args.workers,
            examples=args.examples,
            progress=args.progress,
        )
    for kind, name in (("bbox", "box"), ("segm", "mask")):
        if kind in res:
            r = {k: "n/a" if v < 0 else f"{v:.1f}" for k, v in res[kind].items()}  # -100: none
            print(
                f"{name} AP {r['AP']}  AP50 {r['AP50']}  AP75 {r['AP75']}  (APs {r['APs']} "
                f"APm {r['APm']} APl {r['APl']}) on {res['test_images']} test images "
                f"[{res['iterations']} iterations, {args.run_dir}]"
            )
    return 0
