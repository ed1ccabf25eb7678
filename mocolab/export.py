"""``mocolab export``: a run's backbone for torchvision, timm, safetensors, ONNX, TorchScript or
detectron2, written atomically and checked by loading it back.

* ``torchvision`` / ``timm``: the backbone's state dict with the libraries' own key names and
  no ``fc``, so ``model.load_state_dict(sd, strict=True)`` works on ``resnet50()`` with
  ``fc = Identity()`` (timm: ``create_model("resnet50", num_classes=0)``). ViTs: timm's
  ``VisionTransformer`` (``create_model("vit_small_patch16_224", num_classes=0, img_size=…,
  patch_size=…)``) or torchvision's (``VisionTransformer(…)`` with ``heads = Identity()``,
  renamed by :func:`mocolab.weights.vit_to_torchvision`). ``.pth`` (``torch.save``) or, for an
  ``--out`` ending in ``.safetensors``, safetensors.
* ``safetensors``: the same tensors plus mocolab's metadata (architecture, stem, width,
  normalisation, config), so :func:`mocolab.load_encoder` rebuilds the :class:`Encoder`.
* ``onnx`` / ``torchscript``: the :class:`~mocolab.encoder.Encoder` graph, normalisation
  included: input float32 images in 0–1, ``N×C×S×S`` (S = the run's crop size), output ``N×D``.
* ``detectron2``: the official MoCo converter's pickle (see :func:`mocolab.weights.to_detectron2`).
"""

from __future__ import annotations

import argparse
import inspect
import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported when an export runs, so `mocolab --help` stays quick
    import torch
    from torch import nn

    from .encoder import Encoder

FORMATS = ("torchvision", "timm", "safetensors", "onnx", "torchscript", "detectron2")
DEFAULT_NAMES = {
    "torchvision": "backbone-torchvision.pth",
    "timm": "backbone-timm.pth",
    "safetensors": "backbone.safetensors",
    "onnx": "encoder.onnx",
    "torchscript": "encoder.torchscript.pt",
    "detectron2": "backbone-detectron2.pkl",
}
ONNX_OPSET = 17


@dataclass
class ExportResult:
    """Where an export went and what a user needs to know to load it."""

    path: Path
    format: str
    notes: list[str] = field(default_factory=list)


def default_output(source: str | Path, fmt: str) -> Path:
    """``RUN_DIR/<name by format>``, or beside the checkpoint file when given a file."""
    source = Path(source)
    return (source if source.is_dir() else source.parent) / DEFAULT_NAMES[fmt]


def export_backbone(
    source: str | Path, fmt: str, out: str | Path | None = None, *, check: bool = True
) -> ExportResult:
    """Export the backbone of ``source`` (a run directory, checkpoint or ``.safetensors``
    export) in format ``fmt`` (one of :data:`FORMATS`) to ``out``.

    With ``check``, the written file is loaded back (the torchvision model, and the timm model
    when timm is installed, with ``strict=True``; onnxruntime when installed; ``torch.jit.load``)
    and its outputs compared with mocolab's.

    Raises:
        ConfigError: unknown format, ``out`` a folder, a backbone the target library cannot
            build, or a missing optional package (the message names it).
        CheckpointError: unreadable source, or an export that does not reproduce the features.
    """
    import torch

    from .backbones import is_vit
    from .checkpoint import load_backbone_and_info
    from .encoder import Encoder
    from .methods.lab import LabBackbone
    from .weights import SAFETENSORS_FORMAT, save_safetensors, vit_to_torchvision, write_atomic

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    out = Path(out) if out is not None else default_output(source, fmt)
    if out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; give the export's file name, e.g. "
            f"--out {out / DEFAULT_NAMES[fmt]}"
        )
    backbone, info = load_backbone_and_info(source)
    if isinstance(backbone, LabBackbone) and fmt in ("torchvision", "timm", "detectron2"):
        raise ConfigError(
            f"--format {fmt}: a {info['config']['method']} backbone is {backbone.what} behind "
            f"a colour conversion, which {fmt} cannot hold in one model; use --format "
            "safetensors, onnx or torchscript"
        )
    arch = info["config"]["arch"]
    if fmt == "detectron2" and is_vit(arch):
        raise ConfigError(
            f"--format detectron2 exports ResNets; this backbone is a {arch}. Use --format timm, "
            "torchvision, safetensors, onnx or torchscript"
        )
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    encoder = Encoder(
        backbone, info["mean"], info["std"], info["crop_size"], info["in_channels"]
    ).eval()
    result = ExportResult(out, fmt)
    if fmt in ("torchvision", "timm"):
        if is_vit(arch):
            info = {**info, "vit": vit_shape(backbone)}
            if fmt == "torchvision" and info["vit"]["global_pool"] != "token":
                raise ConfigError(
                    "--format torchvision: torchvision's VisionTransformer returns the class "
                    "token, but this backbone's features are the mean of its patch tokens "
                    "(--vit-pool avg); use --format timm, safetensors, onnx or torchscript"
                )
            if fmt == "torchvision" and info["vit"]["layer_scale"]:
                raise ConfigError(
                    "--format torchvision: torchvision's VisionTransformer has no LayerScale, "
                    "which this backbone's blocks have (--vit-layer-scale, DINOv2); use --format "
                    "timm, safetensors, onnx or torchscript"
                )
            if fmt == "torchvision":
                state = vit_to_torchvision(state)
        else:
            _check_library_shape(fmt, arch, info)
        if out.suffix == ".safetensors":
            save_safetensors(state, out)
        else:
            write_atomic(out, lambda f: torch.save(state, f))
        result.notes = _library_snippet(fmt, arch, info, out)
        if check:
            result.notes.append(_check_library(fmt, arch, info, state, backbone))
    elif fmt == "safetensors":
        meta = {k: v for k, v in info.items() if k != "config"}
        save_safetensors(
            state, out, {"format": SAFETENSORS_FORMAT, **meta, "config": info["config"]}
        )
        result.notes = ["load it with: encoder = mocolab.load_encoder(" + repr(str(out)) + ")"]
    elif fmt == "onnx":
        result.notes = _export_onnx(encoder, info, out, check)
    elif fmt == "torchscript":
        result.notes = _export_torchscript(encoder, info, out, check)
    else:
        result.notes = _export_detectron2(state, arch, info, out)
    return result


# --- torchvision / timm --------------------------------------------------------------------


def _check_library_shape(fmt: str, arch: str, info: dict[str, Any]) -> None:
    width = info.get("width", 64)
    if width != 64:
        raise ConfigError(
            f"--format {fmt}: this backbone has width {width}, but {fmt}'s {arch} has width 64 "
            f"and no option to change it; use --format safetensors, onnx or torchscript, or "
            f"pretrain with --width 64"
        )


def _stem_lines(info: dict[str, Any], channels_done: bool = False) -> list[str]:
    """Code that gives a library ResNet this backbone's stem (empty for the standard one)."""
    c, stem = info["in_channels"], info["stem"]
    if stem == "imagenet":
        return (
            []
            if c == 3 or channels_done
            else [
                f"model.conv1 = torch.nn.Conv2d({c}, 64, 7, 2, 3, bias=False)  # {c}-channel input"
            ]
        )
    stride = 1 if stem == "cifar" else 2
    return [
        f"model.conv1 = torch.nn.Conv2d({c}, 64, 3, {stride}, 1, bias=False)  # stem {stem!r}",
        "model.maxpool = torch.nn.Identity()",
    ]


def vit_shape(backbone: nn.Module) -> dict[str, Any]:
    """What a library needs to build the same ViT: image and patch side, depth, heads, D, and
    its features (``global_pool``: the [CLS] token or the mean of the patch tokens) and the
    initial value of its blocks' LayerScale (``layer_scale``, 0: none; timm's ``init_values``)."""
    vit: Any = backbone  # a mocolab.vit.VisionTransformer
    return {
        "image_size": vit.patch_embed.grid * vit.patch_size,
        "patch_size": vit.patch_size,
        "depth": len(vit.blocks),
        "heads": vit.blocks[0].attn.num_heads,
        "dim": vit.num_features,
        "global_pool": getattr(vit, "global_pool", "token"),
        "layer_scale": float(getattr(vit, "layer_scale", 0.0)),
    }


def _timm_name(arch: str, info: dict[str, Any]) -> str:
    return f"{arch}_patch16_224" if "vit" in info else arch


def _model_lines(fmt: str, arch: str, info: dict[str, Any]) -> list[str]:
    """Code that builds the library model this export loads into (``model``)."""
    c, v = info["in_channels"], info.get("vit")
    if fmt == "timm":
        extra = f", in_chans={c}" if c != 3 else ""
        if v:
            extra = (
                f", img_size={v['image_size']}, patch_size={v['patch_size']}, "
                f"depth={v['depth']}, num_heads={v['heads']}" + extra
            )
            if v.get("global_pool", "token") != "token":  # the mean of the normed patch tokens
                extra += f', global_pool="{v["global_pool"]}", fc_norm=False'
            if v.get("layer_scale"):  # timm's LayerScale: blocks.N.ls1.gamma / ls2.gamma
                extra += f", init_values={v['layer_scale']}"

        return [
            "import timm, torch",
            f'model = timm.create_model("{_timm_name(arch, info)}", num_classes=0{extra})',
            *([] if v else _stem_lines(info, channels_done=True)),
        ]
    if v:
        return [
            "import torch",
            "from torchvision.models.vision_transformer import VisionTransformer",
            f"model = VisionTransformer(image_size={v['image_size']}, patch_size={v['patch_size']}, "
            f"num_layers={v['depth']}, num_heads={v['heads']}, hidden_dim={v['dim']}, "
            f"mlp_dim={4 * v['dim']})",
            *(
                [
                    f"model.conv_proj = torch.nn.Conv2d({c}, {v['dim']}, {v['patch_size']}, "
                    f"{v['patch_size']})  # {c}-channel input"
                ]
                if c != 3
                else []
            ),
            "model.heads = torch.nn.Identity()",
        ]
    return [
        "import torch, torchvision",
        f"model = torchvision.models.{arch}()",
        *_stem_lines(info),
        "model.fc = torch.nn.Identity()",
    ]


def _library_snippet(fmt: str, arch: str, info: dict[str, Any], out: Path) -> list[str]:
    c = info["in_channels"]
    lines = _model_lines(fmt, arch, info)
    if out.suffix == ".safetensors":
        lines.append(f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))")
    else:
        lines.append(f"model.load_state_dict(torch.load({str(out)!r}, weights_only=True))")
    lines.append(
        f"# inputs: RGB in 0–1, normalised with mean={info['mean']} std={info['std']}, "
        f"{info['crop_size']}×{info['crop_size']} px"
        if c == 3
        else f"# inputs: {c}-channel in 0–1, normalised with mean={info['mean']} "
        f"std={info['std']}, {info['crop_size']}×{info['crop_size']} px"
    )
    return ["load it with:", *("    " + line for line in lines)]


def library_model(fmt: str, arch: str, info: dict[str, Any]) -> nn.Module:
    """The torchvision or timm model that the snippet of an export builds (``info`` as
    :func:`export_backbone` completes it: with ``"vit"`` = :func:`vit_shape` for a ViT): the
    snippet's own code (:func:`_model_lines`) is run, so the export check loads the weights
    into exactly what a user is told to build."""
    namespace: dict[str, Any] = {}
    exec("\n".join(_model_lines(fmt, arch, info)), namespace)  # our own code, not input
    return cast("nn.Module", namespace["model"])


def _check_library(
    fmt: str, arch: str, info: dict[str, Any], state: dict[str, torch.Tensor], backbone: nn.Module
) -> str:
    """Load the export into the library's model strictly and compare features with ours."""
    import torch

    from .errors import CheckpointError

    if fmt == "timm":
        try:
            import timm  # noqa: F401
        except ImportError:
            return "not checked: pip install timm to load it back and compare"
    model = library_model(fmt, arch, info).eval()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"export check: the weights do not load into {fmt}'s "
            f"{_timm_name(arch, info)} ({str(e).splitlines()[0]})"
        ) from None
    x = _example(info)
    with torch.no_grad():
        diff = _compare(f"{fmt}'s model", model(x), backbone.eval()(x))
    return f"checked: loads strictly into {fmt}'s model, max |Δ| of features = {diff:.2g}"


# --- ONNX / TorchScript --------------------------------------------------------------------


def _example(info: dict[str, Any], n: int = 2) -> torch.Tensor:
    import torch

    s = info["crop_size"]
    return torch.rand(n, info["in_channels"], s, s, generator=torch.Generator().manual_seed(0))


def _compare(name: str, got: Any, want: torch.Tensor) -> float:
    import torch

    from .errors import CheckpointError

    got = torch.as_tensor(got, dtype=torch.float32)
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not diff <= 1e-4 * max(1.0, want.abs().max().item()):
        raise CheckpointError(
            f"export check: {name} gives other features than mocolab "
            f"(max |Δ| = {diff:.3g}); please report this with the run's config"
        )
    return diff


def _input_note(info: dict[str, Any]) -> str:
    s = info["crop_size"]
    return (
        f"input 'images': float32 N×{info['in_channels']}×{s}×{s} in 0–1 (normalisation is "
        f"inside the graph); output 'features': N×D"
    )


def _export_onnx(encoder: Encoder, info: dict[str, Any], out: Path, check: bool) -> list[str]:
    import torch

    from .checkpoint import require
    from .weights import write_atomic

    onnx = require("onnx", "onnx", "--format onnx")
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
        # the TorchScript-based exporter: quick, and no onnxscript needed (torch < 2.5 has
        # no `dynamo` argument and only this exporter)
        legacy: dict[str, Any] = (
            {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        )
        torch.onnx.export(
            encoder,
            (_example(info),),
            cast(Any, buf),  # a file object: the stubs name only paths
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            **legacy,
        )
    model = onnx.load_from_string(buf.getvalue())
    for key, value in (
        ("mean", info["mean"]),
        ("std", info["std"]),
        ("crop_size", info["crop_size"]),
        ("producer", "mocolab"),
    ):
        model.metadata_props.add(key=key, value=str(value))  # the input pipeline, for users
    blob = model.SerializeToString()
    write_atomic(out, lambda f: f.write(blob))
    notes = [_input_note(info)]
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            return [*notes, "not checked: pip install onnxruntime to compare its outputs"]
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = _example(info, 3)  # another batch size than the traced one
        with torch.no_grad():
            want = encoder(x)
        diff = _compare("onnxruntime", session.run(None, {"images": x.numpy()})[0], want)
        notes.append(f"checked with onnxruntime: max |Δ| = {diff:.2g}")
    return notes


def _export_torchscript(
    encoder: Encoder, info: dict[str, Any], out: Path, check: bool
) -> list[str]:
    import torch

    from .weights import write_atomic

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(encoder, (_example(info),))  # type: ignore[no-untyped-call]
        torch.jit.save(traced, buf)
    blob = buf.getvalue()
    write_atomic(out, lambda f: f.write(blob))
    notes = [_input_note(info), f"load it with: model = torch.jit.load({str(out)!r})"]
    if check:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(out))  # type: ignore[no-untyped-call]
            x = _example(info, 3)
            diff = _compare("the TorchScript module", loaded(x), encoder(x))
        notes.append(f"checked with torch.jit.load: max |Δ| = {diff:.2g}")
    return notes


# --- detectron2 ----------------------------------------------------------------------------


def _export_detectron2(
    state: dict[str, torch.Tensor], arch: str, info: dict[str, Any], out: Path
) -> list[str]:
    from .weights import to_detectron2, write_atomic

    if info["stem"] != "imagenet":
        raise ConfigError(
            f"--format detectron2: this backbone has the {info['stem']!r} stem, but detectron2's "
            f"ResNet has the 7×7 'imagenet' stem only; pretrain with --stem imagenet to detect "
            f"with it"
        )
    blob = pickle.dumps(to_detectron2(state), protocol=pickle.HIGHEST_PROTOCOL)
    write_atomic(out, lambda f: f.write(blob))
    width = info.get("width", 64)
    expansion = 4 if arch in ("resnet50", "resnet101") else 1
    mean = [round(255 * m, 3) for m in info["mean"]]
    std = [round(255 * s, 3) for s in info["std"]]
    return [
        "detectron2 config (as the official MoCo's detection configs; torchvision ResNets "
        "stride in the 3×3 conv):",
        f"    MODEL.WEIGHTS {out}  MODEL.RESNETS.DEPTH {arch[len('resnet') :]}  "
        f"MODEL.RESNETS.STRIDE_IN_1X1 False  INPUT.FORMAT RGB",
        f"    MODEL.PIXEL_MEAN {mean}  MODEL.PIXEL_STD {std}",
        *(
            [
                f"    MODEL.RESNETS.STEM_OUT_CHANNELS {width}  "
                f"MODEL.RESNETS.RES2_OUT_CHANNELS {width * expansion}"
            ]
            if width != 64
            else []
        ),
    ]


# --- command line --------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``mocolab export RUN_DIR --format F [--out FILE]``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="write the backbone for torchvision, timm, safetensors, ONNX, "
        "TorchScript or detectron2",
        description="Export a run's backbone. torchvision/timm: a state dict that loads with "
        "strict=True (fc = Identity); safetensors: with mocolab's metadata; "
        "onnx/torchscript: normalisation included, input in 0–1; detectron2: the "
        "official MoCo converter's pickle.",
    )
    p.add_argument("run_dir", help="a run directory, checkpoint file or .safetensors export")
    p.add_argument("--format", required=True, choices=FORMATS, help="the target")
    p.add_argument("--out", help="output file (default: in the run directory, named by format)")
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="do not load the export back to compare its outputs",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from .safeio import writing

    hint = "" if args.out else "pass --out FILE to write it elsewhere"  # a read-only run
    with writing(args.out or args.run_dir, note=hint):
        result = export_backbone(args.run_dir, args.format, args.out, check=args.check)
    print(f"wrote {result.path} ({result.format})")
    for note in result.notes:
        print(note)
    return 0
