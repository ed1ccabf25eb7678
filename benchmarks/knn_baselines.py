"""kNN baselines on a labelled dataset, with the same protocol as mocolab's evaluation
(weighted kNN of InstDisc, cosine similarity, k=200, τ=0.1, train split as the bank, test
split as queries):

- raw pixels (each image flattened, as one feature vector), and the same centred by the
  training mean;
- a randomly initialised encoder (the demo's architecture, no training);
- optionally, pretrained runs given with --run.

Usage: python benchmarks/knn_baselines.py [--data fashion-mnist] [--run RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from mocolab.backbones import default_stem, resnet
from mocolab.checkpoint import load_backbone_and_info
from mocolab.config import build_config
from mocolab.evaluate.features import extract_features
from mocolab.evaluate.knn import knn_accuracy
from mocolab.train import channel_stats, evaluation_splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--t", type=float, default=0.1)
    p.add_argument("--run", action="append", default=[], help="a pretrained run directory")
    args = p.parse_args()

    cfg = build_config(data=args.data)
    train, test = evaluation_splits(cfg)
    classes = train.num_classes
    rows = []

    t0 = time.perf_counter()
    flat_train = train.images.flatten(1).float() / 255
    acc = knn_accuracy(flat_train, train.labels, test.images.flatten(1).float() / 255,
                       test.labels, classes, k=args.k, temperature=args.t)
    rows.append(("raw pixels", acc, time.perf_counter() - t0))

    t0 = time.perf_counter()
    mean = flat_train.mean(0, keepdim=True)
    acc = knn_accuracy(flat_train - mean, train.labels, test.images.flatten(1).float() / 255 - mean,
                       test.labels, classes, k=args.k, temperature=args.t)
    rows.append(("raw pixels (centred)", acc, time.perf_counter() - t0))

    t0 = time.perf_counter()
    size = train.image_size[0]
    torch.manual_seed(0)
    net = resnet(cfg.arch, train.channels, cfg.stem or default_stem(size), width=cfg.width).eval()
    m, s = channel_stats(train.images)
    kw = dict(size=size, mean=m, std=s)
    acc = knn_accuracy(extract_features(net, train.images, **kw), train.labels,
                       extract_features(net, test.images, **kw), test.labels, classes,
                       k=args.k, temperature=args.t)
    rows.append((f"random-init {cfg.arch} width {cfg.width}", acc, time.perf_counter() - t0))

    for run in args.run:
        t0 = time.perf_counter()
        net, info = load_backbone_and_info(run)
        kw = dict(size=info["crop_size"], mean=info["mean"], std=info["std"])
        acc = knn_accuracy(extract_features(net, train.images, **kw), train.labels,
                           extract_features(net, test.images, **kw), test.labels, classes,
                           k=args.k, temperature=args.t)
        rows.append((f"{info['config']['method']} {run} (step {info['step']})", acc,
                     time.perf_counter() - t0))

    print(f"kNN (k={args.k}, τ={args.t}) on {args.data}: bank {len(train)} train images, "
          f"{len(test)} test queries; {date.today()}, {platform.machine()} "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| features | top-1 % | top-5 % | seconds |")
    print("|---|---|---|---|")
    for name, acc, secs in rows:
        print(f"| {name} | {acc['top1']:.2f} | {acc['top5']:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
