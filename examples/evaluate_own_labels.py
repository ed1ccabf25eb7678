"""Evaluate an encoder on labels of your own: a CSV of image paths and labels → kNN and linear
accuracy.

    python examples/evaluate_own_labels.py --run runs/mine --labels labels.csv --root ~/photos
    python examples/evaluate_own_labels.py --tiny         # a generated folder, its CSV and a run

The CSV has a header ``path,label``: paths relative to ``--root``, labels any strings. A
class-balanced fifth of the images is held out as the test set; the rest is the kNN bank and
the linear classifier's training set (the protocols of ``mocolab eval knn`` and ``eval
linear``, on your split).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import mocolab
from mocolab.evaluate import balanced_subset, knn_accuracy, linear_probe


def read_labels(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [row["path"] for row in rows], [row["label"] for row in rows]


@torch.no_grad()
def features(
    encoder: mocolab.Encoder, root: Path, paths: list[str], batch: int = 64
) -> torch.Tensor:
    """The encoder's features of the images, each centre-cropped and resized to its input side."""
    side, out = encoder.size, []
    for start in range(0, len(paths), batch):
        images = [
            ImageOps.fit(Image.open(root / name).convert("RGB"), (side, side))
            for name in paths[start : start + batch]
        ]
        x = torch.from_numpy(np.stack([np.array(im) for im in images])).permute(0, 3, 1, 2)
        out.append(encoder(x))  # uint8 N×3×S×S in, N×D out
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run directory, checkpoint or .safetensors export")
    p.add_argument("--labels", help="CSV with columns path,label")
    p.add_argument("--root", default=".", help="the folder the CSV's paths are relative to")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--tiny", action="store_true", help="a generated folder, CSV and run")
    args = p.parse_args()

    if args.tiny or os.environ.get("MOCOLAB_EXAMPLES_TINY") == "1":
        from _tiny import TINY_RUN, make_folder  # beside this file: seconds instead of minutes

        work = Path("own-labels")  # the generated folder, its CSV and the run
        root = make_folder(work / "images")
        args.root, args.labels = str(root), str(work / "labels.csv")
        with open(args.labels, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(
                [str(q.relative_to(root)), q.parent.name] for q in sorted(root.rglob("*.png"))
            )
        cfg = mocolab.build_config(**TINY_RUN, out_dir=str(work / "runs"), run_name="run")
        args.run = mocolab.pretrain(cfg)["run_dir"]
    if args.run is None or args.labels is None:
        p.error("--run and --labels are needed (or --tiny)")

    paths, names = read_labels(Path(args.labels))
    classes = sorted(set(names))
    labels = torch.tensor([classes.index(n) for n in names])
    encoder = mocolab.load_encoder(args.run)
    x = features(encoder, Path(args.root), paths)

    train = torch.zeros(len(labels), dtype=torch.bool)
    train[balanced_subset(labels, 0.8, seed=0)] = True  # a class-balanced 80 % to train on
    test = ~train
    k = min(args.k, int(train.sum()))
    knn = knn_accuracy(x[train], labels[train], x[test], labels[test], len(classes), k=k)
    linear = linear_probe(x[train], labels[train], x[test], labels[test], len(classes))
    print(f"{len(paths)} images, {len(classes)} classes, {int(test.sum())} held out")
    print(f"kNN (k={k}) top-1 {knn['top1']:.2f} %   linear top-1 {linear['top1']:.2f} %")


if __name__ == "__main__":
    main()
