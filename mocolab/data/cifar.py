"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009): 60k colour 32×32 images, 10 or 100 classes.

Files are the "python version" archives extracted under the root (default
``default_data_root()/cifar10`` or ``/cifar100``): ``cifar-10-batches-py/`` (``data_batch_1``..
``data_batch_5``, ``test_batch``, ``batches.meta``) or ``cifar-100-python/`` (``train``,
``test``, ``meta``). They are pickles downloaded from the internet, so they are read with a
restricted unpickler that can only rebuild numpy arrays and plain containers.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DatasetError, ImageDataset, default_data_root


def _numpy_attr(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy >= 2), or ``numpy.core``'s (numpy 1.x)."""
    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:  # pragma: no cover - numpy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _numpy_reconstruct() -> Any:
    return _numpy_attr("multiarray", "_reconstruct")


def _numpy_frombuffer() -> Any:
    return _numpy_attr("numeric", "_frombuffer")


def _numpy_scalar() -> Any:
    return _numpy_attr("multiarray", "scalar")


# (module, name) -> the object; everything else is refused. ``__builtin__``/``copy_reg`` are the
# Python 2 spellings the original files use; ``_codecs.encode`` is how protocol-2 pickles store
# bytes; ``multiarray.scalar`` rebuilds numpy scalars and ``numeric._frombuffer`` arrays pickled
# with protocol 5 (numpy >= 1.16). None of these can run arbitrary code.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
    **{
        (module, name): (lambda t=t: t)
        for module in ("builtins", "__builtin__")
        for name, t in (
            ("list", list),
            ("dict", dict),
            ("tuple", tuple),
            ("set", set),
            ("frozenset", frozenset),
            ("bytes", bytes),
            ("bytearray", bytearray),
            ("int", int),
            ("float", float),
            ("str", str),
        )
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that only resolves the globals a CIFAR batch needs.

    A pickle can name any importable callable (``os.system``...) and have it called while
    loading; CIFAR files come from the internet, so every other global is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise DatasetError(
                f"refusing to load {module}.{name} from a dataset pickle: CIFAR files only "
                f"contain numpy arrays and lists, so this file is not a genuine CIFAR batch "
                f"(corrupt or tampered with); delete it and download the dataset again"
            )
        return factory()


def unpickle(path: str | Path) -> dict[bytes, Any]:
    """Load one CIFAR python batch (a dict with bytes keys) safely.

    Raises:
        DatasetError: unreadable or corrupt file, or one that names a forbidden global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # UnpicklingError, EOFError, ValueError... from a corrupt file
        raise DatasetError(
            f"{path} is not a readable CIFAR batch ({type(e).__name__}: {e}); the file is "
            f"truncated or corrupt: delete it and download the dataset again"
        ) from e
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict; "
            f"delete it and download the dataset again"
        )
    return obj


_LAYOUT = {
    # name: (folder, train files, test files, meta file, label key, class-names key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"labels",
        b"label_names",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        b"fine_labels",
        b"fine_label_names",
        100,
    ),
}

_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def _folder(root: Path, folder: str, files: list[str]) -> Path:
    """The extracted folder: ``root/<folder>``, or ``root`` itself if the files lie there."""
    if root.name == folder or all((root / f).is_file() for f in files):
        return root
    return root / folder


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = unpickle(path)
    fix = "delete it and download the dataset again"
    if b"data" not in batch or label_key not in batch:
        raise DatasetError(
            f"{path} lacks the b'data' or {label_key!r} entry of a CIFAR batch; "
            f"is it the right file? {fix}"
        )
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 N×3072; {fix}"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: labels are not integers ({e}); {fix}") from e
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside 0..{num_classes - 1}; {fix}")
    return data.reshape(-1, 3, 32, 32), labels  # channel-major rows: R plane, G plane, B plane


def _download(kind: str, root: Path, split: str) -> str | None:
    try:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if kind == "cifar10" else CIFAR100
        cls(root=str(root), train=split == "train", download=True)
    except Exception as e:  # network, DNS, HTTP, disk: all mean "not available this way"
        return f"{type(e).__name__}: {str(e).strip()}"
    return None


def load_cifar(
    kind: str, split: str, root: str | Path | None = None, download: bool = True
) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 (``kind``) ``split`` as uint8 ``N×3×32×32`` + labels + names.

    Raises:
        DatasetError: files missing (and not downloadable) or corrupt; the message names the
            exact folder to place the extracted archive in.
    """
    if kind not in _LAYOUT:
        raise DatasetError(f"unknown CIFAR variant {kind!r}; choose cifar10 or cifar100")
    if split not in ("train", "test"):
        raise DatasetError(f"{kind} has no split {split!r}; choose train or test")
    folder_name, train_files, test_files, meta, label_key, names_key, n = _LAYOUT[kind]
    base = Path(root).expanduser() if root is not None else default_data_root() / kind
    files = (train_files if split == "train" else test_files) + [meta]
    folder = _folder(base, folder_name, files)
    missing = [f for f in files if not (folder / f).is_file()]
    failure = None
    if missing and download:
        failure = _download(kind, base, split)
        folder = _folder(base, folder_name, files)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        why = (
            f"downloading through torchvision failed ({failure}); it needs internet once"
            if failure
            else "downloading was not allowed (download=False)"
        )
        raise DatasetError(
            f"{kind} {split} files not found: {', '.join(missing)} missing in {folder}; {why}. "
            f"Either run once with internet access, or download {_URLS[kind]} elsewhere and "
            f"extract it so that the files lie in {base / folder_name}/ (or pass the folder "
            f"holding {folder_name}/ as --data-root)"
        )

    parts = [_read_batch(folder / f, label_key, n) for f in files[:-1]]
    meta_dict = unpickle(folder / meta)
    try:
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta_dict[names_key]]
    except (KeyError, TypeError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"{folder / meta}: no usable {names_key!r} class-name list ({e}); "
            f"delete it and download the dataset again"
        ) from e
    if len(classes) != n:
        raise DatasetError(
            f"{folder / meta}: {len(classes)} class names, expected {n}; delete it "
            f"and download the dataset again"
        )
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        classes=classes,
        name=f"{kind}/{split}",
    )
