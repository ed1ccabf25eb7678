"""One checkpoint format: a dict of tensors and plain values, written atomically and read with
``torch.load(weights_only=True)`` so that a file can never run code when loaded; and mocolab's
backbone exports (``.safetensors`` with the run's info as metadata), read the same safe way."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError  # CheckpointError: re-exported
from .methods import build_backbone
from .safeio import CHECKPOINT_NAME, write_text_atomic, writing  # CHECKPOINT_NAME: re-exported

SAFETENSORS_FORMAT = "mocolab-backbone"
FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash at any moment leaves either the old file or the new one, never a partial one.

    Raises:
        OutputError: the file could not be written (full disk, read-only folder); the message
            says how much space it needs and that the previous file, if any, is intact.
    """
    path = Path(path)
    note = (
        f"the last good checkpoint {path} is intact"
        if path.exists()
        else "no checkpoint was written"
    )
    with writing(path, need=_tensor_bytes(obj), note=note):
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


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about the size of its
    ``torch.save`` file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a run directory or a .pt file"
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``): files that need arbitrary pickled code
    are refused, truncated or corrupt files give a clear error."""
    ckpt_path = find_checkpoint(path)
    obj = torch_load_safely(ckpt_path, map_location, fix="use an earlier checkpoint or retrain")
    if not isinstance(obj, dict) or "model" not in obj or obj.get("format") != "mocolab":
        raise CheckpointError(f"{ckpt_path} is not a mocolab checkpoint (or it is corrupt)")
    return obj


# torch says "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module is blocked"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _pickled_imports(path: Path, limit: int = 64 * 2**20) -> list[str]:
    """The callables a plain pickle file (not torch's zip format) would import, read with
    ``pickletools`` (which runs nothing): ``GLOBAL`` and ``STACK_GLOBAL`` opcodes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return []
    if not data.startswith(b"\x80"):  # pickle protocol 2+
        return []
    names: list[str] = []
    strings: list[str] = []
    ops = pickletools.genops(data)
    while True:
        try:
            op, arg, _ = next(ops)
        except StopIteration:
            return names
        except Exception:
            return names
        if op.name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)


def torch_load_safely(path: Path, map_location: str | torch.device = "cpu", *, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors: a file that would import
    code (a pickled class or function) is refused, naming it; anything else that does not
    load (random bytes, an image, a cut-off file) is "not a mocolab checkpoint (or corrupt)".
    ``fix`` ends the message (what to do instead). Never suggests ``weights_only=False``.

    Raises:
        CheckpointError: the file is unsafe, corrupt, truncated or not a checkpoint.
    """
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        imports = [unsafe.group(1)] if unsafe else _pickled_imports(path)
        if imports:
            raise CheckpointError(
                f"{path} was refused: loading it would import {imports[0]}, which could run "
                f"code. mocolab loads only plain tensors and values; {fix}"
            ) from None
        reason = "not a PyTorch file"
    except OSError as e:
        reason = f"{e.strerror or e}"
    except Exception as e:
        # RuntimeError, EOFError, BadZipFile, UnicodeDecodeError, struct.error, ...)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
    raise CheckpointError(
        f"{path} is not a mocolab checkpoint, or it is truncated or corrupt ({reason}); {fix}"
    ) from None


def backbone_state_dict(
    model_state: dict[str, torch.Tensor], prefix: str = "query_encoder.backbone."
) -> dict[str, torch.Tensor]:
    """The backbone's weights out of a method's state dict, with torchvision's key names."""
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}


def load_backbone_and_info(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained backbone of a run (or of its ``.safetensors`` export), in eval mode,
    and the run's info. (:func:`mocolab.load_encoder` gives the same backbone with its input
    pipeline, ready for raw images.)

    Returns:
        ``(backbone, info)`` where ``info`` holds ``config`` (the run's options as a dict),
        ``mean`` and ``std`` (the input normalisation), ``in_channels``, ``crop_size`` and ``step``.
    """
    if Path(path).suffix == ".safetensors":  # a `mocolab export --format safetensors` file
        return load_exported_backbone(path, map_location)
    ckpt = load_checkpoint(path, map_location)
    cfg, info = ckpt["config"], ckpt["info"]
    try:
        backbone = build_backbone(
            cfg,
            info["in_channels"],
            info["stem"],
            info.get("width", 64),
            image_size=info.get("crop_size"),
        )
    except ValueError as e:  # an architecture this version does not build
        raise CheckpointError(f"{path}: cannot build the checkpoint's backbone ({e})") from None
    state = backbone_state_dict(ckpt["model"])
    if not state:
        raise CheckpointError(
            f"{path}: this {cfg.get('method')!r} checkpoint has no query-encoder backbone "
            "(no query_encoder.backbone.* weights), so mocolab cannot evaluate it; pass a "
            "checkpoint of a method this version trains"
        )
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: backbone weights do not match a {cfg['arch']} with stem {info['stem']} "
            f"(missing {len(missing)}, unexpected {len(unexpected)} keys)"
        )
    backbone.eval()
    return backbone, {**info, "config": cfg, "step": ckpt["step"]}


def load_backbone(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Deprecated name of :func:`load_backbone_and_info` (``mocolab.load_backbone`` was
    another function, :func:`mocolab.load_encoder`)."""
    warnings.warn(
        "mocolab.checkpoint.load_backbone is now load_backbone_and_info (the same pair); "
        "the old name will be removed",
        DeprecationWarning,
        stacklevel=2,
    )
    return load_backbone_and_info(path, map_location)


def save_backbone_run(
    run_dir: str | Path,
    backbone: nn.Module,
    *,
    config: dict[str, Any],
    info: dict[str, Any],
    step: int,
    origin: dict[str, Any],
) -> Path:
    """Write ``backbone`` as a run directory that every evaluation loads like a pretraining run
    (:func:`load_backbone_and_info`): ``checkpoint.pt`` (atomically) with the backbone's weights under
    ``query_encoder.backbone.*``, the source run's ``config`` and ``info`` (input view,
    normalisation), and ``origin`` (how the weights were made, e.g. supervised fine-tuning)
    in ``info["origin"]``; plus ``config.yaml``. It holds no optimiser state: it cannot be
    resumed by ``mocolab pretrain --resume``. Returns the checkpoint's path."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_NAME).exists() and "origin" not in load_checkpoint(run_dir)["info"]:
        raise CheckpointError(
            f"{run_dir} already holds a pretraining run; --save into a new "
            "directory (mocolab never overwrites a run)"
        )
    state = {
        f"query_encoder.backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()
    }
    ckpt = {
        "format": "mocolab",
        "version": FORMAT_VERSION,
        "config": config,
        "info": {
            **{k: v for k, v in info.items() if k not in ("config", "step")},
            "origin": origin,
        },
        "step": step,
        "model": state,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(ckpt, run_dir / CHECKPOINT_NAME)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return run_dir / CHECKPOINT_NAME


# --- mocolab's backbone exports (.safetensors) ------------------------------------------------


def require(module: str, pip_name: str, purpose: str) -> Any:
    """Import an optional package, or raise a ConfigError that names the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{purpose} needs the optional package {pip_name}: pip install {pip_name}"
        ) from None


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
            f"{str(e).splitlines()[0] if str(e) else ''}); download or export it again"
        ) from None


def backbone_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The mocolab info stored in a ``.safetensors`` export, or ``None`` for a foreign file."""
    if json.loads(metadata.get("format", "null")) != SAFETENSORS_FORMAT:
        return None
    return {k: json.loads(v) for k, v in metadata.items()}


def load_exported_backbone(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of a mocolab ``.safetensors`` export and its info, as
    :func:`load_backbone_and_info` returns them for a run."""
    state, metadata = _read_safetensors(Path(path))
    info = backbone_metadata(metadata)
    if info is None:
        raise CheckpointError(
            f"{path} is a safetensors file without mocolab's metadata, so its architecture and "
            f"normalisation are unknown; use it as --init, or export the run again with "
            f"mocolab export RUN_DIR --format safetensors"
        )
    cfg = info["config"]
    backbone = build_backbone(
        cfg,
        info["in_channels"],
        info["stem"],
        info.get("width", 64),
        image_size=info.get("crop_size"),
    )
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not match its metadata ({str(e).splitlines()[0]})"
        ) from None
    backbone.to(map_location).eval()
    info.pop("format", None)
    return backbone, info
