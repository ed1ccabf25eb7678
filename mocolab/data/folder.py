"""A folder of images as an :class:`ImageDataset`, decoded once and cached.

Layout rules:

* ``folder/train/`` and ``folder/test/`` (or ``folder/val/``): split "train" reads ``train/``,
  split "test" reads ``test/`` (else ``val/``). Otherwise split "train" is the whole folder and
  there is no "test" split.
* Within a split: if every image lies inside a first-level subfolder, the sorted subfolder
  names are the classes (``cat/x.jpg`` → class "cat"); if any image lies directly in it, the
  split is unlabeled. In a train/test layout both splits share the union of their classes, so a
  label means the same class in both.

Images (``.jpg .jpeg .png .webp .bmp``, any case, found recursively, sorted) are decoded to a
fixed size: the shorter side is resized to ``image_size`` (bilinear, antialiased) and the
centre ``image_size×image_size`` is cropped, as torchvision's ``Resize(s)`` + ``CenterCrop(s)``.
They become 1-channel when every image is grayscale, else RGB. Unreadable files are skipped
with one :class:`SkippedImagesWarning`. The decoded array is cached as ``.npy`` (keyed by the
folder, split, size and every file's path, size and mtime) and memory-mapped on the next load.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import OutputError
from ..safeio import write_atomic, write_text_atomic
from .base import DatasetError, ImageDataset, default_data_root

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_IMAGE_SIZE = 64
PROGRESS_THRESHOLD = 1000  # show a progress bar above this many files
CACHE_VERSION = 1
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_SHOW_SKIPPED = 5


class SkippedImagesWarning(UserWarning):
    """Some files of an image folder could not be decoded and were left out."""


# --- layout --------------------------------------------------------------------------------


def _test_dir(folder: Path) -> Path | None:
    if not (folder / "train").is_dir():
        return None
    for name in ("test", "val"):
        if (folder / name).is_dir():
            return folder / name
    return None


def split_root(folder: str | Path, split: str) -> Path:
    """The directory that holds ``split`` of ``folder`` (see the module's layout rules).

    Raises:
        DatasetError: an unknown split, or "test" for a folder without ``train/`` + ``test/``
            or ``val/`` subfolders.
    """
    folder = Path(folder)
    test = _test_dir(folder)
    if split == "train":
        return folder / "train" if test is not None else folder
    if split == "test":
        if test is None:
            raise DatasetError(
                f"{folder} has no test split: a test split needs subfolders train/ and test/ "
                f"(or val/); without them the whole folder is the train split. Split the "
                f"images into {folder / 'train'} and {folder / 'test'}, or use only split train"
            )
        return test
    raise DatasetError(f"a folder dataset has no split {split!r}; choose train or test")


def has_folder_split(folder: str | Path, split: str) -> bool:
    """Whether ``split`` of ``folder`` exists (a cheap check of the subfolders only)."""
    if split == "train":
        return Path(folder).is_dir()
    if split == "test":
        return _test_dir(Path(folder)) is not None
    return False


def list_images(root: str | Path) -> list[PurePosixPath]:
    """Image files under ``root``, recursively, as sorted paths relative to ``root``."""
    root = Path(root)
    found: list[PurePosixPath] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(rel_dir / name)
    return sorted(found, key=lambda p: p.parts)


def folder_classes(files: list[PurePosixPath]) -> list[str] | None:
    """Sorted first-level subfolder names if every file lies in one, else ``None``."""
    if not files or any(len(f.parts) < 2 for f in files):
        return None
    return sorted({f.parts[0] for f in files})


# --- decoding ------------------------------------------------------------------------------


def _to_8bit(im: Image.Image) -> Image.Image:
    """``im`` as mode "L" (grayscale sources) or "RGB"; 16/32-bit and float gray is rescaled
    (PIL's own conversion would clip everything above 255 to white)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            a = a / 257.0  # 0..65535 → 0..255
        elif im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode in _GRAY_MODES:
        return im.convert("L")
    return im.convert("RGB")


def decode_image(path: str | Path | IO[bytes], image_size: int) -> tuple[np.ndarray, bool]:
    """Decode one image fully and bring it to ``image_size×image_size``.

    The shorter side becomes ``image_size`` (the longer ``int(image_size · long / short)``),
    PIL bilinear resampling (which antialiases when shrinking), then the centre crop with
    offset ``round((side − image_size) / 2)``: the rules of torchvision's ``Resize`` +
    ``CenterCrop``. EXIF orientation is applied first.

    Returns:
        ``(array C×S×S uint8, grayscale)`` where C is 1 for grayscale sources, else 3.

    Raises:
        Exception: whatever PIL raises for an unreadable, truncated or corrupt file.
    """
    with Image.open(path) as src:
        im = ImageOps.exif_transpose(src)  # a decoded copy: truncation surfaces here
        im.load()
        gray = im.mode in _GRAY_MODES
        im = _to_8bit(im)
    w, h = im.size
    if w <= h:
        size = (image_size, int(image_size * h / w))
    else:
        size = (int(image_size * w / h), image_size)
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BILINEAR)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    im = im.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return np.ascontiguousarray(a), gray


class _DecodeSet(Dataset):
    """Files to decode, for a DataLoader: item ``i`` is ``(i, array|None, gray, error|None)``."""

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, bool, str | None]:
        try:
            array, gray = decode_image(self.paths[i], self.image_size)
        except Exception as e:  # any unreadable file is skipped, never a crash
            return i, None, False, f"{type(e).__name__}: {e}"
        return i, array, gray, None


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


# --- cache ---------------------------------------------------------------------------------


def _cache_key(
    folder: Path,
    split: str,
    image_size: int,
    classes: list[str] | None,
    root: Path,
    files: list[PurePosixPath],
) -> str:
    entries = []
    for f in files:
        try:
            st = (root / f).stat()
            entries.append([str(f), st.st_size, st.st_mtime_ns])
        except OSError:
            entries.append([str(f), -1, -1])
    blob = json.dumps(
        [
            CACHE_VERSION,
            str(folder.resolve()),
            split,
            image_size,
            "channels:auto",
            classes,
            entries,
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def folder_fingerprint(folder: str | Path, split: str) -> str:
    """A hash of ``split``'s image files (relative names and sizes, sorted): it changes when
    an image is added, removed or replaced (a resumed run checks that its data is the same).

    Raises:
        DatasetError: no such split, or no images in it.
    """
    _, root, files, _, _ = split_files(folder, split)
    entries = []
    for f in files:
        try:
            entries.append([str(f), (root / f).stat().st_size])
        except OSError:
            entries.append([str(f), -1])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _read_cache(npy: Path, meta_path: Path, image_size: int) -> tuple[np.ndarray, dict] | None:
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, mmap_mode="c")  # copy-on-write: writable, never changes the file
        if (
            meta.get("version") != CACHE_VERSION
            or images.dtype != np.uint8
            or images.shape != (meta["n"], meta["channels"], image_size, image_size)
            or (meta["labels"] is not None and len(meta["labels"]) != meta["n"])
        ):
            return None
    except Exception:  # a damaged cache entry is simply rebuilt
        return None
    return images, meta


def _write_cache(npy: Path, meta_path: Path, images: np.ndarray, meta: dict) -> None:
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(npy, lambda f: np.save(f, images))
        write_text_atomic(meta_path, json.dumps(meta))
    except (OSError, OutputError) as e:
        warnings.warn(
            f"could not write the decoded-image cache {npy} ({e}); the folder will be "
            f"decoded again next time (set cache_dir / $MOCOLAB_DATA to a writable "
            f"place)",
            stacklevel=3,
        )


def _warn_skipped(root: Path, skipped: int, total: int, examples: list[str]) -> None:
    more = f" and {skipped - len(examples)} more" if skipped > len(examples) else ""
    warnings.warn(
        SkippedImagesWarning(
            f"skipped {skipped} of {total} image files in {root} that could not be decoded: "
            f"{'; '.join(examples)}{more}. Delete or replace them to silence this warning"
        ),
        stacklevel=4,
    )


# --- loading -------------------------------------------------------------------------------


def split_files(
    folder: str | Path, split: str
) -> tuple[Path, Path, list[PurePosixPath], list[str] | None, str]:
    """``(folder, root, files, classes, name)`` of ``split`` of an image folder: the split's
    root, its image files (relative to the root, sorted), the class names (shared by the
    train and test splits; ``None`` without class folders) and the dataset's name.

    Raises:
        DatasetError: no such folder, or no image files in the split.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder")
    root = split_root(folder, split)
    files = list_images(root)
    if not files:
        raise DatasetError(
            f"no image files in {root}: looked recursively for {' '.join(IMAGE_EXTENSIONS)} "
            f"(any case); put images there or pass another folder (--data)"
        )
    classes = folder_classes(files)
    if classes is not None and root != folder:  # train/test layout: share the class list
        other = split_root(folder, "test" if split == "train" else "train")
        other_classes = folder_classes(list_images(other))
        if other_classes is not None:
            classes = sorted(set(classes) | set(other_classes))
    return folder, root, files, classes, f"{folder.name or folder.resolve().name}/{split}"


def cache_folder(cache_dir: str | Path | None) -> Path:
    """Where decoded folders are cached: ``cache_dir``, else ``default_data_root()/folder-cache``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return default_data_root() / "folder-cache"


@dataclass
class Decoded:
    """What :func:`decode_files` found: the rows ``kept`` (decodable, in file order), whether
    every kept image was gray, the labels of the kept rows (``None`` without classes), the
    skipped ``(row, error)`` pairs and the first few as text."""

    kept: np.ndarray
    all_gray: bool
    labels: list[int] | None
    errors: list[tuple[int, str]]
    examples: list[str]

    def images(self, out: np.ndarray) -> np.ndarray:
        """The kept rows of ``out`` (``N×3×…``), one channel when every image was gray."""
        images = out[self.kept] if len(self.kept) < len(out) else out
        return np.ascontiguousarray(images[:, :1] if self.all_gray else images)

    def meta(
        self, folder: Path, split: str | None, images: np.ndarray, classes: list[str] | None
    ) -> dict[str, Any]:
        """The cache's record of the decoding (its caller adds its version and the size it
        cut the images to)."""
        return {
            "folder": str(folder.resolve()),
            "split": split,
            "n": int(images.shape[0]),
            "channels": int(images.shape[1]),
            "labels": self.labels,
            "classes": classes,
            "skipped": len(self.errors),
            "skipped_examples": self.examples,
        }

    def dataset(
        self,
        images: np.ndarray,
        classes: list[str] | None,
        name: str,
        sizes: np.ndarray | None = None,
    ) -> ImageDataset:
        """The decoded images as a dataset, with their labels (and true sizes, when cut whole)."""
        return ImageDataset(
            torch.from_numpy(images),
            None if self.labels is None else torch.tensor(self.labels, dtype=torch.int64),
            classes,
            name,
            None if sizes is None else torch.from_numpy(sizes),
        )


def decode_files(
    dataset: Any,
    files: list[PurePosixPath],
    root: Path,
    classes: list[str] | None,
    store: Any,
    *,
    num_workers: int,
    desc: str,
    progress: bool = True,
) -> Decoded:
    """Decode ``dataset`` (items ``(row, array or None, gray, ..., error)``) in ``num_workers``
    DataLoader processes with a progress bar (above :data:`PROGRESS_THRESHOLD` files, unless
    ``progress`` is false), ``store(row, item)`` for each decodable one; the skipped files are
    counted in one warning (:class:`SkippedImagesWarning`).

    Raises:
        DatasetError: none of the files could be decoded.
    """
    ok = np.zeros(len(files), dtype=bool)
    all_gray = True
    errors: list[tuple[int, str]] = []
    loader = DataLoader(
        dataset, batch_size=16, shuffle=False, num_workers=num_workers, collate_fn=_as_list
    )
    with tqdm(
        total=len(files),
        desc=desc,
        unit="img",
        disable=not progress or len(files) <= PROGRESS_THRESHOLD,
    ) as bar:
        for batch in loader:
            for item in batch:
                i, array, gray, error = item[0], item[1], item[2], item[-1]
                if array is None:
                    errors.append((i, error or "unreadable"))
                    continue
                store(i, item)
                ok[i] = True
                all_gray &= gray
            bar.update(len(batch))
    if not ok.any():
        raise DatasetError(
            f"none of the {len(files)} image files in {root} could be decoded (first: "
            f"{files[errors[0][0]]}: {errors[0][1]}); check that they are real "
            f"{'/'.join(IMAGE_EXTENSIONS)} images"
        )
    kept = np.flatnonzero(ok)
    labels = None
    if classes is not None:
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[files[i].parts[0]] for i in kept]
    examples = [f"{files[i]} ({e})" for i, e in errors[:_SHOW_SKIPPED]]
    if errors:
        _warn_skipped(root, len(errors), len(files), examples)
    return Decoded(kept, bool(all_gray), labels, errors, examples)


def load_folder(
    folder: str | Path,
    split: str = "train",
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageDataset:
    """Load ``split`` of an image folder as uint8 ``N×C×S×S`` (S = ``image_size``).

    Args:
        folder: the folder (see the module docstring for the layout rules).
        split: "train" or "test".
        image_size: side S the images are resized (shorter side) and centre-cropped to.
        cache_dir: where the decoded array is cached (default
            ``default_data_root()/folder-cache``).
        num_workers: DataLoader processes decoding in parallel (0: in this process).
        progress: show the decoding's progress bar (large folders only).

    Raises:
        DatasetError: no image files in the split, none readable, or no such split.
    """
    folder, root, files, classes, name = split_files(folder, split)
    cache = cache_folder(cache_dir)
    key = _cache_key(folder, split, image_size, classes, root, files)
    npy, meta_path = cache / f"{key}.npy", cache / f"{key}.json"
    hit = _read_cache(npy, meta_path, image_size)
    if hit is not None:
        images, meta = hit
        if meta["skipped"]:
            _warn_skipped(root, meta["skipped"], len(files), meta["skipped_examples"])
        cached = None if meta["labels"] is None else torch.tensor(meta["labels"], dtype=torch.int64)
        return ImageDataset(torch.from_numpy(images), cached, meta["classes"], name)

    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)

    def store(i: int, item: tuple) -> None:
        out[i] = item[1]  # 1×S×S broadcasts to the three channels

    decoded = decode_files(
        _DecodeSet([root / f for f in files], image_size),
        files,
        root,
        classes,
        store,
        num_workers=num_workers,
        desc=f"decoding {root}",
        progress=progress,
    )
    images = decoded.images(out)
    meta = {
        "version": CACHE_VERSION,
        **decoded.meta(folder, split, images, classes),
        "image_size": image_size,
    }
    _write_cache(npy, meta_path, images, meta)
    return decoded.dataset(images, classes, name)
