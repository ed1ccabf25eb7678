"""One checkpoint format: a dict of tensors and plain values, written atomically and read with
``torch.load(weights_only=True)`` so that a file can never run code when loaded; and mocolab's
backbone exports (``.safetensors`` with the run's info as metadata), read the same safe way.

What a file says is checked before it is used: its format version and step, the types and
bounds of its architecture fields (:func:`check_backbone_info`), every tensor's storage (a
stride-0 view of a huge shape is refused), and the shapes its declared architecture would
have, computed on the meta device (no memory) and compared with the weights it holds, before
any network is allocated (:func:`expected_shapes`, :func:`state_mismatch`).
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import pickletools
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .backbones import ARCHS, STEMS, is_vit
from .errors import CheckpointError, ConfigError  # CheckpointError: re-exported
from .methods import build_backbone, load_methods
from .safeio import (  # CHECKPOINT_NAME: re-exported
    CHECKPOINT_NAME,
    write_atomic,
    write_text_atomic,
)
from .vit import POS_EMBEDS, VIT_SIZES, default_patch_size

SAFETENSORS_FORMAT = "mocolab-backbone"
FORMAT_VERSION = 1
MAX_SIDE = 4096
"""The largest crop side a checkpoint or export may declare (ImageNet runs use 224)."""
MAX_WIDTH = 4096
"""The largest ResNet width a file may declare (torchvision's is 64; its 4× wide ResNet 256)."""
MAX_DEPTH = 1000
"""The most ViT blocks a file may declare (ViT-22B has 48)."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``
    (:func:`mocolab.safeio.write_atomic`): a crash at any moment leaves either the old file
    or the new one, never a partial one. The file gets the permissions the umask gives
    (0644 under umask 022).

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
    write_atomic(path, lambda f: torch.save(obj, f), need=_tensor_bytes(obj), note=note)


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
    version = obj.get("version", FORMAT_VERSION)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        newer = _is_int(version) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{ckpt_path} has format version {version!r}, which this mocolab does not know (it "
            f"reads version {FORMAT_VERSION}); "
            + ("upgrade mocolab to read it" if newer else "the file is damaged: use another one")
        )
    problem = None
    if "step" in obj and (not _is_int(obj["step"]) or obj["step"] < 0):
        problem = f"its step is {_short(obj['step'])}, not a number of steps"
    elif "config" in obj and not isinstance(obj["config"], dict):
        problem = f"its config is a {type(obj['config']).__name__}, not a mapping"
    elif "info" in obj and not isinstance(obj["info"], dict):
        problem = f"its info is a {type(obj['info']).__name__}, not a mapping"
    elif not isinstance(obj["model"], dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj["model"].items()
    ):
        problem = "its model is not a mapping of names to tensors"
    if problem:
        raise CheckpointError(f"{ckpt_path} is damaged: {problem}; use another checkpoint")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_tensors(obj: Any, path: str | Path) -> None:
    """Refuse a loaded file whose tensors claim more elements than their storage holds (a
    stride-0 or overlapping view: a 1e6×1e6 tensor in 4 bytes, which any copy would try to
    allocate).

    Raises:
        CheckpointError: naming the tensor, its shape and its storage.
    """
    todo: list[tuple[str, Any]] = [("", obj)]
    while todo:
        key, value = todo.pop()
        if isinstance(value, Tensor):
            if value.layout != torch.strided or value.numel() == 0:
                continue
            need, have = value.numel() * value.element_size(), value.untyped_storage().nbytes()
            if need > have:
                raise CheckpointError(
                    f"{path}: the tensor {key or '(the file)'} of shape {tuple(value.shape)} is "
                    f"stored in {have} bytes but its elements need {need} (a stride-0 or "
                    f"overlapping view); save plain tensors (tensor.contiguous()) instead"
                )
        elif isinstance(value, dict):
            todo += [(f"{key}.{k}" if key else str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            todo += [(f"{key}[{i}]", v) for i, v in enumerate(value)]


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
            obj = torch.load(path, map_location=map_location, weights_only=True)
        check_tensors(obj, path)
        return obj
    except CheckpointError:
        raise
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


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-3:]


def check_backbone_info(config: Any, info: Any, source: str | Path) -> None:
    """The architecture and input fields a checkpoint or export declares, checked for type
    and sane bounds before anything is built from them: ``config`` (``method``, ``arch``,
    ``vit_depth``, ``vit_heads``, ``patch_size``, ``pos_embed``) and ``info``
    (``in_channels``, ``stem``, ``width``, ``crop_size``, ``mean``, ``std``).

    Raises:
        CheckpointError: one line naming the first bad field, its value and what it must be.
    """

    def refuse(field: str, value: Any, want: str) -> None:
        what = f"it has no {field}" if value is None else f"{field} is {_short(value)}, {want}"
        raise CheckpointError(
            f"{source}: {what}; the file is damaged or was edited: use another one, or "
            f"export / save it again"
        )

    def integer(field: str, value: Any, low: int, high: int) -> None:
        if not _is_int(value) or not low <= value <= high:
            refuse(field, value, f"not an integer from {low} to {high}")

    if not isinstance(config, dict):
        refuse("config", config, "not a mapping of options")
    if not isinstance(info, dict):
        refuse("info", info, "not a mapping")
    if not isinstance(config.get("method"), str):
        refuse("config.method", config.get("method"), "not a method's name")
    if config.get("arch") not in ARCHS:
        raise CheckpointError(
            f"{source}: cannot build the checkpoint's backbone: config.arch is "
            f"{_short(config.get('arch'))}, not one of {', '.join(ARCHS)}"
        )
    for key, high in (("vit_depth", MAX_DEPTH), ("vit_heads", 4096), ("patch_size", MAX_SIDE)):
        if config.get(key) is not None:
            integer(f"config.{key}", config[key], 1, high)
    if config.get("pos_embed") not in (None, *POS_EMBEDS):
        refuse("config.pos_embed", config.get("pos_embed"), f"not {' or '.join(POS_EMBEDS)}")
    channels = info.get("in_channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        refuse("info.in_channels", channels, "not 1 or 3")
    if info.get("stem") not in STEMS:
        refuse("info.stem", info.get("stem"), f"not one of {', '.join(STEMS)}")
    integer("info.width", info.get("width", 64), 1, MAX_WIDTH)
    integer("info.crop_size", info.get("crop_size"), 8, MAX_SIDE)
    for key in ("mean", "std"):
        values = info.get(key)
        if (
            not isinstance(values, (list, tuple))
            or len(values) != channels
            or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            )
            or (key == "std" and min(values) <= 0)
        ):
            refuse(f"info.{key}", values, f"not {channels} finite numbers (positive for std)")


def _declared_fields(
    config: dict[str, Any], info: dict[str, Any], state: Mapping[str, Tensor]
) -> str | None:
    """For a plain ResNet or ViT, the first declared field that the weights contradict (by
    the shapes that field sets), as a phrase; ``None`` when they agree or the weights have
    another layout altogether (the full comparison then speaks)."""
    spec = load_methods().get(str(config.get("method")))
    if spec is not None and spec.backbone is not None:
        return None  # a method's own backbone (CMC, CPC): compared in full below
    arch, crop, channels = config["arch"], info["crop_size"], info["in_channels"]
    if is_vit(arch):
        token, proj = state.get("cls_token"), state.get("patch_embed.proj.weight")
        if token is None or proj is None or proj.dim() != 4:
            return None
        dim, depth = VIT_SIZES[arch][0], config.get("vit_depth") or VIT_SIZES[arch][1]
        blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
        patch = config.get("patch_size") or default_patch_size(crop)
        pos = state.get("pos_embed")
        if token.shape[-1] != dim:
            return (
                f"config.arch says {arch} ({dim}-d tokens) but its tokens are {token.shape[-1]}-d"
            )
        if len(blocks) != depth:
            return f"config.vit_depth says {depth} blocks but the file holds {len(blocks)}"
        if proj.shape[1] != channels:
            return (
                f"info.in_channels says {channels} but the patch projection takes {proj.shape[1]}"
            )
        if proj.shape[-1] != patch:
            return f"config.patch_size says {patch} px patches but they are {proj.shape[-1]} px"
        if pos is not None and pos.dim() == 3 and pos.shape[1] != (crop // patch) ** 2 + 1:
            return (
                f"info.crop_size says {crop} px ({(crop // patch) ** 2 + 1} tokens) but the "
                f"position embedding has {pos.shape[1]} tokens"
            )
        return None
    conv = state.get("conv1.weight")
    if conv is None or conv.dim() != 4:
        return None
    width, kernel = info.get("width", 64), 7 if info["stem"] == "imagenet" else 3
    if conv.shape[0] != width:
        return f"info.width says {width} but the first convolution has {conv.shape[0]} filters"
    if conv.shape[1] != channels:
        return f"info.in_channels says {channels} but the first convolution takes {conv.shape[1]}"
    if conv.shape[-1] != kernel:
        return f"info.stem says {info['stem']} but the first convolution is {conv.shape[-1]}×{conv.shape[-1]}"
    return None


def expected_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]] | None:
    """The state dict's shapes of the module ``build()`` makes, built on the meta device:
    nothing is allocated, whatever sizes it declares. ``None`` when it cannot be built there
    (a module that computes with its weights while it is built)."""
    before = _memo_misses()
    try:
        with torch.device("meta"):
            module = build()
    except (ConfigError, CheckpointError):
        raise
    except Exception:
        return None
    finally:  # a memoised function called while building holds meta tensors now: forget them
        for fn, misses in _memo_misses().values():
            if before.get(id(fn), (fn, 0))[1] != misses:
                fn.cache_clear()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _memo_misses() -> dict[int, tuple[Any, int]]:
    """The ``functools.lru_cache`` / ``cache`` functions of mocolab's loaded modules and
    their miss counts (a miss is a new entry)."""
    found: dict[int, tuple[Any, int]] = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("mocolab") and module is not None:
            for obj in list(vars(module).values()):
                if callable(getattr(obj, "cache_info", None)) and hasattr(obj, "cache_clear"):
                    found[id(obj)] = (obj, obj.cache_info().misses)
    return found


def state_mismatch(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor]
) -> list[str]:
    """What in ``state`` does not fit a module of ``expected`` shapes, as short phrases
    (empty when it fits exactly)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    what = []
    if missing:
        what.append(f"{len(missing)} of its tensors missing (e.g. {missing[0]})")
    if unexpected:
        what.append(f"{len(unexpected)} unknown (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        what.append(
            f"{len(shapes)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {expected[k]})"
        )
    return what


def build_checked_backbone(
    config: dict[str, Any], info: dict[str, Any], state: Mapping[str, Tensor], source: str | Path
) -> nn.Module:
    """The backbone a file declares, built only after its fields passed
    :func:`check_backbone_info` and its weights ``state`` were found to have exactly the
    shapes of that architecture (compared on the meta device, before any allocation); the
    weights are loaded into it.

    Raises:
        CheckpointError: a bad field, or weights that do not fit it; one line naming it.
    """
    check_backbone_info(config, info, source)
    field = _declared_fields(config, info, state)
    if field is not None:
        raise CheckpointError(
            f"{source}: its architecture does not match its weights: {field}; the file is "
            f"damaged or was edited: use another one, or export / save it again"
        )

    def build() -> nn.Module:
        return build_backbone(
            config,
            info["in_channels"],
            info["stem"],
            info.get("width", 64),
            image_size=info["crop_size"],
        )

    try:
        expected = expected_shapes(build)
        what = [] if expected is None else state_mismatch(expected, state)
        if what:
            raise CheckpointError(
                f"{source}: backbone weights do not match a {config['arch']} with stem "
                f"{info['stem']} and width {info.get('width', 64)}, the architecture it "
                f"declares ({'; '.join(what)})"
            )
        backbone = build()
    except (ValueError, TypeError, AssertionError) as e:  # CheckpointError is a ValueError
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{source}: cannot build the checkpoint's backbone ({str(e).splitlines()[0][:200]})"
        ) from None
    try:
        backbone.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source}: weights do not match its metadata ({str(e).splitlines()[0][:200]})"
        ) from None
    return backbone


def load_backbone_and_info(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained backbone of a run (or of its ``.safetensors`` export), in eval mode,
    and the run's info. (:func:`mocolab.load_encoder` gives the same backbone with its input
    pipeline, ready for raw images.)

    The file's architecture fields are checked against sane bounds and against the weights
    it holds before the network is built (:func:`build_checked_backbone`).

    Returns:
        ``(backbone, info)`` where ``info`` holds ``config`` (the run's options as a dict),
        ``mean`` and ``std`` (the input normalisation), ``in_channels``, ``crop_size`` and ``step``.

    Raises:
        CheckpointError: the file is unsafe, damaged, or its fields do not fit its weights.
    """
    if Path(path).suffix == ".safetensors":  # a `mocolab export --format safetensors` file
        return load_exported_backbone(path, map_location)
    ckpt = load_checkpoint(path, map_location)
    cfg: dict[str, Any] = ckpt.get("config")  # type: ignore[assignment]  # checked next
    info: dict[str, Any] = ckpt.get("info")  # type: ignore[assignment]
    check_backbone_info(cfg, info, path)
    state = backbone_state_dict(ckpt["model"])
    if not state:
        raise CheckpointError(
            f"{path}: this {cfg.get('method')!r} checkpoint has no query-encoder backbone "
            "(no query_encoder.backbone.* weights), so mocolab cannot evaluate it; pass a "
            "checkpoint of a method this version trains"
        )
    backbone = build_checked_backbone(cfg, info, state, path)
    backbone.eval()
    return backbone, {**info, "config": cfg, "step": ckpt.get("step", 0)}


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


def backbone_metadata(
    metadata: dict[str, str], source: str | Path = "the file"
) -> dict[str, Any] | None:
    """The mocolab info stored in a ``.safetensors`` export, or ``None`` for a foreign file.

    Raises:
        CheckpointError: mocolab's metadata that is not JSON, or lacks its ``config``.
    """
    try:
        fmt = json.loads(metadata.get("format", "null"))
    except ValueError:
        return None  # another program's metadata: a foreign file
    if fmt != SAFETENSORS_FORMAT:
        return None
    info = {}
    for key, value in metadata.items():
        try:
            info[key] = json.loads(value)
        except (ValueError, TypeError, RecursionError):
            raise CheckpointError(
                f"{source}: its metadata {key} is not JSON ({_short(value)}); the file is "
                f"damaged or was edited: export it again"
            ) from None
    if not isinstance(info.get("config"), dict):
        raise CheckpointError(
            f"{source}: its metadata has no config mapping (the run's options); the file is "
            f"damaged or was edited: export it again"
        )
    return info


def load_exported_backbone(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of a mocolab ``.safetensors`` export and its info, as
    :func:`load_backbone_and_info` returns them for a run."""
    state, metadata = _read_safetensors(Path(path))
    info = backbone_metadata(metadata, path)
    if info is None:
        raise CheckpointError(
            f"{path} is a safetensors file without mocolab's metadata, so its architecture and "
            f"normalisation are unknown; use it as --init, or export the run again with "
            f"mocolab export RUN_DIR --format safetensors"
        )
    backbone = build_checked_backbone(info["config"], info, state, path)
    backbone.to(map_location).eval()
    info.pop("format", None)
    return backbone, info
