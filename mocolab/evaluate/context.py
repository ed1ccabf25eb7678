"""What every evaluation protocol starts from: a run's frozen backbone, its input
normalisation, the labelled (train, test) splits and the device — loaded and checked once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import load_backbone_and_info
from ..data import ImageDataset, evaluation_splits, load_dataset
from ..device import select_device
from ..errors import ConfigError
from .features import extract_features


@dataclass
class EvalContext:
    """A loaded run, ready to be evaluated.

    Attributes:
        backbone: the pretrained backbone in eval mode, on ``device``.
        info: the checkpoint's info (``mean``, ``std``, ``crop_size``, ``in_channels``, ``step``...).
        config: the run's options as a dict (with ``data`` / ``data_root`` overridden if asked).
        train: the labelled train split (the kNN bank, the linear classifier's data); for
            unlabelled data (``labels=False``) the whole dataset.
        test: the labelled test split, or ``None`` for unlabelled data.
        device: where features are computed.
        run_dir: the run directory (where ``eval_*.json`` files go).
    """

    backbone: nn.Module
    info: dict[str, Any]
    config: dict[str, Any]
    train: ImageDataset
    test: ImageDataset | None
    device: torch.device
    run_dir: Path

    @property
    def labelled(self) -> bool:
        return self.test is not None and self.train.labels is not None

    def labelled_splits(self) -> tuple[ImageDataset, Tensor, ImageDataset, Tensor]:
        """``(train, train labels, test, test labels)`` of a labelled run.

        Raises:
            ConfigError: the data has no labels or no test split.
        """
        train, test = self.train, self.test
        if test is None or train.labels is None or test.labels is None:
            raise ConfigError(
                f"{self.config.get('data')} has no labelled train and test split; pass a "
                "labelled dataset with --data (class sub-folders or a built-in)"
            )
        return train, train.labels, test, test.labels

    @property
    def num_classes(self) -> int:
        """C, from the class names when known, else from the largest label."""
        return self.train.num_classes or 0

    def feature_kwargs(self, batch_size: int = 512, progress: bool = False) -> dict[str, Any]:
        """The keyword arguments of :func:`mocolab.evaluate.features.extract_features` for this run."""
        return dict(
            size=self.info["crop_size"],
            mean=self.info["mean"],
            std=self.info["std"],
            device=self.device,
            batch_size=batch_size,
            progress=progress,
        )

    def features(self, split: str, batch_size: int = 512, progress: bool = False) -> Tensor:
        """Frozen features (``N×D`` float32 on the CPU) of the ``"train"`` or ``"test"`` split."""
        data = self.train if split == "train" else self.test
        if data is None:
            raise ConfigError(f"{self.config['data']} has no test split to extract features from")
        return extract_features(
            self.backbone,
            data.images,
            desc=f"{split} features",
            **self.feature_kwargs(batch_size, progress),
        )

    def check_k(self, k: int, flag: str = "--k", exclude_self: bool = False) -> None:
        """A clear error when ``k`` neighbours are asked of a smaller bank."""
        bank = len(self.train) - int(exclude_self)
        if k < 1:
            raise ConfigError(f"{flag} must be positive, got {k}")
        if k > bank:
            raise ConfigError(
                f"{flag} {k} is larger than the bank: {self.train.name} has {bank} "
                f"{'other ' if exclude_self else ''}images; lower {flag}"
            )


def prepare(
    run_dir: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
    device: str = "auto",
    protocol: str = "evaluation",
    labels: bool = True,
    progress: bool = True,
) -> EvalContext:
    """Load a run's backbone and the splits to evaluate it on.

    Args:
        run_dir: a run directory or checkpoint file.
        data: evaluate on another dataset than the run's (same channels).
        data_root: where built-in datasets are looked for.
        device: ``auto | cpu | cuda | cuda:N``.
        protocol: the protocol's name, for error messages.
        labels: the protocol needs labels; unlabelled data is then an error. With ``False``,
            unlabelled data gives ``train`` = the whole dataset and ``test = None``.
        progress: show the progress bar of a large folder's decoding.

    Raises:
        ConfigError: no labels when needed, or images whose channels the backbone does not take.
        CheckpointError: not a run, or a checkpoint whose backbone cannot be loaded.
    """
    dev = select_device(device)
    backbone, info = load_backbone_and_info(run_dir)
    backbone.to(dev)
    cfg = dict(info["config"])
    if data:
        cfg["data"] = data
    if data_root:
        cfg["data_root"] = data_root
    # data named by the checkpoint, not typed: a pipe: command in it is refused
    splits = evaluation_splits(
        {**cfg, "progress": progress}, origin=None if data else f"the checkpoint of {run_dir}"
    )
    if splits is None:
        if labels:
            raise ConfigError(
                f"{cfg['data']} has no labels, so it cannot be evaluated by {protocol}; "
                "pass a labelled dataset with --data (class sub-folders or a built-in)"
            )
        train = load_dataset(
            cfg["data"],
            "train",
            root=cfg["data_root"],
            image_size=cfg["image_size"],
            num_workers=cfg["num_workers"],
            progress=progress,
        )
        test = None
    else:
        train, test = splits
    if train.channels != info["in_channels"]:
        raise ConfigError(
            f"the backbone takes {info['in_channels']}-channel images but "
            f"{train.name} has {train.channels}; evaluate on a matching dataset"
        )
    path = Path(run_dir)
    return EvalContext(
        backbone=backbone,
        info=info,
        config=cfg,
        train=train,
        test=test,
        device=dev,
        run_dir=path if path.is_dir() else path.parent,
    )
