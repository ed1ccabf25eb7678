"""A user's script on mocolab's public API, checked with ``mypy --strict`` against the
installed package (scripts/check-dist.sh): the package is typed (``py.typed``) and its public
names carry precise types. It is type-checked, not run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mocolab
from mocolab import (
    ConfigError,
    Encoder,
    KnnResult,
    PretrainConfig,
    PretrainResult,
    build_config,
    create_backbone,
    create_method,
    list_methods,
    load_encoder,
)
from mocolab.evaluate import knn_accuracy, linear_probe, retrieval_metrics
from mocolab.transforms import MoCoV2Views, Views


def train_one_epoch(run_dir: Path) -> float:
    cfg: PretrainConfig = build_config("mocov2-fashion-mnist", epochs=1, max_steps=2)
    result: PretrainResult = mocolab.pretrain(cfg)
    steps: int = result.step
    where: Path = result.run_dir
    knn: KnnResult | None = result.knn
    record: dict[str, object] = result.to_dict()
    print(steps, where, record, run_dir)
    return knn.top1 if knn is not None else float("nan")


def features(path: str) -> torch.Tensor:
    encoder: Encoder = load_encoder(path)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out: torch.Tensor = encoder(images)
    return out


def evaluate(bank: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    knn = knn_accuracy(bank, labels, bank, labels, num_classes=10, k=20)
    linear = linear_probe(bank, labels, bank, labels, 10, epochs=1)
    retrieval = retrieval_metrics(bank, labels, bank, labels, ks=(1, 5))
    top1: float = knn.top1
    loss: float = linear.train_loss
    precision: float = retrieval.precision[1]
    return top1, loss, precision


class Images(Dataset[list[torch.Tensor]]):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.views = MoCoV2Views(32, mean=(0.5,), std=(0.5,))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.views(self.images[index])


def train_my_way(images: torch.Tensor) -> nn.Module:
    names: list[str] = list_methods()
    assert "mocov2" in names
    try:
        model = create_method("mocov2", image_size=32, queue_size=256)
    except ConfigError as e:
        raise SystemExit(str(e)) from e
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    loader = DataLoader(Images(images), batch_size=8)
    generator = torch.Generator().manual_seed(0)
    for step, views in enumerate(loader):
        out = model(views, generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.on_step_end(out, step, len(loader))
    backbone: nn.Module = model.backbone
    return backbone


def my_views() -> Views:
    return Views(["byol-view1", "byol-view2"], 64)


def small_backbone() -> nn.Module:
    return create_backbone("resnet18", width=8, image_size=32)
