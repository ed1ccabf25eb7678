"""One checkpoint format: a dict of tensors and plain values, written atomically and read with
``torch.load(weights_only=True)`` so that a file can never run code when loaded; and mocolab's
backbone exports (``.safetensors`` with the run's info as metadata), read the same safe way."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError  # CheckpointError: re-exported
from .methods import build_backbone

SAFETENSORS_FORMAT = "mocolab-backbone"
CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash at any moment leaves either the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt``; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / CHECKPOINT_NAME
        if not ckpt.exists():
            raise CheckpointError(
                f"{path} has no {CHECKPOINT_NAME}: it is not a mocolab run directory, or the run "
                "stopped before its first checkpoint (start it again without --resume)"
            )
        return ckpt
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run directory or a .pt file")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``): files that need arbitrary pickled code
    are refused, truncated or corrupt files give a clear error."""
    ckpt_path = find_checkpoint(path)
    try:
        obj = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{ckpt_path} was refused: it needs arbitrary Python objects to load, which could run "
            f"code. mocolab only loads plain tensors and values. ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{ckpt_path} is truncated or corrupt and cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); use an earlier checkpoint or retrain"
        ) from None
    if not isinstance(obj, dict) or "model" not in obj or obj.get("format") != "mocolab":
        raise CheckpointError(f"{ckpt_path} is not a mocolab checkpoint")
    return obj


def backbone_state_dict(model_state: dict[str, torch.Tensor],
                        prefix: str = "query_encoder.backbone.") -> dict[str, torch.Tensor]:
    """The backbone's weights out of a method's state dict, with torchvision's key names."""
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained backbone of a run (or of its ``.safetensors`` export), in eval mode,
    and the run's info.

    Returns:
        ``(backbone, info)`` where ``info`` holds ``config`` (the run's options as a dict),
        ``mean`` and ``std`` (the input normalisation), ``in_channels``, ``crop_size`` and ``step``.
    """
    if Path(path).suffix == ".safetensors":  # a `mocolab export --format safetensors` file
        return load_exported_backbone(path, map_location)
    ckpt = load_checkpoint(path, map_location)
    cfg, info = ckpt["config"], ckpt["info"]
    try:
        backbone = build_backbone(cfg, info["in_channels"], info["stem"], info.get("width", 64),
                                  image_size=info.get("crop_size"))
    except ValueError as e:  # an architecture this version does not build
        raise CheckpointError(f"{path}: cannot build the checkpoint's backbone ({e})") from None
    state = backbone_state_dict(ckpt["model"])
    if not state:
        raise CheckpointError(
            f"{path}: this {cfg.get('method')!r} checkpoint has no query-encoder backbone "
            "(no query_encoder.backbone.* weights), so mocolab cannot evaluate it; pass a "
            "checkpoint of a method this version trains")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: backbone weights do not match a {cfg['arch']} with stem {info['stem']} "
            f"(missing {len(missing)}, unexpected {len(unexpected)} keys)"
        )
    backbone.eval()
    return backbone, {**info, "config": cfg, "step": ckpt["step"]}


# --- mocolab's backbone exports (.safetensors) ------------------------------------------------


def require(module: str, pip_name: str, purpose: str) -> Any:
    """Import an optional package, or raise a ConfigError that names the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the optional package {pip_name}: "
                          f"pip install {pip_name}") from None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    safetensors_torch = require("safetensors.torch", "safetensors", f"reading {path.name}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return safetensors_torch.load_file(str(path)), metadata
    except Exception as e:  # SafetensorError, OSError, JSON errors: all mean a damaged file
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); download or export it again") from None


def backbone_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The mocolab info stored in a ``.safetensors`` export, or ``None`` for a foreign file."""
    if json.loads(metadata.get("format", "null")) != SAFETENSORS_FORMAT:
        return None
    return {k: json.loads(v) for k, v in metadata.items()}


def load_exported_backbone(path: str | Path, map_location: str | torch.device = "cpu"
                           ) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of a mocolab ``.safetensors`` export and its info, as
    :func:`load_backbone` returns them for a run."""
    state, metadata = _read_safetensors(Path(path))
    info = backbone_metadata(metadata)
    if info is None:
        raise CheckpointError(
            f"{path} is a safetensors file without mocolab's metadata, so its architecture and "
            f"normalisation are unknown; use it as --init, or export the run again with "
            f"mocolab export RUN_DIR --format safetensors")
    cfg = info["config"]
    backbone = build_backbone(cfg, info["in_channels"], info["stem"], info.get("width", 64),
                              image_size=info.get("crop_size"))
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its metadata "
                              f"({str(e).splitlines()[0]})") from None
    backbone.to(map_location).eval()
    info.pop("format", None)
    return backbone, info
