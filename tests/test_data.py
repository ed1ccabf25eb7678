"""Tests for mocolab.data: every reader against tiny files built here in the exact on-disk
formats, with expected values written out by hand (or by an independent implementation)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mocolab.data import (
    BUILTIN_DATASETS,
    DatasetError,
    ImageDataset,
    SkippedImagesWarning,
    default_data_root,
    fashion_mnist,
    folder,
    has_split,
    load_dataset,
    make_synthetic,
)
from mocolab.data.fashion_mnist import read_idx


@pytest.fixture(autouse=True)
def _private_data_root(tmp_path_factory, monkeypatch):
    """Never touch ~/.cache: every test gets its own $MOCOLAB_DATA."""
    monkeypatch.setenv("MOCOLAB_DATA", str(tmp_path_factory.mktemp("data-root")))


# --- entry point ---------------------------------------------------------------------------


def test_default_data_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOCOLAB_DATA", str(tmp_path / "x"))
    assert default_data_root() == tmp_path / "x"
    monkeypatch.delenv("MOCOLAB_DATA")
    assert default_data_root() == Path.home() / ".cache" / "mocolab" / "data"


def test_unknown_spec_lists_builtins_and_says_path_missing(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DatasetError) as e:
        load_dataset(str(missing))
    msg = str(e.value)
    assert all(name in msg for name in BUILTIN_DATASETS)
    assert str(missing) in msg and "does not exist" in msg


def test_spec_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        load_dataset(str(f))


def test_unknown_split_and_bad_options():
    with pytest.raises(DatasetError, match="no split 'validation'"):
        load_dataset("synthetic", "validation")
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("synthetic", image_size=0)
    with pytest.raises(DatasetError, match="num_workers"):
        load_dataset("synthetic", num_workers=-1)


def test_has_split_for_builtins():
    assert has_split("cifar10", "test") and has_split("fashion-mnist", "train")
    assert has_split("stl10", "train+unlabeled") and not has_split("cifar10", "unlabeled")
    with pytest.raises(DatasetError):
        has_split("/no/such/folder", "test")


# --- Fashion-MNIST -------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX by hand: 0x0000, dtype 0x08, ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(directory: Path, n_train: int = 3, n_test: int = 2, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            images[i, i, 27 - i] = 100 + i  # a marker at row i, column 27 - i
        labels = np.arange(n, dtype=np.uint8) % 10 + (1 if prefix == "t10k" else 0)
        for name, a in ((f"{prefix}-images-idx3-ubyte", images),
                        (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(a)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)


def test_read_idx_raw_and_gzip(tmp_path):
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    expected = np.array([[[1, 2, 3]], [[4, 5, 6]]], np.uint8)
    for p in ("a", "a.gz"):
        out = read_idx(tmp_path / p, expected_ndim=3)
        assert out.dtype == np.uint8 and out.flags.writeable
        np.testing.assert_array_equal(out, expected)
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])
    (tmp_path / "l").write_bytes(labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "l", expected_ndim=1), [7, 8, 9])


@pytest.mark.parametrize("content, match", [
    (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "truncated or corrupt"),  # 5 declared, 2 present
    (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]), "truncated or corrupt"),  # trailing garbage
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 1]), "not an unsigned-byte IDX"),  # float dtype
    (bytes([0x50, 0x4B, 8, 1, 0, 0, 0, 1, 1]), "not an unsigned-byte IDX"),  # zip magic
    (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "declares 3 dimensions"),  # images where labels expected
    (gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 1, 1]), mtime=0)[:-6], "corrupt or truncated gzip"),
])
def test_read_idx_rejects_bad_files(tmp_path, content, match):
    p = tmp_path / "bad-labels-idx1-ubyte"
    p.write_bytes(content)
    with pytest.raises(DatasetError, match=match) as e:
        read_idx(p, expected_ndim=1)
    assert str(p) in str(e.value) and "re-download" in str(e.value)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path, gz):
    _write_fashion(tmp_path / "fm", gz=gz)
    train = load_dataset("fashion-mnist", "train", root=tmp_path / "fm", download=False)
    assert train.images.shape == (3, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0, 1, 2]
    assert train.images[2, 0, 2, 25] == 102 and int(train.images.sum()) == 100 + 101 + 102
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.name == "fashion-mnist/train"
    test = load_dataset("fashion-mnist", "test", root=tmp_path / "fm", download=False)
    assert test.labels.tolist() == [1, 2]


def test_fashion_mnist_found_in_root_subfolder_and_data_root(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "r" / "fashion-mnist", n_train=4)
    assert len(load_dataset("fashion-mnist", root=tmp_path / "r", download=False)) == 4
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    monkeypatch.setenv("MOCOLAB_DATA", str(tmp_path / "home"))
    _write_fashion(tmp_path / "home" / "fashion-mnist", n_train=5)
    assert len(load_dataset("fashion-mnist", download=False)) == 5


def test_fashion_mnist_missing_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (tmp_path / "system",))
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", root=tmp_path / "mine", download=False)
    msg = str(e.value)
    for place in (tmp_path / "mine", tmp_path / "mine" / "fashion-mnist",
                  default_data_root() / "fashion-mnist", tmp_path / "system"):
        assert f"  {place}\n" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg


def test_fashion_mnist_label_count_mismatch(tmp_path):
    _write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros(2, np.uint8))))
    with pytest.raises(DatasetError, match=r"3 images but .* 2 labels"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist", "train", download=False)
    test = load_dataset("fashion-mnist", "test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.images.float().mean() > 50  # real pictures, not zeros


# --- CIFAR ---------------------------------------------------------------------------------


def _cifar_rows(n: int, start: int) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """n flattened images (R plane, G plane, B plane, each row-major 32×32) with one known
    pixel each: returns the rows and the (image, c, y, x, value) markers."""
    data = np.zeros((n, 3072), np.uint8)
    marks = []
    for i in range(n):
        k = start + i
        c, y, x, v = k % 3, (5 * k) % 32, (7 * k + 1) % 32, 50 + k
        data[i, c * 1024 + y * 32 + x] = v
        marks.append((i, c, y, x, v))
    return data, marks


def _pickle(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _write_cifar10(root: Path) -> list:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    marks = []
    for b in range(1, 6):
        data, m = _cifar_rows(2, start=2 * (b - 1))
        marks += [(2 * (b - 1) + i, c, y, x, v) for i, c, y, x, v in m]
        batch = {b"batch_label": b"training batch", b"data": data,
                 b"labels": [(2 * (b - 1) + i) % 10 for i in range(2)]}
        if b == 1:  # protocol 2 with numpy 1's module name, as the original (Python 2) files
            blob = pickle.dumps(batch, protocol=2)
            (d / "data_batch_1").write_bytes(
                blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        else:
            _pickle(d / f"data_batch_{b}", batch)
    data, _ = _cifar_rows(3, start=20)
    _pickle(d / "test_batch", {b"data": data, b"labels": [9, 8, 7]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    _pickle(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return marks


def test_cifar10_layout_labels_and_names(tmp_path):
    marks = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    for i, c, y, x, v in marks:
        assert train.images[i, c, y, x] == v
    assert int(train.images.sum()) == sum(m[4] for m in marks)  # nothing else is set
    assert train.labels.tolist() == list(range(10))
    assert train.classes[1] == "automobile" and len(train.classes) == 10
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert test.labels.tolist() == [9, 8, 7] and test.name == "cifar10/test"
    # the extracted folder itself is accepted as root too
    assert len(load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py",
                            download=False)) == 3


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    data, marks = _cifar_rows(4, start=0)
    _pickle(d / "train", {b"data": data, b"fine_labels": [99, 0, 5, 42],
                          b"coarse_labels": [1, 2, 3, 4]})
    _pickle(d / "test", {b"data": data[:1], b"fine_labels": [3], b"coarse_labels": [0]})
    _pickle(d / "meta", {b"fine_label_names": [f"c{k}".encode() for k in range(100)],
                         b"coarse_label_names": [b"x"] * 20})
    train = load_dataset("cifar100", "train", root=tmp_path, download=False)
    assert train.labels.tolist() == [99, 0, 5, 42] and train.classes[42] == "c42"
    for i, c, y, x, v in marks:
        assert train.images[i, c, y, x] == v
    assert load_dataset("cifar100", "test", root=tmp_path, download=False).labels.tolist() == [3]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_forbidden_global_is_refused_and_not_run(tmp_path):
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _pickle(tmp_path / "cifar-10-batches-py" / "test_batch",
            {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(DatasetError, match=r"refusing to load .*system") as e:
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert "test_batch" in str(e.value)
    assert not marker.exists()


def test_cifar_corrupt_and_missing_files(tmp_path):
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"data_batch_3.*truncated or corrupt"):
        load_dataset("cifar10", "train", root=tmp_path, download=False)
    batch.unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert "data_batch_3" in str(e.value) and "cifar-10-batches-py/" in str(e.value)
    with pytest.raises(DatasetError, match="cifar-100-python/"):
        load_dataset("cifar100", "train", root=tmp_path / "empty", download=False)


# --- STL-10 --------------------------------------------------------------------------------


def _stl_bytes(images: np.ndarray) -> bytes:
    """STL-10 stores each 96×96 plane column-major: byte (c, x, y) is pixel row y, column x."""
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()


def _write_stl(root: Path) -> dict[str, np.ndarray]:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sets = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
            for s, n in (("train", 3), ("test", 2), ("unlabeled", 4))}
    for s, a in sets.items():
        (d / f"{s}_X.bin").write_bytes(_stl_bytes(a))
    (d / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    (d / "test_y.bin").write_bytes(bytes([2, 3]))
    (d / "class_names.txt").write_text("\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"])
        + "\n")
    return sets


def test_stl10_pixel_layout_by_hand(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    raw = bytearray(3 * 96 * 96)
    raw[2 * 96 * 96 + 70 * 96 + 5] = 123  # channel 2, column 70, row 5, column-major
    (d / "train_X.bin").write_bytes(bytes(raw))
    (d / "train_y.bin").write_bytes(bytes([7]))
    (d / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    ds = load_dataset("stl10", "train", root=tmp_path, download=False)
    assert ds.images.shape == (1, 3, 96, 96) and ds.images[0, 2, 5, 70] == 123
    assert int(ds.images.sum()) == 123
    assert ds.labels.tolist() == [6] and ds.classes[6] == "k6"


def test_stl10_splits(tmp_path):
    sets = _write_stl(tmp_path)
    train = load_dataset("stl10", "train", root=tmp_path, download=False)
    np.testing.assert_array_equal(train.images.numpy(), sets["train"])
    assert train.labels.tolist() == [0, 9, 3] and train.classes[9] == "truck"
    test = load_dataset("stl10", "test", root=tmp_path, download=False)
    assert test.labels.tolist() == [1, 2]
    unl = load_dataset("stl10", "unlabeled", root=tmp_path, download=False)
    assert unl.labels is None and unl.classes is None
    np.testing.assert_array_equal(unl.images.numpy(), sets["unlabeled"])
    both = load_dataset("stl10", "train+unlabeled", root=tmp_path, download=False)
    assert both.labels is None and len(both) == 7
    np.testing.assert_array_equal(both.images.numpy(),
                                  np.concatenate([sets["train"], sets["unlabeled"]]))


def test_stl10_bad_sizes_and_missing(tmp_path):
    _write_stl(tmp_path)
    x = tmp_path / "stl10_binary" / "test_X.bin"
    x.write_bytes(x.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="multiple of 3·96·96"):
        load_dataset("stl10", "test", root=tmp_path, download=False)
    (tmp_path / "stl10_binary" / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DatasetError, match="2 labels for 3 images"):
        load_dataset("stl10", "train", root=tmp_path, download=False)
    (tmp_path / "stl10_binary" / "train_y.bin").write_bytes(bytes([0, 1, 2]))
    with pytest.raises(DatasetError, match="1-based"):
        load_dataset("stl10", "train", root=tmp_path, download=False)
    with pytest.raises(DatasetError, match="stl10_binary/"):
        load_dataset("stl10", "test", root=tmp_path / "none", download=False)


# --- image folders -------------------------------------------------------------------------


def _img(path: Path, colour, size=(20, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def _load(path: Path, split: str = "train", **kw) -> ImageDataset:
    kw.setdefault("image_size", 8)
    kw.setdefault("cache_dir", path.parent / f"{path.name}-cache")
    return load_dataset(str(path), split, **kw)


def test_folder_classes_from_subfolders_mixed_extensions(tmp_path):
    root = tmp_path / "animals"
    _img(root / "cat" / "a.png", (255, 0, 0))
    _img(root / "cat" / "b.BMP", (0, 255, 0))
    _img(root / "dog" / "deep" / "c.webp", (0, 0, 255))  # webp saved lossy: compare loosely
    _img(root / "dog" / "d.jpeg", (200, 200, 200))
    _img(root / "emu" / "e.JPG", (10, 20, 30))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty-class").mkdir()
    ds = _load(root)
    assert ds.images.shape == (5, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.classes == ["cat", "dog", "emu"]
    # sorted order: cat/a.png, cat/b.BMP, dog/d.jpeg, dog/deep/c.webp, emu/e.JPG
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    expected = [(255, 0, 0), (0, 255, 0), (200, 200, 200), (0, 0, 255), (10, 20, 30)]
    mean = ds.images.float().mean(dim=(2, 3))
    assert torch.equal(ds.images[0], torch.tensor([255, 0, 0], dtype=torch.uint8)
                       .view(3, 1, 1).expand(3, 8, 8))  # png: exact
    assert torch.allclose(mean, torch.tensor(expected, dtype=torch.float), atol=6)
    assert ds.name == "animals/train" and has_split(str(root), "train")


def test_folder_flat_or_partly_flat_is_unlabeled(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _img(flat / f"{i}.png", (i, i, i))
    ds = _load(flat)
    assert ds.labels is None and ds.classes is None and len(ds) == 3
    mixed = tmp_path / "mixed"
    _img(mixed / "cls" / "a.png", (1, 2, 3))
    _img(mixed / "loose.png", (1, 2, 3))
    assert _load(mixed).labels is None


def test_folder_without_test_split(tmp_path):
    root = tmp_path / "only"
    _img(root / "a" / "x.png", (9, 9, 9))
    assert not has_split(str(root), "test")
    with pytest.raises(DatasetError, match=r"no test split.*train/ and test/"):
        _load(root, "test")


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_folder_train_test_layout_shares_classes(tmp_path, test_name):
    root = tmp_path / "tt"
    _img(root / "train" / "b" / "1.png", (1, 1, 1))
    _img(root / "train" / "c" / "2.png", (2, 2, 2))
    _img(root / test_name / "a" / "3.png", (3, 3, 3))
    _img(root / test_name / "c" / "4.png", (4, 4, 4))
    assert has_split(str(root), "test")
    train, test = _load(root, "train"), _load(root, "test")
    assert train.classes == test.classes == ["a", "b", "c"]
    assert train.labels.tolist() == [1, 2] and test.labels.tolist() == [0, 2]
    assert test.images[:, 0, 0, 0].tolist() == [3, 4]


def test_folder_grayscale_only_gives_one_channel(tmp_path):
    root = tmp_path / "gray"
    _img(root / "a.png", 77, mode="L")
    _img(root / "b.bmp", 1, mode="1")  # 1-bit white
    a16 = np.full((12, 20), 257 * 100, np.uint16)  # 16-bit: 25700 ≙ 100 in 8 bits
    Image.fromarray(a16).save(root / "c.png")
    ds = _load(root)
    assert ds.images.shape == (3, 1, 8, 8)
    assert ds.images[:, 0, 0, 0].tolist() == [77, 255, 100]
    _img(root / "d.png", (10, 20, 30))  # one colour image: everything becomes RGB
    ds = _load(root)
    assert ds.images.shape == (4, 3, 8, 8)
    assert ds.images[0, :, 3, 3].tolist() == [77, 77, 77]


def test_folder_skips_corrupt_and_empty_files_with_one_warning(tmp_path):
    root = tmp_path / "broken"
    for i in range(3):
        _img(root / "ok" / f"{i}.png", (i * 10, 0, 0))
    (root / "ok" / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "ok" / "zero.jpg").write_bytes(b"")
    with pytest.warns(SkippedImagesWarning) as record:
        ds = _load(root)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 2 of 5" in msg and "random.png" in msg and "zero.jpg" in msg
    assert len(ds) == 3 and ds.images[:, 0, 0, 0].tolist() == [0, 10, 20]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_folder_truncated_jpeg_is_skipped(tmp_path):
    root = tmp_path / "trunc"
    rng = np.random.default_rng(1)
    root.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "a.jpg")
    data = (root / "a.jpg").read_bytes()
    (root / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 2.*b.jpg"):
        ds = _load(root)
    assert len(ds) == 1


def test_folder_without_images_or_only_unreadable(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as e:
        _load(empty)
    assert str(empty) in str(e.value) and ".jpg" in str(e.value) and ".webp" in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 1 image files"):
        _load(bad)


@pytest.mark.parametrize("size", [(40, 25), (25, 41)])
def test_folder_resize_and_centre_crop_match_torchvision(tmp_path, size):
    """Independent reference: torchvision's Resize(s) + CenterCrop(s) on the PIL image."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    root = tmp_path / "one"
    root.mkdir()
    Image.fromarray(pixels).save(root / "x.png")
    ds = _load(root, image_size=16)
    ref = TF.center_crop(TF.resize(Image.fromarray(pixels), 16, InterpolationMode.BILINEAR,
                                   antialias=True), [16, 16])
    expected = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
    assert ds.images.shape == (1, 3, 16, 16)
    assert torch.equal(ds.images[0], expected)


def test_folder_cache_reused_then_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "cached"
    _img(root / "a" / "1.png", (10, 10, 10))
    _img(root / "b" / "2.png", (20, 20, 20))
    cache = tmp_path / "cache"
    first = _load(root, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob("*.tmp"))

    calls = []
    real = folder.decode_image

    def spy(path, image_size):
        calls.append(Path(path).name)
        return real(path, image_size)

    def refuse(path, image_size):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "decode_image", refuse)
    second = _load(root, cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == ["a", "b"]
    second.images[0] = 0  # copy-on-write map: the cache file is not changed
    assert torch.equal(_load(root, cache_dir=cache).images, first.images)

    monkeypatch.setattr(folder, "decode_image", spy)
    _img(root / "b" / "3.png", (30, 30, 30))  # a file added
    third = _load(root, cache_dir=cache)
    assert sorted(calls) == ["1.png", "2.png", "3.png"] and len(third) == 3
    calls.clear()
    _img(root / "a" / "1.png", (99, 99, 99))  # a file changed
    st = (root / "a" / "1.png").stat()
    os.utime(root / "a" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fourth = _load(root, cache_dir=cache)
    assert len(calls) == 3 and fourth.images[0, 0, 0, 0] == 99
    calls.clear()
    _load(root, cache_dir=cache, image_size=4)  # another size is another entry
    assert len(calls) == 3


def test_folder_cache_replays_skipped_warning(tmp_path):
    root = tmp_path / "w"
    _img(root / "a.png", (1, 1, 1))
    (root / "z.png").write_bytes(b"junk")
    with pytest.warns(SkippedImagesWarning):
        _load(root)
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 2.*z.png"):
        assert len(_load(root)) == 1


def test_folder_progress_bar_above_threshold(tmp_path, monkeypatch, capsys):
    root = tmp_path / "bar"
    for i in range(3):
        _img(root / f"{i}.png", (i, i, i))
    _load(root)
    assert "decoding" not in capsys.readouterr().err
    monkeypatch.setattr(folder, "PROGRESS_THRESHOLD", 2)
    _load(root, image_size=4)
    assert "decoding" in capsys.readouterr().err


def test_folder_parallel_decoding_matches_serial(tmp_path):
    root = tmp_path / "par"
    rng = np.random.default_rng(3)
    root.mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
    serial = _load(root, cache_dir=tmp_path / "c0")
    parallel = _load(root, cache_dir=tmp_path / "c2", num_workers=2)
    assert torch.equal(serial.images, parallel.images)


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_builtin_shapes_labels_determinism():
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    assert train.images.shape == (512, 3, 32, 32) and test.images.shape == (256, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [52] * 2 + [51] * 8  # 512 = 10·51 + 2
    assert train.num_classes == 10 and train.name == "synthetic/train"
    assert torch.equal(train.images, load_dataset("synthetic", "train").images)
    assert not torch.equal(train.images[:256], test.images)
    assert load_dataset("synthetic", image_size=20).images.shape == (512, 3, 20, 20)
    gray = make_synthetic(30, image_size=12, channels=1, num_classes=3, seed=5)
    assert gray.images.shape == (30, 1, 12, 12) and torch.bincount(gray.labels).tolist() == [10] * 3
    assert not torch.equal(make_synthetic(8, seed=1).images, make_synthetic(8, seed=2).images)


def test_synthetic_classes_are_separable_by_pattern_and_by_colour():
    """Nearest class mean, fitted on train and scored on test, with two independent features:
    the phase-free Fourier magnitude of the grayscale image (the grating: survives colour
    augmentations) and the mean colour."""
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")

    def accuracy(features) -> float:
        f_train, f_test = features(train), features(test)
        means = torch.stack([f_train[train.labels == c].mean(0) for c in range(10)])
        return (torch.cdist(f_test, means).argmin(1) == test.labels).float().mean().item()

    def spectrum(ds):
        x = ds.images.float().mean(1, keepdim=True) / 255
        return torch.fft.fft2(x - x.mean(dim=(2, 3), keepdim=True)).abs().flatten(1)

    assert accuracy(spectrum) > 0.9
    assert accuracy(lambda ds: ds.images.float().mean((2, 3))) > 0.9


# --- resizing built-ins --------------------------------------------------------------------


def test_builtin_image_size_resizes_like_pil(tmp_path):
    d = tmp_path / "fm"
    d.mkdir()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(images))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1], np.uint8)))
    ds = load_dataset("fashion-mnist", root=d, image_size=14, download=False)
    assert ds.images.shape == (2, 1, 14, 14)
    ref = np.asarray(Image.fromarray(images[0]).resize((14, 14), Image.Resampling.BILINEAR))
    assert np.abs(ds.images[0, 0].numpy().astype(int) - ref.astype(int)).max() <= 1
