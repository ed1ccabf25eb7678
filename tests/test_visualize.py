"""Pictures: they are written, show what they claim (frame colours, layer outputs equal to a
hand-run torchvision forward), and refuse bad input clearly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mocolab.backbones import resnet
from mocolab.visualize import (
    embedding_map,
    feature_maps,
    first_layer_kernels,
    layer_output,
    project_2d,
    retrieval_grid,
    training_curves,
)
from mocolab.visualize.kernels import kernel_images


def _count(png, rgb, tol=30):
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) < tol).sum())


GREEN, RED = (0x1A, 0x98, 0x50), (0xD7, 0x30, 0x27)


def test_retrieval_grid_frames_right_green_and_wrong_red(tmp_path):
    grey = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    nbrs = grey.unsqueeze(0).expand(1, 2, 3, 16, 16)
    only_right = retrieval_grid(grey, nbrs, tmp_path / "a.png", query_labels=torch.tensor([0]),
                                neighbour_labels=torch.tensor([[0, 0]]))
    mixed = retrieval_grid(grey, nbrs, tmp_path / "b.png", query_labels=torch.tensor([0]),
                           neighbour_labels=torch.tensor([[0, 1]]), similarities=torch.tensor([[0.9, 0.5]]))
    plain = retrieval_grid(grey, nbrs, tmp_path / "c.png")
    assert _count(only_right, GREEN) > 50 and _count(only_right, RED) == 0
    assert _count(mixed, GREEN) > 50 and _count(mixed, RED) > 50
    assert _count(plain, GREEN) == 0 and _count(plain, RED) == 0


def test_layer_output_equals_a_hand_run_forward():
    torch.manual_seed(0)
    model = resnet("resnet18", in_channels=3, stem="imagenet", width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(layer_output(model, "layer2", x), expected)
    with pytest.raises(ValueError, match=r"no layer 'layer9'.*layer4"):
        layer_output(model, "layer9", x)


def test_kernels_and_feature_maps_are_drawn(tmp_path):
    w = torch.tensor([[[[-1.0, 1.0]]]])  # one 1×1×2 kernel → scaled to [0, 1]
    torch.testing.assert_close(kernel_images(w), torch.tensor([[[[0.0, 1.0]]]]))
    model = resnet("resnet18", in_channels=1, stem="compact", width=8).eval()
    k = first_layer_kernels(model, tmp_path / "k.png")
    image = torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8)
    f = feature_maps(model, image, "layer1", tmp_path / "f.png", size=28, mean=(0.5,), std=(0.5,))
    for png in (k, f):
        assert Image.open(png).size[0] > 100


def _clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated clusters of 30 points (their directions differ: the maps normalise)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(30)
    return torch.eye(3)[labels] * 5 + 0.1 * torch.randn(90, 3, generator=g), labels


def _neighbours_keep_class(xy, labels) -> bool:
    xy = torch.as_tensor(xy).float()
    d = torch.cdist(xy, xy)
    d.fill_diagonal_(float("inf"))
    return torch.equal(labels[d.argmin(1)], labels)  # every point's 2-D neighbour is of its class


def test_tsne_keeps_separated_clusters_apart(tmp_path):
    feats, labels = _clusters()
    assert _neighbours_keep_class(project_2d(feats, "tsne"), labels)
    path = embedding_map(feats, tmp_path / "e.png", labels=labels, classes=["a", "b", "c"])
    assert path.exists()
    with pytest.raises(ValueError, match="unknown embedding map"):
        project_2d(feats, "pca")


def test_umap_keeps_separated_clusters_apart_and_is_the_auto_choice():
    pytest.importorskip("umap", reason="umap-learn is not installed")
    feats, labels = _clusters()
    xy = project_2d(feats, "umap", seed=0)
    assert xy.shape == (90, 2) and _neighbours_keep_class(xy, labels)
    assert np.allclose(project_2d(feats, "auto", seed=0), xy)  # UMAP when installed, same seed


def test_umap_when_missing_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "umap", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install umap-learn"):
        project_2d(torch.randn(10, 4), "umap")
    assert project_2d(torch.randn(10, 4), "auto").shape == (10, 2)  # falls back to t-SNE


def test_training_curves_panels(tmp_path):
    rows = [{"step": s, "epoch": s / 10, "loss": 5 - s / 10, "lr": 0.1, "momentum": 0.99,
             "images_per_s": 100.0} for s in range(1, 11)]
    rows.append({"step": 10, "epoch": 1.0, "knn_top1": 50.0, "knn_top5": 90.0})
    rows.append({"step": 10, "uniformity": -2.5})  # a diagnostic logged by the loop
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')  # torn line
    panels = training_curves(tmp_path, tmp_path / "curves.png")
    assert panels == ["loss", "learning rate", "key-encoder momentum", "kNN accuracy (%)",
                      "images / s", "uniformity"]
    assert (tmp_path / "curves.png").exists()
    with pytest.raises(ValueError, match="empty"):
        training_curves([], tmp_path / "none.png")
