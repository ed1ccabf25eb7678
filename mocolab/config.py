"""Configuration: one dataclass per job, YAML presets, validation with clear errors.

Values left as ``None`` are filled from the method's paper defaults by :func:`resolve`.
Presets live in ``mocolab/configs/*.yaml`` and only list what differs from the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "configs"
METHODS = ("mocov1", "mocov2", "mocov3", "simclr", "simclr2", "byol", "simsiam", "instdisc",
           "invaspread", "swav", "dino", "cpc", "cmc")


def opt(default: Any, help: str) -> Any:
    """A config field with its command-line help text (one source for both)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """An option has an invalid value; the message names the option and the fix."""


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs. Defaults are sized for the 2-core-CPU demo
    (MoCo v2 on Fashion-MNIST, about 10 minutes)."""

    # data
    data: str = opt("fashion-mnist", "built-in name or a folder of images")
    data_root: str | None = opt(None, "where built-in datasets are looked for / downloaded")
    image_size: int | None = opt(None, "side images are decoded to (folders; default 64)")
    crop_size: int | None = opt(None, "side of the views (default: the dataset's side)")
    num_workers: int = opt(2, "folder decoding workers")
    # method
    method: str = opt("mocov2", " | ".join(METHODS))
    arch: str = opt("resnet18", "backbone: resnet18 | resnet34 | resnet50 | resnet101 | "
                                "vit_tiny | vit_small | vit_base")
    width: int = opt(16, "ResNet base width (64 = torchvision's; the CPU demo's 16 is ~16× cheaper)")
    stem: str | None = opt(None, "imagenet | cifar | compact (default: by image size)")
    pos_embed: str = opt("sincos", "ViT position embedding: sincos (fixed 2-D, MoCo v3) | learned (DINO)")
    freeze_patch_embed: bool = opt(False, "ViT: keep the random patch projection frozen (MoCo v3 §4)")
    vit_depth: int | None = opt(None, "ViT blocks (default: the arch's 12; fewer for CPU demos and tests)")
    vit_heads: int | None = opt(None, "ViT attention heads (default: timm's 3/6/12; MoCo v3's ViT-S: 12)")
    dim: int | None = opt(None, "key / embedding dimension C (default: the method's, 128; BYOL, MoCo v3 256; SimSiam 2048)")
    head_layers: int | None = opt(None, "projection head layers: 1 (MoCo v1, InstDisc), 2 (MoCo v2, SimCLR, BYOL), "
                                         "3 (SimCLR v2, SimSiam, MoCo v3)")
    hidden_dim: int | None = opt(None, "MLP hidden width (default: backbone width)")
    queue_size: int = opt(4096, "K, the number of keys in the queue (65536 on ImageNet)")
    key_momentum: float | None = opt(None, "m of the key / target encoder EMA (MoCo demo 0.99, paper 0.999; "
                                            "BYOL 0.996; MoCo v3 0.99)")
    momentum_schedule: str | None = opt(None, "constant (MoCo) | cosine (ramp m to 1: BYOL, MoCo v3)")
    temperature: float | None = opt(None, "τ (MoCo v1, InstDisc 0.07; v2 0.2; SimCLR, InvaSpread 0.1; MoCo v3 1.0)")
    simclr2_memory: bool = opt(False, "SimCLR v2: MoCo's memory, a momentum encoder (--key-momentum, 0.999) "
                                      "whose keys in a queue of --queue-size are extra negatives")
    shuffle_bn: bool = opt(True, "shuffle the key batch across BN sub-batches (MoCo §3.3)")
    symmetric: bool = opt(False, "MoCo v1/v2: symmetrised loss InfoNCE(q1,k2) + InfoNCE(q2,k1), both keys enqueued "
                                 "(the official CIFAR-10 demo's option; twice the work per image)")
    mochi_n: int = opt(0, "MoCHi: N hardest queue keys per query to mix (MoCo v1/v2; 0: off; paper 1024)")
    mochi_s: int = opt(0, "MoCHi: s synthetic negatives mixing two hard keys (paper 1024)")
    mochi_s_prime: int = opt(0, "MoCHi: s' synthetic negatives mixing the query with a hard key (paper 256)")
    predictor_hidden_dim: int | None = opt(None, "predictor hidden width (BYOL, MoCo v3: the head's; "
                                                 "SimSiam: dim/4)")
    nce_k: int | None = opt(None, "InstDisc, CMC: m, memory-bank entries drawn as noise per batch (4096; CMC 16384)")
    bank_momentum: float | None = opt(None, "InstDisc, CMC: λ of the bank update v ← normalize(λv + (1−λ)f) (0.5)")
    bank_init: str = opt("random", "InstDisc: memory bank start: random (the paper's unit vectors) | encoder (the initial "
                         "encoder's features of the plain images, so that a first epoch has real positives)")
    loss: str | None = opt(None, "InstDisc, CMC objective: nce (the papers') | softmax (InfoNCE over the same "
                                 "entries; CMC's later default)")
    prototypes: int | None = opt(None, "SwAV: number of prototypes K (3000); DINO: head output dimension K (65536)")
    num_local_crops: int | None = opt(None, "multi-crop: small views besides the 2 large ones (SwAV 6, DINO 8)")
    sinkhorn_epsilon: float | None = opt(None, "SwAV: ε of the Sinkhorn-Knopp equipartition (0.05)")
    sinkhorn_iterations: int | None = opt(None, "SwAV: Sinkhorn-Knopp iterations (3)")
    swav_queue: int = opt(0, "SwAV: past large-crop features per crop kept for the Sinkhorn codes "
                             "(paper §4 for small batches: 3840; 0: off)")
    swav_queue_start_epoch: int = opt(15, "SwAV: epoch from which --swav-queue is filled (15)")
    freeze_prototypes_niters: int | None = opt(None, "steps with the SwAV prototypes / the DINO head's last "
                                                     "layer frozen (SwAV 313; DINO one epoch)")
    head_bn: bool = opt(False, "DINO: BN after the head's hidden layers (the official --use_bn_in_head)")
    teacher_temperature: float | None = opt(None, "DINO: teacher τ_t after warmup (0.07)")
    warmup_teacher_temperature: float | None = opt(None, "DINO: teacher τ_t at the start (0.04)")
    teacher_temperature_warmup: float | None = opt(None, "DINO: fraction of training over which τ_t "
                                                         "rises linearly (0.1: 30 of 300 epochs)")
    center_momentum: float | None = opt(None, "DINO: momentum of the teacher center (0.9)")
    patch_size: int | None = opt(None, "CPC: side of the grid's patches, pixels (8 for 28-32 px images; 64 on ImageNet); "
                                       "ViT: patch side (default by image size: 16 from 160 px, 8 from 48, else 4)")
    patch_stride: int | None = opt(None, "CPC: step between patches, pixels (half the patch: overlapping)")
    prediction_steps: int | None = opt(None, "CPC: K, predict the patches 1..K rows ahead (3)")
    prediction_directions: str | None = opt(None, "CPC: down (CPC v1) | all (down, up, left, right: v2) "
                                                  "| a comma-separated list of those")
    context_blocks: int | None = opt(None, "CPC: residual blocks of causal convolutions in the context network")
    bn_splits: int = opt(4, "BN sub-batches of the global batch (shuffle-BN; at least one per process)")
    init: str | None = opt(None, "initialise the backbone from weights: a mocolab run, torchvision/timm, "
                               "official MoCo v1/v2/v3, solo-learn or lightly checkpoint")
    augment: str | None = opt(None, "view recipe, or one per view comma-separated (default: the method's)")
    augment_backend: str = opt("batched", "batched (views made on the training device, fast) | "
                                          "torchvision (per image in --workers processes)")
    workers: int = opt(2, "DataLoader processes of --augment-backend torchvision")
    crop_scale: tuple[float, ...] | None = opt(None, "random resized crop area range MIN MAX (default: the recipe's)")
    blur_p: float | None = opt(None, "probability of the Gaussian blur in every view (default: the recipe's; "
                                     "0 as the official MoCo CIFAR-10 demo and SimCLR's CIFAR setting)")
    # optimisation
    epochs: int = opt(8, "passes over the training images")
    batch_size: int = opt(128, "images per step (all processes together)")
    lr: float = opt(0.12, "base LR for a batch of 256 (linear scaling rule)")
    weight_decay: float = opt(5e-4, "SGD weight decay (1e-4 on ImageNet)")
    weight_decay_end: float | None = opt(None, "cosine schedule of the weight decay from --weight-decay "
                                               "to this value over training (DINO: 0.04 -> 0.4; default: constant)")
    clip_grad: float = opt(0.0, "clip each parameter's gradient to this L2 norm (DINO: 3.0; 0: off)")
    sgd_momentum: float = opt(0.9, "SGD momentum")
    optimizer: str = opt("sgd", "sgd (MoCo) | lars (SimCLR, BYOL; biases and BN excluded) | adamw")
    lars_eta: float = opt(0.001, "LARS trust coefficient η")
    lr_schedule: str | None = opt(None, "cosine (v2) | step (v1) | constant")
    lr_steps: tuple[float, ...] = opt((0.6, 0.8), "step schedule milestones, fractions of training")
    warmup_epochs: float = opt(0.0, "linear LR warmup, in epochs")
    max_steps: int | None = opt(None, "stop after this many steps (smoke tests, budgets)")
    # execution
    seed: int = opt(0, "seed of every random stream (init, data order, views)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: str = opt("auto", "auto (bf16 on CUDA) | bf16 | fp16 | off")
    channels_last: bool | None = opt(None, "channels-last memory format (faster convolutions on CUDA; "
                                           "no gain on a CPU: benchmarks/step_modes.py; "
                                           "default: on with CUDA only)")
    compile: bool | None = opt(None, "torch.compile the method's forward (inductor; 1.5x faster steps on a "
                                     "2-core CPU, about 35 s to compile; needs a C++ compiler on a CPU; "
                                     "default: on for an image folder on a CPU, else off)")
    compile_views: str = opt("auto", "make the views with one fused torch.compile program: on | off | "
                                     "graphs (also a CUDA graph) | auto (on with CUDA or --compile)")
    sync_bn: bool = opt(False, "synchronised BN across processes (SimCLR; CUDA, --bn-splits 1)")
    threads: int | None = opt(None, "CPU threads for torch (default: torch's)")
    # monitoring and output
    knn_every: int = opt(0, "epochs between online kNN checks (0: only at the end)")
    diagnostics_every: int = opt(1, "epochs between logged diagnostics: alignment, uniformity, "
                                    "effective rank, collapse, queue consistency (0: never)")
    knn_k: int = opt(200, "neighbours k of the weighted kNN (InstDisc)")
    knn_t: float = opt(0.1, "temperature of the weighted kNN vote")
    knn_bank: int = opt(10000, "train images in the online kNN bank (0: all)")
    knn_queries: int = opt(2000, "test images for the online kNN (0: all)")
    log_every: int = opt(20, "steps between metric rows")
    checkpoint_every: int = opt(0, "steps between extra checkpoints (0: each epoch only)")
    out_dir: str = opt("runs", "folder that holds run directories")
    run_name: str | None = opt(None, "run directory name (default: method-data-time)")
    progress: bool = opt(True, "show a progress bar")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        d["crop_scale"] = None if self.crop_scale is None else list(self.crop_scale)
        return d


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # MoCo v1: linear 128-d head, τ = 0.07, v1 augmentation, step LR schedule.
    "mocov1": {"head_layers": 1, "temperature": 0.07, "augment": "mocov1", "lr_schedule": "step",
               "dim": 128, "key_momentum": 0.99, "momentum_schedule": "constant"},
    # MoCo v2: 2-layer MLP head, τ = 0.2, blur augmentation, cosine LR schedule.
    "mocov2": {"head_layers": 2, "temperature": 0.2, "augment": "mocov2", "lr_schedule": "cosine",
               "dim": 128, "key_momentum": 0.99, "momentum_schedule": "constant"},
    # MoCo v3 (ResNet): 3-layer projector with BN, 256-d, predictor, τ = 1.0, m = 0.99 ramped
    # to 1, BYOL's asymmetric augmentation, cosine LR.
    "mocov3": {"head_layers": 3, "dim": 256, "temperature": 1.0, "key_momentum": 0.99,
               "momentum_schedule": "cosine", "augment": "byol-view1,byol-view2", "lr_schedule": "cosine"},
    # SimCLR v1: 2-layer head with BN, 128-d, τ = 0.1 (ImageNet), SimCLR augmentation, cosine.
    "simclr": {"head_layers": 2, "dim": 128, "temperature": 0.1, "augment": "simclr", "lr_schedule": "cosine"},
    # SimCLR v2: the same with a 3-layer head.
    "simclr2": {"head_layers": 3, "dim": 128, "temperature": 0.1, "augment": "simclr", "lr_schedule": "cosine"},
    # BYOL: 2-layer projector and predictor with BN, 256-d, τ_base = 0.996 ramped to 1, the
    # asymmetric pair of augmentations, cosine LR.
    "byol": {"head_layers": 2, "dim": 256, "key_momentum": 0.996, "momentum_schedule": "cosine",
             "augment": "byol-view1,byol-view2", "lr_schedule": "cosine"},
    # SimSiam: 3-layer projector with BN, 2048-d, bottleneck predictor, MoCo v2 augmentation.
    "simsiam": {"head_layers": 3, "dim": 2048, "augment": "mocov2", "lr_schedule": "cosine"},
    # InstDisc: linear 128-d head, τ = 0.07, m = 4096 noise entries, λ = 0.5, NCE, the
    # augmentation MoCo v1 took from it, LR ×0.1 at epochs 120 and 160 of 200.
    "instdisc": {"head_layers": 1, "dim": 128, "temperature": 0.07, "nce_k": 4096,
                 "bank_momentum": 0.5, "loss": "nce", "augment": "mocov1", "lr_schedule": "step"},
    # InvaSpread: linear 128-d head, τ = 0.1, crop/jitter/grayscale/flip augmentation.
    "invaspread": {"head_layers": 1, "dim": 128, "temperature": 0.1, "augment": "mocov1",
                   "lr_schedule": "step"},
    # SwAV: 2-layer projector with BN to 128-d, 3000 prototypes, τ = 0.1, Sinkhorn ε = 0.05
    # with 3 iterations, 2×224 + 6×96 crops, prototypes frozen for 313 iterations, cosine LR.
    "swav": {"head_layers": 2, "dim": 128, "prototypes": 3000, "temperature": 0.1,
             "sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3, "num_local_crops": 6,
             "freeze_prototypes_niters": 313, "augment": "swav-global,swav-local", "lr_schedule": "cosine"},
    # DINO: 3-layer GELU head to a 256-d bottleneck, weight-normalised last layer to 65536,
    # student τ = 0.1, teacher τ 0.04 → 0.07 over the first 10% (30 of 300 epochs), center
    # momentum 0.9, teacher EMA 0.996 → 1 (cosine), 2 global + 8 local crops, cosine LR.
    "dino": {"head_layers": 3, "dim": 256, "prototypes": 65536, "temperature": 0.1,
             "teacher_temperature": 0.07, "warmup_teacher_temperature": 0.04,
             "teacher_temperature_warmup": 0.1, "center_momentum": 0.9, "key_momentum": 0.996,
             "momentum_schedule": "cosine", "num_local_crops": 8, "freeze_prototypes_niters": 0,
             "augment": "dino-global1,dino-global2,dino-local", "lr_schedule": "cosine"},
    # CPC v2 (sized for 28-32 px images): 8 px patches with stride 4 (a 6×6 grid on 28 px),
    # 128-channel context network of 2 causal residual blocks, K = 3 rows ahead, downwards,
    # raw dot products (τ = 1), each patch augmented on its own; the image view is only
    # cropped and flipped (``cpc`` recipe).
    "cpc": {"dim": 128, "head_layers": 1, "patch_size": 8, "patch_stride": 4, "prediction_steps": 3,
            "prediction_directions": "down", "context_blocks": 2, "temperature": 1.0,
            "augment": "cpc", "lr_schedule": "cosine"},
    # CMC (L ↔ ab): a linear 128-d head per view, τ = 0.07, K = 16384 bank entries, bank
    # momentum 0.5, softmax InfoNCE (the official code's later default), crop + flip only, step LR.
    "cmc": {"head_layers": 1, "dim": 128, "temperature": 0.07, "nce_k": 16384, "bank_momentum": 0.5,
            "loss": "softmax", "augment": "cmc", "lr_schedule": "step"},
}


def field_names() -> set[str]:
    return {f.name for f in fields(PretrainConfig)}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The options of a preset (a YAML file in ``mocolab/configs`` or a path)."""
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(
            f"preset {name!r} not found; available presets: {', '.join(list_presets())} "
            "(or pass a path to a YAML file)"
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"preset {path} must be a mapping of option: value")
    unknown = set(values) - field_names()
    if unknown:
        raise ConfigError(f"preset {path} has unknown options: {', '.join(sorted(unknown))}")
    return values


def build_config(preset: str | None = None, **overrides: Any) -> PretrainConfig:
    """Defaults, then the preset's values, then explicit overrides (``None`` = not given)."""
    values: dict[str, Any] = {}
    if preset:
        values.update(load_preset(preset))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - field_names()
    if unknown:
        raise ConfigError(f"unknown options: {', '.join(sorted(unknown))}")
    for key in ("lr_steps", "crop_scale"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return resolve(PretrainConfig(**values))


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fill the method's defaults into options left unset, then validate."""
    if cfg.method not in METHOD_DEFAULTS:
        raise ConfigError(f"--method {cfg.method!r} is not known; choose one of {', '.join(METHODS)}")
    updates = {k: v for k, v in METHOD_DEFAULTS[cfg.method].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **updates)
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
    _check(cfg.stem is None or cfg.stem in STEMS,
           f"--stem {cfg.stem!r} is not known; choose one of {', '.join(STEMS)}")
    _check_vit(cfg)
    _check(cfg.queue_size > 0, f"--queue-size must be a positive number of keys, got {cfg.queue_size}")
    _check(cfg.mochi_n >= 0 and cfg.mochi_s >= 0 and cfg.mochi_s_prime >= 0,
           "--mochi-n, --mochi-s and --mochi-s-prime must be >= 0 (0 turns MoCHi off)")
    _check(cfg.mochi_n == 0 or cfg.method in ("mocov1", "mocov2"),
           f"--mochi-n mixes queue keys: it needs --method mocov1 or mocov2, not {cfg.method}")
    _check(not cfg.symmetric or cfg.method in ("mocov1", "mocov2"),
           f"--symmetric is MoCo v1/v2's option (MoCo v3, BYOL, SimCLR are symmetric already), not {cfg.method}'s")
    _check(cfg.mochi_n <= cfg.queue_size,
           f"--mochi-n {cfg.mochi_n} exceeds --queue-size {cfg.queue_size}; lower it")
    _check(cfg.mochi_n > 0 or cfg.mochi_s + cfg.mochi_s_prime == 0,
           "--mochi-s / --mochi-s-prime need --mochi-n > 0 hard keys to mix")
    _check(cfg.key_momentum is None or 0.0 <= cfg.key_momentum <= 1.0,
           f"--key-momentum must be in [0, 1] (0.999 in the paper), got {cfg.key_momentum}")
    _check(cfg.momentum_schedule in (None, "constant", "cosine"),
           f"--momentum-schedule must be constant or cosine, got {cfg.momentum_schedule!r}")
    _check(cfg.temperature is None or cfg.temperature > 0,
           f"--temperature must be > 0 (0.2 for MoCo v2), got {cfg.temperature}")
    _check(cfg.width >= 4, f"--width must be at least 4, got {cfg.width}")
    _check(cfg.dim > 0, f"--dim must be positive, got {cfg.dim}")
    _check(cfg.head_layers in (1, 2, 3), f"--head-layers must be 1, 2 or 3, got {cfg.head_layers}")
    _check(cfg.batch_size > 1, f"--batch-size must be at least 2, got {cfg.batch_size}")
    _check(cfg.bn_splits >= 1, f"--bn-splits must be at least 1, got {cfg.bn_splits}")
    _check(cfg.batch_size % cfg.bn_splits == 0 or is_vit(cfg.arch),
           f"--batch-size {cfg.batch_size} must be divisible by --bn-splits {cfg.bn_splits} "
           "(each BN sub-batch gets the same number of images)")
    _check(cfg.batch_size // cfg.bn_splits >= 2 or cfg.bn_splits == 1 or is_vit(cfg.arch),
           f"--bn-splits {cfg.bn_splits} leaves fewer than 2 images per BN sub-batch at "
           f"--batch-size {cfg.batch_size}; lower --bn-splits")
    _check(cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}")
    _check(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    _check(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    _check(cfg.weight_decay_end is None or (cfg.weight_decay_end >= 0 and cfg.weight_decay > 0),
           f"--weight-decay-end {cfg.weight_decay_end} needs a value >= 0 and --weight-decay > 0 "
           "(the schedule's start)")
    _check(cfg.clip_grad >= 0, f"--clip-grad must be >= 0 (3.0 in DINO; 0: off), got {cfg.clip_grad}")
    _check(0 <= cfg.sgd_momentum < 1, f"--sgd-momentum must be in [0, 1), got {cfg.sgd_momentum}")
    _check(cfg.optimizer in ("sgd", "lars", "adamw"),
           f"--optimizer must be sgd, lars or adamw, got {cfg.optimizer!r}")
    _check(cfg.lars_eta > 0, f"--lars-eta must be > 0 (0.001 in SimCLR), got {cfg.lars_eta}")
    _check(cfg.lr_schedule in ("cosine", "step", "constant"),
           f"--lr-schedule must be cosine, step or constant, got {cfg.lr_schedule!r}")
    _check(all(0 < s < 1 for s in cfg.lr_steps), "--lr-steps must be fractions of training in (0, 1)")
    _check(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    _check(cfg.max_steps is None or cfg.max_steps > 0, f"--max-steps must be positive, got {cfg.max_steps}")
    _check(cfg.augment_backend in ("batched", "torchvision"),
           f"--augment-backend must be batched or torchvision, got {cfg.augment_backend!r}")
    _check(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _check(all(a.strip() in RECIPES for a in cfg.augment.split(",")),
           f"--augment {cfg.augment!r} is not known; choose one of {', '.join(RECIPES)} "
           "(or one per view, comma-separated)")
    _check(cfg.nce_k is None or cfg.nce_k > 0, f"--nce-k must be a positive number of entries, got {cfg.nce_k}")
    _check(cfg.bank_init in ("random", "encoder"), f"--bank-init must be random or encoder, got {cfg.bank_init!r}")
    _check(cfg.bank_momentum is None or 0.0 <= cfg.bank_momentum < 1.0,
           f"--bank-momentum must be in [0, 1) (0.5 in InstDisc), got {cfg.bank_momentum}")
    _check(cfg.loss in (None, "nce", "softmax"), f"--loss must be nce or softmax, got {cfg.loss!r}")
    _check(cfg.init is None or cfg.method != "cmc", "--init loads one ResNet, but cmc's backbone is "
           "two (the L and ab encoders); pretrain cmc without --init")
    _check(cfg.prototypes is None or cfg.prototypes > 0, f"--prototypes must be positive, got {cfg.prototypes}")
    _check(cfg.num_local_crops is None or cfg.num_local_crops >= 0,
           f"--num-local-crops must be >= 0, got {cfg.num_local_crops}")
    _check(cfg.sinkhorn_epsilon is None or cfg.sinkhorn_epsilon > 0,
           f"--sinkhorn-epsilon must be > 0 (0.05 in SwAV), got {cfg.sinkhorn_epsilon}")
    _check(cfg.sinkhorn_iterations is None or cfg.sinkhorn_iterations > 0,
           f"--sinkhorn-iterations must be positive (3 in SwAV), got {cfg.sinkhorn_iterations}")
    _check(not cfg.simclr2_memory or cfg.method == "simclr2",
           f"--simclr2-memory adds SimCLR v2's memory: it needs --method simclr2, not {cfg.method}")
    _check(cfg.swav_queue >= 0 and cfg.swav_queue_start_epoch >= 0,
           "--swav-queue and --swav-queue-start-epoch must be >= 0 (0: no queue / from the start)")
    _check(cfg.swav_queue == 0 or cfg.method == "swav",
           f"--swav-queue keeps SwAV features: it needs --method swav, not {cfg.method}")
    _check(cfg.freeze_prototypes_niters is None or cfg.freeze_prototypes_niters >= 0,
           f"--freeze-prototypes-niters must be >= 0, got {cfg.freeze_prototypes_niters}")
    for name in ("teacher_temperature", "warmup_teacher_temperature"):
        value = getattr(cfg, name)
        _check(value is None or value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")
    _check(cfg.teacher_temperature_warmup is None or 0 <= cfg.teacher_temperature_warmup < 1,
           f"--teacher-temperature-warmup is a fraction of training in [0, 1), got {cfg.teacher_temperature_warmup}")
    _check(cfg.center_momentum is None or 0 <= cfg.center_momentum < 1,
           f"--center-momentum must be in [0, 1) (0.9 in DINO), got {cfg.center_momentum}")
    _check(all(getattr(cfg, n) is None or getattr(cfg, n) > 0
               for n in ("patch_size", "patch_stride", "prediction_steps", "context_blocks")),
           "--patch-size, --patch-stride, --prediction-steps and --context-blocks must be positive")
    _check(cfg.prediction_directions is None or cfg.prediction_directions == "all" or
           all(d.strip() in ("down", "up", "left", "right") for d in cfg.prediction_directions.split(",")),
           f"--prediction-directions must be all or a comma-separated list of down, up, left, right, "
           f"got {cfg.prediction_directions!r}")
    _check(cfg.predictor_hidden_dim is None or cfg.predictor_hidden_dim > 0,
           f"--predictor-hidden-dim must be positive, got {cfg.predictor_hidden_dim}")
    _check(cfg.blur_p is None or 0 <= cfg.blur_p <= 1, f"--blur-p is a probability in [0, 1], got {cfg.blur_p}")
    _check(cfg.crop_scale is None or (len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1),
           f"--crop-scale takes two fractions 0 < MIN <= MAX <= 1, got {cfg.crop_scale}")
    _check(cfg.compile_views in ("auto", "on", "off", "graphs"),
           f"--compile-views must be auto, on, off or graphs, got {cfg.compile_views!r}")
    _check(cfg.amp in ("auto", "bf16", "fp16", "off"), f"--amp must be auto, bf16, fp16 or off, got {cfg.amp!r}")
    _check(cfg.knn_k > 0, f"--knn-k must be positive, got {cfg.knn_k}")
    _check(cfg.knn_t > 0, f"--knn-t must be > 0, got {cfg.knn_t}")
    _check(cfg.knn_every >= 0, f"--knn-every must be >= 0, got {cfg.knn_every}")
    _check(cfg.diagnostics_every >= 0, f"--diagnostics-every must be >= 0, got {cfg.diagnostics_every}")
    _check(cfg.log_every > 0, f"--log-every must be positive, got {cfg.log_every}")
    _check(cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}")
    _check(cfg.crop_size is None or cfg.crop_size >= 8, f"--crop-size must be at least 8, got {cfg.crop_size}")
    _check(cfg.image_size is None or cfg.image_size >= 8, f"--image-size must be at least 8, got {cfg.image_size}")
    _check(cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}")
    _check(cfg.threads is None or cfg.threads > 0, f"--threads must be positive, got {cfg.threads}")


def _check_vit(cfg: PretrainConfig) -> None:
    """The ViT options: valid values, and only with a ViT ``--arch``."""
    from .backbones import is_vit
    from .vit import POS_EMBEDS

    vit = is_vit(cfg.arch)
    _check(vit or not cfg.freeze_patch_embed,
           f"--freeze-patch-embed freezes a ViT's patch projection, but --arch {cfg.arch} is a "
           "ResNet; drop the flag or choose --arch vit_tiny, vit_small or vit_base")
    _check(vit or cfg.vit_heads is None,
           f"--vit-heads is a ViT option, but --arch {cfg.arch} is a ResNet; drop it or choose "
           "--arch vit_tiny, vit_small or vit_base")
    _check(cfg.vit_heads is None or cfg.vit_heads >= 1, f"--vit-heads must be positive, got {cfg.vit_heads}")
    _check(vit or cfg.vit_depth is None,
           f"--vit-depth is a ViT option, but --arch {cfg.arch} is a ResNet; drop it or choose "
           "--arch vit_tiny, vit_small or vit_base")
    _check(vit or cfg.patch_size is None or cfg.method == "cpc",
           f"--patch-size is a ViT (or CPC) option, but --arch {cfg.arch} is a ResNet; drop it or "
           "choose --arch vit_tiny, vit_small or vit_base")
    _check(not (vit and cfg.method in ("cpc", "cmc")),
           f"--method {cfg.method} builds on ResNets; choose --arch resnet18|34|50|101, not {cfg.arch}")
    _check(cfg.pos_embed in POS_EMBEDS,
           f"--pos-embed must be {' or '.join(POS_EMBEDS)}, got {cfg.pos_embed!r}")
    _check(cfg.vit_depth is None or cfg.vit_depth >= 1, f"--vit-depth must be positive, got {cfg.vit_depth}")
    _check(not vit or cfg.patch_size is None or cfg.patch_size < 1 or cfg.crop_size is None
           or cfg.crop_size % cfg.patch_size == 0,
           f"--patch-size {cfg.patch_size} does not divide --crop-size {cfg.crop_size}; pick a "
           f"divisor of {cfg.crop_size} or a crop size that is a multiple of {cfg.patch_size}")
