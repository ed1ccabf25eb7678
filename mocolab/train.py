"""The one training loop, for every method.

Read top to bottom: set up (data, views, method, optimiser, random stream), maybe restore a
checkpoint, then step: views → ``method(views)`` → backward → optimiser → ``on_step_end``.
The loop never asks which method it runs.

Reproducibility and resume: the data order of an epoch is a pure function of (seed, epoch),
the LR of a step a pure function of the step, and every other random number (augmentation,
shuffle-BN) comes from one generator whose state is in the checkpoint, so a run resumed from
a checkpoint at step s repeats exactly the steps an uninterrupted run would take after s. On a
GPU the views' parameters come from a second generator, on the host (also checkpointed): the
host then knows them without waiting for the GPU, and a step never synchronises the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from tqdm.auto import tqdm

from . import distributed
from .augment import ViewGenerator, recipe
from .augment.ops import to_device
from .augment.per_image import per_image_loader
from .backbones import default_stem, is_vit
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from .config import ConfigError, PretrainConfig, build_config, resolve
from .data import ImageDataset, load_dataset
from .data.prefetch import BatchPrefetcher
from .evaluate.diagnostics import training_diagnostics
from .evaluate.features import extract_features
from .evaluate.knn import knn_accuracy
from .methods import build_method
from .optim import build_optimizer, clip_gradients
from .schedules import cosine_weight_decay, learning_rate, scaled_lr
from .vit import VIT_SIZES, default_patch_size

METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


STOP_CHECK_EVERY = 20
"""Under torchrun, how often (in steps) the ranks agree on a Ctrl-C / SIGTERM when the step is
neither logged nor saved (those steps always check): one all-reduce then, instead of one per
step."""

VIEW_SEED = 7919  # the host generator of the views on a GPU starts at seed + VIEW_SEED
GPU_RESIDENT_BYTES = 4 * 2**30
"""Training images smaller than this (uint8 bytes) are copied to the GPU once and batches are
indexed there; larger ones stay in host memory and each batch is gathered on a background
thread into pinned memory and copied without blocking (:class:`BatchPrefetcher`)."""


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. A requested CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found" notice, which inductor's C++ builds log on a
    machine without CUDA (true, and not news to someone training on a CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def compile_works(device: torch.device, flag: str = "--compile") -> bool:
    """Whether ``torch.compile`` (inductor) can build and run a kernel on ``device`` here: on a
    CPU it needs a C++ compiler, on CUDA Triton. A tiny function is compiled to find out, so a
    missing toolchain costs a warning and eager speed, not a crash at the first step."""
    import warnings

    if device.type == "cpu":  # inductor's C++ build logs "No CUDA runtime is found": true, and noise
        logger = logging.getLogger("torch.utils.cpp_extension")
        if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
            logger.addFilter(_NoCudaRuntimeNotice())  # that line only; its other messages stay
    try:
        x = torch.ones(4, device=device)
        torch.testing.assert_close(torch.compile(lambda t: (t * 2).relu().sum())(x),
                                   torch.tensor(8.0, device=device))
        return True
    except Exception as e:  # inductor reports a missing compiler in many exception types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        off = "--no-compile" if flag == "--compile" else f"{flag.split()[0]} off"
        warnings.warn(f"{flag}: torch.compile does not work on this machine ({type(e).__name__}: "
                      f"{first}); training without it, slower. On a CPU it needs a C++ compiler "
                      f"(e.g. apt-get install g++); {off} hides this warning.", stacklevel=2)
        return False


def channel_stats(images: torch.Tensor, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, from up to ``max_images`` evenly spaced images."""
    step = max(1, images.shape[0] // max_images)
    x = images[::step].float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch: a pure function of (seed, epoch), so resume can skip to any step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def evaluation_splits(cfg: PretrainConfig | dict[str, Any]) -> tuple[ImageDataset, ImageDataset] | None:
    """The labelled (train, test) pair that kNN and linear evaluation use: the dataset's own
    test split when it has one; for a labelled folder without one, a fixed 90/10 split of it;
    ``None`` for unlabelled data."""
    from .data import has_split

    c = cfg if isinstance(cfg, dict) else asdict(cfg)
    kw = dict(root=c["data_root"], image_size=c["image_size"], num_workers=c["num_workers"])
    train = load_dataset(c["data"], "train", **kw)
    if train.labels is None:
        return None
    if has_split(c["data"], "test", root=c["data_root"]):
        return train, load_dataset(c["data"], "test", **kw)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    n_test = max(1, len(train) // 10)
    return train.subset(perm[n_test:]), train.subset(perm[:n_test])


def knn_eval(backbone: torch.nn.Module, train: ImageDataset, test: ImageDataset, *, size: int,
             mean: list[float], std: list[float], device: torch.device, k: int, t: float,
             progress: bool = False) -> dict[str, float]:
    """Weighted kNN (InstDisc) top-1/top-5 of ``test`` against ``train`` with frozen features."""
    kw = dict(size=size, mean=mean, std=std, device=device, progress=progress)
    bank = extract_features(backbone, train.images, desc="bank features", **kw)
    query = extract_features(backbone, test.images, desc="test features", **kw)
    return knn_accuracy(bank, train.labels, query, test.labels, len(train.classes or []) or
                        int(train.labels.max()) + 1, k=k, temperature=t)


class MetricsLog:
    """Metrics as JSON lines (``metrics.jsonl``) and TensorBoard scalars (``tb/``).

    On resume, rows after the checkpoint's step are dropped, so the log continues as if the run
    had never stopped.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / METRICS_NAME
        if resume_step is not None and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop after the current step (with a
    checkpoint); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        with contextlib.suppress(ValueError):  # signals only work in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def new_run_dir(cfg: PretrainConfig) -> Path:
    """Create the run directory (rank 0 picks the name, every rank gets the same path)."""
    name = cfg.run_name
    if name is None and distributed.is_main_process():
        elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        suffix = datetime.now().strftime("%Y%m%d-%H%M%S") if elastic_id == "none" else elastic_id[:12]
        name = f"{cfg.method}-{Path(cfg.data).name or 'data'}-{suffix}"
    run_dir = Path(cfg.out_dir) / distributed.broadcast_object(name)
    if distributed.is_main_process():
        if (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with `mocolab pretrain --resume {run_dir}` "
                "or choose another --run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return run_dir


def _restart_checkpoint(cfg: PretrainConfig) -> Path | None:
    """Under ``torchrun --max-restarts``, a restarted worker continues its run's last checkpoint."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    name = cfg.run_name
    elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if name is None and elastic_id != "none":
        name = f"{cfg.method}-{Path(cfg.data).name or 'data'}-{elastic_id[:12]}"
    if name and (Path(cfg.out_dir) / name / CHECKPOINT_NAME).exists():
        return Path(cfg.out_dir) / name
    return None


def _backbone_text(cfg: PretrainConfig, stem: str, crop: int) -> str:
    """The backbone in the run's first line: a ResNet's stem and width, a ViT's depth and
    patch side (a ViT has no stem or width)."""
    if not is_vit(cfg.arch):
        return f"{cfg.arch}/{stem} width {cfg.width}"
    depth = cfg.vit_depth or VIT_SIZES[cfg.arch][1]
    return f"{cfg.arch} ({depth} blocks, {cfg.patch_size or default_patch_size(crop)}-px patches)"


def _views_compile_mode(option: str, device: torch.device, compile_model: bool) -> bool | str:
    """``ViewGenerator``'s ``compile`` for ``--compile-views``: ``auto`` compiles on CUDA (where
    the eager pipeline's many small kernels cost the model time) and wherever the model is
    compiled too (``--compile``), when inductor works there."""
    if option == "off" or (option == "auto" and device.type != "cuda" and not compile_model):
        return False
    if not compile_works(device, "--compile-views " + option):
        return False
    return "reduce-overhead" if option == "graphs" else True


def _slice_views(view_generators: list[ViewGenerator], x: torch.Tensor, global_batch: int,
                 offset: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Views of this rank's images ``x``: the parameters are drawn for the whole global batch
    (the same stream on every rank) and this rank applies rows ``offset:offset+len(x)`` — so W
    processes make exactly the views one process makes for the global batch."""
    n, pin = x.shape[0], x.is_cuda and generator.device.type == "cpu"
    return [g.views_from_uniforms(x, g.draw_uniforms(global_batch, generator, pin_memory=pin)[offset:offset + n])
            for g in view_generators]


def pretrain(cfg: PretrainConfig | None = None, *, resume: str | Path | None = None,
             on_step: Callable[[int, dict[str, float]], None] | None = None,
             final_eval: bool = True) -> dict[str, Any]:
    """Pretrain a method; returns the results (run directory, steps, final kNN accuracy).

    Runs as one process, or as one of several under ``torchrun`` (DistributedDataParallel;
    ``batch_size`` is the global batch, split evenly over the processes; rank 0 logs, shows
    progress, checkpoints and evaluates).

    Args:
        cfg: the resolved configuration (ignored when resuming: the run's own is used).
        resume: a run directory (or checkpoint file) to continue from its last checkpoint.
        on_step: called after every step with ``(step, metrics)``; for callers that watch.
        final_eval: run the full kNN evaluation at the end when the data has labels.
    """
    ckpt = None
    if resume is None:
        cfg = resolve(cfg or PretrainConfig())
        resume = _restart_checkpoint(cfg)
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if "optimizer" not in ckpt:  # a backbone saved by `mocolab eval finetune --save`
            raise ConfigError(f"{resume} holds a saved backbone, not a pretraining run; it can be "
                              "evaluated but not resumed")
        cfg = build_config(**ckpt["config"])
    device = distributed.init_from_env(select_device(cfg.device))
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    if resume is not None:
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    else:
        run_dir = new_run_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # --bn-splits counts BN sub-batches of the global batch: each process computes its share,
    # so a configuration means the same on 1 or W processes (and a process is at least one).
    local_splits = max(1, cfg.bn_splits // world)
    if cfg.batch_size % world or (cfg.bn_splits > world and cfg.bn_splits % world):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} and --bn-splits {cfg.bn_splits} must be multiples of "
            f"the {world} processes (each process gets an equal share of both)")
    local_batch = cfg.batch_size // world

    # --- data and views ------------------------------------------------------------------
    train_set = load_dataset(cfg.data, "train", root=cfg.data_root, image_size=cfg.image_size,
                             num_workers=cfg.num_workers)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the dataset "
                          f"({len(train_set)} images in {train_set.name}); lower --batch-size")
    crop = cfg.crop_size or train_set.image_size[0]
    stem = cfg.stem or default_stem(crop)
    if ckpt is not None:
        mean, std = ckpt["info"]["mean"], ckpt["info"]["std"]
    else:
        mean, std = channel_stats(train_set.images)
    info = {"in_channels": train_set.channels, "stem": stem, "width": cfg.width, "crop_size": crop,
            "mean": mean, "std": std, "dataset": train_set.name, "num_images": len(train_set)}

    # --- method, optimiser, random stream --------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_method(dataclasses.replace(cfg, bn_splits=local_splits), train_set.channels,
                         stem, num_images=len(train_set), mean=mean, std=std,
                         image_size=crop).to(device)
    if cfg.init and ckpt is None:  # pretrained start; f_k becomes a copy of the new f_q
        from .weights import init_backbone

        init_backbone(model, cfg.init)
    if ckpt is None:  # a method's start from the data (InstDisc's --bank-init encoder)
        model.prepare(train_set.images, size=crop, mean=mean, std=std, device=device)
    view_configs = [recipe(name, crop, mean=mean, std=std) for name in model.view_recipes(cfg.augment)]
    overrides = {k: v for k, v in (("scale", None if cfg.crop_scale is None else tuple(cfg.crop_scale)),
                                   ("blur_p", cfg.blur_p)) if v is not None}  # --crop-scale, --blur-p
    view_configs = [dataclasses.replace(c, **overrides) for c in view_configs]
    views_compile = _views_compile_mode(cfg.compile_views, device, cfg.compile)
    view_generators = [ViewGenerator(c, compile=views_compile) for c in view_configs]
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size)  # linear scaling on the global batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, params, lr=peak_lr, momentum=cfg.sgd_momentum,
                                weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    decayed_groups = [g for g in optimizer.param_groups if g["weight_decay"] > 0]  # --weight-decay-end
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None,
                 "auto": torch.bfloat16 if device.type == "cuda" else None}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # same stream on every rank
    # the views' parameters are drawn on the host (see the module's docstring); on a CPU that
    # is the one generator
    view_rng = generator if device.type == "cpu" else torch.Generator().manual_seed(cfg.seed + VIEW_SEED)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        generator.set_state(ckpt["generator"].cpu())
        if view_rng is not generator and "view_generator" in ckpt:
            view_rng.set_state(ckpt["view_generator"].cpu())
        step = int(ckpt["step"])
    if cfg.sync_bn:
        if world == 1 or device.type != "cuda" or local_splits != 1:
            raise ConfigError("--sync-bn needs several CUDA processes (torchrun) and at most one "
                              "BN sub-batch per process (--bn-splits ≤ the number of processes)")
        model.query_encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.query_encoder)
    if cfg.compile and compile_works(device):
        model.compile()
    forward: torch.nn.Module = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- bookkeeping -----------------------------------------------------------------------
    n = len(train_set)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch, as MoCo does
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    log = None
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = MetricsLog(run_dir, resume_step=step if ckpt is not None else None)
    images = train_set.images
    if device.type == "cuda" and images.numel() < GPU_RESIDENT_BYTES:
        images = images.to(device)  # small datasets live on the GPU: no copies per step
    monitor = _KnnMonitor(cfg, crop, mean, std, device) if cfg.knn_every and main else None

    def save(step_: int) -> None:
        if main:
            state = {"format": "mocolab", "version": 1, "config": cfg.to_dict(), "info": info,
                     "step": step_, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                     "scaler": scaler.state_dict()}
            if view_rng is not generator:
                state["view_generator"] = view_rng.get_state()
            save_atomic(state, run_dir / CHECKPOINT_NAME)

    if main:
        print(f"mocolab: {cfg.method} on {train_set.name} ({n} images, {crop}px), "
              f"{_backbone_text(cfg, stem, crop)}, {total_steps} steps of {cfg.batch_size} on {device}"
              f"{f' × {world} processes' if world > 1 else ''}; run directory {run_dir}"
              f"{f' (resuming at step {step})' if ckpt is not None else ''}", flush=True)
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and main),
               dynamic_ncols=True, unit="step", desc="pretrain")
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    t_last, step_last, loss_ema = time.perf_counter(), step, None
    stopped_early = False
    model.train()
    with StopRequest() as stop:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            order = epoch_permutation(n, cfg.seed, epoch)  # the same on every rank
            shards = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # this rank's share
                      [rank * local_batch:(rank + 1) * local_batch]
                      for i in range(position, min(steps_per_epoch, position + total_steps - step))]
            per_image = prefetch = None
            if cfg.augment_backend == "batched" and images.device.type == "cpu":
                # gather the next batches on a background thread (pinned for a GPU's copies)
                prefetch = BatchPrefetcher(images, shards, pin=device.type == "cuda")
            if cfg.augment_backend == "torchvision":
                per_image = iter(per_image_loader(
                    train_set.images, view_configs, shards, cfg.workers,
                    seed=cfg.seed * 1_000_003 + epoch,
                    pin_memory=device.type == "cuda"))
            try:
                for i, idx in enumerate(shards, start=position):
                    if per_image is not None:  # the per-image pipeline, for comparison
                        views = [v.to(device, non_blocking=True) for v in next(per_image)]
                    else:
                        x = next(prefetch) if prefetch is not None else images[to_device(idx, images.device)]
                        x = x.to(device, non_blocking=True)
                        views = _slice_views(view_generators, x, cfg.batch_size, rank * local_batch,
                                             view_rng)
                    if cfg.channels_last:
                        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                    lr = learning_rate(step, total_steps, peak_lr, cfg.lr_schedule, warmup_steps,
                                       cfg.lr_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if cfg.weight_decay_end is not None:
                        wd = cosine_weight_decay(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
                        for group in decayed_groups:
                            group["weight_decay"] = wd
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = forward(views, generator, index=to_device(idx, device))
                    bad = ~torch.isfinite(out.loss.detach())
                    first_bad = torch.where(bad & ~nonfinite, torch.full_like(first_bad, step), first_bad)
                    nonfinite |= bad
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(out.loss).backward()
                    if cfg.clip_grad:
                        scaler.unscale_(optimizer)  # clip the true gradients (no-op without fp16)
                        clip_gradients(params, cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    extra = model.on_step_end(step, total_steps)
                    step += 1
                    bar.update(1)
                    end_of_epoch = i == steps_per_epoch - 1 or step == total_steps
                    must_log = step % cfg.log_every == 0 or end_of_epoch or on_step is not None
                    must_save = end_of_epoch or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                    # Every rank must agree to stop, at the cost of an all-reduce (a device
                    # sync) under DDP: asked at logged and saved steps (below) and otherwise
                    # every STOP_CHECK_EVERY steps, not at every step.
                    stop_now = (not (must_log or must_save)
                                and (world == 1 or step % STOP_CHECK_EVERY == 0)
                                and distributed.any_rank(stop.requested, device))
                    if must_log or must_save or stop_now:
                        if distributed.any_rank(nonfinite, device):
                            bar.close()
                            if log is not None:
                                log.close()
                            raise NonFiniteLossError(
                                f"the loss became non-finite at step {int(first_bad)} (lr {lr:.4g}); "
                                f"training stopped and the last good checkpoint in {run_dir} is kept. "
                                "Lower --lr, add --warmup-epochs, or use --amp off, then start again.")
                        metrics = {"loss": out.loss.detach(), **out.metrics}
                        metrics = {k: float(distributed.all_reduce_mean(v.float())) for k, v in metrics.items()}
                        loss_ema = metrics["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * metrics["loss"]
                        now = time.perf_counter()
                        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), **metrics,
                               "lr": lr, **extra,
                               "images_per_s": round((step - step_last) * cfg.batch_size
                                                     / max(now - t_last, 1e-9), 1)}
                        t_last, step_last = now, step
                        if log is not None and (step % cfg.log_every == 0 or end_of_epoch):
                            log.log(row)
                        bar.set_postfix(epoch=f"{row['epoch']:.2f}", loss=f"{loss_ema:.3f}",
                                        img_s=f"{row['images_per_s']:.0f}")
                        if on_step is not None:
                            on_step(step, row)
                        stop_now = distributed.any_rank(stop.requested, device)
                    if must_save or stop_now:
                        save(step)
                    if stop_now:
                        stopped_early = True
                        break
            finally:
                if prefetch is not None:
                    prefetch.close()
            if stopped_early:
                break
            if monitor is not None and (step // steps_per_epoch) % cfg.knn_every == 0:
                acc = monitor(model.backbone)
                if acc and log is not None:
                    log.log({"step": step, "epoch": round(step / steps_per_epoch, 4),
                             **{f"knn_{k}": v for k, v in acc.items()}})
                    bar.write(f"epoch {step // steps_per_epoch}: online kNN top-1 {acc['top1']:.2f}%")
            if main and cfg.diagnostics_every and (step // steps_per_epoch) % cfg.diagnostics_every == 0:
                diag = training_diagnostics(model, images, view_generators, size=crop, mean=mean,
                                            std=std, seed=cfg.seed)
                log.log({"step": step, "epoch": round(step / steps_per_epoch, 4), **diag})
            distributed.barrier()
    bar.close()

    results: dict[str, Any] = {"run_dir": str(run_dir), "step": step, "total_steps": total_steps}
    if stopped_early:
        if main:
            print(f"\nStopped at step {step} of {total_steps}; checkpoint saved. "
                  f"Continue with: mocolab pretrain --resume {run_dir}", flush=True)
            log.close()
        results["interrupted"] = True
        return results
    if main:
        if final_eval:
            splits = evaluation_splits(cfg)
            if splits is not None:
                acc = knn_eval(model.backbone, *splits, size=crop, mean=mean, std=std,
                               device=device, k=cfg.knn_k, t=cfg.knn_t, progress=cfg.progress)
                results["knn"] = {**acc, "k": cfg.knn_k, "t": cfg.knn_t,
                                  "train": len(splits[0]), "test": len(splits[1])}
                log.log({"step": step, "epoch": round(step / steps_per_epoch, 4),
                         **{f"knn_{k}": v for k, v in acc.items()}})
                print(f"kNN (k={cfg.knn_k}, τ={cfg.knn_t}) on {len(splits[1])} test images: "
                      f"top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%", flush=True)
        log.close()
        (run_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        print(f"Run directory: {run_dir}", flush=True)
    distributed.barrier()
    return results


class _KnnMonitor:
    """The online kNN check on a fixed subset of the evaluation splits."""

    def __init__(self, cfg: PretrainConfig, size: int, mean, std, device) -> None:
        self.splits = evaluation_splits(cfg)
        self.kw = dict(size=size, mean=mean, std=std, device=device, k=cfg.knn_k, t=cfg.knn_t)
        if self.splits is not None:
            train, test = self.splits
            g = torch.Generator().manual_seed(cfg.seed)
            if cfg.knn_bank and len(train) > cfg.knn_bank:
                train = train.subset(torch.randperm(len(train), generator=g)[:cfg.knn_bank])
            if cfg.knn_queries and len(test) > cfg.knn_queries:
                test = test.subset(torch.randperm(len(test), generator=g)[:cfg.knn_queries])
            self.splits = (train, test)

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
        if self.splits is None:
            return {}
        return knn_eval(backbone, *self.splits, **self.kw)
