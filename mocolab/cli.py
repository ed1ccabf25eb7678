"""Command line: ``mocolab pretrain | eval knn|linear|finetune|retrieval|diagnostics|segment |
report | export | embed | data | completion``.

Every pretraining option is a field of :class:`mocolab.config.PretrainConfig` (the run-level
options) or of a method's options dataclass (:mod:`mocolab.methods.registry`); the flags are
generated from them, so the CLI, the YAML presets and the Python API cannot drift apart.
``mocolab pretrain --method NAME --help`` shows the run-level options and NAME's own, read
from the sources (:mod:`mocolab.catalog`) without importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import __version__, catalog, embed, export
from .catalog import MethodInfo, OptionInfo, options_of
from .config import (
    ConfigError,
    PretrainConfig,
    build_config,
    field_names,
    list_presets,
    load_preset,
)
from .data_cli import add_data_parser, add_pack_parser
from .errors import MocolabError, OutputError, unknown_name
from .results import PretrainResult, Result
from .safeio import (
    EXIT_HANGUP,
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    is_write_error,
    save_json_or_warn,
    write_error,
)
from .transfer_cli import add_detect_parser, add_scenes_parser
from .visualize import report

_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}
_LIST_TYPES: dict[str, Any] = {"floats": float, "ints": int, "strs": str}
_STATES_DEFAULT = re.compile(r"(?:^|[(;,]\s*)default\b")


def _help_text(option: OptionInfo) -> str:
    """The option's help with its default stated once: appended unless the text already
    states it ("(default: the method's ...)"), and never for ``None`` (not set)."""
    text = option.help
    if option.default is not None and not _STATES_DEFAULT.search(text):
        shown = option.default
        if isinstance(shown, (tuple, list)):
            shown = " ".join(map(str, shown))
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")  # argparse formats help texts with %


def _add_flags(group: Any, options: Iterable[OptionInfo], *, hidden: bool = False) -> list[str]:
    """One flag per option (``default=None``: not given); ``hidden`` flags parse but stay out
    of ``--help``. Returns the options' names."""
    names = []
    for o in options:
        names.append(o.name)
        flag = "--" + o.name.replace("_", "-")
        help_ = argparse.SUPPRESS if hidden else _help_text(o)
        if o.kind == "bool":
            group.add_argument(
                flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif o.kind in _LIST_TYPES:
            group.add_argument(
                flag,
                dest=o.name,
                type=_LIST_TYPES[o.kind],
                nargs="+",
                default=None,
                metavar=o.kind[:-1].upper(),
                help=help_,
            )
        else:
            group.add_argument(
                flag,
                dest=o.name,
                type=_TYPES.get(o.kind, str),
                default=None,
                choices=o.choices,
                metavar=None if o.choices else "NAME" if o.name == "method" else o.kind.upper(),
                help=help_,
            )
    return names


def _method_group_title(info: MethodInfo) -> str:
    where = f", from the plug-in {info.origin}" if info.origin else ""
    return f"{info.name} options ({info.summary or info.name}{where}; a --preset overrides)"


def _method_group_description(info: MethodInfo) -> str | None:
    if not info.defaults:
        return None
    sets = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in info.defaults.items())
    return f"{info.name} sets {sets} unless given".replace("%", "%%")


def _add_config_flags(
    parser: argparse.ArgumentParser, method: str | None, methods: dict[str, MethodInfo]
) -> None:
    """The run-level flags, and the methods' own: ``method``'s shown in ``--help`` (every
    method's when ``None``: the reference and the shell completion), every other method's
    parsed (so that a flag of another method gets a clear error naming it, not argparse's
    "unrecognized arguments") but hidden."""
    group = parser.add_argument_group("run options (defaults: the CPU demo; a --preset overrides)")
    _add_flags(group, options_of(PretrainConfig))
    seen = set(field_names())
    infos = sorted(methods.values(), key=lambda m: (m.name != method, m.name))  # shown first
    for info in infos:
        shown = method is None or info.name == method
        todo = [o for o in info.options if o.name not in seen]
        seen.update(o.name for o in todo)
        if shown:
            own = parser.add_argument_group(
                _method_group_title(info), _method_group_description(info)
            )
            _add_flags(own, todo)
        elif todo:
            _add_flags(parser, todo, hidden=True)


def _pretrain_method(argv: Sequence[str]) -> str:
    """The method a ``pretrain`` command line will run, to show its options: ``--method``, else
    the preset's, else the default."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(list(argv)[1:])
    if known.method:
        return str(known.method)
    if known.preset:
        try:
            return str(load_preset(known.preset).get("method", PretrainConfig.method))
        except ConfigError:
            pass  # the real parse reports it
    return PretrainConfig.method


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _methods_epilog(methods: dict[str, MethodInfo]) -> str:
    width = max(map(len, methods), default=0)
    lines = [
        f"  {name:{width}s}  {info.summary}" + (f" [plug-in {info.origin}]" if info.origin else "")
        for name, info in sorted(methods.items())
    ]
    return (
        "methods (mocolab pretrain --method NAME --help shows one's own options):\n"
        + "\n".join(lines)
        + "\n\nshell completion of these flags: mocolab completion --help"
    ).replace("%", "%%")


def _add_pretrain_parser(sub: Any, argv: Sequence[str] | None) -> argparse.ArgumentParser:
    """``mocolab pretrain``: for a ``pretrain`` command line ``argv``, with the options of the
    method it runs shown in ``--help``; for ``argv=None`` with every method's (the reference,
    the shell completion); for another command without the options (they are not needed).

    ``--help`` reads the methods from their sources (:mod:`mocolab.catalog`): it answers
    without importing torch."""
    pretrain = argv is None or (len(argv) > 0 and argv[0] == "pretrain")
    description = (
        "Pretrain an encoder. Defaults: MoCo v2 on Fashion-MNIST, about 10 minutes on a 2-core CPU."
    )
    methods: dict[str, MethodInfo] = {}
    method: str | None = None
    if pretrain:
        methods = catalog.methods(fast=argv is None or _wants_help(argv))
        if argv is not None:
            method = _pretrain_method(argv)
            if method not in methods:
                raise ConfigError(unknown_name("--method", method, sorted(methods)))
        description += (
            " Each method has its own options: mocolab pretrain --method NAME --help shows them"
            + (f" (below: {method}'s, the method this command line runs)." if method else ".")
        )
    p = sub.add_parser(
        "pretrain",
        help="pretrain an encoder without labels",
        description="\n".join(textwrap.wrap(description, 90)),
        epilog=_methods_epilog(methods) if pretrain else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--method NAME] [--preset NAME] [--resume RUN_DIR] [OPTIONS]",
    )
    p.add_argument(
        "--preset", help=f"a preset of options: {', '.join(list_presets())}, or a YAML path"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint with its own options (only "
        "--no-progress, --threads, --num-workers and --no-final-eval may be given with it; "
        "--data names its data again if it moved: the same images)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved options and exit"
    )
    p.add_argument(
        "--no-final-eval",
        dest="final_eval",
        action="store_false",
        help="skip the kNN evaluation at the end",
    )
    if pretrain:
        _add_config_flags(p, method, methods)
    return p


def _add_completion_parser(sub: Any) -> None:
    desc = (
        "Print a shell completion script for mocolab's commands and flags: every method's\n"
        "options, and the values of the options that have a fixed set. Install it once:\n\n"
        "  bash:  mocolab completion bash > ~/.local/share/bash-completion/completions/mocolab\n"
        '  zsh:   mocolab completion zsh > "${fpath[1]}/_mocolab"   (then: compinit)\n'
        "  tcsh:  mocolab completion tcsh > ~/.mocolab.csh   (and: source ~/.mocolab.csh)\n\n"
        "Generate it again after installing a plug-in or upgrading mocolab. It needs the\n"
        "shtab package (pip install shtab)."
    )
    q = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, tcsh)",
        description=desc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell of the script")


def _completion(args: argparse.Namespace) -> int:
    """``mocolab completion SHELL``: the script shtab writes from the full parser."""
    try:
        import shtab
    except ImportError:
        raise ConfigError("mocolab completion needs the shtab package: pip install shtab") from None
    parser = build_parser()
    paths = {"run_dir", "resume", "out_dir", "out", "data", "data_root", "init", "save", "preset"}
    for action in _all_actions(parser):
        if action.dest in paths and not action.choices:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_actions(sub)
    return found


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``mocolab``; for a ``pretrain`` command line ``argv``, with the options of
    the method it runs shown in ``--help``; without ``argv``, with every method's options (the
    reference of every flag, and what the shell completion completes).

    Raises:
        ConfigError: ``argv`` runs a method that is not known.
    """
    parser = argparse.ArgumentParser(
        prog="mocolab",
        description="Self-supervised visual representation learning by contrast (MoCo and family).",
        epilog="Shell completion: mocolab completion --help.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain_parser(sub, argv)

    e = sub.add_parser("eval", help="evaluate a pretrained backbone")
    esub = e.add_subparsers(dest="protocol", required=True)
    for name, desc in (
        ("knn", "weighted kNN of InstDisc: cosine similarity, exp(s/τ) votes"),
        ("linear", "linear classifier on frozen features"),
        ("finetune", "fine-tune on a class-balanced fraction of the labels (SimCLR)"),
        ("retrieval", "nearest-neighbour retrieval of the test split in the train split"),
        ("diagnostics", "alignment, uniformity, effective rank, collapse, queue"),
    ):
        q = esub.add_parser(name, help=desc, description=desc)
        q.add_argument("run_dir", help="a run directory or checkpoint file")
        q.add_argument("--data", help="evaluate on another dataset (default: the run's)")
        q.add_argument("--data-root", help="where built-in datasets are looked for")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        q.add_argument("--batch-size", type=int, default=512, help="feature extraction batch")
        q.add_argument("--no-progress", dest="progress", action="store_false")
        if name in ("knn", "retrieval"):
            q.add_argument(
                "--faiss",
                action="store_true",
                help="search neighbours with FAISS (pip install faiss-cpu)",
            )
        if name == "knn":
            q.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
            q.add_argument("--t", type=float, default=0.1, help="vote temperature τ (default 0.1)")
        elif name == "linear":
            q.add_argument(
                "--recipe",
                choices=("default", "moco"),
                default="default",
                help="default: standardised features, lr 0.1, cosine; moco: MoCo's "
                "lr 30, step decay at 60%% and 80%%, raw features",
            )
            q.add_argument("--epochs", type=int, help="classifier epochs (default 100)")
            q.add_argument("--lr", type=float, help="SGD learning rate (default: the recipe's)")
            q.add_argument("--weight-decay", type=float)
            q.add_argument(
                "--no-standardize",
                dest="standardize",
                action="store_false",
                default=None,
                help="use raw features (then use MoCo's lr 30)",
            )
            q.add_argument(
                "--augment-copies",
                type=int,
                default=0,
                help="train on N precomputed random-crop + flip views per image "
                "(the papers' train-time augmentation; default 0: plain views)",
            )
            q.add_argument(
                "--layer",
                choices=("layer1", "layer2", "layer3", "layer4", "all"),
                help="probe the pooled output of a ResNet stage (all: one per stage, "
                "Goyal et al. 2019) instead of the backbone's pooled features",
            )
            q.add_argument(
                "--train-fraction",
                type=float,
                default=1.0,
                help="with --layer: train the probes on a class-balanced share of the "
                "train split (default 1: all of it; less for CPU budgets)",
            )
            q.add_argument(
                "--pool-dims",
                type=int,
                default=4096,
                help="with --layer: average-pool each stage to at most this many "
                "features (default 4096; Goyal et al. use ~9k)",
            )
        elif name == "finetune":
            q.add_argument(
                "--fraction",
                type=float,
                default=0.01,
                help="share of the labels used, class-balanced (default 0.01)",
            )
            q.add_argument("--seed", type=int, default=0, help="draws the labelled subset")
            q.add_argument("--epochs", type=int, default=30, help="default 30")
            q.add_argument(
                "--recipe",
                choices=("simclr", "mae"),
                default="simclr",
                help="simclr: Nesterov SGD, lr 0.05, cosine (SimCLR); mae: MAE's ViT recipe, "
                "AdamW lr 5e-4, layer-wise LR decay 0.65, weight decay 0.05, 5 warmup "
                "epochs, label smoothing 0.1 (for ViTs)",
            )
            q.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
            q.add_argument(
                "--layer-decay",
                type=float,
                help="with --recipe mae: each ViT block's LR is this times the next "
                "one's (default 0.65, MAE's ViT-B; 1: none)",
            )
            q.add_argument(
                "--head-only",
                action="store_true",
                help="freeze the backbone, train only a linear head",
            )
            q.add_argument(
                "--freeze-stages",
                type=int,
                default=-1,
                help="freeze the stem and the first N ResNet stages (0: the stem "
                "only; default -1: none); frozen BN keeps its statistics",
            )
            q.add_argument(
                "--from-scratch",
                action="store_true",
                help="re-initialise the backbone first: with --fraction 1 the "
                "supervised baseline, with --epochs 0 a random network",
            )
            q.add_argument(
                "--save",
                metavar="OUT_DIR",
                help="write the fine-tuned backbone as a run directory that every "
                "eval command loads",
            )
        elif name == "retrieval":
            q.add_argument(
                "--k",
                type=int,
                nargs="+",
                default=[1, 5, 10],
                help="list lengths K (default 1 5 10)",
            )
        else:
            q.add_argument(
                "--max-images", type=int, default=2048, help="test images measured (default 2048)"
            )
    _add_segment_parser(esub)
    add_detect_parser(esub)
    report.add_parser(sub)
    export.add_parser(sub)
    embed.add_parser(sub)
    dsub = add_data_parser(sub)  # mocolab data pack | scenes
    add_pack_parser(dsub)
    add_scenes_parser(dsub)
    _add_completion_parser(sub)
    return parser


def _add_segment_parser(esub: Any) -> None:
    desc = (
        "fine-tune an FCN segmentation head with the backbone (MoCo's VOC / Cityscapes "
        "transfer); mean IoU and pixel accuracy"
    )
    q = esub.add_parser("segment", help=desc, description=desc)
    q.add_argument("run_dir", help="a run directory or checkpoint file")
    q.add_argument(
        "--data",
        required=True,
        help="a segmentation dataset in the PASCAL VOC layout (JPEGImages/, "
        "SegmentationClass/ label-map PNGs with 255 = ignore, "
        "ImageSets/Segmentation/{train,val}.txt), e.g. from mocolab data scenes",
    )
    q.add_argument(
        "--num-classes",
        type=int,
        help="classes including background (default: the largest label + 1)",
    )
    q.add_argument(
        "--iters",
        type=int,
        default=1000,
        help="SGD steps (default 1000; MoCo: 30k on VOC, 90k on Cityscapes)",
    )
    q.add_argument("--train-batch", type=int, default=16, help="crops per step (default 16)")
    q.add_argument(
        "--lr",
        type=float,
        default=0.01,
        help="default 0.01 (MoCo: 0.003 on VOC, 0.01 on Cityscapes); x0.1 at 70%% "
        "and 90%% of the steps",
    )
    q.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4 (MoCo)")
    q.add_argument(
        "--crop",
        type=int,
        help="training crop side (default: the largest image side, at most 513 as MoCo's VOC crop)",
    )
    q.add_argument(
        "--norm",
        choices=("bn", "frozen"),
        default="bn",
        help="the backbone's BN while fine-tuning: bn (batch statistics, MoCo's "
        "SyncBN on one process) or frozen (stored statistics and affine)",
    )
    q.add_argument("--head-channels", type=int, default=256, help="FCN head width (default 256)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    q.add_argument("--batch-size", type=int, default=16, help="inference batch (default 16)")
    q.add_argument(
        "--examples",
        type=int,
        default=6,
        help="test images drawn with their predictions into segment_examples.png",
    )
    q.add_argument("--no-progress", dest="progress", action="store_false")


def _segment(args: argparse.Namespace) -> int:
    """``eval segment``: fine-tune a :class:`~mocolab.evaluate.segment.Segmenter`, score it."""
    import time

    import torch

    from .checkpoint import load_backbone_and_info
    from .evaluate.segment import (
        Segmenter,
        evaluate_segmenter,
        load_segmentation,
        train_segmenter,
    )
    from .train import select_device

    for flag in ("iters", "train_batch", "head_channels", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    device = select_device(args.device)
    backbone, info = load_backbone_and_info(args.run_dir)
    train, val = load_segmentation(args.data, "train"), load_segmentation(args.data, "val")
    num_classes = args.num_classes or max(train.max_label(), val.max_label()) + 1
    if num_classes < 2:
        raise ConfigError(
            f"{args.data}: the label maps hold fewer than 2 classes; check them "
            "or pass --num-classes"
        )
    too_big = max(train.max_label(), val.max_label())
    if too_big >= num_classes:
        raise ConfigError(
            f"{args.data} has label {too_big} but --num-classes is {num_classes}; "
            f"raise --num-classes (255 is the only ignored value)"
        )
    torch.manual_seed(args.seed)
    model = Segmenter(backbone, num_classes, channels=args.head_channels)
    kw = dict(mean=info["mean"], std=info["std"], channels=info["in_channels"], device=device)
    start = time.perf_counter()
    loss = train_segmenter(
        model,
        train,
        iters=args.iters,
        batch_size=args.train_batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        crop=args.crop,
        norm=args.norm,
        seed=args.seed,
        progress=args.progress,
        **kw,
    )
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    res = evaluate_segmenter(
        model,
        val,
        num_classes,
        batch_size=args.batch_size,
        examples=args.examples,
        examples_to=run_dir / "segment_examples.png",
        **kw,
    )
    res.update(
        train_loss=loss,
        iters=args.iters,
        train_batch=args.train_batch,
        lr=args.lr,
        norm=args.norm,
        num_classes=num_classes,
        class_names=train.class_names,
        train_images=len(train),
        val_images=len(val),
        data=str(args.data),
        step=info["step"],
        seconds=round(time.perf_counter() - start, 1),
    )
    print(
        f"segmentation (FCN head, {args.iters} steps of {args.train_batch}, norm {args.norm}) "
        f"on {len(val)} images of {val.name}: mIoU {res['miou']:.2f}%  pixel accuracy "
        f"{res['pixel_acc']:.2f}%  [step {info['step']} of {args.run_dir}]"
    )
    save_json_or_warn(run_dir / "eval_segment.json", res)
    return 0


def _pretrain(args: argparse.Namespace, command_line: bool = False) -> int:
    """``mocolab pretrain``; ``command_line``: the process is the command (not a caller of
    :func:`main`), so the handler of a second Ctrl-C stays until it exits."""
    from .train import pretrain, resume_config

    overrides = {k: v for k, v in vars(args).items() if k in _option_names()}
    if args.resume:
        # --data: the run's data again (moved, or a pipe: command, run only when typed)
        given = {k: v for k, v in overrides.items() if v is not None and k != "data"}
        if args.preset:
            given["preset"] = args.preset  # refused below, named with the others
        if args.print_config:
            from .checkpoint import load_checkpoint

            cfg = resume_config(load_checkpoint(args.resume)["config"], given)
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        with _second_interrupt_exits(keep=command_line):
            results = pretrain(
                resume=args.resume, data=args.data, final_eval=args.final_eval, resume_with=given
            )
        return _exit_code(results)
    cfg = build_config(args.preset, **overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    with _second_interrupt_exits(keep=command_line):
        return _exit_code(pretrain(cfg, final_eval=args.final_eval))


@contextlib.contextmanager
def _second_interrupt_exits(keep: bool = False) -> Iterator[None]:
    """While ``pretrain`` runs, a Ctrl-C that the training loop does not take as its request
    to stop (a second one, or one while data loads or the final evaluation runs) ends the
    process at once: one line, exit status 130, whatever it interrupts (no traceback from a
    worker's cleanup, no exception lost in a finaliser). ``keep``: also while the process
    exits afterwards (the command line)."""
    import signal

    def interrupted(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        try:
            os.write(2, b"\nmocolab: interrupted\n")
        finally:
            os._exit(130)

    previous = signal.getsignal(signal.SIGINT)
    installed = False
    if previous is not signal.SIG_IGN:  # started to ignore Ctrl-C: keep it so
        with contextlib.suppress(ValueError):  # signals only work in the main thread
            signal.signal(signal.SIGINT, interrupted)
            installed = True
    try:
        yield
    finally:
        if installed and not keep:
            signal.signal(signal.SIGINT, previous)


def _exit_code(results: PretrainResult) -> int:
    """0 for a finished run or one stopped by Ctrl-C; EXIT_PREEMPTED (143) for one stopped by
    SIGTERM and EXIT_HANGUP (129) by SIGHUP: saved, but not finished (a scheduler or torchrun
    must not read it as success)."""
    return {"SIGTERM": EXIT_PREEMPTED, "SIGHUP": EXIT_HANGUP}.get(results.signal or "", 0)


def _option_names() -> set[str]:
    """Every pretraining option: run-level and of every registered method."""
    from .methods.registry import load_methods

    return field_names() | {n for spec in load_methods().values() for n in spec.option_names()}


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate.context import prepare

    if args.protocol == "diagnostics":
        return _diagnostics(args)
    if args.protocol == "segment":
        return _segment(args)
    if args.protocol == "detect":
        return args.eval_run(args)
    ctx = prepare(
        args.run_dir,
        data=args.data,
        data_root=args.data_root,
        device=args.device,
        protocol=args.protocol,
        progress=args.progress,
    )
    info = ctx.info
    train, train_labels, test, test_labels = ctx.labelled_splits()  # prepare() checked
    acc: Result
    backend = "faiss" if getattr(args, "faiss", False) else "torch"
    if backend == "faiss":
        from .evaluate.knn import _faiss

        try:
            _faiss()
        except ImportError as e:
            raise ConfigError(f"--faiss: {e}") from None
    if args.protocol == "finetune":
        from .evaluate.finetune import FINETUNE_RECIPES, finetune

        if not 0 < args.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {args.fraction}")
        if args.epochs < 0 or (args.epochs == 0 and not args.save):
            raise ConfigError(f"--epochs must be positive (0 only with --save), got {args.epochs}")
        recipe = dict(FINETUNE_RECIPES[args.recipe])
        for key in ("lr", "layer_decay"):
            if getattr(args, key) is not None:
                recipe[key] = getattr(args, key)
        if recipe["layer_decay"] != 1 and recipe["optimizer"] != "adamw":
            raise ConfigError("--layer-decay needs --recipe mae")
        if not 0 < recipe["layer_decay"] <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {recipe['layer_decay']}")
        if recipe["layer_decay"] != 1 and not hasattr(ctx.backbone, "blocks"):
            raise ConfigError(
                "--recipe mae's layer-wise LR decay needs a ViT backbone; "
                "add --layer-decay 1 or use --recipe simclr"
            )
        acc = finetune(
            ctx.backbone,
            train.images,
            train_labels,
            test.images,
            test_labels,
            ctx.num_classes,
            size=info["crop_size"],
            mean=info["mean"],
            std=info["std"],
            fraction=args.fraction,
            seed=args.seed,
            epochs=args.epochs,
            **recipe,
            head_only=args.head_only,
            freeze_stages=args.freeze_stages,
            from_scratch=args.from_scratch,
            on_trained=_saver(args, ctx),
            device=ctx.device,
            progress=args.progress,
        )
        frozen = f"stem + {args.freeze_stages} stages frozen, " if args.freeze_stages >= 0 else ""
        title = (
            f"fine-tune ({args.recipe} recipe, lr {recipe['lr']:g}, "
            f"{'head only, ' if args.head_only else ''}{frozen}"
            f"{'from scratch, ' if args.from_scratch else ''}{args.fraction:g} of the "
            f"labels = {acc['train_images']} images, {args.epochs} epochs)"
        )
        return _report_eval(args, ctx, acc, title)
    if args.protocol == "linear" and args.layer:
        return _probe_stages(args, ctx)
    bank = ctx.features("train", args.batch_size, args.progress)
    query = ctx.features("test", args.batch_size, args.progress)
    if args.protocol == "knn":
        from .evaluate.knn import knn_accuracy

        ctx.check_k(args.k)
        acc = knn_accuracy(
            bank,
            train_labels,
            query,
            test_labels,
            ctx.num_classes,
            k=args.k,
            temperature=args.t,
            backend=backend,
        )
        acc = dataclasses.replace(acc, train_images=len(train), test_images=len(test))
        title = f"kNN (k={args.k}, τ={args.t})"
    elif args.protocol == "retrieval":
        from .evaluate.retrieval import retrieval_metrics

        ctx.check_k(max(args.k))
        acc = retrieval_metrics(
            query, test_labels, bank, train_labels, ks=sorted(set(args.k)), backend=backend
        )
        print(f"retrieval of {len(test)} test images of {test.name} in {len(train)} train images:")
        for k in sorted(set(args.k)):
            print(
                f"  K={k:<4d} "
                + "  ".join(
                    f"{m} {acc[f'{m}@{k}']:.2f}%" for m in ("precision", "recall", "mAP", "hit")
                )
            )
        return _report_eval(args, ctx, acc, None)
    else:
        from .evaluate.features import extract_augmented_features
        from .evaluate.linear import LINEAR_RECIPES, linear_probe

        opts = dict(LINEAR_RECIPES[args.recipe])
        for key in ("epochs", "lr", "weight_decay", "standardize"):
            if getattr(args, key) is not None:
                opts[key] = getattr(args, key)
        labels = train_labels
        if args.augment_copies:
            bank = extract_augmented_features(
                ctx.backbone,
                train.images,
                copies=args.augment_copies,
                **ctx.feature_kwargs(args.batch_size, args.progress),
            )
            labels = labels.repeat(args.augment_copies)
        torch.manual_seed(0)
        acc = linear_probe(bank, labels, query, test_labels, ctx.num_classes, **opts)
        title = (
            f"linear ({args.recipe} recipe, {opts['epochs']} epochs, lr {opts['lr']}"
            f"{f', {args.augment_copies} augmented copies' if args.augment_copies else ''})"
        )
    return _report_eval(args, ctx, acc, title)


def _probe_stages(args: argparse.Namespace, ctx: Any) -> int:
    """``eval linear --layer``: a linear probe per ResNet stage, printed as a table."""
    from .evaluate.linear import LINEAR_RECIPES
    from .evaluate.stages import STAGES, probe_stages

    opts = dict(LINEAR_RECIPES[args.recipe])
    for key in ("epochs", "lr", "weight_decay", "standardize"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.augment_copies:
        raise ConfigError("--augment-copies is not available with --layer (plain views only)")
    if args.pool_dims < 1:
        raise ConfigError(f"--pool-dims must be positive, got {args.pool_dims}")
    if not 0 < args.train_fraction <= 1:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.train_fraction < 1:
        import dataclasses

        from .evaluate.finetune import balanced_subset

        keep = balanced_subset(ctx.train.labels, args.train_fraction)
        ctx.train = dataclasses.replace(
            ctx.train, images=ctx.train.images[keep], labels=ctx.train.labels[keep]
        )
    stages = STAGES if args.layer == "all" else (args.layer,)
    res = probe_stages(
        ctx, stages, dims=args.pool_dims, batch_size=args.batch_size, progress=args.progress, **opts
    )
    print(
        f"linear probe per stage ({args.recipe} recipe, {opts['epochs']} epochs, "
        f"{len(ctx.train)} train images, pooled to <= {args.pool_dims} dims) on "
        f"{len(ctx.test)} test images of {ctx.test.name} "
        f"[step {ctx.info['step']} of {args.run_dir}]:"
    )
    print(f"  {'stage':8s} {'dims':>6s} {'grid':>5s} {'top-1':>7s} {'top-5':>7s}")
    for stage, acc in res.items():
        print(
            f"  {stage:8s} {acc['dims']:6d} {acc['grid']:>5s} {acc['top1']:6.2f}% "
            f"{acc['top5']:6.2f}%"
        )
    save_json_or_warn(
        ctx.run_dir / "eval_linear_layers.json",
        {
            "stages": res,
            "pool_dims": args.pool_dims,
            "recipe": args.recipe,
            "train_images": len(ctx.train),
            "data": ctx.config["data"],
            "step": ctx.info["step"],
        },
    )
    return 0


def _saver(args: argparse.Namespace, ctx: Any) -> Any:
    """``finetune``'s ``on_trained`` for ``--save OUT_DIR``: the trained backbone as a run."""
    if not args.save:
        return None
    from .checkpoint import save_backbone_run
    from .evaluate.finetune import FINETUNE_RECIPES

    recipe = FINETUNE_RECIPES[args.recipe]

    def save(model: Any) -> None:
        origin = {
            "source": str(args.run_dir),
            "from_scratch": args.from_scratch,
            "fraction": args.fraction,
            "epochs": args.epochs,
            "recipe": args.recipe,
            "lr": recipe["lr"] if args.lr is None else args.lr,
            "freeze_stages": args.freeze_stages,
            "data": ctx.config["data"],
            "kind": "random" if args.from_scratch and args.epochs == 0 else "supervised",
        }
        path = save_backbone_run(
            args.save,
            model,
            config=ctx.config,
            info=ctx.info,
            step=0 if args.from_scratch else ctx.info["step"],
            origin=origin,
        )
        print(f"saved the {origin['kind']} backbone as a run: {path.parent}")

    return save


def _report_eval(args: argparse.Namespace, ctx: Any, acc: Result, title: str | None) -> int:
    """Print a protocol's result line and write ``eval_<protocol>.json`` into the run."""
    if title is not None:
        print(
            f"{title} on {len(ctx.test)} test images of {ctx.test.name}: top-1 {acc['top1']:.2f}%  "
            f"top-5 {acc['top5']:.2f}%  [step {ctx.info['step']} of {args.run_dir}]"
        )
    save_json_or_warn(
        ctx.run_dir / f"eval_{args.protocol}.json",
        {**acc.to_dict(), "data": ctx.config["data"], "step": ctx.info["step"]},
    )
    return 0


def _diagnostics(args: argparse.Namespace) -> int:
    from .evaluate.diagnostics import run_diagnostics

    res = run_diagnostics(
        args.run_dir,
        data=args.data,
        data_root=args.data_root,
        device=args.device,
        max_images=args.max_images,
        batch_size=min(args.batch_size, 256),
    )
    print(f"diagnostics of step {res['step']} on {res['images']} images (two views each):")
    for space in ("backbone", "embedding"):
        if space in res:
            d = res[space]
            print(
                f"  {space:9s} d={d['dim']:<5d} alignment {d['alignment']:.3f}  uniformity "
                f"{d['uniformity']:.3f}  effective rank {d['effective_rank']:.1f}  std "
                f"{d['std_mean']:.4f} (1/√d = {d['std_ideal']:.4f})"
            )
    if "key_encoder" in res:
        print(
            f"  key encoder agreement cos(f_q(x), f_k(x)) = {res['key_encoder']['agreement']:.4f}"
        )
    if "queue" in res:
        q = res["queue"]
        line = (
            f"  queue {q['filled']}/{q['size']} keys, effective rank {q['effective_rank']:.1f}, "
            f"uniformity {q['uniformity']:.3f}"
        )
        if q["consistency"] is not None:
            line += f", consistency {q['consistency']['mean']:.4f}"
        print(line)
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    save_json_or_warn(run_dir / "eval_diagnostics.json", res)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    command_line = argv is None  # the process is `mocolab …` (python -m mocolab, the script)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        if args.command == "pretrain":
            return _pretrain(args, command_line)
        if args.command == "report":
            return report.run(args)
        if args.command == "export":
            return export.run(args)
        if args.command == "embed":
            return embed.run(args)
        if args.command == "data":
            return int(args.data_run(args))
        if args.command == "completion":
            return _completion(args)
        return _eval(args)
    except OutputError as e:  # a file could not be written (full or read-only disk)
        print(f"mocolab: error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except MocolabError as e:  # a bad input or run state: its one-line message, no traceback
        print(f"mocolab: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # a write that failed outside safeio.writing
        if not is_write_error(e):
            raise
        print(f"mocolab: error: {write_error(e)}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:
        print("\nmocolab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
