"""Command line: ``mocolab pretrain | eval knn | eval linear | export | embed``.

Every pretraining option is a field of :class:`mocolab.config.PretrainConfig`; the flags are
generated from it, so the CLI, the YAML presets and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import embed, export
from .config import ConfigError, PretrainConfig, build_config, list_presets


def _flag_type(annotation: Any) -> Any:
    """The argparse ``type`` for a dataclass annotation like ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"tuple": tuple})  # annotations are strings (future import)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    return annotation


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run options (defaults: the CPU demo; a --preset overrides)")
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        kind = _flag_type(f.type)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=f"{help_} (default: {default})")
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, dest=f.name, type=float, nargs="+", default=None,
                               help=f"{help_} (default: {' '.join(map(str, default)) if default else default})")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"{help_} (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocolab",
        description="Self-supervised visual representation learning by contrast (MoCo and family).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder without labels",
                       description="Pretrain an encoder. Defaults: MoCo v2 on Fashion-MNIST, "
                                   "about 10 minutes on a 2-core CPU.")
    p.add_argument("--preset", help=f"a preset of options: {', '.join(list_presets())}, or a YAML path")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (its own options are used)")
    p.add_argument("--print-config", action="store_true", help="print the resolved options and exit")
    p.add_argument("--no-final-eval", dest="final_eval", action="store_false",
                   help="skip the kNN evaluation at the end")
    _add_config_flags(p)

    e = sub.add_parser("eval", help="evaluate a pretrained backbone (frozen)")
    esub = e.add_subparsers(dest="protocol", required=True)
    for name, desc in (("knn", "weighted kNN of InstDisc: cosine similarity, exp(s/τ) votes"),
                       ("linear", "linear classifier on frozen features")):
        q = esub.add_parser(name, help=desc, description=desc)
        q.add_argument("run_dir", help="a run directory or checkpoint file")
        q.add_argument("--data", help="evaluate on another dataset (default: the run's)")
        q.add_argument("--data-root", help="where built-in datasets are looked for")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        q.add_argument("--batch-size", type=int, default=512, help="feature extraction batch")
        q.add_argument("--no-progress", dest="progress", action="store_false")
        if name == "knn":
            q.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
            q.add_argument("--t", type=float, default=0.1, help="vote temperature τ (default 0.1)")
        else:
            q.add_argument("--epochs", type=int, default=100, help="classifier epochs (default 100)")
            q.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
            q.add_argument("--weight-decay", type=float, default=0.0)
            q.add_argument("--no-standardize", dest="standardize", action="store_false",
                           help="use raw features (then use MoCo's lr 30)")
    export.add_parser(sub)
    embed.add_parser(sub)
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    from .train import pretrain

    overrides = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)}
    if args.resume:
        given = [k for k, v in overrides.items() if v is not None and k != "progress"]
        if given:
            print("note: --resume continues with the run's own options; ignoring "
                  + ", ".join("--" + k.replace("_", "-") for k in given), file=sys.stderr)
        pretrain(resume=args.resume, final_eval=args.final_eval)
        return 0
    cfg = build_config(args.preset, **overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    pretrain(cfg, final_eval=args.final_eval)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_backbone
    from .evaluate.features import extract_features
    from .evaluate.knn import knn_accuracy
    from .evaluate.linear import linear_probe
    from .train import evaluation_splits, select_device

    device = select_device(args.device)
    backbone, info = load_backbone(args.run_dir)
    backbone.to(device)
    cfg = dict(info["config"])
    if args.data:
        cfg["data"] = args.data
    if args.data_root:
        cfg["data_root"] = args.data_root
    splits = evaluation_splits(cfg)
    if splits is None:
        raise ConfigError(f"{cfg['data']} has no labels, so it cannot be evaluated by {args.protocol}; "
                          "pass a labelled dataset with --data (class sub-folders or a built-in)")
    train, test = splits
    if train.channels != info["in_channels"]:
        raise ConfigError(f"the backbone takes {info['in_channels']}-channel images but "
                          f"{train.name} has {train.channels}; evaluate on a matching dataset")
    kw = dict(size=info["crop_size"], mean=info["mean"], std=info["std"], device=device,
              batch_size=args.batch_size, progress=args.progress)
    bank = extract_features(backbone, train.images, desc="train features", **kw)
    query = extract_features(backbone, test.images, desc="test features", **kw)
    num_classes = len(train.classes) if train.classes else int(train.labels.max()) + 1
    if args.protocol == "knn":
        acc = knn_accuracy(bank, train.labels, query, test.labels, num_classes, k=args.k,
                           temperature=args.t)
        title = f"kNN (k={args.k}, τ={args.t})"
    else:
        torch.manual_seed(0)
        acc = linear_probe(bank, train.labels, query, test.labels, num_classes, epochs=args.epochs,
                           lr=args.lr, weight_decay=args.weight_decay, standardize=args.standardize)
        title = f"linear ({args.epochs} epochs, lr {args.lr})"
    print(f"{title} on {len(test)} test images of {test.name}: top-1 {acc['top1']:.2f}%  "
          f"top-5 {acc['top5']:.2f}%  [step {info['step']} of {args.run_dir}]")
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    out = run_dir / f"eval_{args.protocol}.json"
    out.write_text(json.dumps({**acc, "data": cfg["data"], "step": info["step"]}, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .train import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "export":
            return export.run(args)
        if args.command == "embed":
            return embed.run(args)
        return _eval(args)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as e:
        print(f"mocolab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmocolab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
