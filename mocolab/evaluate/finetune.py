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
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..augment import ViewGenerator
from ..results import FinetuneResult
from .features import classifier_augment, extract_features
from .knn import topk_accuracy
from .stages import freeze, keep_frozen


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
    head_only: bool = False,
    freeze_stages: int = -1,
    from_scratch: bool = False,
    on_trained: Callable[[nn.Module], None] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` plus a new ``nn.Linear(D, C)`` head on a class-balanced
    ``fraction`` of ``(train_images, train_labels)``; report test top-1 / top-5 (percent).

    SimCLR's recipe (App. B.5) in small: Nesterov SGD with momentum 0.9, no weight decay, cosine
    learning-rate decay, random-resized-crop + flip views (:func:`classifier_augment`), BN in
    training mode. Every weight of the copy is trained, also those frozen during pretraining
    (MoCo v3's random patch projection: its fine-tuning, DeiT's recipe, trains it). The
    backbone passed in is not modified.

    Args:
        backbone: the pretrained encoder (``N×C×H×W → N×D``, attribute ``num_features``).
        train_images / test_images: uint8 ``N×C×H×W``; train_labels / test_labels: int64.
        num_classes: C.
        size, mean, std: the run's input view (crop side and normalisation).
        fraction: the share of labels used (0.01 and 0.1 in the papers).
        seed: draws the subset, the head's initialisation and the views.
        epochs, lr, batch_size, momentum, weight_decay: SGD on the subset.
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
    params = list(head.parameters()) + (
        [] if head_only else [p for p in model.parameters() if p.requires_grad]
    )
    opt = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    views = ViewGenerator(classifier_augment(size, mean, std))
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    n = len(subset)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps_per_epoch, 0
    loss = torch.tensor(float("nan"))
    model.train(not head_only)
    keep_frozen(frozen)
    for _ in tqdm(range(epochs), desc="fine-tune", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=order)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x = views(images[idx].to(device), gen)
            with torch.set_grad_enabled(not head_only):
                h = model(x)
            loss = F.cross_entropy(head(h), labels[idx])
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
