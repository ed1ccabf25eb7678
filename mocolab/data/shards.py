"""WebDataset tar shards: pack a folder once, stream it per rank, decode in workers or on the GPU.

A dataset too large for every node to decode to a cache (ImageNet at 256² is ~250 GB of raw
pixels; a 100M-image set does not fit a node's disk) is read the way OpenCLIP / DataComp read
theirs: encoded images in tar shards (the WebDataset format, through the ``webdataset``
package: its ``TarWriter`` writes them, its tar reader and sample grouping read them), plus
``index.json`` listing every shard and its sample count.

Addresses (:func:`check_address`, :func:`open_address`): shards and indexes are read from local
files and from ``http://``, ``https://`` (urllib), ``s3://`` (the AWS CLI) and ``gs://``
(``gsutil``) — never through a shell: a command is always an argument list. A ``pipe:CMD``
address runs ``CMD`` (split like a shell would split it, but without one: no pipes,
redirections or variables) and is accepted only where the user typed it (``--data``, the
Python API), never when it is read from a file: an index, a checkpoint, a preset. Shard names
in an index are resolved relative to the index.

``mocolab data pack FOLDER OUT`` (:func:`pack_folder`) writes ``OUT/shard-000000.tar`` …:
sample ``k`` (the folder's sorted order) is ``{k:09d}.jpg`` (or ``.webp``), its longer side
capped at ``max_side`` (a JPEG already small enough is copied byte for byte), and
``{k:09d}.cls`` with the class index when the folder has classes.

Order, ranks and resume (:class:`ShardStream`): epoch ``e`` permutes the shards with a
generator seeded by (seed, e); rank ``r`` of ``W`` reads shards ``perm[r::W]`` only, and splits
them into ``S`` streams (one per DataLoader worker; ``S = max(1, num_workers)``), stream ``s``
reading ``perm[r::W][s::S]``, each shard's samples in an order permuted by (seed, e, shard).
A stream makes whole batches; the rank's batch ``k`` is stream ``k mod S``'s batch ``k // S``,
so the order is a pure function of (seed, epoch, ranks, streams) and resuming at batch ``p``
skips whole shards by their counts (no reading) and, inside one shard, undecoded samples.
Every rank makes the same number of batches per epoch (the smallest over ranks, streams and
epochs, so ``W`` processes never wait for each other at an epoch's end); the rest of an
epoch's samples are dropped, as the last partial batch is.

Memory is flat in the dataset's size: a stream holds one shard's encoded bytes (to permute
them) and a batch of decoded images. A sample that cannot be read or decoded (a truncated
shard, a member that is not an image, a shard missing or a URL that does not answer) is
replaced by a repeat of the stream's previous good sample, counted, and reported in one
warning per shard, so every rank still makes the same batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..safeio import (
    CHECKPOINT_NAME,
    LOCK_NAME,
    is_write_error,
    write_error,
    write_text_atomic,
)
from .base import DatasetError, ImageDataset
from .folder import (
    _to_8bit,
    decode_image,
    folder_classes,
    list_images,
    split_root,
)
from .whole import DEFAULT_SIDE, decode_whole, true_size  # noqa: F401 - DEFAULT_SIDE re-exported

INDEX_NAME = "index.json"
MAX_SHARD_SIZE = 10**12  # bytes: one shard is held in memory by a decoding worker
MAX_SIDE = {"jpeg": 65535, "webp": 16383}  # the longest side each format can hold
FORMAT = "mocolab-shards"
VERSION = 1
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
PIPE = "pipe:"
REMOTE_SCHEMES = ("http", "https", "s3", "gs")
"""The URL schemes shards and indexes are read from (besides local files)."""
MAX_INDEX_BYTES = 64 * 2**20  # an index of a million shards is ~60 MB
_UNSAFE_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")  # a URL holds no spaces or controls


class SkippedSamplesWarning(UserWarning):
    """Some samples of a shard could not be read or decoded; they were replaced by repeats."""


# --- sizes and specs -----------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """Bytes of ``"1GB"``, ``"500MB"``, ``"64KiB"``, ``"1e9"`` (decimal units; ``i`` binary).

    Raises:
        DatasetError: not a size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgt]?)(i?)b?\s*", str(text), re.I)
    try:
        value = float(m.group(1)) if m else -1.0
    except ValueError:
        value = -1.0
    if not m or not math.isfinite(value) or value <= 0:
        raise DatasetError(f"--shard-size {text!r} is not a size; write e.g. 1GB, 500MB or 64MiB")
    power = "kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0
    size = value * (1024 if m.group(3) else 1000) ** power
    if not 1 <= size <= MAX_SHARD_SIZE:
        raise DatasetError(
            f"--shard-size {text!r} is out of range: write a size from 1B to 1TB, e.g. 1GB"
        )
    return int(size)


def is_url(spec: str) -> bool:
    """Whether ``spec`` is a URL (``https://``, ``s3://``, ``gs://`` …) rather than a path."""
    return bool(_URL.match(str(spec)))


def is_pipe(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` is a ``pipe:`` address (a command whose output is read)."""
    return isinstance(spec, str) and spec.startswith(PIPE)


def is_shards(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names packed shards: a folder holding ``index.json``, an
    ``index.json`` path, a URL ending in ``.json``, or a ``pipe:`` command (whose output is
    the index)."""
    text = os.fspath(spec)
    if is_pipe(text):
        return True
    if is_url(text):
        return text.endswith(".json")
    path = Path(text).expanduser()
    return (path.is_dir() and (path / INDEX_NAME).is_file()) or (
        path.name.endswith(".json") and path.is_file()
    )


def _webdataset() -> Any:
    """The ``webdataset`` package, or a one-line error saying how to install it."""
    try:
        import webdataset
    except ImportError:
        raise DatasetError(
            "shards need the webdataset package: pip install 'mocolab[shards]' "
            "(or pip install webdataset)"
        ) from None
    return webdataset


# --- addresses: what is opened, and how ------------------------------------------------------


def shown(address: str, limit: int = 120) -> str:
    """``address`` for a one-line message: as it is when it is a plain path or URL, else
    quoted with its control characters escaped; shortened to about ``limit`` characters."""
    text = str(address)
    if _UNSAFE_CHARS.search(text) or "'" in text or len(text) > limit:
        text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-3:]


def check_address(address: str, *, origin: str | None = None) -> str:
    """``address`` if mocolab will open it, else a one-line :class:`DatasetError` naming it.

    Local paths and URLs of :data:`REMOTE_SCHEMES` are opened; a URL must not hold spaces or
    control characters (a valid URL has them percent-encoded); a ``pipe:`` command only when
    ``origin`` is ``None``, i.e. the user typed it.

    Args:
        address: a path, a URL or ``pipe:CMD``.
        origin: where ``address`` was read from (``"index.json of …"``, ``"the checkpoint
            of …"``), or ``None`` when the user gave it (command line, Python API).

    Raises:
        DatasetError: a ``pipe:`` read from a file, an unknown scheme or a malformed URL.

    Examples:
        >>> check_address("https://example.com/shards/index.json")
        'https://example.com/shards/index.json'
        >>> check_address("pipe:cat x.tar", origin="index.json")
        Traceback (most recent call last):
        ...
        mocolab.errors.DatasetError: index.json names 'pipe:cat x.tar', a pipe: command; ...
    """
    if not isinstance(address, str) or not address:
        raise DatasetError(f"{origin or '--data'}: {address!r} is not an address (a path or URL)")
    if is_pipe(address):
        if origin is not None:
            raise DatasetError(
                f"{origin} names {shown(address)}, a pipe: command; mocolab runs a command only "
                f"when it is typed on the command line, never one read from a file: pass "
                f"--data {shown(address)} yourself if you mean it"
            )
        if not shlex.split(address[len(PIPE) :]):
            raise DatasetError(f"--data {shown(address)} names no command after pipe:")
        return address
    if not is_url(address):
        if "\x00" in address:
            raise DatasetError(f"{origin or '--data'}: the path {shown(address)} holds a NUL byte")
        return address
    scheme = address.split(":", 1)[0].lower()
    where = f"{origin} names" if origin else "--data"
    if scheme not in REMOTE_SCHEMES:
        raise DatasetError(
            f"{where} {shown(address)}: mocolab reads local files and "
            f"{', '.join(s + '://' for s in REMOTE_SCHEMES)} addresses, not {scheme}://"
        )
    if _UNSAFE_CHARS.search(address):
        raise DatasetError(
            f"{where} {shown(address)}, which is not a valid URL (it holds spaces or control "
            f"characters; a URL has them percent-encoded); fix the address"
        )
    return address


class _CommandOutput(io.RawIOBase):
    """The standard output of a command run from an argument list (never a shell), as a
    readable binary stream; the command's failure is an ``OSError`` at the end of its output.
    Closing it early stops the command."""

    def __init__(self, args: list[str], address: str) -> None:
        super().__init__()
        self.args, self.address, self.done = args, address, False
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr
            )
        except OSError as e:
            self.stderr.close()
            raise OSError(
                f"cannot run {args[0]!r} to read {shown(address)} ({e.strerror or e}); "
                f"install it or put it on the PATH"
            ) from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = cast(io.BufferedReader, self.proc.stdout).readinto(buffer)
        if not n and not self.done:
            self.done = True
            if self.proc.wait() != 0:
                self.stderr.seek(0)
                lines = self.stderr.read().decode(errors="replace").strip().splitlines()
                raise OSError(
                    f"{self.args[0]} exited with status {self.proc.returncode} reading "
                    f"{shown(self.address)}{': ' + lines[-1][:200] if lines else ''}"
                )
        return n or 0

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                self.proc.kill()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc.wait()
            self.stderr.close()
        super().close()


def open_address(address: str, timeout: float = 60.0) -> IO[bytes]:
    """A binary stream of a checked address (:func:`check_address`): a local file, an
    ``http(s)://`` URL through urllib, ``s3://`` through ``aws s3 cp URL -``, ``gs://``
    through ``gsutil cat URL``, or a typed ``pipe:CMD``'s output. Commands are argument
    lists: no shell ever sees an address.

    Raises:
        OSError: the file, URL or command cannot be opened (urllib's errors are OSErrors).
    """
    if is_pipe(address):
        return io.BufferedReader(_CommandOutput(shlex.split(address[len(PIPE) :]), address))
    scheme = address.split(":", 1)[0].lower() if is_url(address) else ""
    if scheme in ("http", "https"):
        return urllib.request.urlopen(address, timeout=timeout)
    if scheme == "s3":
        return io.BufferedReader(_CommandOutput(["aws", "s3", "cp", address, "-"], address))
    if scheme == "gs":
        return io.BufferedReader(_CommandOutput(["gsutil", "cat", address], address))
    if scheme:
        raise OSError(f"{shown(address)}: mocolab does not read {scheme}:// addresses")
    return open(address, "rb")


# --- the index -----------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """The contents of ``index.json``: shard locations and counts, classes, channels.

    Attributes:
        urls: where each shard is read from (local paths or URLs), in pack order.
        counts: samples per shard.
        classes: class names in label order, or ``None``.
        channels: 1 when every packed image was grayscale, else 3.
        max_side: the longer side the images were capped at.
        location: the index itself (for messages).
        names: the shards as the index lists them (relative to it).
    """

    urls: list[str]
    counts: list[int]
    classes: list[str] | None
    channels: int
    max_side: int
    location: str
    image_format: str = "jpeg"
    names: list[str] | None = None

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def fingerprint(self) -> str:
        """A hash of the shards' names, counts and classes: the same for the same packed
        images wherever the shards are (a checkpoint keeps it to detect repacked data)."""
        blob = json.dumps([self.names or self.urls, self.counts, self.classes])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, spec: str | os.PathLike, *, origin: str | None = None) -> ShardIndex:
        """Read the index of ``spec`` (see :func:`is_shards`); shard names are relative to it.

        Every shard address is checked (:func:`check_address`: a ``pipe:`` listed in an index
        is refused, so is a URL of another scheme or with spaces), a remote index lists only
        remote shards, and the counts of local shards are checked against their tar members.

        Args:
            spec: a folder, an ``index.json`` path or URL, or a ``pipe:`` command.
            origin: where ``spec`` was read from (a checkpoint, a config file), or ``None``
                when the user typed it: only then may it be a ``pipe:`` command.

        Raises:
            DatasetError: the index cannot be read, is not mocolab's, names a shard mocolab
                will not open, a local shard that does not exist, or counts that its shards
                do not hold (the message names it and the fix).
        """
        text = check_address(os.fspath(spec), origin=origin)
        if is_pipe(text) or is_url(text):
            location = text
            base = None if is_pipe(text) else text.rsplit("/", 1)[0]
            try:
                with open_address(text) as f:
                    raw = f.read(MAX_INDEX_BYTES + 1)
            except Exception as e:
                raise DatasetError(
                    f"cannot read the shard index {shown(text)} ({_reason(e)}); check the "
                    f"address, the network and the credentials"
                ) from None
        else:
            path = Path(text).expanduser()
            path = path / INDEX_NAME if path.is_dir() else path
            location, base = str(path), str(path.parent)
            try:
                with open(path, "rb") as f:
                    raw = f.read(MAX_INDEX_BYTES + 1)
            except OSError as e:
                raise DatasetError(
                    f"cannot read the shard index {path} ({e}); pack the folder "
                    f"with `mocolab data pack FOLDER OUT`"
                ) from None
        if len(raw) > MAX_INDEX_BYTES:
            raise DatasetError(
                f"{location} is larger than {MAX_INDEX_BYTES // 2**20} MB: not an index "
                f"written by `mocolab data pack`"
            )
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not a mocolab shard index")
            shards = meta["shards"]
            if not isinstance(shards, list) or not all(isinstance(x, dict) for x in shards):
                raise ValueError("'shards' is not a list of {name, count}")
            names = [x["name"] for x in shards]
            counts = [x["count"] for x in shards]
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError("a shard's name is not a string")
            bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int) or c < 0]
            if bad:
                raise ValueError(f"a shard's count is {bad[0]!r}, not a number of samples")
            classes = meta.get("classes")
            if classes is not None and (
                not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
            ):
                raise ValueError("'classes' is not a list of names")
            channels, max_side = meta.get("channels", 3), meta.get("max_side", 0)
            if channels not in (1, 3) or isinstance(channels, bool):
                raise ValueError(f"'channels' is {channels!r}, not 1 or 3")
            if isinstance(max_side, bool) or not isinstance(max_side, int):
                raise ValueError(f"'max_side' is {max_side!r}, not a number")
            image_format = meta.get("image_format", "jpeg")
            if image_format not in ("jpeg", "webp"):
                raise ValueError(f"'image_format' is {image_format!r}, not jpeg or webp")
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(
                f"{location} is not an index written by `mocolab data pack` "
                f"({type(e).__name__}: {str(e)[:200]}); pack the images again"
            ) from None
        where = f"{location}"
        urls = [_shard_address(n, base, where) for n in names]
        missing = [u for u in urls if not is_url(u) and not Path(u).is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} shard(s) listed in {location} are missing, first {missing[0]}; "
                f"copy them back, or pack the folder again (`mocolab data pack`)"
            )
        if not counts or sum(counts) == 0:
            raise DatasetError(f"{location} lists no samples; pack a folder with images")
        for url, count in zip(urls, counts):
            real = None if is_url(url) else tar_samples(url)
            if real is not None and real != count:
                raise DatasetError(
                    f"{location} says {count} samples for {url}, but the shard holds {real}; "
                    f"the index does not belong to these shards: pack the folder again"
                )
        return cls(urls, counts, classes, channels, max_side, location, image_format, list(names))


def _reason(e: BaseException) -> str:
    """A short reason for a failed read, on one line."""
    why = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
    text = " ".join(str(why).split())  # "HTTP Error 404: Not Found", "Connection refused"
    return f"{type(e).__name__}: {text[:200]}"


def _shard_address(name: str, base: str | None, location: str) -> str:
    """Where the shard ``name`` listed in the index at ``location`` (folder or URL ``base``;
    ``None`` for a ``pipe:`` index) is read: relative names resolved against the index."""
    check_address(name, origin=location)  # refuses pipe:, other schemes, malformed URLs
    if is_url(name):
        return name
    if base is not None and is_url(base):
        if name.startswith("/") or name.startswith("\\") or name.startswith("~"):
            raise DatasetError(
                f"{location} lists the local file {shown(name)}; a remote index lists only "
                f"shards beside it or URLs"
            )
        return f"{base}/{name}"
    path = os.path.expanduser(name)
    if os.path.isabs(path):
        return path
    if base is None:
        raise DatasetError(
            f"{location} lists the shard {shown(name)} by a relative name, but an index read "
            f"through pipe: has no folder; list the shards by URL or absolute path"
        )
    return os.path.join(base, path)


def tar_samples(path: str | Path) -> int | None:
    """The samples (distinct keys, as webdataset groups members) of a local tar shard, read
    from its 512-byte headers only (the members' data is skipped by seeking); ``None`` when
    it cannot be read to its end (a truncated or damaged shard, which the reading then
    reports sample by sample)."""
    _webdataset()
    from webdataset.tariterators import base_plus_ext

    keys: set[str] = set()
    long_name: bytes | None = None  # a pax "path" or GNU long name for the next member
    try:
        end = os.path.getsize(path)
        with open(path, "rb") as f:
            while True:
                header = f.read(512)
                if len(header) < 512:
                    return None  # no end-of-archive block: cut off
                if not header.strip(b"\0"):
                    break  # the end-of-archive block
                kind, size_field = header[156:157], header[124:136]
                if size_field[:1] >= b"\x80":
                    return _tar_samples_slow(path)  # a member over 8 GB: base-256 size
                size = int(size_field.strip(b"\0 ").decode("ascii") or "0", 8)
                padded = (size + 511) // 512 * 512
                if kind in (b"x", b"L"):  # the next member's pax records / GNU long name
                    if size > 2**20:
                        return _tar_samples_slow(path)
                    data = f.read(padded)
                    if len(data) < padded:
                        return None
                    long_name = _pax_path(data[:size]) if kind == b"x" else data[:size]
                    long_name = long_name.rstrip(b"\0") if long_name is not None else None
                    continue
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345]:
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                name, long_name = long_name or name, None
                text = name.decode("utf-8", "surrogateescape")
                if kind in (b"0", b"\0", b"7") and not _TAR_META.match(os.path.basename(text)):
                    key = base_plus_ext(text)[0]
                    if key is not None:
                        keys.add(key)
                if f.seek(padded, os.SEEK_CUR) > end:
                    return None  # a member cut off
    except (OSError, ValueError):
        return None
    return len(keys)


def _pax_path(records: bytes) -> bytes | None:
    """The ``path`` of a pax extended header's records (``"LEN key=value\\n"`` each)."""
    pos = 0
    while pos < len(records):
        length = int(records[pos : records.index(b" ", pos)])
        key, _, value = records[records.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value
        pos += length
    return None


_TAR_META = re.compile(r"__[^/]*__$")  # webdataset skips such members


def _tar_samples_slow(path: str | Path) -> int | None:
    """:func:`tar_samples` through :mod:`tarfile`, for archives with extended headers."""
    from webdataset.tariterators import base_plus_ext

    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            while (member := tar.next()) is not None:
                if member.isreg() and not _TAR_META.match(os.path.basename(member.name)):
                    key = base_plus_ext(member.name)[0]
                    if key is not None:
                        keys.add(key)
                tar.members = []  # type: ignore[attr-defined]  # no list of a million members
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return None
    return len(keys)


# --- packing -------------------------------------------------------------------------------


def _encode(path: Path, max_side: int, fmt: str, quality: int) -> tuple[bytes, str, bool]:
    """``(bytes, extension, grayscale)`` of one image, longer side capped at ``max_side``."""
    with Image.open(path) as src:
        orientation = src.getexif().get(0x0112, 1)
        gray = src.mode in ("1", "L", "LA", "I", "I;16", "F")
        if (
            fmt == "jpeg"
            and src.format == "JPEG"
            and orientation == 1
            and max(src.size) <= max_side
            and src.mode in ("L", "RGB")
        ):
            src.load()  # a truncated file fails here, not at training time
            return path.read_bytes(), "jpg", gray
        if src.format == "JPEG" and max(src.size) > max_side:
            h, w = true_size(src.width, src.height, max_side)
            src.draft(src.mode if src.mode in ("L", "RGB") else None, (w, h))
        im = ImageOps.exif_transpose(src)
        im.load()
        im = _to_8bit(im)  # "L" for grayscale sources (16-bit rescaled), else "RGB"
    gray = im.mode == "L"
    if max(im.size) > max_side:
        h, w = true_size(im.width, im.height, max_side)
        im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=quality)
    return buf.getvalue(), "jpg" if fmt == "jpeg" else "webp", gray


def _check_pack_target(folder: Path, out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that would mix shards with other data: inside the image folder, a
    run directory, a file, or earlier shards without ``overwrite``."""
    source = folder.resolve()
    if out.resolve().is_relative_to(source):
        raise DatasetError(
            f"OUT {out} is inside the image folder {folder}; pack into a folder of its own, "
            f"e.g. {folder.resolve().parent / (source.name + '-shards')}"
        )
    if out.exists() and not out.is_dir():
        raise DatasetError(f"OUT {out} is a file; choose a folder for the shards")
    if any((out / name).exists() for name in (CHECKPOINT_NAME, LOCK_NAME, "metrics.jsonl")):
        raise DatasetError(f"OUT {out} is a run directory; pack into a folder of its own")
    if (out / INDEX_NAME).exists() and not overwrite:
        raise DatasetError(
            f"{out} already holds packed shards ({INDEX_NAME}); pass --overwrite to replace "
            "them, or choose another OUT"
        )


@contextlib.contextmanager
def _naming_shard(out: Path, shards: list[dict[str, Any]]) -> Iterator[None]:
    """A failed write of a shard (a full disk) as one line naming the shard and the space of
    its file system."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_write_error(e):
            raise
        target = out / shards[-1]["name"] if shards else out
        note = "the pack is unfinished (no index.json); free some space and run it again"
        raise write_error(e, target, note=note) from None


def pack_folder(
    folder: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    max_side: int = 512,
    shard_size: str | int = "1GB",
    image_format: str = "jpeg",
    quality: int = 90,
    progress: bool = True,
    overwrite: bool = False,
) -> ShardIndex:
    """Write the images of ``split`` of ``folder`` as WebDataset shards in ``out``.

    Files that cannot be decoded, or that vanish while packing, are skipped with one warning
    (their count and examples go into the index too); files added after the folder was listed
    are not packed (the warning says so). The index is written last, atomically: a pack that
    stops half-way leaves no index, and is simply run again (its partial shards are removed).
    An ``out`` that holds packed shards (an ``index.json``) is only packed again with
    ``overwrite`` (its old shards are removed first); ``out`` must not be inside ``folder`` or
    a run directory.

    Raises:
        DatasetError: no images, none readable, a bad option, or a used, unsuitable or
            unwritable ``out``.
        OutputError: a shard could not be written (a full disk), naming it.
    """
    from tqdm import tqdm

    TarWriter = _webdataset().TarWriter

    if image_format not in ("jpeg", "webp"):
        raise DatasetError(f"--format must be jpeg or webp, got {image_format!r}")
    if not 8 <= max_side <= MAX_SIDE[image_format]:
        raise DatasetError(
            f"--max-side must be between 8 and {MAX_SIDE[image_format]} (the longest side a "
            f"{'JPEG' if image_format == 'jpeg' else 'WebP'} image can have), got {max_side}"
        )
    if isinstance(quality, bool) or not 1 <= quality <= 100:
        raise DatasetError(
            f"--quality must be between 1 and 100 (the encoder's quality; default 90), "
            f"got {quality}"
        )
    limit = parse_size(shard_size)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder")
    root = split_root(folder, split)
    files = list_images(root)
    if not files:
        raise DatasetError(f"no image files in {root}; pass a folder of images")
    classes = folder_classes(files)
    out = Path(out).expanduser()
    _check_pack_target(folder, out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {out} ({e}); choose a writable OUT") from None
    (out / INDEX_NAME).unlink(missing_ok=True)  # no stale index while the shards change
    for old in out.glob("shard-*.tar"):  # of the pack replaced, or of one that was killed
        old.unlink()
    shards: list[dict[str, Any]] = []
    skipped: list[str] = []
    all_gray, writer, size, k = True, None, 0, 0
    index = {c: i for i, c in enumerate(classes or [])}
    with _naming_shard(out, shards):
        try:
            for rel in tqdm(files, desc=f"packing {root}", unit="img", disable=not progress):
                try:
                    data, ext, gray = _encode(root / rel, max_side, image_format, quality)
                except Exception as e:
                    skipped.append(f"{rel} ({type(e).__name__}: {e})")
                    continue
                if writer is None or (size + len(data) > limit and shards[-1]["count"]):
                    if writer is not None:
                        writer.close()
                    name = f"shard-{len(shards):06d}.tar"
                    shards.append({"name": name, "count": 0})
                    writer = TarWriter(str(out / name), encoder=False)
                    size = 0
                sample: dict[str, Any] = {"__key__": f"{k:09d}", ext: data}
                if classes is not None:
                    sample["cls"] = str(index[rel.parts[0]]).encode()
                writer.write(sample)
                shards[-1]["count"] += 1
                size += len(data) + 1536  # tar headers and padding
                all_gray &= gray
                k += 1
        finally:
            if writer is not None:
                writer.close()
    if k == 0:
        raise DatasetError(
            f"none of the {len(files)} files in {root} could be packed (first: "
            f"{skipped[0] if skipped else '?'}); check that they are images"
        )
    now = list_images(root)
    added = len(set(now) - set(files))
    if skipped or added:
        warnings.warn(
            SkippedSamplesWarning(
                f"packed {k} of {len(files)} images of {root}: skipped {len(skipped)} unreadable "
                f"or vanished ({'; '.join(skipped[:5])}); {added} added while packing were not "
                f"packed. Fix or remove them and pack again to include them"
            ),
            stacklevel=2,
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(root.resolve()),
        "packed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "count": k,
        "classes": classes,
        "channels": 1 if all_gray else 3,
        "max_side": max_side,
        "image_format": image_format,
        "skipped": len(skipped),
        "skipped_examples": skipped[:20],
        "shards": [{**s, "bytes": (out / s["name"]).stat().st_size} for s in shards],
    }
    write_text_atomic(out / INDEX_NAME, json.dumps(meta, indent=1))
    return ShardIndex.load(out)


# --- decoding ------------------------------------------------------------------------------


def read_shard(address: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The samples of the shard at ``address`` (checked by :func:`ShardIndex.load`) in file
    order, grouped by key as webdataset groups them, and the errors met reading it (what was
    read before an error is kept)."""
    _webdataset()
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[str] = []

    def handler(e: Exception) -> bool:
        errors.append(f"{type(e).__name__}: {e}"[:300])
        return True  # warn and continue: what was read so far is kept

    try:
        stream = open_address(address)
    except Exception as e:
        return [], [_reason(e)]
    with contextlib.closing(stream):
        files = tar_file_expander([{"url": address, "stream": stream}], handler=handler)
        samples = list(group_by_keys(files, handler=handler))
    return samples, errors


def sample_label(sample: dict[str, Any], address: str, classes: int | None = None) -> int:
    """The class index in a sample's ``.cls`` member (below ``classes`` when given), or -1
    without one.

    Raises:
        DatasetError: the member does not hold such an integer (names shard and member).
    """
    if "cls" not in sample:
        return -1
    raw = sample["cls"]
    try:
        label = int(raw.decode("ascii") if isinstance(raw, bytes) else raw)
        if label < 0 or (classes is not None and label >= classes):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise DatasetError(
            f"shard {address}: member {sample.get('__key__')}.cls holds {shown(repr(raw), 60)}, "
            f"not a class number; pack the folder again"
        ) from None
    return label


def _image_field(sample: dict[str, Any]) -> bytes | None:
    for ext in ("jpg", "jpeg", "webp", "png"):
        if ext in sample:
            return sample[ext]
    return None


def decode_sample(data: bytes, side: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One encoded image as ``(C×side×side uint8 stretched, true (h, w))`` (see
    :func:`mocolab.data.whole.decode_whole`), with ``channels`` channels."""
    array, _, size = decode_whole(data, side)
    return _with_channels(array, channels), size


def _with_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """A ``C×S×S`` uint8 image with ``channels`` channels: gray repeated, or RGB to gray."""
    if array.shape[0] == channels:
        return array
    if channels == 3:
        return np.broadcast_to(array, (3, *array.shape[1:]))
    return np.round(  # ITU-R 601-2 luma, as PIL's convert("L")
        array.astype(np.float32).transpose(1, 2, 0) @ np.array([0.299, 0.587, 0.114], np.float32)
    )[None].astype(np.uint8)


def decode_jpeg_batch(
    data: list[Tensor], side: int, device: torch.device | str, channels: int = 3
) -> tuple[Tensor, Tensor]:
    """Decode JPEGs with ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG, batched, on
    CUDA) and stretch each to ``side×side`` (bilinear, antialiased); returns uint8
    ``N×C×side×side`` and the true sizes ``N×2`` (longer side ``side``), as
    :func:`decode_sample` does on the CPU.

    Args:
        data: the encoded files as 1-D uint8 CPU tensors.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    # EXIF orientation was applied by `mocolab data pack` (it re-encodes rotated JPEGs)
    images = decode_jpeg(data, mode=mode, device=device)
    out = torch.empty(len(images), channels, side, side, dtype=torch.uint8, device=device)
    sizes = torch.empty(len(images), 2, dtype=torch.int64)
    for n, im in enumerate(images):
        sizes[n] = torch.tensor(true_size(im.shape[2], im.shape[1], side))
        x = torch.nn.functional.interpolate(
            im[None].float(),
            size=(side, side),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        out[n] = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return out, sizes


# --- streaming -----------------------------------------------------------------------------


_Item = tuple[Any, "tuple[int, int] | None", int, int]  # decoded or encoded, size, number, label


@dataclass(frozen=True)
class Batch:
    """A rank's batch: uint8 images ``B×C×S×S`` (stretched whole images), their true sizes
    ``B×2``, their sample numbers in pack order ``B`` (the index InstDisc's bank uses), and
    labels ``B`` (-1 without classes). With GPU decoding ``images`` is ``None`` and
    ``encoded`` holds the JPEG files for :func:`decode_jpeg_batch`."""

    images: Tensor | None
    sizes: Tensor | None
    index: Tensor
    labels: Tensor
    encoded: list[Tensor] | None = None


class ShardStream:
    """The training batches of one rank from packed shards (see the module docstring).

    Args:
        index: the shards.
        side: side of the stored whole images (true sizes have this longer side).
        batch_size: this rank's batch.
        seed: the run's seed.
        rank, world: this process among ``world``.
        streams: parallel streams (DataLoader workers); the order depends on it.
        epochs: the run's epochs, over which the batches per epoch are equalised.

    Raises:
        DatasetError: fewer shards than ``world × streams``, or too few samples per stream for
            one batch; the message says how to repack or what to lower.
    """

    def __init__(
        self,
        index: ShardIndex,
        *,
        side: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        streams: int = 1,
        epochs: int = 1,
    ) -> None:
        self.index, self.side, self.batch_size = index, side, batch_size
        self.seed, self.rank, self.world, self.streams = seed, rank, world, max(1, streams)
        n = len(index.counts)
        if n < world * self.streams:
            raise DatasetError(
                f"{index.location} has {n} shards, fewer than the {world} processes × "
                f"{self.streams} workers that each read their own; pack with a smaller "
                f"--shard-size (about {max(1, index.total // (world * self.streams * 4))} images "
                f"a shard) or lower --num-workers"
            )
        counts = torch.tensor(index.counts)
        per_epoch = []
        for epoch in range(max(1, epochs)):
            perm = self.shard_order(epoch)
            batches = min(
                int(counts[perm[r::world][s :: self.streams]].sum()) // batch_size
                for r in range(world)
                for s in range(self.streams)
            )
            per_epoch.append(batches * self.streams)
        self.steps_per_epoch = min(per_epoch)
        if self.steps_per_epoch == 0:
            raise DatasetError(
                f"{index.location}: some of the {world} × {self.streams} streams hold fewer than "
                f"one batch of {batch_size} images; lower --batch-size or --num-workers, or pack "
                f"smaller shards"
            )

    def shard_order(self, epoch: int) -> Tensor:
        """The shards' permutation of ``epoch``: a pure function of (seed, epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.index.counts), generator=g)

    def stream_shards(self, epoch: int, stream: int) -> list[int]:
        """The shards that ``stream`` of this rank reads in ``epoch``, in order."""
        return self.shard_order(epoch)[self.rank :: self.world][stream :: self.streams].tolist()

    def _sample_order(self, epoch: int, shard: int, count: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7_919 + shard + 1)
        return torch.randperm(count, generator=g).tolist()

    def _read_shard(self, shard: int) -> tuple[list[dict[str, Any]], list[str]]:
        """The samples of one shard in file order, and the errors met reading it."""
        return read_shard(self.index.urls[shard])

    def stream_batches(
        self, epoch: int, stream: int, first: int, last: int, decode: bool = True
    ) -> Iterator[Batch]:
        """Batches ``first ≤ j < last`` of ``stream`` in ``epoch`` (``decode=False``: the
        encoded JPEGs, for the GPU). Skipped batches cost no decoding; whole shards before
        the first batch are not read."""
        skip, needed = first * self.batch_size, (last - first) * self.batch_size
        if needed <= 0:
            return
        pending: list[_Item] = []
        n_classes = None if self.index.classes is None else len(self.index.classes)
        last_good: _Item | None = None
        holes = 0  # bad samples before the first good one
        for shard in self.stream_shards(epoch, stream):
            count = self.index.counts[shard]
            if skip >= count:
                skip -= count
                continue
            samples, errors = self._read_shard(shard)
            by_key = {str(s.get("__key__")): s for s in samples}
            keys = sorted(by_key)
            bad = 0
            for j in self._sample_order(epoch, shard, count)[skip:]:
                if needed == 0:
                    break
                item: _Item | None = None
                if j < len(keys):
                    s = by_key[keys[j]]
                    data = _image_field(s)
                    try:
                        number = int(keys[j])
                        label = sample_label(s, self.index.urls[shard], n_classes)
                        if data is None:
                            raise ValueError(f"member {keys[j]} holds no image")
                        if decode:
                            array, size = decode_sample(data, self.side, self.index.channels)
                            item = (array, size, number, label)
                        else:
                            Image.open(io.BytesIO(data)).verify()
                            item = (data, None, number, label)
                    except Exception as e:
                        errors.append(f"{keys[j]}: {type(e).__name__}: {e}"[:300])
                if item is None:
                    bad += 1
                    if last_good is None:
                        holes += 1
                        needed -= 1
                        continue
                    item = last_good
                last_good = item
                if holes:  # the stream began with bad samples: repeat its first good one
                    pending.extend([item] * holes)
                    holes = 0
                pending.append(item)
                needed -= 1
                while len(pending) >= self.batch_size:
                    yield self._collate(pending[: self.batch_size], decode)
                    pending = pending[self.batch_size :]
            skip = 0
            if bad or errors:
                warnings.warn(
                    SkippedSamplesWarning(
                        f"shard {self.index.urls[shard]}: {bad} of the samples this run needed "
                        f"could not be read or decoded ({'; '.join(errors[:3])}); they were "
                        f"replaced by repeats of good ones. Repack or replace the shard"
                    ),
                    stacklevel=2,
                )
            if needed == 0:
                break
        if holes or needed > 0:
            raise DatasetError(
                f"rank {self.rank}, stream {stream} of {self.index.location}: no readable "
                f"image in its shards for epoch {epoch}; check the shards / URLs and the network"
            )

    def _collate(self, items: list[Any], decode: bool) -> Batch:
        index = torch.tensor([it[2] for it in items], dtype=torch.int64)
        labels = torch.tensor([it[3] for it in items], dtype=torch.int64)
        if not decode:
            encoded = [torch.frombuffer(bytearray(it[0]), dtype=torch.uint8) for it in items]
            return Batch(None, None, index, labels, encoded)
        images = torch.from_numpy(np.stack([it[0] for it in items]))
        sizes = torch.tensor([it[1] for it in items], dtype=torch.int64)
        return Batch(images, sizes, index, labels)

    def batches(
        self,
        epoch: int,
        start: int = 0,
        stop: int | None = None,
        *,
        workers: bool = True,
        decode: bool = True,
        pin_memory: bool = False,
    ) -> Iterator[Batch]:
        """The rank's batches ``start ≤ k < stop`` of ``epoch`` in order (``stop`` defaults to
        :attr:`steps_per_epoch`): batch ``k`` is stream ``k mod S``'s batch ``k // S``.

        ``workers``: one DataLoader process per stream (else all streams in this process,
        the same batches)."""
        stop = self.steps_per_epoch if stop is None else min(stop, self.steps_per_epoch)
        if stop <= start:
            return iter(())
        if workers and self.streams > 1:
            from torch.utils.data import DataLoader

            ds = _StreamsDataset(self, epoch, start, stop, decode)
            loader = DataLoader(
                ds,
                batch_size=None,
                num_workers=self.streams,
                pin_memory=pin_memory,
                persistent_workers=False,
            )
            return iter(loader)
        return self._interleave(epoch, start, stop, decode)

    def _range(self, stream: int, start: int, stop: int) -> tuple[int, int]:
        """Stream ``stream``'s batches j with ``start ≤ j·S + stream < stop``."""
        first = max(0, math.ceil((start - stream) / self.streams))
        last = max(0, math.ceil((stop - stream) / self.streams))
        return first, last

    def _interleave(self, epoch: int, start: int, stop: int, decode: bool) -> Iterator[Batch]:
        its = {
            s: self.stream_batches(epoch, s, *self._range(s, start, stop), decode=decode)
            for s in range(self.streams)
        }
        for k in range(start, stop):
            yield next(its[k % self.streams])


class _StreamsDataset(torch.utils.data.IterableDataset):
    """DataLoader worker ``i`` runs stream ``(start + i) mod S``, so that the loader's
    round-robin over its workers yields the rank's batches ``start, start + 1, …`` in order."""

    def __init__(
        self, stream: ShardStream, epoch: int, start: int, stop: int, decode: bool
    ) -> None:
        self.s, self.epoch, self.start, self.stop, self.decode = stream, epoch, start, stop, decode

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        torch.set_num_threads(1)
        stream = (self.start + worker) % self.s.streams
        return self.s.stream_batches(
            self.epoch, stream, *self.s._range(stream, self.start, self.stop), decode=self.decode
        )


def sample_images(index: ShardIndex, side: int, max_images: int = 512) -> ImageDataset:
    """The first ``max_images`` images of the first shards, decoded whole: for the channel
    statistics and the diagnostics of a run on shards (never the whole set).

    Raises:
        DatasetError: no readable image, or a ``.cls`` member that is not a class number.
    """
    arrays, sizes, labels = [], [], []
    n_classes = None if index.classes is None else len(index.classes)
    for url in index.urls:
        samples, _ = read_shard(url)
        for s in samples:
            data = _image_field(s)
            if data is None:
                continue
            try:
                array, size = decode_sample(data, side, index.channels)
            except Exception:
                continue
            arrays.append(array)
            sizes.append(size)
            labels.append(sample_label(s, url, n_classes))
            if len(arrays) == max_images:
                break
        if len(arrays) == max_images:
            break
    if not arrays:
        raise DatasetError(f"no readable image in the shards of {index.location}; check them")
    lab = torch.tensor(labels) if index.classes is not None else None
    return ImageDataset(
        torch.from_numpy(np.stack(arrays)),
        lab,
        index.classes,
        _name(index),
        torch.tensor(sizes, dtype=torch.int64),
    )


def _name(index: ShardIndex) -> str:
    return f"{Path(index.location).parent.name or 'shards'} (shards)"


def labelled_images(index: ShardIndex, side: int, max_images: int = 10_000) -> ImageDataset:
    """Labelled images of the shards for evaluation: every ``⌈total / max_images⌉``-th sample
    in pack order (so every class of a class-sorted folder is there), each brought to
    ``side×side`` as a folder's evaluation images are (shorter side resized, centre crop:
    :func:`mocolab.data.folder.decode_image`). Every shard is read; only those are decoded.

    Raises:
        DatasetError: the shards have no classes, no readable image, or a ``.cls`` member
            that is not a class number.
    """
    if index.classes is None:
        raise DatasetError(f"{index.location} has no classes; pack a folder with class folders")
    stride = max(1, math.ceil(index.total / max_images))
    arrays, labels = [], []
    for url in index.urls:
        samples, _ = read_shard(url)
        for s in samples:
            key, data = str(s.get("__key__")), _image_field(s)
            if data is None or not key.isdigit() or int(key) % stride:
                continue
            label = sample_label(s, url, len(index.classes))
            try:
                array, _ = decode_image(io.BytesIO(data), side)
            except Exception:
                continue  # counted by the training's warnings; evaluation skips it
            arrays.append(_with_channels(array, index.channels))
            labels.append(label)
    if not arrays:
        raise DatasetError(f"no readable image in the shards of {index.location}; check them")
    images = torch.from_numpy(np.stack(arrays))
    return ImageDataset(images, torch.tensor(labels), index.classes, _name(index))


def device_batches(
    stream: ShardStream, epoch: int, start: int, stop: int, device: torch.device
) -> Generator[tuple[Tensor, Tensor, Tensor], None, None]:
    """``(index, images, sizes)`` of the rank's batches ``start ≤ k < stop`` of ``epoch``,
    images on ``device``. Decoding is chosen here: on CUDA, JPEG shards are decoded on the GPU
    in one batched ``decode_jpeg`` call per batch (the workers only read and check the files);
    otherwise in the DataLoader workers (PIL, reduced-size JPEG decoding)."""
    gpu = device.type == "cuda" and stream.index.image_format == "jpeg"
    for batch in stream.batches(
        epoch, start, stop, decode=not gpu, pin_memory=device.type == "cuda"
    ):
        if batch.encoded is not None:
            images, sizes = decode_jpeg_batch(
                batch.encoded, stream.side, device, stream.index.channels
            )
        else:
            assert batch.images is not None and batch.sizes is not None
            images, sizes = batch.images.to(device, non_blocking=True), batch.sizes
        yield batch.index, images, sizes
