"""mocolab: self-supervised visual representation learning by contrast.

Contrastive learning as a dictionary look-up: a query must match its key and differ from the
other keys. The parts are first-class objects — views (:mod:`mocolab.augment`), backbones
(:mod:`mocolab.backbones`), heads, dictionaries of keys (:mod:`mocolab.dictionaries`), momentum
encoders (:mod:`mocolab.momentum`), losses (:mod:`mocolab.losses`) — and a method
(:mod:`mocolab.methods`) is a short composition of them, trained by one loop (:mod:`mocolab.train`).

The names of :data:`__all__` are the public API. They are imported on first use, so that
``import mocolab`` (and ``mocolab --help``) stays free of torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    MocolabError,
    NonFiniteLossError,
    OutputError,
)
from .results import (
    EvalResult,
    FinetuneResult,
    KnnResult,
    LinearResult,
    PretrainResult,
    RetrievalResult,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from . import transforms as transforms
    from .config import PretrainConfig as PretrainConfig
    from .config import build_config as build_config
    from .config import list_presets as list_presets
    from .embed import EmbedResult as EmbedResult
    from .embed import embed_folder as embed_folder
    from .encoder import Encoder as Encoder
    from .encoder import load_encoder as load_encoder
    from .export import ExportResult as ExportResult
    from .export import export_backbone as export_backbone
    from .factory import create_backbone as create_backbone
    from .factory import create_method as create_method
    from .factory import list_methods as list_methods
    from .train import pretrain as pretrain
    from .weights import load_backbone_weights as load_backbone_weights

__all__ = [
    # pretrain
    "pretrain",
    "PretrainConfig",
    "build_config",
    "list_presets",
    # build the parts for your own training loop
    "create_method",
    "create_backbone",
    "list_methods",
    "transforms",
    # use what was trained
    "Encoder",
    "load_encoder",
    "load_backbone_weights",
    "export_backbone",
    "embed_folder",
    # results
    "PretrainResult",
    "EvalResult",
    "KnnResult",
    "LinearResult",
    "FinetuneResult",
    "RetrievalResult",
    "ExportResult",
    "EmbedResult",
    # errors
    "MocolabError",
    "ConfigError",
    "CheckpointError",
    "DatasetError",
    "OutputError",
    "NonFiniteLossError",
]

# The lazy names: name → the module that defines it (imported on first use).
_LAZY = {
    "pretrain": "train",
    "PretrainConfig": "config",
    "build_config": "config",
    "list_presets": "config",
    "create_method": "factory",
    "create_backbone": "factory",
    "list_methods": "factory",
    "Encoder": "encoder",
    "load_encoder": "encoder",
    "load_backbone_weights": "weights",
    "export_backbone": "export",
    "ExportResult": "export",
    "embed_folder": "embed",
    "EmbedResult": "embed",
}
_SUBMODULES = ("transforms",)
# Old names: name → (module, new name); they warn and will be removed.
_DEPRECATED = {
    # mocolab.load_backbone was load_encoder under another name (mocolab.checkpoint had a
    # load_backbone of its own, which returns a pair: now load_backbone_and_info)
    "load_backbone": ("encoder", "load_encoder"),
    "load_foreign_backbone": ("weights", "load_backbone_weights"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # imported once
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        warnings.warn(
            f"mocolab.{name} is now mocolab.{new}; the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{module}", __name__), new)
    raise AttributeError(f"module 'mocolab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
