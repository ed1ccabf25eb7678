"""What :func:`mocolab.pretrain` and the evaluation protocols return: small typed records.

Each result is a frozen dataclass with typed attributes (``result.top1``, ``result.run_dir``)
and :meth:`Result.to_dict` for JSON (the shape of ``results.json`` and ``eval_*.json``).
Results also read like the dicts that mocolab 0.1.0 returned (``result["top1"]``,
``result.get("interrupted")``, ``{**result}``, ``dict(result)``): their keys are those of
:meth:`~Result.to_dict`.

A leaf module (the standard library only), so that every layer can return these.

Examples:
    >>> acc = KnnResult(top1=81.5, top5=99.2, k=200, t=0.1)
    >>> acc.top1, acc["top5"]
    (81.5, 99.2)
    >>> acc.to_dict()
    {'top1': 81.5, 'top5': 99.2, 'k': 200, 't': 0.1}
    >>> res = RetrievalResult(precision={1: 80.0}, recall={1: 0.1}, hit={1: 80.0}, mean_ap={1: 80.0})
    >>> res.precision[1], res["mAP@1"]
    (80.0, 80.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Result",
    "EvalResult",
    "KnnResult",
    "LinearResult",
    "FinetuneResult",
    "RetrievalResult",
    "PretrainResult",
]


def _plain(value: Any) -> Any:
    """``value`` as JSON takes it: results as dicts, paths as strings, tuples as lists."""
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Result(Mapping[str, Any]):
    """The base of every result: :meth:`to_dict` for JSON, and read-only dict access to the
    same keys (a result is a :class:`~collections.abc.Mapping`)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values, in declaration order; fields left ``None`` are
        left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _plain(value)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(frozen=True)
class EvalResult(Result):
    """A classification protocol's accuracy on the test split.

    Attributes:
        top1: top-1 accuracy, percent.
        top5: top-5 accuracy, percent (k clamped to the number of classes).
    """

    top1: float
    top5: float


@dataclass(frozen=True)
class KnnResult(EvalResult):
    """The weighted kNN classifier's accuracy (InstDisc: cosine similarity, ``exp(s/t)`` votes).

    Attributes:
        k: neighbours that vote.
        t: the votes' temperature τ.
        train_images: the size of the bank of training features (``None``: not recorded).
        test_images: the number of test images classified (``None``: not recorded).
    """

    k: int
    t: float
    train_images: int | None = None
    test_images: int | None = None


@dataclass(frozen=True)
class LinearResult(EvalResult):
    """The linear protocol's accuracy (a linear classifier on frozen features).

    Attributes:
        train_loss: the classifier's cross-entropy on the last training batch.
    """

    train_loss: float


@dataclass(frozen=True)
class FinetuneResult(EvalResult):
    """Fine-tuning's accuracy (backbone and a linear head trained on a share of the labels).

    Attributes:
        train_images: the labelled subset's size.
        train_loss: the cross-entropy on the last training batch.
    """

    train_images: int
    train_loss: float


@dataclass(frozen=True)
class RetrievalResult(Result):
    """Nearest-neighbour retrieval of the test split in the training split, percent, by list
    length K (see :mod:`mocolab.evaluate.retrieval` for the definitions).

    :meth:`to_dict` (and dict access) gives flat keys ``precision@K``, ``recall@K``, ``mAP@K``
    and ``hit@K``.

    Attributes:
        precision: K → precision@K, the share of relevant items among the first K.
        recall: K → recall@K, the share of the query's relevant items found in the first K.
        hit: K → hit@K, the share of queries with a relevant item in the first K.
        mean_ap: K → mAP@K, the mean average precision over the first K.
    """

    precision: dict[int, float]
    recall: dict[int, float]
    hit: dict[int, float]
    mean_ap: dict[int, float]

    @property
    def ks(self) -> list[int]:
        """The list lengths K, ascending."""
        return sorted(self.precision)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in self.ks:
            out[f"precision@{k}"] = self.precision[k]
            out[f"recall@{k}"] = self.recall[k]
            out[f"hit@{k}"] = self.hit[k]
            out[f"mAP@{k}"] = self.mean_ap[k]
        return out


@dataclass(frozen=True)
class PretrainResult(Result):
    """What a pretraining run reports (also written to ``RUN_DIR/results.json``).

    Attributes:
        run_dir: the run directory (checkpoint, config, metrics, results).
        step: the steps taken.
        total_steps: the steps the run was set to take.
        knn: the final kNN evaluation (``None``: not run, or data without labels).
        interrupted: the run was stopped by Ctrl-C or SIGTERM after saving a checkpoint
            (``mocolab pretrain --resume RUN_DIR`` continues it).
        signal: the name of the signal that stopped it (``SIGINT``, ``SIGTERM``).
    """

    run_dir: Path
    step: int
    total_steps: int
    knn: KnnResult | None = None
    interrupted: bool = False
    signal: str | None = None
