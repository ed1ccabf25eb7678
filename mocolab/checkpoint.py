"""One checkpoint format: a dict of tensors and plain values, written atomically and read with
``torch.load(weights_only=True)`` so that a file can never run code when loaded."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or of another kind; the message says which."""


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
    from .methods import build_backbone

    if Path(path).suffix == ".safetensors":  # a `mocolab export --format safetensors` file
        from .weights import load_exported_backbone

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


def save_backbone_run(run_dir: str | Path, backbone: nn.Module, *, config: dict[str, Any],
                      info: dict[str, Any], step: int, origin: dict[str, Any]) -> Path:
    """Write ``backbone`` as a run directory that every evaluation loads like a pretraining run
    (:func:`load_backbone`): ``checkpoint.pt`` (atomically) with the backbone's weights under
    ``query_encoder.backbone.*``, the source run's ``config`` and ``info`` (input view,
    normalisation), and ``origin`` (how the weights were made, e.g. supervised fine-tuning)
    in ``info["origin"]``; plus ``config.yaml``. It holds no optimiser state: it cannot be
    resumed by ``mocolab pretrain --resume``. Returns the checkpoint's path."""
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_NAME).exists() and "origin" not in load_checkpoint(run_dir)["info"]:
        raise CheckpointError(f"{run_dir} already holds a pretraining run; --save into a new "
                              "directory (mocolab never overwrites a run)")
    state = {f"query_encoder.backbone.{k}": v.detach().cpu()
             for k, v in backbone.state_dict().items()}
    ckpt = {"format": "mocolab", "version": FORMAT_VERSION, "config": config,
            "info": {**{k: v for k, v in info.items() if k not in ("config", "step")},
                     "origin": origin},
            "step": step, "model": state}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(ckpt, run_dir / CHECKPOINT_NAME)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir / CHECKPOINT_NAME
