"""Semi-supervised evaluation with few labels: fine-tune on 1% or 10% of the labelled images
(SimCLR, Chen et al. 2020, §6 and App. B.5; CPC v2, Hénaff et al. 2020), class-balanced
subsets drawn by seed, then top-1 / top-5 on the whole test split.

``head_only=True`` keeps the backbone frozen (eval mode) and trains only the linear head on
augmented views: the linear protocol restricted to few labels. ``freeze_stages=N`` freezes only
the stem and the first N stages (:func:`mocolab.evaluate.stages.freeze`), so the share of
frozen layers can be swept (Jaiswal et al. 2020, §6). ``from_scratch=True`` re-initialises the
copy first: with ``fraction=1`` it is the supervised baseline that transfer results are compared
with (MoCo §4.2, "supervised pre-training"), and ``on_trained`` hands the trained backbone to
the caller (``mocolab eval finetune --save`` writes it as a run).

Two recipes (:data:`FINETUNE_RECIPES`): ``simclr``, SimCLR's SGD recipe in small, and ``mae``,
MAE's ViT recipe (He et al. 2022, App. A.1, Table 9; ``main_finetune.py`` and ``util/lr_decay.py`` of
facebookresearch/mae at ``efb2a80``): AdamW, layer-wise learning-rate decay, weight decay,
warmup and label smoothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..augment import ViewGenerator
from ..results import FinetuneResult
from .features import classifier_augment, extract_features
from .knn import topk_accuracy
from .stages import freeze, keep_frozen

#: Named settings of :func:`finetune`. ``simclr``: SimCLR's recipe (App. B.5) in small —
#: Nesterov SGD, lr 0.05, no weight decay, cosine decay. ``mae``: MAE's ViT fine-tuning
#: (``FINETUNE.md``'s ViT-B command, ``main_finetune.py``; the paper's Table 9 has base LR 1e-3
#: and decay 0.75, ``FINETUNE.md`` retuned them for its released models and is followed):
#: AdamW (0.9, 0.999), LR 5e-4 (its base LR 5e-4 × batch/256 at mocolab's batch 256),
#: layer-wise LR decay 0.65, weight decay 0.05 on weights only, 5 linear warmup epochs then
#: cosine, label smoothing 0.1. Left out of ``mae``: drop path 0.1, mixup, CutMix, RandAugment
#: and random erasing (mocolab's ViT has no drop path; the views are
#: :func:`classifier_augment`'s), the cosine's floor 1e-6 (here 0) and the head's
#: initialisation (``trunc_normal_(std=2e-5)``; here ``nn.Linear``'s); a fixed sin-cos position
#: embedding (a buffer) stays fixed, MAE's fine-tuning trains it.
FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "simclr": dict(
        optimizer="sgd",
        lr=0.05,
        weight_decay=0.0,
        layer_decay=1.0,
        warmup_epochs=0,
        label_smoothing=0.0,
    ),
    "mae": dict(
        optimizer="adamw",
        lr=5e-4,
        weight_decay=0.05,
        layer_decay=0.65,
        warmup_epochs=5,
        label_smoothing=0.1,
    ),
}


def layer_decay_groups(
    model: nn.Module, head: nn.Module, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` and its classifier ``head`` for layer-wise learning-rate
    decay (BEiT §2.3 / ELECTRA; MAE's ``util/lr_decay.py`` ``param_groups_lrd``): with ``L`` the
    ViT's blocks, the patch embedding, [CLS] token and position embedding are layer 0, block
    ``i`` layer ``i + 1``, everything after the blocks (final norm, head) layer ``L + 1``;
    layer ``l``'s ``lr_scale`` is ``layer_decay ** (L + 1 − l)``. Weight decay only on weights
    of two or more dimensions other than the [CLS] token and position embedding (timm's
    ``no_weight_decay``). Parameters without ``requires_grad`` are left out.

    With ``layer_decay == 1`` any model works (every scale 1); else ``model`` must be a ViT
    (attribute ``blocks``: :class:`~mocolab.vit.VisionTransformer`).

    Examples:
        >>> from mocolab.vit import VisionTransformer
        >>> vit = VisionTransformer(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2)
        >>> groups = layer_decay_groups(vit, nn.Linear(8, 3), 0.05, 0.5)
        >>> sorted({g["lr_scale"] for g in groups})
        [0.125, 0.25, 0.5, 1.0]

    Raises:
        ValueError: ``layer_decay != 1`` for a model without ``blocks``.
    """
    blocks = getattr(model, "blocks", None)
    if layer_decay != 1 and blocks is None:
        raise ValueError("layer-wise LR decay needs a ViT backbone (one with `blocks`)")
    top = len(cast(nn.Sequential, blocks)) + 1 if blocks is not None else 0

    def layer(name: str) -> int:  # MAE's get_layer_id_for_vit
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return top

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    named = [(n, p) for n, p in model.named_parameters()]
    named += [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in ("cls_token", "pos_embed")
        key = (layer(name) if not name.startswith("head.") else top, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr_scale": layer_decay ** (top - key[0]),
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def balanced_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Indices of a class-balanced ``fraction`` of a labelled set: from each class ``c`` with
    ``n_c`` images, ``max(1, round(fraction · n_c))`` drawn without replacement by ``seed``
    (the same seed gives the same subset). Sorted ascending.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(picked).sort().values


def reinitialise(model: nn.Module) -> nn.Module:
    """Every weight of ``model`` drawn anew by its modules' own ``reset_parameters`` (convs,
    linears, BN: weight 1, bias 0, running statistics reset), then the torchvision ResNet's
    Kaiming-normal init of its convolutions (``mode="fan_out"``) for a ResNet, as a freshly
    built one has. Uses the global torch RNG (seed it first). Returns ``model``."""
    resnet = hasattr(model, "layer1")
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not model:
            reset()
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.reset_running_stats()
        if resnet and isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def finetune(
    backbone: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    fraction: float = 0.01,
    seed: int = 0,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    layer_decay: float = 1.0,
    warmup_epochs: float = 0,
    label_smoothing: float = 0.0,
    head_only: bool = False,
    freeze_stages: int = -1,
    from_scratch: bool = False,
    on_trained: Callable[[nn.Module], None] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` plus a new ``nn.Linear(D, C)`` head on a class-balanced
    ``fraction`` of ``(train_images, train_labels)``; report test top-1 / top-5 (percent).

    By default SimCLR's recipe (App. B.5) in small: Nesterov SGD with momentum 0.9, no weight
    decay, cosine learning-rate decay, random-resized-crop + flip views
    (:func:`classifier_augment`), BN in training mode. ``optimizer="adamw"`` with
    ``layer_decay``, ``warmup_epochs`` and ``label_smoothing`` gives MAE's ViT recipe
    (``**FINETUNE_RECIPES["mae"]``): AdamW on :func:`layer_decay_groups`, the learning rate
    warmed up linearly from 0 then cosine, per step. Every weight of the copy is trained, also
    those frozen during pretraining (MoCo v3's random patch projection: its fine-tuning, DeiT's
    recipe, trains it). The backbone passed in is not modified.

    Args:
        backbone: the pretrained encoder (``N×C×H×W → N×D``, attribute ``num_features``).
        train_images / test_images: uint8 ``N×C×H×W``; train_labels / test_labels: int64.
        num_classes: C.
        size, mean, std: the run's input view (crop side and normalisation).
        fraction: the share of labels used (0.01 and 0.1 in the papers).
        seed: draws the subset, the head's initialisation and the views.
        epochs, lr, batch_size, momentum, weight_decay: the optimiser on the subset
            (``momentum`` only for SGD; with AdamW ``weight_decay`` skips biases, norms, the
            [CLS] token and the position embedding).
        optimizer: ``"sgd"`` (Nesterov) or ``"adamw"`` (β = 0.9, 0.999, on
            :func:`layer_decay_groups`).
        layer_decay: AdamW's layer-wise LR decay (1: none; < 1 needs a ViT).
        warmup_epochs: linear warmup from 0 before the cosine (fractions of an epoch count).
        label_smoothing: of the cross-entropy (MAE: 0.1).
        head_only: train only the head on the frozen backbone.
        freeze_stages: -1 trains every layer; 0 freezes the stem; N ≥ 1 the stem and the first
            N stages of a ResNet (no gradient, BN in eval mode: its statistics stay as loaded).
        from_scratch: re-initialise every weight of the copy (``reset_parameters``, seeded by
            ``seed``) before training: a supervised network, or with ``epochs=0`` a random one.
        on_trained: called with the trained copy (in eval mode) before the test.
        device: where to train.

    Returns:
        ``top1``, ``top5`` on the test split, ``train_images`` (the subset size) and
        ``train_loss``.
    """
    device = torch.device(device)
    subset = balanced_subset(train_labels, fraction, seed)
    images, labels = train_images[subset], train_labels[subset].to(device)
    model = copy.deepcopy(backbone).to(device)
    torch.manual_seed(seed)
    if from_scratch:
        reinitialise(model)
    if not head_only:  # every weight, also those pretraining froze (MoCo v3's patch projection)
        model.requires_grad_(True)
    frozen = freeze(model, freeze_stages) if not head_only else []
    head = nn.Linear(int(cast(int, model.num_features)), num_classes).to(device)
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        trained = nn.Identity() if head_only else model
        groups = layer_decay_groups(trained, head, weight_decay, 1.0 if head_only else layer_decay)
        opt = torch.optim.AdamW(groups, lr=lr)
    elif optimizer == "sgd":
        if layer_decay != 1:
            raise ValueError("layer_decay needs optimizer='adamw' (MAE's recipe)")
        params = list(head.parameters()) + (
            [] if head_only else [p for p in model.parameters() if p.requires_grad]
        )
        opt = torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose sgd or adamw")
    views = ViewGenerator(classifier_augment(size, mean, std))
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    n = len(subset)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps_per_epoch, 0
    warmup = warmup_epochs * steps_per_epoch
    loss = torch.tensor(float("nan"))
    model.train(not head_only)
    keep_frozen(frozen)
    for _ in tqdm(range(epochs), desc="fine-tune", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=order)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if step < warmup:  # MAE's util/lr_sched.py: linear warmup, then half a cosine
                step_lr = lr * step / warmup
            else:
                step_lr = lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            for group in opt.param_groups:
                group["lr"] = step_lr * group.get("lr_scale", 1.0)
            x = views(images[idx].to(device), gen)
            with torch.set_grad_enabled(not head_only):
                h = model(x)
            loss = F.cross_entropy(head(h), labels[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
    model.eval()
    if on_trained is not None:
        on_trained(model)
    feats = extract_features(
        model,
        test_images,
        size=size,
        mean=mean,
        std=std,
        device=device,
        batch_size=max(batch_size, 256),
    )
    with torch.no_grad():
        scores = head(feats.to(device)).cpu()
    acc = topk_accuracy(scores, test_labels.cpu())
    return FinetuneResult(
        top1=acc["top1"], top5=acc["top5"], train_images=n, train_loss=float(loss.detach())
    )
