"""Fashion-MNIST (Xiao et al., 2017): 70k grayscale 28×28 images of 10 kinds of clothing.

The four IDX files are looked for, in order, in ``root`` (and ``root/fashion-mnist``),
``default_data_root()/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist`` package); torchvision's download layout (``FashionMNIST/raw``) under
each is accepted too. Missing files are downloaded through torchvision when allowed.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DatasetError, ImageDataset, default_data_root

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

#: Folders a system package installs the files into (Debian/Ubuntu ``dataset-fashion-mnist``).
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_UBYTE = 0x08
_FIX = (
    "re-download it (delete the file and run online), reinstall the system package "
    "(sudo apt-get install --reinstall dataset-fashion-mnist), or point --data-root at a "
    "good copy"
)


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or raw, strictly.

    The header is two zero bytes, a dtype byte (only ``0x08``, unsigned byte, is accepted),
    the number of dimensions ``d``, then ``d`` big-endian uint32 sizes; the payload must hold
    exactly their product of bytes (magic ``0x00000803`` for images N×H×W, ``0x00000801`` for
    labels N).

    Args:
        path: the file; ``.gz`` or anything starting with the gzip magic is decompressed.
        expected_ndim: if given, the number of dimensions the header must declare.

    Returns:
        A writable uint8 array of the declared shape.

    Raises:
        DatasetError: unreadable, truncated or corrupt file, naming it and how to replace it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read IDX file {path}: {e.strerror or e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path} is a corrupt or truncated gzip file ({e}); {_FIX}") from e
    if len(raw) < 4:
        raise DatasetError(f"{path} is too short to be an IDX file ({len(raw)} bytes); {_FIX}")
    magic = int.from_bytes(raw[:4], "big")
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != _UBYTE or ndim == 0:
        raise DatasetError(
            f"{path} is not an unsigned-byte IDX file (magic 0x{magic:08x}; expected "
            f"0x00000803 for images or 0x00000801 for labels); {_FIX}"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DatasetError(
            f"{path} declares {ndim} dimensions (magic 0x{magic:08x}) but "
            f"0x{0x800 + expected_ndim:08x} with {expected_ndim} was expected; is it the right "
            f"file? {_FIX}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: header truncated ({len(raw)} bytes); {_FIX}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: header declares shape {dims} = {expected} bytes of data but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt; {_FIX}"
        )
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def search_dirs(root: str | Path | None) -> list[Path]:
    """The folders looked in, in order (each also with torchvision's ``FashionMNIST/raw``)."""
    bases: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        bases += [root, root / "fashion-mnist"]
    bases.append(default_data_root() / "fashion-mnist")
    bases += list(SYSTEM_DIRS)
    dirs: list[Path] = []
    for base in bases:
        for d in (base, base / "FashionMNIST" / "raw"):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _locate(split: str, dirs: list[Path]) -> tuple[Path, Path] | None:
    images_name, labels_name = FILES[split]
    for d in dirs:
        images, labels = _find(d, images_name), _find(d, labels_name)
        if images is not None and labels is not None:
            return images, labels
    return None


def _download(target: Path) -> str | None:
    """Fetch the files with torchvision into ``target``; ``None`` or the reason it failed."""
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(target), train=True, download=True)
        FashionMNIST(root=str(target), train=False, download=True)
    except Exception as e:  # network, DNS, HTTP, disk: all mean "not available this way"
        return f"{type(e).__name__}: {str(e).strip()}"
    return None


def load_fashion_mnist(
    split: str, root: str | Path | None = None, download: bool = True
) -> ImageDataset:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as uint8 ``N×1×28×28`` + labels.

    Raises:
        DatasetError: files not found (listing every folder looked in and three ways to get
            them) or corrupt.
    """
    if split not in FILES:
        raise DatasetError(f"fashion-mnist has no split {split!r}; choose train or test")
    dirs = search_dirs(root)
    found = _locate(split, dirs)
    failure = None
    if found is None and download:
        target = (
            Path(root).expanduser() if root is not None else (default_data_root() / "fashion-mnist")
        )
        failure = _download(target)
        found = _locate(split, dirs)
    if found is None:
        looked = "\n".join(f"  {d}" for d in dirs)
        why = (
            f"\nDownloading through torchvision failed ({failure})."
            if failure
            else ""
            if download
            else "\nDownloading was not allowed (download=False)."
        )
        raise DatasetError(
            f"Fashion-MNIST {split} files ({' and '.join(FILES[split])}, raw or .gz) not found; "
            f"looked in:\n{looked}{why}\nTo get them, either:\n"
            f"  - sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)\n"
            f"  - run once with internet access so torchvision can download them\n"
            f"  - put the four IDX files in a folder and pass it as root (--data-root)"
        )
    images_path, labels_path = found
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files do not belong together; {_FIX}"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is out of range 0..9; {_FIX}")
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(CLASSES),
        name=f"fashion-mnist/{split}",
    )
