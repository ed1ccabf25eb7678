"""The command line of ``mocolab data``: ``pack`` (:mod:`mocolab.data.shards`). Only the
standard library is imported here, so building the parser keeps ``mocolab --help`` fast; the
runners import torch when called."""

from __future__ import annotations

import argparse
from typing import Any


def add_data_parser(sub: Any) -> Any:
    """The ``data`` command (``sub``: the top-level sub-parsers); returns its sub-parsers, to
    which each ``mocolab data`` command adds itself."""
    d = sub.add_parser(
        "data",
        help="prepare datasets (pack a folder into shards, make scenes)",
        description="prepare datasets",
    )
    return d.add_subparsers(dest="data_command", required=True)


def add_pack_parser(dsub: Any) -> None:
    """``mocolab data pack FOLDER OUT [--max-side 512] [--shard-size 1GB]``."""
    p = dsub.add_parser(
        "pack",
        help="write a folder of images as WebDataset tar shards",
        description="Pack the images of FOLDER (its train split) into WebDataset tar shards in "
        "OUT with an index.json; train from them with `mocolab pretrain --data OUT` "
        "(or the URL of OUT/index.json). Each process reads its own shards.",
    )
    p.add_argument("folder", help="folder of images (class subfolders give labels)")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar and index.json")
    p.add_argument(
        "--max-side", type=int, default=512, help="cap of the longer side, pixels (default 512)"
    )
    p.add_argument(
        "--shard-size",
        default="1GB",
        help="bytes per shard, e.g. 1GB, 256MB (default 1GB; each decoding worker "
        "holds one shard in memory)",
    )
    p.add_argument(
        "--format",
        dest="image_format",
        choices=("jpeg", "webp"),
        default="jpeg",
        help="encoding of resized images (default jpeg: decodable on the GPU)",
    )
    p.add_argument("--quality", type=int, default=90, help="encoder quality, 1-100 (default 90)")
    p.add_argument("--split", default="train", help="the folder's split to pack (default train)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards already packed into OUT (they are removed first)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(data_run=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    """``mocolab data pack``: returns the exit status."""
    from .data.shards import pack_folder

    index = pack_folder(
        args.folder,
        args.out,
        split=args.split,
        max_side=args.max_side,
        shard_size=args.shard_size,
        image_format=args.image_format,
        quality=args.quality,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    print(f"packed {index.total} images into {len(index.urls)} shards: {index.location}")
    return 0
