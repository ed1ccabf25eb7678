"""Weights in and out of the ecosystem: read foreign checkpoints safely, rename their keys.

Every file is read with ``torch.load(weights_only=True)`` or safetensors, so a file that needs
arbitrary pickled code is refused, never run. Backbone state dicts use torchvision's ResNet
key names (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight`` …, no ``fc``);
:func:`backbone_from_state` finds them inside the layouts of

* mocolab runs (``query_encoder.backbone.*``) and mocolab ``.safetensors`` exports,
* the official MoCo v1/v2 (``module.encoder_q.*``) and v3 (``module.base_encoder.*``),
* solo-learn (``backbone.*`` with torchvision names),
* lightly (``backbone.*`` of ``nn.Sequential(*list(resnet.children())[:-1])``:
  ``backbone.0`` = conv1, ``backbone.1`` = bn1, ``backbone.4``–``7`` = layer1–4),
* plain torchvision / timm ResNet state dicts (optionally under DDP's ``module.``),
* ViTs with timm's names (``patch_embed.proj.weight``, ``cls_token``, ``blocks.N.*`` …) in any
  of these layouts: timm, the official MoCo v3 ViT checkpoints, mocolab ViT runs; and
  torchvision's ``VisionTransformer`` (``conv_proj``, ``class_token``, ``encoder.layers.*``),
  renamed to timm's (:func:`vit_from_torchvision`).

Classifier and projection heads (``fc``, ``head``, ``projector`` …) are dropped.

Caveats: lightly's own ``ResNetGenerator`` (its benchmarks' CIFAR ResNet) has other names and
is not read. solo-learn's CIFAR stem is a 3×3 conv with padding 2 (mocolab's ``cifar`` stem has
padding 1): its weights load, but the features differ slightly. Lightning checkpoints that
pickle a config object (solo-learn's ``hyper_parameters``) are refused by ``weights_only``;
the message says how to re-save the state dict from a trusted file.
:func:`to_detectron2` renames a backbone as the official MoCo's
``detection/convert-pretrain-to-detectron2.py`` does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from .checkpoint import (  # mocolab's own formats live in checkpoint.py; re-exported here
    SAFETENSORS_FORMAT as SAFETENSORS_FORMAT,
)
from .checkpoint import (
    _read_safetensors,
    find_checkpoint,
    require,
    torch_load_safely,
)
from .checkpoint import backbone_metadata as backbone_metadata
from .checkpoint import load_exported_backbone as load_exported_backbone
from .errors import CheckpointError
from .momentum import MomentumEncoder
from .safeio import write_atomic as write_atomic  # re-exported: its home is safeio

if TYPE_CHECKING:
    from .methods.base import Method

# Children of torchvision's ResNet in order; lightly wraps ``children()[:-1]`` in a Sequential.
_LIGHTLY_CHILDREN = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
# Key prefixes of whole encoders, most specific first: (prefix, layout name).
_PREFIXES = (
    ("query_encoder.backbone.", "mocolab"),
    ("module.encoder_q.", "MoCo v1/v2 (official)"),
    ("encoder_q.", "MoCo v1/v2 (official, without DDP)"),
    ("module.base_encoder.", "MoCo v3 (official)"),
    ("base_encoder.", "MoCo v3 (official, without DDP)"),
    ("module.backbone.", "solo-learn / lightly (DDP)"),
    ("backbone.", "solo-learn / lightly"),
    ("module.", "DDP-wrapped torchvision / timm"),
    ("", "torchvision / timm"),
)
_HEADS = ("fc.", "head.", "heads.", "classifier.")
_VIT_KEYS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")  # timm's ViT body


# --- reading -------------------------------------------------------------------------------


def read_weights(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The object stored in a weights file and its metadata (safetensors only, else ``{}``).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, unsafe (needs pickled code), truncated or corrupt file.
    """
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return torch_load_safely(
        path,
        fix="download or export it again, or save a plain state "
        "dict of tensors from the code that wrote it",
    ), {}


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint: ``state_dict`` / ``model`` / ``module`` / itself."""
    if isinstance(obj, dict) and obj.get("format") == "mocolab" and "model" in obj:
        return cast(dict[str, Tensor], obj["model"])
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return cast(dict[str, Tensor], obj[key])
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(
        f"{path} holds no state dict (a dict of tensors, or one under "
        f"'state_dict' / 'model'); it is not a weights file mocolab can read"
    )


def backbone_from_state(
    state: dict[str, Tensor], source: str = "state dict"
) -> tuple[dict[str, Tensor], str]:
    """The ResNet backbone inside ``state`` with torchvision's key names, and its layout's name.

    Raises:
        CheckpointError: no known layout holds ``conv1.weight`` and ``layer1.*`` keys.
    """
    for prefix, layout in _PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            continue
        if "0.weight" in sub and any(k.startswith("4.") for k in sub):  # lightly's Sequential
            sub = {
                _LIGHTLY_CHILDREN[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v
                for k, v in sub.items()
                if k.split(".", 1)[0] in _LIGHTLY_CHILDREN
            }
            layout = "lightly"
        if "conv_proj.weight" in sub and "class_token" in sub:  # torchvision's ViT
            return vit_from_torchvision(sub), layout
        if "patch_embed.proj.weight" in sub:  # a ViT with timm's names
            return {k: v for k, v in sub.items() if k.split(".", 1)[0] in _VIT_KEYS}, layout
        sub = {k: v for k, v in sub.items() if _is_backbone_key(k)}
        if "conv1.weight" in sub and any(k.startswith("layer1.") for k in sub):
            return sub, layout
    head = ", ".join(list(state)[:4])
    raise CheckpointError(
        f"no ResNet backbone found (nor a ViT) in {source} (first keys: {head}); mocolab reads torchvision/"
        f"timm ResNets and ViTs, the official MoCo v1/v2/v3, solo-learn and lightly layouts and mocolab runs"
    )


def _is_backbone_key(key: str) -> bool:
    return key.split(".", 1)[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def load_backbone_weights(path: str | Path) -> dict[str, Tensor]:
    """A backbone's state dict (a ResNet with torchvision's key names, no classifier; a ViT
    with timm's) from any supported checkpoint layout (see the module docstring), read safely.

    Example::

        state = load_backbone_weights("moco_v2_800ep_pretrain.pth.tar")
        model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
        model.load_state_dict(state)
    """
    obj, _ = read_weights(path)
    state, _ = backbone_from_state(_unwrap(obj, Path(path)), str(path))
    return state


def load_foreign_backbone(path: str | Path) -> dict[str, Tensor]:
    """Deprecated name of :func:`load_backbone_weights`."""
    warnings.warn(
        "mocolab.load_foreign_backbone is now mocolab.load_backbone_weights (the same state "
        "dict); the old name will be removed",
        DeprecationWarning,
        stacklevel=2,
    )
    return load_backbone_weights(path)


def init_backbone(method: Method, path: str | Path) -> str:
    """Initialise ``method``'s backbone from ``path`` (``--init``) and make the key encoder
    its copy again (MoCo: "f_k is initialised as f_q"). Returns the detected layout's name.

    A 3-channel first convolution (a ViT's patch projection) loaded into a 1-channel model is
    summed over RGB (the response to a gray image stays the same), as timm's
    ``adapt_input_conv`` does.

    Raises:
        CheckpointError: unreadable file, no backbone in it, or shapes that do not fit.
    """
    obj, _ = read_weights(path)
    state, layout = backbone_from_state(_unwrap(obj, Path(path)), str(path))
    backbone = method.backbone
    target = backbone.state_dict()
    for first in ("conv1.weight", "patch_embed.proj.weight"):
        w = state.get(first)
        if w is not None and first in target and w.shape[1] == 3 and target[first].shape[1] == 1:
            state = {**state, first: w.sum(dim=1, keepdim=True)}
    for k, v in state.items():
        if k in target and target[k].shape != v.shape:
            raise CheckpointError(
                f"--init {path}: {k} is {tuple(v.shape)} there but {tuple(target[k].shape)} in "
                f"this model; set --arch, --width, --stem (ViTs: --patch-size, --crop-size) to the "
                f"pretrained network's"
            )
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"--init {path} ({layout}) does not fit a {type(backbone).__name__} backbone: "
            f"missing {', '.join(missing[:3]) or 'none'}, unexpected "
            f"{', '.join(unexpected[:3]) or 'none'}; set --arch to the pretrained network's"
        )
    for ema in (m for m in method.children() if isinstance(m, MomentumEncoder)):
        ema.module.load_state_dict(method.query_encoder.state_dict())  # MoCo f_k, BYOL target
    return layout


# --- writing -------------------------------------------------------------------------------


def save_safetensors(
    state: dict[str, Tensor], path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``state`` as safetensors (atomically); ``metadata`` values are stored as JSON."""
    safetensors_torch = require("safetensors.torch", "safetensors", "--format safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    blob = safetensors_torch.save(tensors, metadata=meta)
    return write_atomic(path, lambda f: f.write(blob))


def to_detectron2(state: dict[str, Tensor]) -> dict[str, Any]:
    """A backbone as detectron2 reads it: the renaming of the official MoCo's
    ``convert-pretrain-to-detectron2.py`` (``conv1`` → ``stem.conv1``, ``layerN`` → ``res(N+1)``,
    ``bnK`` → ``convK.norm``, ``downsample.0/1`` → ``shortcut`` / ``shortcut.norm``) with numpy
    values, in the dict ``{"model", "__author__": "MOCO", "matching_heuristics": True}``.
    ``num_batches_tracked`` counters are left out (detectron2 has no use for them).
    """
    model = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[k] = v.detach().cpu().numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


# timm's ViT names (mocolab's) → torchvision's VisionTransformer; {i} is the block number.
_VIT_TORCHVISION = (
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    ("patch_embed.proj.", "conv_proj."),
    ("blocks.{i}.norm1.", "encoder.layers.encoder_layer_{i}.ln_1."),
    (
        "blocks.{i}.attn.qkv.weight",
        "encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight",
    ),
    ("blocks.{i}.attn.qkv.bias", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias"),
    ("blocks.{i}.attn.proj.", "encoder.layers.encoder_layer_{i}.self_attention.out_proj."),
    ("blocks.{i}.norm2.", "encoder.layers.encoder_layer_{i}.ln_2."),
    ("blocks.{i}.mlp.fc1.", "encoder.layers.encoder_layer_{i}.mlp.0."),
    ("blocks.{i}.mlp.fc2.", "encoder.layers.encoder_layer_{i}.mlp.3."),
    ("norm.", "encoder.ln."),
)


def _rename_vit(state: dict[str, Tensor], forward: bool) -> dict[str, Tensor]:
    import re

    out = {}
    for key, value in state.items():
        for timm_name, tv_name in _VIT_TORCHVISION:
            src, dst = (timm_name, tv_name) if forward else (tv_name, timm_name)
            pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
            match = re.match(pattern, key)
            if match:
                new = dst.replace("{i}", match.group(1)) if match.groups() else dst
                out[new + key[match.end() :]] = value
                break
        else:
            if not forward and key.split(".", 1)[0] == "heads":
                continue  # torchvision's classifier
            raise CheckpointError(
                f"ViT key {key!r} has no {'torchvision' if forward else 'timm'} "
                f"name; the model is not a plain ViT"
            )
    return out


def vit_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ViT state dict with timm's names (mocolab's) renamed for torchvision's
    ``VisionTransformer`` with ``heads = Identity()``: ``cls_token`` → ``class_token``,
    ``patch_embed.proj`` → ``conv_proj``, ``blocks.i.attn.qkv`` → ``encoder.layers.encoder_layer_i.
    self_attention.in_proj_*`` (q, k, v stacked in the same order), ``mlp.fc1/fc2`` → ``mlp.0/3``,
    ``norm`` → ``encoder.ln``."""
    return _rename_vit(state, forward=True)


def vit_from_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`vit_to_torchvision`; torchvision's ``heads`` are dropped."""
    return _rename_vit(state, forward=False)
