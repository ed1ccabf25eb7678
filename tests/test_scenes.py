"""The scenes dataset: deterministic, COCO-consistent, test scenes from the test split only."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mocolab.cli import main
from mocolab.data import DatasetError, ImageDataset, scenes
from mocolab.data import fashion_mnist as fm
from mocolab.data.scenes import IGNORE, SceneOptions, draw_scene, make_scenes


def _fake_split(split: str, root=None, download=True) -> ImageDataset:
    """Garments with a random outline; train holds classes 0-4 only, test classes 5-9 only."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 40
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(10, 27, (2,), generator=g))
        images[i, 0, 1:1 + h, 1:1 + w] = torch.randint(1, 256, (h, w), generator=g).to(torch.uint8)
    offset = 0 if split == "train" else 5
    labels = torch.arange(n) % 5 + offset
    return ImageDataset(images, labels, list(fm.CLASSES), f"fake/{split}")


@pytest.fixture
def fake_source(monkeypatch):
    monkeypatch.setattr(scenes, "load_fashion_mnist", _fake_split)  # as scenes.py sees it


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path, fake_source):
    opts = SceneOptions(size=48)
    make_scenes(tmp_path / "a", train=6, test=3, seed=3, opts=opts)
    make_scenes(tmp_path / "b", train=6, test=3, seed=3, opts=opts)
    make_scenes(tmp_path / "c", train=6, test=3, seed=4, opts=opts)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a["train/annotations.json"] != c["train/annotations.json"]
    assert len([k for k in a if k.startswith("train/images/")]) == 6
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary folder was renamed away


def test_annotations_agree_with_masks_and_label_maps(tmp_path, fake_source):
    meta = make_scenes(tmp_path / "s", train=8, test=5, seed=0, opts=SceneOptions(size=64))
    for split in ("train", "test"):
        root = tmp_path / "s" / split
        coco = json.loads((root / "annotations.json").read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert meta["splits"][split]["instances"] == len(coco["annotations"])
        cats = {a["category_id"] for a in coco["annotations"]}
        # test scenes use test garments only (classes 5-9 in the fake source: ids 6-10)
        assert cats <= (set(range(1, 6)) if split == "train" else set(range(6, 11)))
        for img in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            assert 1 <= len(anns) <= 6
            label_map = np.array(Image.open(root / "masks" / img["file_name"]))
            image = np.array(Image.open(root / "images" / img["file_name"]))
            assert image.shape == label_map.shape == (64, 64)
            taken = np.zeros((64, 64), bool)
            for a in anns:
                m = mask_utils.decode(a["segmentation"]).astype(bool)
                assert not (m & taken).any()  # visible masks do not overlap
                taken |= m
                ys, xs = np.nonzero(m)
                x, y = xs.min(), ys.min()
                assert a["bbox"] == [x, y, xs.max() - x + 1, ys.max() - y + 1]
                assert a["area"] == m.sum() and a["iscrowd"] == 0
                # the label map holds the class or "ignore" on every pixel of the instance
                assert set(np.unique(label_map[m])) <= {a["category_id"], IGNORE}
                assert (label_map[m] == a["category_id"]).mean() > 0.5
            assert set(np.unique(label_map[~taken])) <= {0, IGNORE}  # outside: no class
            assert set(np.unique(label_map)) <= set(range(11)) | {IGNORE}


def test_one_opaque_garment_is_a_square_of_its_class():
    """A garment whose 28×28 pixels are all foreground: α is exactly 1 inside its square and
    0 outside, so the mask is the square, the label map is the class with no ignored pixel."""
    garments = np.full((1, 28, 28), 200, np.uint8)
    opts = SceneOptions(size=40, max_objects=1)
    image, label_map, instances = draw_scene(np.random.default_rng(0), garments,
                                             np.array([7]), opts)
    assert len(instances) == 1 and instances[0]["class"] == 7
    m = instances[0]["mask"]
    ys, xs = np.nonzero(m)
    side = ys.max() - ys.min() + 1
    assert xs.max() - xs.min() + 1 == side and m.sum() == side * side
    assert 8 <= side <= 20  # [size/5, size/2]
    np.testing.assert_array_equal(label_map, np.where(m, 8, 0))
    np.testing.assert_array_equal(image, np.where(m, 200, 0))


def test_bad_options_and_existing_folder(tmp_path, fake_source):
    make_scenes(tmp_path / "s", train=1, test=1, opts=SceneOptions(size=32))
    with pytest.raises(DatasetError, match="--overwrite"):
        make_scenes(tmp_path / "s", train=1, test=1, opts=SceneOptions(size=32))
    with pytest.raises(DatasetError, match="--size"):
        make_scenes(tmp_path / "t", train=1, test=1, opts=SceneOptions(size=8))
    with pytest.raises(DatasetError, match="--from"):
        make_scenes(tmp_path / "t", source="cifar10")


def test_cli_writes_scenes_from_fashion_mnist(tmp_path, capsys):
    fm_dirs = [d for d in fm.search_dirs(None) if (d / "t10k-labels-idx1-ubyte").exists()
               or (d / "t10k-labels-idx1-ubyte.gz").exists()]
    if not fm_dirs:
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "scenes"
    assert main(["data", "scenes", str(out), "--train", "3", "--test", "2", "--size", "64",
                 "--seed", "1", "--no-progress"]) == 0
    assert "train 3 images" in capsys.readouterr().out
    meta = json.loads((out / "scenes.json").read_text())
    assert meta["splits"]["test"]["images"] == 2 and meta["classes"][9] == "Ankle boot"
    assert main(["data", "scenes", str(out), "--train", "3"]) == 2  # exists: one-line error
    assert "--overwrite" in capsys.readouterr().err
