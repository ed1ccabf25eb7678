"""STL-10 (Coates et al., 2011): 96×96 colour images, 5k labelled train, 8k test, 100k unlabeled.

Files are the binary archive extracted under the root (default ``default_data_root()/stl10``):
``stl10_binary/`` with ``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``,
``unlabeled_X.bin`` and ``class_names.txt``. Images are raw uint8 ``N×3×96×96`` stored
column-major (each 96×96 plane is transposed), labels are one byte each, 1-based.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DatasetError, ImageDataset, default_data_root

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FOLDER = "stl10_binary"
SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
_FIX = "delete it and download the dataset again"


def _count(path: Path) -> int:
    """The number of images in an STL-10 ``*_X.bin`` file, checking its size."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    if size == 0 or size % IMAGE_BYTES:
        raise DatasetError(
            f"{path} has {size} bytes, not a positive multiple of 3·96·96 = {IMAGE_BYTES} (one "
            f"image); the file is truncated or not an STL-10 image file; {_FIX}"
        )
    return size // IMAGE_BYTES


def _read_into(path: Path, out: np.ndarray, chunk: int = 2048) -> None:
    """Copy the images of ``path`` into ``out`` (``N×3×96×96``), un-transposing each plane."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r", shape=out.shape)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot map {path}: {e}") from e
    for i in range(0, out.shape[0], chunk):
        out[i : i + chunk] = raw[i : i + chunk].transpose(0, 1, 3, 2)
    del raw


def read_images(*paths: str | Path) -> np.ndarray:
    """Read STL-10 ``*_X.bin`` files (concatenated) into a C-contiguous uint8 ``N×3×96×96``.

    The files store each channel plane column-major, so the last two axes are swapped on read
    (as torchvision does); done in chunks from a memory map straight into the result, so 100k
    images need no second copy.

    Raises:
        DatasetError: a size is not a multiple of 3·96·96 bytes, or a file is unreadable.
    """
    files = [Path(p) for p in paths]
    counts = [_count(p) for p in files]
    out = np.empty((sum(counts), 3, SIDE, SIDE), dtype=np.uint8)
    start = 0
    for path, n in zip(files, counts):
        _read_into(path, out[start : start + n])
        start += n
    return out


def read_labels(path: str | Path, n: int, num_classes: int) -> np.ndarray:
    """Read an STL-10 ``*_y.bin`` file (one byte per image, 1-based) as 0-based int64 labels."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    if raw.shape[0] != n:
        raise DatasetError(f"{path} holds {raw.shape[0]} labels for {n} images; {_FIX}")
    if n and (raw.min() < 1 or raw.max() > num_classes):
        raise DatasetError(
            f"{path}: labels outside 1..{num_classes} (STL-10 labels are 1-based); {_FIX}"
        )
    return raw.astype(np.int64) - 1


def read_class_names(path: str | Path) -> list[str]:
    """The class names, one per line, of ``class_names.txt``."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path} ({e}); {_FIX}") from e
    names = [n for n in names if n]
    if not names:
        raise DatasetError(f"{path} lists no class names; {_FIX}")
    return names


def _files(split: str) -> list[str]:
    if split == "train":
        return ["train_X.bin", "train_y.bin", "class_names.txt"]
    if split == "test":
        return ["test_X.bin", "test_y.bin", "class_names.txt"]
    if split == "unlabeled":
        return ["unlabeled_X.bin"]
    return ["train_X.bin", "unlabeled_X.bin"]


def _download(root: Path, split: str) -> str | None:
    try:
        from torchvision.datasets import STL10

        STL10(root=str(root), split=split, download=True)
    except Exception as e:  # network, DNS, HTTP, disk: all mean "not available this way"
        return f"{type(e).__name__}: {str(e).strip()}"
    return None


def load_stl10(split: str, root: str | Path | None = None, download: bool = True) -> ImageDataset:
    """STL-10 ``split`` as uint8 ``N×3×96×96``.

    Splits: "train" (5k labelled), "test" (8k labelled), "unlabeled" (100k, labels ``None``),
    "train+unlabeled" (105k, labels ``None``: the pretraining set of the STL-10 protocol).

    Raises:
        DatasetError: files missing (and not downloadable), of the wrong size, or corrupt.
    """
    if split not in SPLITS:
        raise DatasetError(f"stl10 has no split {split!r}; choose one of {', '.join(SPLITS)}")
    base = Path(root).expanduser() if root is not None else default_data_root() / "stl10"
    files = _files(split)

    def where() -> Path:
        if base.name == FOLDER or all((base / f).is_file() for f in files):
            return base
        return base / FOLDER

    folder = where()
    missing = [f for f in files if not (folder / f).is_file()]
    failure = None
    if missing and download:
        failure = _download(base, "train+unlabeled" if split == "train+unlabeled" else split)
        folder = where()
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        why = (
            f"downloading through torchvision failed ({failure}); it needs internet once (2.5 GB)"
            if failure
            else "downloading was not allowed (download=False)"
        )
        raise DatasetError(
            f"stl10 {split} files not found: {', '.join(missing)} missing in {folder}; {why}. "
            f"Either run once with internet access, or download {URL} elsewhere and extract it "
            f"so that the files lie in {base / FOLDER}/ (or pass the folder holding {FOLDER}/ "
            f"as --data-root)"
        )

    if split in ("train", "test"):
        images = read_images(folder / f"{split}_X.bin")
        classes = read_class_names(folder / "class_names.txt")
        labels = read_labels(folder / f"{split}_y.bin", images.shape[0], len(classes))
        return ImageDataset(
            torch.from_numpy(images), torch.from_numpy(labels), classes, f"stl10/{split}"
        )
    if split == "unlabeled":
        images = read_images(folder / "unlabeled_X.bin")
    else:
        images = read_images(folder / "train_X.bin", folder / "unlabeled_X.bin")
    return ImageDataset(torch.from_numpy(images), None, None, f"stl10/{split}")
