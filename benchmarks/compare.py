"""Training speed side by side: mocolab against lightly 1.6 and the official MoCo code, on the
same network, views, batch, queue and precision, on one machine in one run.

Contenders (each in its own process, so that a failure, its memory and its DataLoader workers
stay its own; a contender that cannot run gets one line saying why and the others go on):

- ``mocolab``: its default path — :meth:`mocolab.train.Run.build` and :meth:`Run.batches`
  (the folder decoded once into its cache; views made batched on the GPU, or by the path
  ``--augment-backend auto`` picks on a CPU) and :func:`mocolab.train.train_step`, from the
  preset of the recipe (``mocov2-imagenet``: shuffle-BN emulated over 8 BN sub-batches,
  channels-last on CUDA).
- ``lightly``: the loop of lightly's MoCo v2 example (``examples/pytorch/moco.py``, lightly
  1.6): ``MoCoV2Transform`` in DataLoader workers (``LightlyDataset`` for a folder),
  ``MoCoProjectionHead``, ``NTXentLoss(memory_bank_size=(K, dim))`` (its bank on the training
  device, as the example's Lightning version has it), ``update_momentum`` of copies made
  with ``deactivate_requires_grad``, the key momentum on its ``cosine_schedule`` per epoch
  from the recipe's m to 1. The recipe's optimiser (SGD with momentum and weight
  decay, cosine LR per step) replaces the example's plain ``SGD(lr=0.06)``.
- ``official``: ``main_moco.py --aug-plus --mlp --cos`` of facebookresearch/moco (read at
  commit 132aea9): ``ImageFolder`` with ``TwoCropsTransform`` of its MoCo v2 augmentation,
  a ``DataLoader`` with workers and pinned memory, and its ``moco/builder.py`` step (query
  and key encoders with the MLP head, queue, ``loss.item()`` and the accuracy every step),
  written here; on one GPU without its batch shuffle (which needs several processes).
- ``solo-dali``: solo-learn's DALI pipeline (``solo/data/dali_dataloader.py``: JPEGs decoded
  and augmented on the GPU) feeding the ``official`` step, when solo-learn and NVIDIA DALI
  are installed; otherwise its row says "not installed" (as the ``lightly`` row does on a
  machine without lightly).

Every contender is measured by the same code: images/s over its timed steps; the data-wait
share, the part of that time the loop spent blocked in ``next()`` of its data iterator (the
device synchronised after each step, so waiting for the GPU is not counted as waiting for
data); images per CPU second, counting the training process and its DataLoader workers
(from ``/proc``: on a machine shared with other jobs, what their load changes least); peak
memory, the GPU memory allocated by torch (CUDA) or the training process's peak RSS (CPU; its
DataLoader workers not counted). Speed runs alternate the contenders in rounds (ABC ABC ABC,
``--rounds``), each segment starting with a few untimed steps that drain the batches its
workers made while the others ran. A training run of whole epochs leaves its first few steps
untimed (compiling, the workers starting); its wall time counts them. All loaders keep their
workers across epochs (``persistent_workers``).

Recipes:

- ``gpu`` (default; needs CUDA): ResNet-50, 224-px views, batch 256, queue 65,536, bf16
  autocast, cudnn.benchmark; ``--images`` JPEGs (default 5,000) made here from Fashion-MNIST
  garments (``--data-root``; random shapes when it is not found): colour-tinted, noised,
  longer side 256 px, aspect 0.6–1.8, JPEG quality 90, in 10 class folders. ``--budget-s``
  (default 480) bounds the whole run, the making of the JPEGs included.
- ``demo-cpu``: the demo's network and recipe (ResNet-18 width 16 with the compact stem,
  batch 128, queue 1024, τ 0.1, m 0.99, crops 0.3–1, lr 0.12 for 256) on Fashion-MNIST for
  ``--epochs`` (3), ``mocolab`` then ``lightly``, one after the other; then the kNN of each
  frozen backbone by mocolab's protocol (weighted kNN, k = 200, τ = 0.1, 60,000 train
  images against the 10,000 test images).
- ``--tiny``: the chosen recipe at a toy size (ResNet-18 width 8, batch 8: a few steps on 48
  JPEGs of 140 px, or 3 steps on Fashion-MNIST and a kNN on 256 of its images), a check that
  every contender still runs (CI).

Usage:
    python benchmarks/compare.py                          # on a GPU machine, about 8 minutes
    python benchmarks/compare.py --tiny                   # anywhere, under a minute
    python benchmarks/compare.py --recipe demo-cpu        # on a CPU, 3 epochs of each + kNN
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "@@compare "
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CONTENDERS = ("mocolab", "lightly", "official", "solo-dali")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every contender shares: network, views, batch, queue and the optimisation."""

    name: str
    data: str  # "jpegs" (a folder made here) or "fashion-mnist"
    preset: str  # mocolab's preset for its own row
    arch: str
    width: int
    stem: str
    size: int  # view side, px
    batch: int
    queue: int
    dim: int = 128
    temperature: float = 0.2
    key_momentum: float = 0.999
    lr: float = 0.03  # for a batch of 256 (linear scaling)
    weight_decay: float = 1e-4
    crop_min: float = 0.2
    epochs: int = 0  # > 0: train whole epochs one contender after the other, then kNN
    images: int = 5000  # JPEGs made for "jpegs"
    image_side: int = 256  # their longer side
    max_steps: int = 0  # > 0: stop each contender after this many steps (tiny)
    knn_subset: tuple[int, int] = (0, 0)  # (train, test) images for the kNN; 0: all
    contenders: tuple[str, ...] = CONTENDERS


RECIPES = {
    "gpu": Recipe(  # the papers' ImageNet setting (mocov2-imagenet; main_moco.py's defaults)
        name="gpu", data="jpegs", preset="mocov2-imagenet", arch="resnet50", width=64,
        stem="imagenet", size=224, batch=256, queue=65536,
    ),
    "demo-cpu": Recipe(  # the demo (mocov2-fashion-mnist) for 3 epochs
        name="demo-cpu", data="fashion-mnist", preset="mocov2-fashion-mnist", arch="resnet18",
        width=16, stem="compact", size=28, batch=128, queue=1024, temperature=0.1,
        key_momentum=0.99, lr=0.12, weight_decay=5e-4, crop_min=0.3, epochs=3,
        contenders=("mocolab", "lightly"),
    ),
}  # fmt: skip


def tiny(recipe: Recipe) -> Recipe:
    """``recipe`` at a toy size: every contender runs a few steps."""
    small = dict(
        arch="resnet18",
        width=8,
        stem="compact",
        batch=8,
        queue=32,
        images=48,
        image_side=140,  # from 128 px: the whole-image cache, as the gpu recipe
        size=32 if recipe.data == "jpegs" else recipe.size,
    )
    if recipe.epochs:
        small.update(max_steps=3, knn_subset=(256, 64), epochs=1)
    return dataclasses.replace(recipe, name=f"{recipe.name} (tiny)", **small)


# --- data ----------------------------------------------------------------------------------------


def gray_items(n: int, data_root: str | None) -> tuple[Any, str]:
    """Up to ``n`` gray 28-px items to draw JPEGs from, and what they are: Fashion-MNIST's
    training garments, or random ellipses when the dataset is not found."""
    import numpy as np

    from mocolab.data import load_dataset
    from mocolab.errors import DatasetError

    try:
        images = load_dataset("fashion-mnist", "train", root=data_root, download=False).images
        return images[: min(n, len(images)), 0].numpy(), "Fashion-MNIST garments"
    except DatasetError:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:28, :28]
        out = np.zeros((min(n, 1000), 28, 28), np.uint8)
        for item in out:
            cy, cx, ry, rx = (
                rng.uniform(8, 20),
                rng.uniform(8, 20),
                rng.uniform(3, 12),
                rng.uniform(3, 12),
            )
            item[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(80, 256)
        return out, "random ellipses (Fashion-MNIST not found)"


def make_folder(root: Path, recipe: Recipe, data_root: str | None) -> str:
    """The JPEG folder of ``recipe`` under ``root`` (made once); returns what it holds."""
    from data_path import make_jpegs  # the JPEGs of benchmarks/data_path.py

    items, what = gray_items(recipe.images, data_root)
    done = root.with_name(root.name + ".done")  # beside the folder: the loaders see no stray file
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_jpegs(
            root, recipe.images, long_side=(recipe.image_side, recipe.image_side + 1), items=items
        )
        done.write_text(f"{recipe.images}\n")
    return f"{recipe.images} JPEGs of {what}, longer side {recipe.image_side} px"


# --- the contenders (in the child process) ------------------------------------------------------


@dataclasses.dataclass
class Contender:
    """A built contender: its batches, one training step, its backbone."""

    batches: Iterator[Any]  # endless: epoch after epoch
    step: Callable[[Any], None]
    backbone: Any
    warmup: int  # untimed steps at the start of a segment (the workers' prefetched batches;
    # of a training run: the compilation, the workers starting)
    steps_per_epoch: int


def _epochs(make: Callable[[int], Any], on_epoch: Callable[[int], None] | None = None) -> Iterator:
    """The batches of epoch 0, 1, 2, ... from ``make(epoch)`` (an iterable of one epoch).

    Raises:
        RuntimeError: an epoch without a batch (fewer images than a batch, or a run whose
            steps are spent), rather than looping for ever.
    """
    epoch = 0
    while True:
        if on_epoch is not None:
            on_epoch(epoch)
        it = iter(make(epoch))
        batches = 0
        try:
            for batch in it:
                batches += 1
                yield batch
        finally:
            if hasattr(it, "close"):  # a generator stopped early (mocolab's: its prefetcher)
                it.close()
        if not batches:
            raise RuntimeError(
                f"epoch {epoch} gave no batch: fewer images than a batch, or the run's steps "
                "are spent"
            )
        epoch += 1


def _autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _backbone(recipe: Recipe, channels: int):
    """The recipe's network, built by mocolab for every contender (the same layers)."""
    from mocolab.backbones import resnet

    return resnet(recipe.arch, channels, recipe.stem, width=recipe.width)


def _total_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    return recipe.max_steps or (recipe.epochs or 1000) * steps_per_epoch


def build_mocolab(spec: dict[str, Any], device) -> Contender:
    from mocolab.config import build_config
    from mocolab.train import Run, train_step

    recipe = Recipe(**spec["recipe"])
    fmnist = recipe.data == "fashion-mnist"
    cfg = build_config(
        recipe.preset,
        data="fashion-mnist" if fmnist else spec["folder"],
        data_root=spec["data_root"],
        image_size=None if fmnist else max(recipe.image_side, recipe.size),
        crop_size=recipe.size,
        arch=recipe.arch,
        width=recipe.width,
        stem=recipe.stem,
        batch_size=recipe.batch,
        queue_size=recipe.queue,
        dim=recipe.dim,
        temperature=recipe.temperature,
        key_momentum=recipe.key_momentum,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        crop_scale=(recipe.crop_min, 1.0),
        epochs=recipe.epochs or 1000,
        max_steps=recipe.max_steps or None,
        amp="bf16" if device.type == "cuda" else "off",
        device=str(device),
        num_workers=spec["workers"],
        workers=spec["workers"],
        compile=False if "tiny" in recipe.name else None,
        bn_splits=2 if "tiny" in recipe.name else None,  # the preset's (8 or 4) otherwise
        out_dir=spec["work"],
        run_name=f"mocolab-{os.getpid()}",
        progress=False,
        logger="none",
        knn_every=0,
        diagnostics_every=0,
    )
    run = Run.build(cfg, None, None)
    if run.view_path:
        print(run.view_path, flush=True)

    def step(batch: tuple) -> None:
        train_step(run, *batch)

    warmup = 3 if run.cfg.augment_backend == "batched" else 4 * run.cfg.workers + 2
    return Contender(
        _epochs(lambda e: run.batches(e, 0)), step, run.model.backbone, warmup, run.steps_per_epoch
    )


class _PILImages:
    """In-memory uint8 images given to a transform as PIL images, with their labels (what a
    torchvision dataset such as ``FashionMNIST(transform=...)`` returns)."""

    def __init__(self, images, labels, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from mocolab.augment.per_image import to_pil

        return self.transform(to_pil(self.images[i])), int(self.labels[i])


def _loader(dataset, recipe: Recipe, workers: int, device, **kw):
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=recipe.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        **kw,
    )


def _normalisation(recipe: Recipe, spec: dict[str, Any]) -> tuple[list[float], list[float]]:
    return (
        (spec["mean"], spec["std"])
        if recipe.data == "fashion-mnist"
        else (IMAGENET_MEAN, IMAGENET_STD)
    )


def build_lightly(spec: dict[str, Any], device) -> Contender:
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.moco_transform import MoCoV2Transform
    from lightly.utils.scheduler import cosine_schedule
    from torch import nn

    from mocolab.schedules import learning_rate, scaled_lr

    recipe = Recipe(**spec["recipe"])

    class MoCo(nn.Module):  # lightly's examples/pytorch/moco.py
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            features = backbone.num_features
            self.projection_head = MoCoProjectionHead(features, features, recipe.dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x):
            key = self.backbone_momentum(x).flatten(start_dim=1)
            return self.projection_head_momentum(key).detach()

    mean, std = _normalisation(recipe, spec)
    transform = MoCoV2Transform(
        input_size=recipe.size, min_scale=recipe.crop_min, normalize={"mean": mean, "std": std}
    )
    if recipe.data == "fashion-mnist":
        from mocolab.data import load_dataset

        train = load_dataset("fashion-mnist", "train", root=spec["data_root"])
        dataset, channels = _PILImages(train.images, train.labels, transform), 1
    else:
        from lightly.data import LightlyDataset

        dataset, channels = LightlyDataset(spec["folder"], transform=transform), 3
    loader = _loader(dataset, recipe, spec["workers"], device)
    model = MoCo(_backbone(recipe, channels)).to(device)
    criterion = NTXentLoss(  # its memory bank on the device, as in lightly's Lightning example
        temperature=recipe.temperature, memory_bank_size=(recipe.queue, recipe.dim)
    ).to(device)  # (the plain loop leaves it on the CPU: a 32 MiB copy each step on a GPU)
    peak = scaled_lr(recipe.lr, recipe.batch)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=peak, momentum=0.9, weight_decay=recipe.weight_decay
    )
    total = _total_steps(recipe, len(loader))
    epochs = math.ceil(total / len(loader))
    state = {"momentum": recipe.key_momentum, "step": 0}

    def on_epoch(epoch: int) -> None:  # the example's schedule, once per epoch
        state["momentum"] = cosine_schedule(epoch, epochs, recipe.key_momentum, 1)

    def step(batch) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"], total, peak)
        x_query, x_key = batch[0]
        update_momentum(model.backbone, model.backbone_momentum, m=state["momentum"])
        update_momentum(model.projection_head, model.projection_head_momentum, m=state["momentum"])
        x_query = x_query.to(device, non_blocking=True)
        x_key = x_key.to(device, non_blocking=True)
        with _autocast(device):
            query = model(x_query)
            key = model.forward_momentum(x_key)
            loss = criterion(query, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state["step"] += 1

    return Contender(
        _epochs(lambda e: loader, on_epoch),
        step,
        model.backbone,
        2 * spec["workers"] + 2,
        len(loader),
    )


def _official_model(recipe: Recipe, device):
    import torch
    from torch import nn

    class MoCo(nn.Module):  # moco/builder.py with mlp=True, written for one process
        def __init__(self) -> None:
            super().__init__()
            self.K, self.m, self.T = recipe.queue, recipe.key_momentum, recipe.temperature

            def encoder() -> nn.Module:  # base_encoder(num_classes=dim) with the MLP head
                backbone = _backbone(recipe, 3)
                d = backbone.num_features
                return nn.Sequential(backbone, nn.Linear(d, d), nn.ReLU(), nn.Linear(d, recipe.dim))

            self.encoder_q, self.encoder_k = encoder(), encoder()
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data.copy_(param_q.data)
                param_k.requires_grad = False
            self.register_buffer(
                "queue", nn.functional.normalize(torch.randn(recipe.dim, self.K), dim=0)
            )
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        @torch.no_grad()
        def _momentum_update_key_encoder(self) -> None:
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

        @torch.no_grad()
        def _dequeue_and_enqueue(self, keys) -> None:
            batch_size = keys.shape[0]
            ptr = int(self.queue_ptr)
            assert self.K % batch_size == 0  # for simplicity (as the official code)
            self.queue[:, ptr : ptr + batch_size] = keys.T
            self.queue_ptr[0] = (ptr + batch_size) % self.K

        def forward(self, im_q, im_k):
            q = nn.functional.normalize(self.encoder_q(im_q), dim=1)  # N×C
            with torch.no_grad():
                self._momentum_update_key_encoder()
                k = nn.functional.normalize(self.encoder_k(im_k), dim=1)  # N×C
            l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # N×1
            l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # N×K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N×(1+K)
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            self._dequeue_and_enqueue(k)
            return logits, labels

    return MoCo().to(device)


def _official_step(recipe: Recipe, device, steps_per_epoch: int, views: Callable[[Any], tuple]):
    """The official ``train()`` step on the views ``views(batch)`` gives; returns the step and
    the model."""
    import torch

    from mocolab.schedules import learning_rate, scaled_lr

    model = _official_model(recipe, device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    peak = scaled_lr(recipe.lr, recipe.batch)
    optimizer = torch.optim.SGD(
        model.parameters(), peak, momentum=0.9, weight_decay=recipe.weight_decay
    )
    total = _total_steps(recipe, steps_per_epoch)
    state = {"step": 0, "loss": 0.0}

    def step(batch) -> None:
        for group in optimizer.param_groups:  # --cos (per step here)
            group["lr"] = learning_rate(state["step"], total, peak)
        im_q, im_k = views(batch)
        with _autocast(device):
            output, target = model(im_q=im_q, im_k=im_k)
            loss = criterion(output, target)
        _, pred = output.topk(5, 1, True, True)  # acc1/acc5 of the (K+1)-way contrast
        correct = pred.t().eq(target.view(1, -1))
        state["acc"] = [correct[:k].reshape(-1).float().sum(0) for k in (1, 5)]
        state["loss"] = loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] += 1

    return step, model


def build_official(spec: dict[str, Any], device) -> Contender:
    import torchvision.transforms as transforms
    from data_path import GaussianBlur, TwoCropsTransform  # moco/loader.py
    from torchvision.datasets import ImageFolder

    recipe = Recipe(**spec["recipe"])
    if recipe.data != "jpegs":
        raise RuntimeError("not applicable: the official data path reads an image folder")
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    augmentation = [  # main_moco.py --aug-plus
        transforms.RandomResizedCrop(recipe.size, scale=(recipe.crop_min, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]
    dataset = ImageFolder(spec["folder"], TwoCropsTransform(transforms.Compose(augmentation)))
    loader = _loader(dataset, recipe, spec["workers"], device)

    def views(batch) -> tuple:
        images, _ = batch
        return (images[0].to(device, non_blocking=True), images[1].to(device, non_blocking=True))

    step, model = _official_step(recipe, device, len(loader), views)
    return Contender(
        _epochs(lambda e: loader), step, model.encoder_q[0], 2 * spec["workers"] + 2, len(loader)
    )


PACKAGES = {
    "lightly": (("lightly", "lightly"),),
    "solo-dali": (("solo", "solo-learn"), ("nvidia.dali", "nvidia-dali")),
}
"""The modules each contender imports beyond torch and torchvision: (module, package)."""


def not_installed(name: str) -> str | None:
    """Why contender ``name`` cannot run here (``"not installed (lightly)"``), or ``None``: a
    machine without one of these packages still measures the others."""
    missing = []
    for module, package in PACKAGES.get(name, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            missing.append(package)
    return f"not installed ({', '.join(missing)})" if missing else None


def build_solo_dali(spec: dict[str, Any], device) -> Contender:
    import omegaconf
    from nvidia.dali.plugin.pytorch import LastBatchPolicy
    from solo.data.dali_dataloader import (
        PretrainPipelineBuilder,
        PretrainWrapper,
        build_transform_pipeline_dali,
    )
    from solo.data.pretrain_dataloader import FullTransformPipeline, NCropAugmentation

    recipe = Recipe(**spec["recipe"])
    if device.type != "cuda" or recipe.data != "jpegs":
        raise RuntimeError("not applicable: solo-learn's DALI pipeline decodes JPEGs on a GPU")
    aug = omegaconf.OmegaConf.create(
        {  # MoCo v2's augmentation in solo-learn's terms
            "crop_size": recipe.size,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "num_crops": 2,
            "rrc": {"enabled": True, "crop_min_scale": recipe.crop_min, "crop_max_scale": 1.0},
            "color_jitter": {
                "prob": 0.8,
                "brightness": 0.4,
                "contrast": 0.4,
                "saturation": 0.4,
                "hue": 0.1,
            },
            "grayscale": {"prob": 0.2},
            "gaussian_blur": {"prob": 0.5},
            "solarization": {"prob": 0.0},
            "equalization": {"prob": 0.0},
            "horizontal_flip": {"prob": 0.5},
        }
    )
    transform = FullTransformPipeline(
        [NCropAugmentation(build_transform_pipeline_dali("custom", aug, dali_device="gpu"), 2)]
    )
    builder = PretrainPipelineBuilder(
        spec["folder"],
        batch_size=recipe.batch,
        device="gpu",
        transforms=transform,
        num_threads=spec["workers"],
    )
    pipeline = builder.pipeline(
        batch_size=recipe.batch,
        num_threads=spec["workers"],
        device_id=device.index or 0,
        seed=builder.seed,
    )
    pipeline.build()
    loader = PretrainWrapper(
        model_batch_size=recipe.batch,
        model_rank=0,
        model_device=device,
        dataset_size=pipeline.epoch_size("Reader"),
        pipelines=pipeline,
        output_map=["large0", "large1", "label"],
        reader_name="Reader",
        last_batch_policy=LastBatchPolicy.DROP,
        auto_reset=True,
    )

    def views(batch) -> tuple:
        _, (x1, x2), _ = batch
        return x1, x2

    step, model = _official_step(recipe, device, len(loader), views)
    return Contender(_epochs(lambda e: loader), step, model.encoder_q[0], 4, len(loader))


BUILDERS = {
    "mocolab": build_mocolab,
    "lightly": build_lightly,
    "official": build_official,
    "solo-dali": build_solo_dali,
}


# --- measuring (in the child process) ----------------------------------------------------------


def cpu_seconds() -> dict[int, float]:
    """CPU seconds used so far by this process (``0``) and each of its child processes (the
    DataLoader workers) by process id, from ``/proc`` (empty where there is none)."""
    used = {0: time.process_time()}
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == me:  # ppid
            used[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return used


def timed_steps(c: Contender, device, *, steps: int = 0, seconds: float = 0.0) -> dict[str, float]:
    """Run ``steps`` steps (or steps for ``seconds``) of ``c``: images, seconds, seconds blocked
    in ``next()`` of its batches, CPU seconds of its process and workers. The device is
    synchronised after every step."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before = cpu_seconds()
    n, wait, start = 0, 0.0, time.perf_counter()
    while (n < steps) if steps else (n < 2 or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        batch = next(c.batches)
        wait += time.perf_counter() - t
        c.step(batch)
        sync()
        n += 1
    elapsed = time.perf_counter() - start
    cpu = sum(v - before.get(pid, 0.0) for pid, v in cpu_seconds().items())
    return {"steps": n, "seconds": elapsed, "wait": wait, "cpu_s": cpu}


def peak_memory(device) -> float:
    """MiB: GPU memory allocated by torch at its peak (CUDA), else the peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def knn(c: Contender, spec: dict[str, Any], device) -> float:
    """Top-1 % of mocolab's weighted kNN on the frozen backbone of ``c``."""
    import torch

    from mocolab.data import load_dataset
    from mocolab.train import knn_eval

    recipe = Recipe(**spec["recipe"])
    train = load_dataset("fashion-mnist", "train", root=spec["data_root"])
    test = load_dataset("fashion-mnist", "test", root=spec["data_root"])
    n_train, n_test = recipe.knn_subset
    if n_train:
        train, test = train.subset(torch.arange(n_train)), test.subset(torch.arange(n_test))
    with torch.no_grad():
        acc = knn_eval(
            c.backbone,
            train,
            test,
            size=recipe.size,
            mean=spec["mean"],
            std=spec["std"],
            device=device,
            k=min(200, len(train)),
            t=0.1,
        )
    return acc["top1"]


def child(name: str, spec: dict[str, Any]) -> int:
    """Build contender ``name``, then answer the parent's commands (one JSON line each)."""
    import torch

    def say(**message: Any) -> None:
        print(PREFIX + json.dumps(message), flush=True)

    try:
        device = torch.device(spec["device"])
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        t = time.perf_counter()
        contender = BUILDERS[name](spec, device)
        say(
            event="ready",
            build_s=time.perf_counter() - t,
            steps_per_epoch=contender.steps_per_epoch,
        )
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "segment":
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                timed_steps(contender, device, steps=contender.warmup)  # drain the prefetch
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                out = timed_steps(contender, device, seconds=cmd["seconds"])
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the others' turn: give the memory back
            elif cmd["cmd"] == "train":  # the first steps (compiling, workers starting) untimed
                steps = cmd["steps"]
                first = contender.warmup if steps > 4 * contender.warmup else 0
                if first:
                    timed_steps(contender, device, steps=first)
                out = {**timed_steps(contender, device, steps=steps - first), "untimed": first}
            elif cmd["cmd"] == "knn":
                out = {"knn_top1": knn(contender, spec, device)}
            out["peak_mib"] = peak_memory(device)
            say(event="done", **out)
    except Exception as e:  # one line for the parent's table; the traceback in the log
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        say(event="error", error=f"{type(e).__name__}: {first}" if first else type(e).__name__)
        return 1
    return 0


# --- the parent: start, alternate, report -------------------------------------------------------


class Child:
    """One contender's process and its messages."""

    def __init__(self, name: str, spec: dict[str, Any], log: Path) -> None:
        self.name, self.error, self.results = name, None, []
        self.build_s, self.started = None, time.perf_counter()
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]
            ),
            PYTHONUNBUFFERED="1",
            MOCOLAB_DATA=str(Path(spec["work"]) / "mocolab-data"),
        )
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                name,
                "--spec",
                json.dumps(spec),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.messages: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.messages.put(json.loads(line[len(PREFIX) :]))
            else:
                self.log.write(line)
                self.tail = [*self.tail, line.rstrip()][-20:]
        self.messages.put(None)  # the process ended

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or ``None`` after marking the child failed."""
        if self.error:
            return None
        try:
            message = self.messages.get(timeout=max(1.0, timeout))
        except queue.Empty:
            self.fail(f"no answer in {timeout:.0f} s")
            return None
        if message is None:
            self.proc.wait()
            last = next((t for t in reversed(self.tail) if t.strip()), "")
            self.fail(f"exited with code {self.proc.returncode}: {last[:200]}")
            return None
        if message["event"] == "error":
            self.fail(message["error"])
            return None
        return message

    def send(self, **cmd: Any) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError) as e:
            self.fail(f"lost its process ({e})")
            return False

    def fail(self, why: str) -> None:
        self.error = self.error or why
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send(cmd="quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: it and its workers
                self.proc.wait()
        self.log.close()


def summary(child: Child, recipe: Recipe) -> dict[str, Any]:
    """The row of one contender: images/s, data-wait share, peak memory (and kNN, wall time)."""
    row: dict[str, Any] = {"contender": child.name, "error": child.error}
    timed = [r for r in child.results if "steps" in r]
    if timed:
        seconds = sum(r["seconds"] for r in timed)
        row["images_per_s"] = sum(r["steps"] for r in timed) * recipe.batch / seconds
        row["wait_share"] = sum(r["wait"] for r in timed) / seconds
        row["segments"] = [r["steps"] * recipe.batch / r["seconds"] for r in timed]
        row["steps"] = sum(r["steps"] for r in timed)
        row["cpu_s"] = sum(r["cpu_s"] for r in timed)
        row["images_per_cpu_s"] = row["steps"] * recipe.batch / max(row["cpu_s"], 1e-9)
    peaks = [r["peak_mib"] for r in child.results]
    if peaks:
        row["peak_mib"] = max(peaks)
    row["build_s"] = child.build_s
    for r in child.results:
        if "knn_top1" in r:
            row["knn_top1"] = r["knn_top1"]
        if "wall_s" in r:
            row["wall_s"] = r["wall_s"]
    return row


def run_speed(children: list[Child], recipe: Recipe, args, deadline: float) -> None:
    """Alternate the ready children in ``args.rounds`` rounds within ``deadline``: each timed
    segment as long as the time left allows, after what its untimed start (draining the
    prefetched batches; the first one also compiles and tunes) took in the rounds before."""
    overhead = 0.0  # the longest untimed part of a segment so far
    for r in range(args.rounds):
        for i, c in enumerate(c for c in children if not c.error):
            live = [c for c in children if not c.error]
            segments_left = (args.rounds - r) * len(live) - i
            share = (deadline - time.perf_counter()) / segments_left - overhead
            seconds = args.segment_s or share * (0.5 if r == 0 else 0.9)
            if not args.segment_s and seconds < 1.0:
                print(f"  the budget is spent: stopping before round {r + 1} of {c.name}")
                return
            t = time.perf_counter()
            if c.send(cmd="segment", seconds=seconds):
                done = c.wait(timeout=seconds * 4 + 600)
                if done is not None:
                    c.results.append(done)
                    overhead = max(overhead, time.perf_counter() - t - done["seconds"])
                    print(
                        f"  round {r + 1}: {c.name} "
                        f"{done['steps'] * recipe.batch / done['seconds']:.1f} images/s, "
                        f"waiting for data {done['wait'] / done['seconds']:.0%}",
                        flush=True,
                    )


def run_epochs(children_spec: list[tuple[str, dict]], recipe: Recipe, work: Path) -> list[Child]:
    """Each contender in turn: build, train the recipe's steps, kNN."""
    done = []
    for name, spec in children_spec:
        c = Child(name, spec, work / f"{name}.log")
        ready = c.wait(timeout=3600)
        if ready is not None:
            c.build_s = ready["build_s"]
            steps = recipe.max_steps or recipe.epochs * ready["steps_per_epoch"]
            print(f"  {name}: built in {c.build_s:.0f} s; training {steps} steps", flush=True)
            if c.send(cmd="train", steps=steps):
                trained = c.wait(timeout=24 * 3600)
                if trained is not None:
                    trained["wall_s"] = time.perf_counter() - c.started
                    c.results.append(trained)
                    if c.send(cmd="knn"):
                        scored = c.wait(timeout=3600)
                        if scored is not None:
                            c.results.append(scored)
        c.stop()
        done.append(c)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=list(RECIPES), default="gpu")
    p.add_argument("--tiny", action="store_true", help="a toy size: every contender, a few steps")
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        help="default: the recipe's (gpu: all four; demo-cpu: mocolab lightly)",
    )
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="speed runs: the whole run's wall-clock budget",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="speed runs: rounds of alternation (default 3; --tiny 2)",
    )
    p.add_argument(
        "--segment-s",
        type=float,
        default=0.0,
        help="speed runs: timed seconds per segment (default: from the budget)",
    )
    p.add_argument("--images", type=int, default=None, help="JPEGs to make (gpu: 5000)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--queue", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="demo-cpu: epochs of each")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="demo-cpu: stop each contender after this many steps (a short check of the recipe)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of every contender (default: the cores, at most 16)",
    )
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is found")
    p.add_argument("--work", default=None, help="keep the JPEGs and runs in this folder")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
        return child(args.child, json.loads(args.spec))

    start = time.perf_counter()
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    args.rounds = args.rounds or (2 if args.tiny else 3)
    if args.tiny and not args.segment_s:
        args.segment_s = 0.5
    import torch

    recipe = RECIPES[args.recipe]
    recipe = tiny(recipe) if args.tiny else recipe
    overrides = {
        k: v
        for k, v in (
            ("images", args.images),
            ("batch", args.batch),
            ("queue", args.queue),
            ("epochs", args.epochs),
            ("max_steps", args.max_steps),
        )
        if v
    }
    recipe = dataclasses.replace(recipe, **overrides)
    if args.contenders:
        recipe = dataclasses.replace(recipe, contenders=tuple(args.contenders))
    if args.max_steps and not recipe.epochs:
        print(
            "compare: --max-steps is for --recipe demo-cpu (the gpu recipe runs on --budget-s)",
            file=sys.stderr,
        )
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("compare: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    if recipe.name == "gpu" and not device.startswith("cuda"):
        print(
            "compare: the gpu recipe needs a CUDA device (ResNet-50 at 224 px); on a CPU run "
            "--tiny, or --recipe demo-cpu",
            file=sys.stderr,
        )
        return 2
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="mocolab-compare-"))
    work.mkdir(parents=True, exist_ok=True)

    spec: dict[str, Any] = {
        "recipe": dataclasses.asdict(recipe),
        "device": device,
        "workers": workers,
        "data_root": args.data_root,
        "work": str(work),
    }
    data_text = "Fashion-MNIST, 60,000 training images"
    if recipe.data == "jpegs":
        spec["folder"] = str(work / "jpegs")
        data_text = make_folder(work / "jpegs", recipe, args.data_root)
        print(f"data: {data_text} ({time.perf_counter() - start:.0f} s)", flush=True)
    else:
        from mocolab.data import load_dataset
        from mocolab.train import channel_stats

        train = load_dataset("fashion-mnist", "train", root=args.data_root)
        spec["mean"], spec["std"] = channel_stats(train.images)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"{platform.machine()}, {os.cpu_count()} cores, no GPU"
    )
    header = (
        f"{when}; {machine}; torch {torch.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the start; recipe {recipe.name}: {recipe.arch} width "
        f"{recipe.width} ({recipe.stem} stem), {recipe.size}-px views, batch {recipe.batch}, "
        f"queue {recipe.queue}, {'bf16' if device.startswith('cuda') else 'fp32'}, "
        f"{workers} DataLoader workers; {data_text}"
    )
    print(header, flush=True)

    skipped: dict[str, str] = {}
    runnable = []
    for name in recipe.contenders:
        why = not_installed(name)
        if why:
            skipped[name] = why
        else:
            runnable.append(name)
    if recipe.epochs:
        children = run_epochs([(n, spec) for n in runnable], recipe, work)
    else:
        deadline = start + args.budget_s
        children = [Child(n, spec, work / f"{n}.log") for n in runnable]
        for c in children:  # built side by side
            ready = c.wait(timeout=max(60.0, deadline - time.perf_counter()))
            if ready is not None:
                c.build_s = ready["build_s"]
                print(f"  {c.name}: built in {c.build_s:.0f} s", flush=True)
        run_speed(children, recipe, args, deadline)
        for c in children:
            c.stop()
    rows = [summary(c, recipe) for c in children]
    rows += [{"contender": n, "error": why} for n, why in skipped.items()]
    print_table(rows, recipe, header, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"({time.perf_counter() - start:.0f} s in all)")
    return 0


NAMES = {
    "mocolab": "mocolab (default path)",
    "lightly": "lightly 1.6, its MoCo v2 example loop",
    "official": "official `main_moco.py` (ImageFolder + DataLoader workers)",
    "solo-dali": "solo-learn DALI pipeline",
}


def print_table(rows: list[dict[str, Any]], recipe: Recipe, header: str, device: str) -> None:
    """The Markdown table of the rows."""
    memory = "peak GPU memory (GiB)" if device.startswith("cuda") else "peak RSS (MiB)"
    print(f"\n{header}\n")
    if recipe.epochs:
        print(
            "| contender | wall time (s) | images/s | images per CPU second | data wait "
            f"| {memory} | kNN top-1 (%) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
    else:
        print(
            f"| contender | images/s | (per round) | images per CPU second | data wait | {memory} |"
        )
        print("|---|---:|---|---:|---:|---:|")
    for row in rows:
        name = NAMES[row["contender"]]
        if "images_per_s" not in row:
            cells = 6 if recipe.epochs else 5
            print(f"| {name} | {row['error'] or 'no result'} |" + " |" * (cells - 1))
            continue
        mem = row.get("peak_mib", float("nan"))
        mem_text = f"{mem / 1024:.1f}" if device.startswith("cuda") else f"{mem:.0f}"
        speed = f"{row['images_per_s']:.1f}"
        cpu = f"{row['images_per_cpu_s']:.0f}"
        wait = f"{row['wait_share']:.0%}"
        if recipe.epochs:
            knn_text = f"{row['knn_top1']:.2f}" if "knn_top1" in row else (row["error"] or "—")
            wall = f"{row.get('wall_s', float('nan')):.0f}"
            print(f"| {name} | {wall} | {speed} | {cpu} | {wait} | {mem_text} | {knn_text} |")
        else:
            rounds = ", ".join(f"{r:.0f}" for r in row["segments"])
            note = f" (then: {row['error']})" if row["error"] else ""
            print(f"| {name}{note} | {speed} | {rounds} | {cpu} | {wait} | {mem_text} |")


if __name__ == "__main__":
    sys.exit(main())
