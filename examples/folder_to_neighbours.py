"""Your own folder of images → an encoder → an embedding per image → each image's nearest
neighbours.

    python examples/folder_to_neighbours.py --data ~/photos                  # pretrain, then embed
    python examples/folder_to_neighbours.py --data ~/photos --run runs/mine  # reuse a run
    python examples/folder_to_neighbours.py --tiny                           # generated images, seconds

The folder may hold class sub-folders or not (labels are not used here). Pretraining uses
mocolab's defaults for a folder (MoCo v2, 64 px, a narrow ResNet-18 on a CPU): about 4 minutes
for 10,000 photos on 2 CPU cores. The embeddings go to ``OUT/embeddings.npy`` with their paths in
``OUT/embeddings.paths.txt``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

import mocolab
from mocolab.embed import read_paths
from mocolab.evaluate import nearest_neighbours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="your folder of images")
    p.add_argument("--run", help="a run directory to use instead of pretraining")
    p.add_argument("--out", default="neighbours", help="folder for the run and the embeddings")
    p.add_argument("--k", type=int, default=3, help="neighbours shown per image")
    p.add_argument("--show", type=int, default=5, help="images whose neighbours are printed")
    p.add_argument("--tiny", action="store_true", help="generated images, two steps")
    args = p.parse_args()

    out = Path(args.out)
    options: dict = {}
    if args.tiny or os.environ.get("MOCOLAB_EXAMPLES_TINY") == "1":
        from _tiny import TINY_RUN, make_folder  # beside this file: seconds instead of minutes

        args.data = str(make_folder(out / "images"))
        options = {**TINY_RUN, "image_size": 32}
    if args.data is None:
        p.error("--data FOLDER is needed (or --tiny)")

    # 1. An encoder: pretrain on the folder, or take a run you have.
    run_dir = args.run
    if run_dir is None:
        options.update(data=args.data, out_dir=str(out), run_name="run")
        run_dir = mocolab.pretrain(mocolab.build_config(**options))["run_dir"]

    # 2. One embedding per image (resumable: rerun after a stop and it continues).
    result = mocolab.embed_folder(run_dir, args.data, out / "embeddings.npy", num_workers=0)
    embeddings = torch.from_numpy(np.load(result.out))  # N×D
    paths = read_paths(result.index)  # the same order, relative to the folder
    print(f"{result.num_images} images embedded in {result.dim} dimensions: {result.out}")

    # 3. Nearest neighbours by cosine similarity; each image's first neighbour is itself.
    similarities, indices = nearest_neighbours(embeddings, embeddings, k=args.k + 1)
    for i in range(min(args.show, len(paths))):
        found = ", ".join(
            f"{paths[j]} ({s:.3f})"
            for s, j in zip(similarities[i, 1:].tolist(), indices[i, 1:].tolist())
        )
        print(f"{paths[i]} → {found}")


if __name__ == "__main__":
    main()
