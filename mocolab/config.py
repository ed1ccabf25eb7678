"""Configuration: one dataclass per job, YAML presets, validation with clear errors.

:class:`PretrainConfig` holds the run-level options every method shares; a method's own
options are a dataclass declared in its module (:mod:`mocolab.methods.registry`), held in
``PretrainConfig.options``. Run-level values left as ``None`` (``dim``, ``head_layers``,
``augment``, ...) are filled from the method's defaults by :func:`resolve`. Presets live in
``mocolab/configs/*.yaml``, flat (each key routed to the run or to the method's options), and
only list what differs from the defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import loggers, plugins
from .errors import ConfigError  # re-exported: its home before errors.py
from .option import opt  # re-exported: the fields of every options dataclass
from .typecheck import check_types, load_yaml

if TYPE_CHECKING:
    from .methods.registry import MethodOptions, MethodSpec

PRESET_DIR = Path(__file__).parent / "configs"
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
)
"""The ``--arch`` values (:data:`mocolab.backbones.ARCHS`, which imports torch)."""


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs. Defaults are sized for the 2-core-CPU demo
    (MoCo v2 on Fashion-MNIST, about 10 minutes)."""

    # data
    data: str = opt(
        "fashion-mnist",
        "built-in name, a folder of images, or WebDataset shards "
        "(the OUT of `mocolab data pack`, or its index.json URL)",
    )
    data_root: str | None = opt(None, "where built-in datasets are looked for / downloaded")
    image_size: int | None = opt(None, "side images are decoded to (folders; default 64)")
    crop_size: int | None = opt(None, "side of the views (default: the dataset's side)")
    num_workers: int = opt(
        2,
        "folder decoding workers; with shards, the decoding workers "
        "(their number is part of the shards' order)",
    )
    crops: str = opt(
        "auto",
        "random resized crops from: whole (each image's true size and aspect; "
        "--image-size is the longer side) | square (the centre square cached "
        "at --image-size) | auto (whole for shards and folders at "
        "--image-size >= 128)",
        choices=("auto", "whole", "square"),
    )
    # method
    method: str = opt(
        "mocov2",
        "the method, a registered name (mocolab pretrain --help lists "
        "them); its own options: mocolab pretrain --method NAME --help",
    )
    arch: str = opt(
        "resnet18",
        "backbone: a ResNet (resnet18: the CPU demo's) or a ViT (MoCo v3, DINO)",
        choices=ARCHS,
    )
    width: int = opt(
        16, "ResNet base width (64 = torchvision's; the CPU demo's 16 is ~16× cheaper)"
    )
    stem: str | None = opt(
        None,
        "imagenet | cifar | compact (default: by image size)",
        choices=("imagenet", "cifar", "compact"),
    )
    pos_embed: str = opt(
        "sincos",
        "ViT position embedding: sincos (fixed 2-D, MoCo v3) | learned (DINO)",
        choices=("sincos", "learned"),
    )
    freeze_patch_embed: bool = opt(
        False, "ViT: keep the random patch projection frozen (MoCo v3 §4)"
    )
    vit_depth: int | None = opt(
        None, "ViT blocks (default: the arch's 12; fewer for CPU demos and tests)"
    )
    vit_heads: int | None = opt(
        None, "ViT attention heads (default: timm's 3/6/12; MoCo v3's ViT-S: 12)"
    )
    vit_pool: str | None = opt(
        None,
        "ViT features: token (the [CLS] token: MoCo v3, DINO, MAE, MSN) | avg (the mean "
        "of the patch tokens: I-JEPA) (default: the method's, else token)",
    )
    vit_layer_scale: float | None = opt(
        None,
        "ViT LayerScale: every block's residual branches scaled by a learned per-channel "
        "γ starting at this value (DINOv2: 1e-5; 0: none) (default: the method's, else 0)",
    )
    dim: int | None = opt(
        None,
        "key / embedding dimension C (default: the method's, 128; BYOL, MoCo v3 256; SimSiam 2048)",
    )
    head_layers: int | None = opt(
        None,
        "projection head layers: 1 (MoCo v1, InstDisc), 2 (MoCo v2, SimCLR, BYOL), "
        "3 (SimCLR v2, SimSiam, MoCo v3)",
    )
    hidden_dim: int | None = opt(None, "MLP hidden width (default: backbone width)")
    patch_size: int | None = opt(
        None,
        "ViT: patch side (default by image size: 16 from 160 px, "
        "8 from 48, else 4); CPC: side of the grid's patches, "
        "pixels (8 for 28-32 px images; 64 on ImageNet)",
    )
    bn_splits: int = opt(
        4, "BN sub-batches of the global batch (shuffle-BN; at least one per process)"
    )
    init: str | None = opt(
        None,
        "initialise the backbone from weights: a mocolab run, torchvision/timm, "
        "official MoCo v1/v2/v3, solo-learn or lightly checkpoint",
    )
    augment: str | None = opt(
        None, "view recipe, or one per view comma-separated (default: the method's)"
    )
    augment_backend: str = opt(
        "auto",
        "batched (views made on the training device) | torchvision (per image with PIL "
        "in --workers processes) | auto (batched on a GPU; on a CPU the faster at the "
        "view size, as measured: per-image for large views)",
        choices=("auto", "batched", "torchvision"),
    )
    workers: int = opt(2, "DataLoader processes making the per-image views (--augment-backend)")
    crop_scale: tuple[float, ...] | None = opt(
        None, "random resized crop area range MIN MAX (default: the recipe's)"
    )
    blur_p: float | None = opt(
        None,
        "probability of the Gaussian blur in every view (default: the recipe's; "
        "0 as the official MoCo CIFAR-10 demo and SimCLR's CIFAR setting)",
    )
    # optimisation
    epochs: int = opt(8, "passes over the training images")
    batch_size: int = opt(128, "images per step (all processes together)")
    lr: float = opt(0.12, "base LR for a batch of 256 (linear scaling rule)")
    lr_biases: float | None = opt(
        None,
        "base LR of biases and BN parameters for a batch of 256, scheduled "
        "as --lr (Barlow Twins: 0.0048 beside --lr 0.2; default: --lr)",
    )
    weight_decay: float = opt(5e-4, "SGD weight decay (1e-4 on ImageNet)")
    weight_decay_end: float | None = opt(
        None,
        "cosine schedule of the weight decay from --weight-decay "
        "to this value over training (DINO: 0.04 -> 0.4; default: constant)",
    )
    clip_grad: float = opt(
        0.0, "clip each parameter's gradient to this L2 norm (DINO: 3.0; 0: off)"
    )
    sgd_momentum: float = opt(0.9, "SGD momentum")
    optimizer: str = opt(
        "sgd",
        "sgd (MoCo) | lars (SimCLR, BYOL; biases and BN excluded) | adamw",
        choices=("sgd", "lars", "adamw"),
    )
    adamw_betas: tuple[float, ...] = opt(
        (0.9, 0.999), "AdamW's β1 β2 (torch's 0.9 0.999; MAE 0.9 0.95)"
    )
    lars_eta: float = opt(0.001, "LARS trust coefficient η")
    lars_trust: str = opt(
        "update",
        "LARS trust ratio: update (η‖w‖/‖g+wd·w‖, the official "
        "MoCo v3, SimCLR and BYOL code) | you (η‖w‖/(‖g‖+wd‖w‖), "
        "You et al. 2017)",
        choices=("update", "you"),
    )
    lr_schedule: str | None = opt(
        None,
        "cosine (v2) | step (v1) | constant (default: the method's)",
        choices=("cosine", "step", "constant"),
    )
    lr_steps: tuple[float, ...] = opt((0.6, 0.8), "step schedule milestones, fractions of training")
    warmup_epochs: float = opt(0.0, "linear LR warmup, in epochs")
    max_steps: int | None = opt(None, "stop after this many steps (smoke tests, budgets)")
    # execution
    seed: int = opt(0, "seed of every random stream (init, data order, views)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: str = opt(
        "auto", "auto (bf16 on CUDA) | bf16 | fp16 | off", choices=("auto", "bf16", "fp16", "off")
    )
    channels_last: bool | None = opt(
        None,
        "channels-last memory format (faster convolutions on CUDA; "
        "no gain on a CPU: benchmarks/step_modes.py; "
        "default: on with CUDA only)",
    )
    compile: bool | None = opt(
        None,
        "torch.compile the method's forward (inductor; 1.5x faster steps on a "
        "2-core CPU, about 35 s to compile; needs a C++ compiler on a CPU; "
        "default: on for an image folder on a CPU, else off)",
    )
    compile_views: str = opt(
        "auto",
        "make the views with one fused torch.compile program: on | off | "
        "graphs (also a CUDA graph) | auto (on with CUDA or --compile)",
        choices=("auto", "on", "off", "graphs"),
    )
    sync_bn: bool = opt(False, "synchronised BN across processes (SimCLR; CUDA, --bn-splits 1)")
    threads: int | None = opt(None, "CPU threads for torch (default: torch's)")
    # monitoring and output
    knn_every: int = opt(0, "epochs between online kNN checks (0: only at the end)")
    diagnostics_every: int = opt(
        1,
        "epochs between logged diagnostics: alignment, uniformity, "
        "effective rank, collapse, queue consistency (0: never)",
    )
    knn_k: int = opt(200, "neighbours k of the weighted kNN (InstDisc)")
    knn_t: float = opt(0.1, "temperature of the weighted kNN vote")
    knn_bank: int = opt(10000, "train images in the online kNN bank (0: all)")
    knn_queries: int = opt(2000, "test images for the online kNN (0: all)")
    log_every: int = opt(20, "steps between metric rows")
    logger: str = opt(
        "tensorboard",
        "where the metric rows go besides metrics.jsonl, comma-separated: tensorboard "
        "(RUN_DIR/tb) | wandb | mlflow, or none; W&B and MLflow read their own environment "
        "(WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME)",
    )
    checkpoint_every: int = opt(0, "steps between extra checkpoints (0: each epoch only)")
    out_dir: str = opt("runs", "folder that holds run directories")
    run_name: str | None = opt(None, "run directory name (default: method-data-time)")
    progress: bool = opt(True, "show a progress bar")
    # the method's own options (a dataclass of its module; filled by resolve(); no flag of its own)
    options: MethodOptions | None = field(default=None, metadata={"flag": False})

    def __getattr__(self, name: str) -> Any:
        """Read the method's options through the config too (``cfg.temperature`` is
        ``cfg.options.temperature``); only called for names that are not run-level options."""
        options = self.__dict__.get("options")
        if options is not None and not name.startswith("__") and hasattr(options, name):
            return getattr(options, name)
        method = self.__dict__.get("method")
        raise AttributeError(f"{type(self).__name__} of --method {method} has no option {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Flat: the run-level options, then the method's (the YAML and checkpoint format)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        d["lr_steps"] = list(self.lr_steps)
        d["adamw_betas"] = list(self.adamw_betas)
        d["crop_scale"] = None if self.crop_scale is None else list(self.crop_scale)
        if self.options is not None:  # tuples as lists (YAML)
            d.update(
                {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.options).items()}
            )
        return d


def field_names() -> set[str]:
    """The run-level option names (the method's own are in its options dataclass)."""
    return {f.name for f in fields(PretrainConfig) if f.name != "options"}


def preset_dirs() -> list[Path]:
    """Where presets are found: ``mocolab/configs``, then the plug-ins' preset folders (the
    entry-point group ``mocolab.presets``, :mod:`mocolab.plugins`); a name found in two is
    the first's."""
    return [PRESET_DIR] + [path for path, _ in plugins.preset_dirs()]


def list_presets() -> list[str]:
    return sorted({p.stem for folder in preset_dirs() for p in folder.glob("*.yaml")})


def load_preset(name: str) -> dict[str, Any]:
    """The options of a preset (a YAML file in ``mocolab/configs``, in a plug-in's preset
    folder, or a path)."""
    path = Path(name)
    if not path.suffix:
        found = [d / f"{name}.yaml" for d in preset_dirs() if (d / f"{name}.yaml").exists()]
        path = found[0] if found else PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(
            f"preset {name!r} not found; available presets: {', '.join(list_presets())} "
            "(or pass a path to a YAML file)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"preset {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"preset {path} cannot be read ({e.strerror or e})") from None
    values = load_yaml(text, f"preset {path}") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"preset {path} must be a mapping of option: value")
    return values  # keys are checked against the run's and the method's options by build_config


def _method(name: str) -> MethodSpec:
    # the registry imports every method module (and torch): imported here, not at the top, so
    # that `mocolab --help` stays fast and config stays below the methods it configures
    from .methods.registry import get_method

    return get_method(name)


def _split(
    method: str, values: Mapping[str, Any], strict: bool, source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` routed to the run-level options and ``method``'s own, each checked against
    its dataclass's types (one line naming ``source``, the key, the value, the type)."""
    from .methods.registry import split_options  # see _method

    try:
        run, own = split_options(method, values, field_names(), strict=strict)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return (
        check_types(PretrainConfig, run, source),
        check_types(_method(method).options, own, source),
    )


def build_config(
    preset: str | None = None, *, strict: bool = True, **overrides: Any
) -> PretrainConfig:
    """Defaults, then the preset's values, then explicit overrides (``None`` = not given).

    Keys are flat: each goes to the run-level options or to the method's own. An option the
    method does not have is an error naming it and the method; with ``strict=False`` (a
    checkpoint's config, written before the registry with every method's options) it is dropped.
    """
    values: dict[str, Any] = {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if preset:
        values.update(load_preset(preset))
        data = values.get("data")
        if isinstance(data, str) and data.startswith("pipe:") and "data" not in given:
            raise ConfigError(
                f"preset {preset} sets data to a pipe: command; mocolab runs a command only "
                f"when it is typed on the command line, never one read from a file: pass "
                f"--data yourself if you mean it"
            )
        method = str(given.get("method", values.get("method", PretrainConfig.method)))
        values = _other_methods_preset(values, method)
        _split(method, values, strict, f"preset {preset}")  # its errors name the preset
    values.update(given)
    run, own = _split(str(values.get("method", PretrainConfig.method)), values, strict, "options")
    for key in ("lr_steps", "crop_scale", "adamw_betas"):
        if run.get(key) is not None:
            run[key] = tuple(run[key])
    spec = _method(str(run.get("method", PretrainConfig.method)))
    try:
        options = spec.options(**own)
    except TypeError as e:  # cannot happen after _split; kept as a clear message
        raise ConfigError(f"--method {spec.name}: {e}") from None
    return resolve(PretrainConfig(**run, options=options))


def _other_methods_preset(values: dict[str, Any], method: str) -> dict[str, Any]:
    """A preset of another method run with ``--method method`` (an ablation's shared base):
    the options that are its own method's and not ``method``'s are dropped."""
    own = str(values.get("method", PretrainConfig.method))
    if own == method:
        return values
    theirs, ours = _method(own), _method(method)
    drop = {*theirs.option_names(), *theirs.renamed} - {*ours.option_names(), *ours.renamed}
    return {k: v for k, v in values.items() if k not in drop}


def config_from_dict(values: Mapping[str, Any]) -> PretrainConfig:
    """The config of a checkpoint or a run's ``config.yaml`` (flat), also one written before
    the method registry: the options of other methods are dropped, renamed ones mapped."""
    return build_config(strict=False, **values)


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fill the method's defaults into run-level options left unset (and its options, when
    none are given), then validate."""
    spec = _method(cfg.method)
    own = cfg.options if cfg.options is not None else spec.options()
    if type(own) is not spec.options:
        raise ConfigError(
            f"--method {cfg.method} takes {spec.options.__name__}, not "
            f"{type(own).__name__}; build the config with build_config()"
        )
    defaults = {"lr_schedule": "cosine", **spec.defaults}
    updates = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **updates)
    # every value's type again (the Python API, a non-finite float): the run's, the method's
    run = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "options"}
    options = type(own)(**check_types(type(own), asdict(own), "options"))
    cfg = PretrainConfig(**check_types(PretrainConfig, run, "options"), options=options)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: PretrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid option."""
    from .augment import RECIPES
    from .backbones import ARCHS, STEMS, is_vit

    _check(cfg.arch in ARCHS, f"--arch {cfg.arch!r} is not known; choose one of {', '.join(ARCHS)}")
    _check(
        cfg.stem is None or cfg.stem in STEMS,
        f"--stem {cfg.stem!r} is not known; choose one of {', '.join(STEMS)}",
    )
    _check_vit(cfg)
    _check(cfg.width >= 4, f"--width must be at least 4, got {cfg.width}")
    _check(cfg.dim is not None and cfg.dim > 0, f"--dim must be positive, got {cfg.dim}")
    _check(cfg.head_layers in (1, 2, 3), f"--head-layers must be 1, 2 or 3, got {cfg.head_layers}")
    _check(cfg.batch_size > 1, f"--batch-size must be at least 2, got {cfg.batch_size}")
    _check(cfg.bn_splits >= 1, f"--bn-splits must be at least 1, got {cfg.bn_splits}")
    _check(
        cfg.batch_size % cfg.bn_splits == 0 or is_vit(cfg.arch),
        f"--batch-size {cfg.batch_size} must be divisible by --bn-splits {cfg.bn_splits} "
        "(each BN sub-batch gets the same number of images)",
    )
    _check(
        cfg.batch_size // cfg.bn_splits >= 2 or cfg.bn_splits == 1 or is_vit(cfg.arch),
        f"--bn-splits {cfg.bn_splits} leaves fewer than 2 images per BN sub-batch at "
        f"--batch-size {cfg.batch_size}; lower --bn-splits",
    )
    _check(cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}")
    _check(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    _check(
        cfg.lr_biases is None or cfg.lr_biases > 0,
        f"--lr-biases must be positive (0.0048 in Barlow Twins), got {cfg.lr_biases}",
    )
    _check(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    _check(
        cfg.weight_decay_end is None or (cfg.weight_decay_end >= 0 and cfg.weight_decay > 0),
        f"--weight-decay-end {cfg.weight_decay_end} needs a value >= 0 and --weight-decay > 0 "
        "(the schedule's start)",
    )
    _check(
        cfg.clip_grad >= 0, f"--clip-grad must be >= 0 (3.0 in DINO; 0: off), got {cfg.clip_grad}"
    )
    _check(0 <= cfg.sgd_momentum < 1, f"--sgd-momentum must be in [0, 1), got {cfg.sgd_momentum}")
    _check(
        cfg.optimizer in ("sgd", "lars", "adamw"),
        f"--optimizer must be sgd, lars or adamw, got {cfg.optimizer!r}",
    )
    _check(
        len(cfg.adamw_betas) == 2 and all(0 <= b < 1 for b in cfg.adamw_betas),
        f"--adamw-betas takes two values in [0, 1) (0.9 0.999), got {cfg.adamw_betas}",
    )
    _check(cfg.lars_eta > 0, f"--lars-eta must be > 0 (0.001 in SimCLR), got {cfg.lars_eta}")
    _check(
        cfg.lars_trust in ("update", "you"),
        "--lars-trust must be update (the official codes) or you (the LARS paper), got "
        f"{cfg.lars_trust!r}",
    )
    _check(
        cfg.lr_schedule in ("cosine", "step", "constant"),
        f"--lr-schedule must be cosine, step or constant, got {cfg.lr_schedule!r}",
    )
    _check(
        all(0 < s < 1 for s in cfg.lr_steps), "--lr-steps must be fractions of training in (0, 1)"
    )
    _check(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    _check(
        cfg.max_steps is None or cfg.max_steps > 0,
        f"--max-steps must be positive, got {cfg.max_steps}",
    )
    _check(
        cfg.augment_backend in ("auto", "batched", "torchvision"),
        f"--augment-backend must be auto, batched or torchvision, got {cfg.augment_backend!r}",
    )
    _check(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _check(
        cfg.augment is not None and all(a.strip() in RECIPES for a in cfg.augment.split(",")),
        f"--augment {cfg.augment!r} is not known; choose one of {', '.join(RECIPES)} "
        "(or one per view, comma-separated)",
    )
    _check(
        cfg.blur_p is None or 0 <= cfg.blur_p <= 1,
        f"--blur-p is a probability in [0, 1], got {cfg.blur_p}",
    )
    _check(
        cfg.crop_scale is None
        or (len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1),
        f"--crop-scale takes two fractions 0 < MIN <= MAX <= 1, got {cfg.crop_scale}",
    )
    _check(
        cfg.compile_views in ("auto", "on", "off", "graphs"),
        f"--compile-views must be auto, on, off or graphs, got {cfg.compile_views!r}",
    )
    _check(
        cfg.amp in ("auto", "bf16", "fp16", "off"),
        f"--amp must be auto, bf16, fp16 or off, got {cfg.amp!r}",
    )
    _check(cfg.knn_k > 0, f"--knn-k must be positive, got {cfg.knn_k}")
    _check(cfg.knn_t > 0, f"--knn-t must be > 0, got {cfg.knn_t}")
    _check(cfg.knn_every >= 0, f"--knn-every must be >= 0, got {cfg.knn_every}")
    _check(
        cfg.diagnostics_every >= 0, f"--diagnostics-every must be >= 0, got {cfg.diagnostics_every}"
    )
    _check(cfg.log_every > 0, f"--log-every must be positive, got {cfg.log_every}")
    loggers.check(cfg.logger)
    _check(
        cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}"
    )
    _check(
        cfg.crop_size is None or cfg.crop_size >= 8,
        f"--crop-size must be at least 8, got {cfg.crop_size}",
    )
    _check(
        cfg.image_size is None or cfg.image_size >= 8,
        f"--image-size must be at least 8, got {cfg.image_size}",
    )
    _check(cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}")
    _check(
        cfg.crops in ("auto", "whole", "square"),
        f"--crops must be auto, whole or square, got {cfg.crops!r}",
    )
    _check(cfg.threads is None or cfg.threads > 0, f"--threads must be positive, got {cfg.threads}")
    _check(
        cfg.patch_size is None or cfg.patch_size > 0,
        f"--patch-size must be positive, got {cfg.patch_size}",
    )
    if cfg.options is not None:
        cfg.options.validate(cfg)  # the method's own checks


def _check_vit(cfg: PretrainConfig) -> None:
    """The ViT options: valid values, and only with a ViT ``--arch``."""
    from .backbones import is_vit
    from .vit import GLOBAL_POOLS, POS_EMBEDS

    vit = is_vit(cfg.arch)
    _check(
        vit or not cfg.freeze_patch_embed,
        f"--freeze-patch-embed freezes a ViT's patch projection, but --arch {cfg.arch} is a "
        "ResNet; drop the flag or choose --arch vit_tiny, vit_small or vit_base",
    )
    _check(
        vit or cfg.vit_heads is None,
        f"--vit-heads is a ViT option, but --arch {cfg.arch} is a ResNet; drop it or choose "
        "--arch vit_tiny, vit_small or vit_base",
    )
    _check(
        cfg.vit_heads is None or cfg.vit_heads >= 1,
        f"--vit-heads must be positive, got {cfg.vit_heads}",
    )
    _check(
        vit or cfg.vit_depth is None,
        f"--vit-depth is a ViT option, but --arch {cfg.arch} is a ResNet; drop it or choose "
        "--arch vit_tiny, vit_small or vit_base",
    )
    spec = _method(cfg.method)
    _check(
        vit or cfg.patch_size is None or "patch_size" in spec.defaults,
        f"--patch-size is a ViT (or CPC) option, but --arch {cfg.arch} is a ResNet; drop it or "
        "choose --arch vit_tiny, vit_small or vit_base",
    )
    _check(
        not (vit and spec.backbone is not None),
        f"--method {cfg.method} builds on ResNets; choose --arch resnet18|34|50|101, not {cfg.arch}",
    )
    _check(
        cfg.vit_pool in (None, *GLOBAL_POOLS),
        f"--vit-pool must be {' or '.join(GLOBAL_POOLS)}, got {cfg.vit_pool!r}",
    )
    _check(
        cfg.pos_embed in POS_EMBEDS,
        f"--pos-embed must be {' or '.join(POS_EMBEDS)}, got {cfg.pos_embed!r}",
    )
    _check(
        vit
        or not cfg.vit_layer_scale
        or cfg.vit_layer_scale == spec.defaults.get("vit_layer_scale"),  # the method's: its check
        f"--vit-layer-scale is a ViT option, but --arch {cfg.arch} is a ResNet; drop it or "
        "choose --arch vit_tiny, vit_small or vit_base",
    )
    _check(
        cfg.vit_layer_scale is None or cfg.vit_layer_scale >= 0,
        f"--vit-layer-scale must be >= 0 (0: none; DINOv2 1e-5), got {cfg.vit_layer_scale}",
    )
    _check(
        cfg.vit_depth is None or cfg.vit_depth >= 1,
        f"--vit-depth must be positive, got {cfg.vit_depth}",
    )
    _check(
        not vit
        or cfg.patch_size is None
        or cfg.patch_size < 1
        or cfg.crop_size is None
        or cfg.crop_size % cfg.patch_size == 0,
        f"--patch-size {cfg.patch_size} does not divide --crop-size {cfg.crop_size}; pick a "
        f"divisor of {cfg.crop_size} or a crop size that is a multiple of {cfg.patch_size}",
    )
