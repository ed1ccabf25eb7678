"""Exports load in the target libraries and give mocolab's features; the Encoder's input
pipeline matches torchvision's transforms."""

from __future__ import annotations

import io
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision
from export_helpers import fake_run
from torch import nn
from torchvision.transforms.v2 import functional as TF

import mocolab
from mocolab.checkpoint import load_backbone_and_info
from mocolab.cli import main
from mocolab.config import ConfigError
from mocolab.export import export_backbone
from mocolab.weights import write_atomic


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """A width-64 ResNet-18 run with the ImageNet stem: what torchvision and timm build."""
    return fake_run(tmp_path_factory.mktemp("runs"), "r64")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A narrow run with the compact stem (the CPU demo's kind)."""
    return fake_run(tmp_path_factory.mktemp("runs"), "small", width=8, stem="compact")


def reference_features(run, x: torch.Tensor) -> torch.Tensor:
    """mocolab's features of float images in [0, 1] at the crop size: normalise, backbone."""
    backbone, info = load_backbone_and_info(run)
    with torch.no_grad():
        return backbone(TF.normalize(x, info["mean"], info["std"]))


def test_torchvision_export_loads_strictly_and_gives_the_same_features(run64, tmp_path):
    out = export_backbone(run64, "torchvision", tmp_path / "tv.pth").path
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = model.eval()(TF.normalize(x, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]))
    torch.testing.assert_close(got, reference_features(run64, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.pth"]  # no temporary files left


def test_timm_export_loads_strictly_and_gives_the_same_features(run64, tmp_path):
    timm = pytest.importorskip("timm")
    out = export_backbone(run64, "timm", tmp_path / "timm.pth").path
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = model.eval()(TF.normalize(x, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]))
    torch.testing.assert_close(got, reference_features(run64, x))


def test_other_stems_export_with_code_that_rebuilds_them(tmp_path):
    run = fake_run(tmp_path, "gray", stem="cifar", in_channels=1)
    result = export_backbone(run, "torchvision", tmp_path / "gray.pth")
    code = [line[4:] for line in result.notes if line.startswith("    ") and not line.strip().startswith("#")]
    scope: dict = {}
    exec("\n".join(code), scope)  # the snippet printed for the user
    model = scope["model"].eval()
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        got = model(TF.normalize(x, [0.4], [0.2]))
    torch.testing.assert_close(got, reference_features(run, x))


def test_narrow_backbones_are_refused_for_torchvision_and_timm(small, capsys):
    with pytest.raises(ConfigError, match=r"width 8.*width 64"):
        export_backbone(small, "torchvision")
    assert main(["export", str(small), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert "width 8" in err and "Traceback" not in err


def test_safetensors_export_round_trips_with_its_metadata(small, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    out = export_backbone(small, "safetensors", tmp_path / "b.safetensors").path
    backbone, _ = load_backbone_and_info(small)
    assert set(st.load_file(str(out))) == set(backbone.state_dict())
    from_export, from_run = mocolab.load_encoder(out), mocolab.load_encoder(small)
    assert from_export.info["config"]["width"] == 8 and from_export.info["step"] == 7
    x = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(from_export(x), from_run(x))


def test_onnx_export_matches_in_onnxruntime(small, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = export_backbone(small, "onnx", tmp_path / "e.onnx").path
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 32, 32)
    got = session.run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), reference_features(small, x),
                               atol=1e-4, rtol=1e-4)


def test_torchscript_export_matches(small, tmp_path):
    out = export_backbone(small, "torchscript", tmp_path / "e.pt", check=False).path
    loaded = torch.jit.load(str(out))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference_features(small, x))


def official_converter(obj: dict) -> dict:
    """facebookresearch/moco detection/convert-pretrain-to-detectron2.py, verbatim but for
    leaving out fc and num_batches_tracked (mocolab's backbone has no fc)."""
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q.") or "fc" in k or "num_batches_tracked" in k:
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = v.numpy()
    return {"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}


class NumpyOnly(pickle.Unpickler):
    """Reads a pickle of plain containers and numpy arrays, nothing else."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def test_detectron2_export_is_the_official_converters_pickle(run64, tmp_path):
    out = export_backbone(run64, "detectron2", tmp_path / "d2.pkl").path
    with open(out, "rb") as f:
        ours = NumpyOnly(f).load()
    backbone, _ = load_backbone_and_info(run64)
    official = official_converter({"module.encoder_q." + k: v for k, v in backbone.state_dict().items()})
    assert ours["__author__"] == "MOCO" and ours["matching_heuristics"] is True
    assert set(ours["model"]) == set(official["model"])
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.norm.weight",
                 "res3.0.shortcut.weight", "res5.1.conv2.norm.bias"):
        assert isinstance(ours["model"][name], np.ndarray)
        np.testing.assert_array_equal(ours["model"][name], official["model"][name])


def test_detectron2_needs_the_imagenet_stem(small):
    with pytest.raises(ConfigError, match="stem"):
        export_backbone(small, "detectron2")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.bin"
    write_atomic(path, lambda f: f.write(b"old"))

    def fail(f: io.BufferedWriter) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.parametrize("fmt,package", [("safetensors", "safetensors"), ("onnx", "onnx")])
def test_a_missing_optional_package_is_named(fmt, package, small, tmp_path, monkeypatch):
    for name in (package, f"{package}.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        export_backbone(small, fmt, tmp_path / "x")


def test_cli_export_default_output_and_errors(small, capsys):
    pytest.importorskip("safetensors")
    assert main(["export", str(small), "--format", "safetensors"]) == 0
    assert "wrote" in capsys.readouterr().out and (small / "backbone.safetensors").is_file()
    assert main(["export", str(small.parent / "nope"), "--format", "safetensors"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_encoder_takes_uint8_or_float_any_size_and_channels(small):
    encoder = mocolab.load_encoder(small)
    backbone, info = load_backbone_and_info(small)
    u8 = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    x = u8.float() / 255
    square = TF.center_crop(x, [48, 48])
    resized = TF.resize(square, [32, 32], antialias=True)  # torchvision's Resize, bilinear
    with torch.no_grad():
        want = backbone(TF.normalize(resized, info["mean"], info["std"]))
        torch.testing.assert_close(encoder(u8), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(encoder(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(encoder(u8[0]), want[:1], atol=1e-4, rtol=1e-4)
        gray = torch.rand(1, 1, 32, 32)
        torch.testing.assert_close(encoder(gray), encoder(gray.expand(1, 3, 32, 32)))


def test_load_encoder_is_a_module_ready_for_inference_with_its_normalisation(small):
    """mocolab.load_encoder(path): an nn.Module in eval mode that takes images in 0–1 and
    applies the run's normalisation itself: (x − mean) / std, then the bare backbone.
    mocolab.load_backbone, its old name, warns and is the same function."""
    model = mocolab.load_encoder(small)
    assert isinstance(model, nn.Module) and not model.training
    with pytest.warns(DeprecationWarning, match="mocolab.load_encoder"):
        assert mocolab.load_backbone is mocolab.load_encoder
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_features(small, x))
