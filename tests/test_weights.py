"""Import of foreign weights: each layout built here with the foreign code's own key names gives
the same features as the torchvision model it came from; unsafe and damaged files are refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from export_helpers import randomize_bn
from torch import nn

from mocolab.backbones import resnet
from mocolab.checkpoint import CheckpointError
from mocolab.cli import main
from mocolab.config import build_config
from mocolab.methods import build_method
from mocolab.train import pretrain
from mocolab.weights import init_backbone, load_backbone_weights

WIDTH = 16  # a torchvision ResNet with narrower stages: the same key names, quick tests


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """A torchvision ResNet-18 (width 16) with random weights and BN statistics, no fc, eval."""
    torch.manual_seed(1)
    model = resnet("resnet18", in_channels=3, stem="imagenet", width=WIDTH)
    assert isinstance(model, torchvision.models.ResNet)
    return randomize_bn(model, 1).eval()


@pytest.fixture(scope="module")
def foreign(reference) -> dict[str, object]:
    return layouts(reference)


def features_of(state: dict[str, torch.Tensor], x: torch.Tensor, width: int = WIDTH) -> torch.Tensor:
    ours = resnet("resnet18", in_channels=3, stem="imagenet", width=width)
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        return ours.eval()(x)


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def noise_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v.float()) for k, v in state.items()}


def layouts(ref: nn.Module) -> dict[str, object]:
    """Checkpoints in the foreign projects' layouts, built from their documented key names."""
    backbone = ref.state_dict()  # torchvision names, fc = Identity (no fc keys)
    d = 8 * WIDTH
    fc = nn.Linear(d, 10)
    tv_state = {**backbone, "fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}
    mlp = {"fc.0.weight": torch.randn(d, d), "fc.0.bias": torch.randn(d),
           "fc.2.weight": torch.randn(128, d), "fc.2.bias": torch.randn(128)}
    # lightly: backbone = nn.Sequential(*list(resnet.children())[:-1]) of a model with its fc
    tv = resnet("resnet18", in_channels=3, stem="imagenet", width=WIDTH)
    tv.fc = fc
    tv.load_state_dict(tv_state)
    lightly_backbone = nn.Sequential(*list(tv.children())[:-1])
    return {
        # facebookresearch/moco main_moco.py: {"epoch", "arch", "state_dict", "optimizer"}
        "moco_v2": {"epoch": 200, "arch": "resnet18", "optimizer": {},
                    "state_dict": {**prefixed({**backbone, **mlp}, "module.encoder_q."),
                                   **prefixed(noise_like({**backbone, **mlp}), "module.encoder_k."),
                                   "module.queue": torch.randn(128, 64),
                                   "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
        # facebookresearch/moco-v3 main_moco.py: base / momentum encoders, predictor
        "moco_v3": {"epoch": 100, "arch": "resnet18",
                    "state_dict": {**prefixed({**backbone, **mlp}, "module.base_encoder."),
                                   **prefixed(noise_like({**backbone, **mlp}), "module.momentum_encoder."),
                                   "module.predictor.0.weight": torch.randn(d, 128)}},
        # solo-learn (Lightning checkpoint): backbone, momentum_backbone, projector, classifier
        "solo_learn": {"epoch": 10, "global_step": 100,
                       "state_dict": {**prefixed(backbone, "backbone."),
                                      **prefixed(noise_like(backbone), "momentum_backbone."),
                                      "projector.0.weight": torch.randn(64, d),
                                      "classifier.weight": torch.randn(10, d),
                                      "classifier.bias": torch.randn(10)}},
        # lightly (MoCo example): backbone (Sequential of children), backbone_momentum, heads
        "lightly": {**prefixed(lightly_backbone.state_dict(), "backbone."),
                    **prefixed(noise_like(lightly_backbone.state_dict()), "backbone_momentum."),
                    "projection_head.layers.0.weight": torch.randn(d, d)},
        "torchvision": tv_state,
        "torchvision_ddp": prefixed(tv_state, "module."),
    }


@pytest.mark.parametrize("layout", ["moco_v2", "moco_v3", "solo_learn", "lightly", "torchvision",
                                    "torchvision_ddp"])
def test_each_foreign_layout_gives_the_same_features(layout, reference, foreign, tmp_path):
    path = tmp_path / f"{layout}.pth"
    torch.save(foreign[layout], path)
    state = load_backbone_weights(path)
    assert not any(k.startswith("fc") for k in state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = reference(x)
    torch.testing.assert_close(features_of(state, x), want)


def test_timm_weights_in_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("resnet18", num_classes=0), 2).eval()
    path = tmp_path / "timm.safetensors"
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(features_of(load_backbone_weights(path), x, width=64), want)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_would_run_code_is_refused(writer, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=r"refused.*could run code"):
        load_backbone_weights(path)
    assert not marker.exists()


def test_init_flag_refuses_unsafe_file_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": Exploit(marker)}, tmp_path / "evil.pt")
    code = main(["pretrain", "--data", "synthetic", "--width", "8", "--stem", "compact",
                 "--batch-size", "32", "--bn-splits", "4", "--queue-size", "64", "--max-steps", "1",
                 "--threads", "1", "--no-progress", "--out-dir", str(tmp_path), "--run-name", "r",
                 "--init", str(tmp_path / "evil.pt"), "--no-final-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(reference, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone_weights(path)
    torch.save({"encoder.blocks.0.weight": torch.zeros(3)}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="no ResNet backbone found"):
        load_backbone_weights(tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_weights(tmp_path / "nope.pth")


def test_truncated_safetensors_gives_clear_error(reference, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone_weights(path)


TINY = dict(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4, queue_size=64,
            epochs=1, max_steps=1, progress=False, threads=1)


def test_pretrain_starts_from_init_weights_in_both_encoders(tmp_path):
    source = randomize_bn(resnet("resnet18", in_channels=3, stem="compact", width=8), 3)
    official = prefixed(source.state_dict(), "module.encoder_q.")  # MoCo v2's layout
    torch.save({"epoch": 1, "state_dict": official}, tmp_path / "moco.pth.tar")
    # a learning rate so small that one step leaves the weights where they started
    cfg = build_config(**TINY, lr=1e-12, out_dir=str(tmp_path), run_name="init",
                       init=str(tmp_path / "moco.pth.tar"))
    pretrain(cfg, final_eval=False)
    model = torch.load(tmp_path / "init" / "checkpoint.pt", weights_only=True)["model"]
    for enc in ("query_encoder.backbone.", "key_encoder.module.backbone."):
        for name in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.bn2.weight"):
            torch.testing.assert_close(model[enc + name], source.state_dict()[name],
                                       atol=1e-6, rtol=0)


def test_init_sums_rgb_filters_for_gray_models_and_names_shape_mismatches(tmp_path):
    cfg = build_config(**TINY)
    rgb = resnet("resnet18", in_channels=3, stem="compact", width=8)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    gray_method = build_method(cfg, 1, "compact")
    init_backbone(gray_method, tmp_path / "rgb.pth")
    want = rgb.conv1.weight.detach().sum(dim=1, keepdim=True)
    torch.testing.assert_close(gray_method.backbone.conv1.weight.detach(), want)
    torch.testing.assert_close(gray_method.key_encoder.module.backbone.conv1.weight, want)

    wide = resnet("resnet18", in_channels=3, stem="compact", width=16)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="--width"):
        init_backbone(build_method(cfg, 3, "compact"), tmp_path / "wide.pth")
