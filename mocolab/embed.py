"""``mocolab embed``: features of every image of a folder, batched, resumable.

Output: ``FILE.npy`` (float32 ``N×D``) with ``FILE.paths.txt`` (the images' paths relative to
the folder, one per line, row order), or ``FILE.parquet`` (columns ``path`` and ``embedding``;
needs pyarrow). A name with a line break or bytes that are not UTF-8 is stored as its JSON
string literal (a line starting with ``"``; :func:`read_paths` decodes them), so every name
is kept and rows and names stay aligned. Unreadable files (corrupt, not images, dangling
symlinks, symlink loops) are skipped with one warning that counts them. Images are found
recursively (``.jpg .jpeg .png .webp .bmp``), sorted, decoded to the run's crop size (shorter
side resized, centre crop) and encoded by the run's :class:`~mocolab.encoder.Encoder` in eval
mode.

Resume: the work is cut into chunks of files; each finished chunk is written atomically to
``FILE.parts/chunk-NNNNNN.npz`` and recorded in ``FILE.parts/progress.json`` (also written
atomically), so an interrupted run continues where it stopped when the same command runs again.
The progress file names the folder's file list and a fingerprint of the weights; a run with
other images or weights refuses to mix them (``--restart`` starts over). When every chunk is
done the output is assembled (atomically) and the parts are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported when embedding runs, so `mocolab --help` stays quick
    import numpy as np
    import torch

PROGRESS_NAME = "progress.json"
PROGRESS_VERSION = 1
SUFFIXES = (".npy", ".parquet")


@dataclass
class EmbedResult:
    """What an embedding run wrote."""

    out: Path
    index: Path | None  # the paths file of a .npy output
    num_images: int
    dim: int
    skipped: list[str] = field(default_factory=list)
    resumed_chunks: int = 0


def parts_dir(out: str | Path) -> Path:
    """Where the chunks and the progress marker of ``out`` live while it is being computed."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def index_path(out: str | Path) -> Path:
    """``FILE.paths.txt`` beside ``FILE.npy``."""
    out = Path(out)
    return out.with_name(out.stem + ".paths.txt")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, bytes): the same weights, the
    same fingerprint."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _files_fingerprint(root: Path, files: list[PurePosixPath]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            st = (root / f).stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a dangling symlink, a symlink loop: skipped when decoded
            size, mtime = -1, -1
        h.update(f"{f}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def encode_path(path: str) -> str:
    """A file name as one line of ``FILE.paths.txt`` (and a Parquet ``path``), losslessly:
    the name itself, or, for a name with a line break, bytes that are not UTF-8 (held by
    Python as ``\\udcXX`` surrogates) or a leading double quote, its JSON string literal.

    >>> encode_path("cat/1.jpg"), encode_path("a\\nb.jpg"), encode_path("x\\udcff.jpg")
    ('cat/1.jpg', '"a\\\\nb.jpg"', '"x\\\\udcff.jpg"')
    """
    plain = not any(c in path for c in "\n\r") and not path.startswith('"')
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        plain = False
    return path if plain else json.dumps(path)


def decode_path(line: str) -> str:
    """The inverse of :func:`encode_path`; ``os.fsencode`` of it gives the file name's bytes.

    >>> decode_path('"a\\\\nb.jpg"') == "a\\nb.jpg", decode_path("cat/1.jpg")
    (True, 'cat/1.jpg')
    """
    return json.loads(line) if line.startswith('"') else line


def read_paths(index: str | Path) -> list[str]:
    """The paths of a ``FILE.paths.txt`` index, one per row of ``FILE.npy``."""
    text = Path(index).read_text(encoding="utf-8")
    return [decode_path(line) for line in text.split("\n")[:-1]]


def _write_json(path: Path, obj: Any) -> None:
    from .weights import write_atomic

    blob = (json.dumps(obj, indent=1) + "\n").encode()
    write_atomic(path, lambda f: f.write(blob))


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.npz"


def _save_chunk(path: Path, embeddings: np.ndarray, paths: list[str], skipped: list[str]) -> None:
    import numpy as np

    from .weights import write_atomic

    write_atomic(
        path,
        lambda f: np.savez(
            f,
            embeddings=embeddings,
            paths=np.array(paths, dtype=np.str_),
            skipped=np.array(skipped, dtype=np.str_),
        ),
    )


def _load_chunk(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return z["embeddings"], z["paths"].tolist(), z["skipped"].tolist()


class _DecodeFiles:
    """Dataset of image files decoded to ``size`` with ``channels`` channels: item ``i`` is
    ``(i, array | None, error | None)``."""

    def __init__(self, paths: list[Path], size: int, channels: int) -> None:
        self.paths, self.size, self.channels = paths, size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        import numpy as np

        from .data.folder import decode_image

        try:
            a, _ = decode_image(self.paths[i], self.size)
        except Exception as e:  # an unreadable file is skipped, never a crash
            return i, None, f"{type(e).__name__}: {e}"
        if a.shape[0] == 1 and self.channels == 3:
            a = np.repeat(a, 3, axis=0)
        elif a.shape[0] == 3 and self.channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            a = np.round(np.tensordot([0.299, 0.587, 0.114], a.astype(np.float32), axes=1))
            a = a.astype(np.uint8)[None]
        return i, a, None


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def embed_folder(
    source: str | Path,
    folder: str | Path,
    out: str | Path,
    *,
    batch_size: int = 256,
    chunk_size: int = 4096,
    device: str = "auto",
    num_workers: int = 2,
    progress: bool = True,
    restart: bool = False,
) -> EmbedResult:
    """Embed every image under ``folder`` with the backbone of ``source`` (a run directory,
    checkpoint or ``.safetensors`` export) into ``out`` (``.npy`` or ``.parquet``).

    Re-running after an interruption continues from the last finished chunk of
    ``chunk_size`` images; ``restart`` discards the finished chunks.

    Raises:
        ConfigError: a bad output name (or a folder) or option, pyarrow missing for
            ``.parquet``, leftover chunks from other images or weights, or another process
            writing the same ``out``.
        DatasetError: no images in ``folder`` or none decodable.
        CheckpointError: unreadable ``source``.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import DatasetError
    from .data.folder import IMAGE_EXTENSIONS, list_images
    from .device import select_device
    from .encoder import load_encoder
    from .features import cpu_features
    from .safeio import LOCK_NAME, claim_run_dir, release_run_dir, writing

    out = Path(out)
    if out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; give a file name such as {out / 'embeddings.npy'}"
        )
    if out.suffix not in SUFFIXES:
        raise ConfigError(
            f"--out {out}: the name must end in .npy (with a .paths.txt index) or .parquet"
        )
    if out.suffix == ".parquet":
        from .checkpoint import require

        require("pyarrow", "pyarrow", "--out *.parquet")
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError("--batch-size and --chunk-size must be positive")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    files = list_images(root)
    if not files:
        raise DatasetError(
            f"no image files in {root}: looked recursively for "
            f"{' '.join(IMAGE_EXTENSIONS)} (any case)"
        )

    dev = select_device(device)
    encoder = load_encoder(source, dev)
    size, channels = encoder.size, encoder.in_channels
    identity = {
        "version": PROGRESS_VERSION,
        "folder": str(root.resolve()),
        "files": _files_fingerprint(root, files),
        "num_files": len(files),
        "weights": weights_fingerprint(encoder),
        "size": size,
        "channels": channels,
    }

    parts = parts_dir(out)
    claim_run_dir(parts, fix="choose another --out")  # one embedding into out at a time
    try:
        marker = parts / PROGRESS_NAME
        done: list[int] = []
        if restart:  # all but the lock this process holds
            for entry in parts.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.name != LOCK_NAME:
                    entry.unlink()
        if marker.exists():
            try:
                state = json.loads(marker.read_text())
            except (OSError, ValueError):
                state = {}
            same = {k: state.get(k) for k in identity} == identity
            if not same:
                raise ConfigError(
                    f"{parts} holds an unfinished embedding of other images or other weights; run "
                    f"again with --restart to discard it, or choose another --out"
                )
            chunk_size = int(state["chunk_size"])
            done = sorted(k for k in state.get("done", []) if _chunk_path(parts, k).exists())
        _write_json(marker, {**identity, "chunk_size": chunk_size, "done": done})

        num_chunks = (len(files) + chunk_size - 1) // chunk_size
        kept_note = (
            f"the finished chunks are kept in {parts}; free some space and run the same "
            "command again to continue"
        )
        done_set = set(done)
        done_images = sum(min(chunk_size, len(files) - k * chunk_size) for k in done_set)
        bar = tqdm(
            total=len(files),
            initial=done_images,
            desc="embedding",
            unit="img",
            disable=not progress,
        )
        try:
            for k in range(num_chunks):
                if k in done_set:
                    continue
                names = files[k * chunk_size : (k + 1) * chunk_size]
                paths = [root / f for f in names]
                chunk: Any = _DecodeFiles(paths, size, channels)  # a map dataset
                loader = DataLoader(
                    chunk,
                    batch_size=batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                    collate_fn=_as_list,
                )
                feats, kept, skipped = [], [], []
                for batch in loader:
                    good = [(i, a) for i, a, err in batch if a is not None]
                    skipped += [f"{names[i]} ({err})" for i, a, err in batch if a is None]
                    if good:
                        x = torch.from_numpy(np.stack([a for _, a in good])).to(dev)
                        with torch.no_grad():
                            feats.append(cpu_features(encoder(x)))
                        kept += [str(names[i]) for i, _ in good]
                    bar.update(len(batch))
                emb = (
                    torch.cat(feats).numpy()
                    if feats
                    else np.zeros((0, encoder.num_features), dtype=np.float32)
                )
                with writing(_chunk_path(parts, k), need=emb.nbytes, note=kept_note):
                    _save_chunk(_chunk_path(parts, k), emb, kept, skipped)
                done.append(k)
                _write_json(marker, {**identity, "chunk_size": chunk_size, "done": sorted(done)})
        finally:
            bar.close()

        with writing(out, need=len(files) * encoder.num_features * 4, note=kept_note):
            result = _assemble(parts, num_chunks, out, encoder.num_features)
        result.resumed_chunks = len(done_set)
        if result.num_images == 0:
            raise DatasetError(
                f"none of the {len(files)} image files in {root} could be decoded "
                f"(first: {result.skipped[0]}); check that they are real images"
            )
        shutil.rmtree(parts)
        if result.skipped:
            warnings.warn(
                f"skipped {len(result.skipped)} of {len(files)} image files that could not "
                f"be decoded: {'; '.join(result.skipped[:5])}",
                stacklevel=2,
            )
        return result
    finally:
        release_run_dir(parts)


def _assemble(parts: Path, num_chunks: int, out: Path, dim: int) -> EmbedResult:
    """Concatenate the chunks into ``out`` (and its index), each written atomically."""
    import os

    import numpy as np

    from .weights import write_atomic

    counts, skipped = [], []
    for k in range(num_chunks):
        emb, paths, sk = _load_chunk(_chunk_path(parts, k))
        counts.append(len(paths))
        skipped += sk
    n = sum(counts)
    if out.suffix == ".npy":
        tmp = out.with_name(f".{out.name}.tmp")
        try:  # written in place chunk by chunk (memory-mapped), then renamed
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
            with open(tmp, "rb+") as f:  # reserve the blocks now: a full disk is then an
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)  # OSError,
                # not a SIGBUS (bus error) when a write through the memory map finds no space
            paths_all: list[str] = []
            row = 0
            for k in range(num_chunks):
                emb, paths, _ = _load_chunk(_chunk_path(parts, k))
                arr[row : row + len(paths)] = emb
                row += len(paths)
                paths_all += paths
            arr.flush()
            del arr
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            text = "".join(encode_path(p) + "\n" for p in paths_all).encode("utf-8")
            write_atomic(index_path(out), lambda f: f.write(text))
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return EmbedResult(out, index_path(out), n, dim, skipped)

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for k in range(num_chunks):
                emb, paths, _ = _load_chunk(_chunk_path(parts, k))
                values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
                column = pa.FixedSizeListArray.from_arrays(values, dim)
                names = [encode_path(p) for p in paths]
                writer.write_table(
                    pa.table(
                        {"path": pa.array(names, pa.string()), "embedding": column}, schema=schema
                    )
                )

    write_atomic(out, write)
    return EmbedResult(out, None, n, dim, skipped)


# --- command line --------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``mocolab embed RUN_DIR --data FOLDER --out FILE``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "embed",
        help="write the embeddings of every image of a folder (.npy or .parquet)",
        description="Embed every image under a folder with a run's backbone. FILE.npy gets "
        "FILE.paths.txt beside it (one path per row); FILE.parquet has columns "
        "path and embedding. Interrupted? Run the same command again to continue.",
    )
    p.add_argument("run_dir", help="a run directory, checkpoint file or .safetensors export")
    p.add_argument("--data", required=True, metavar="FOLDER", help="folder of images (recursive)")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.npy or FILE.parquet")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--chunk-size", type=int, default=4096, help="images per resumable chunk (default 4096)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="decoding processes")
    p.add_argument(
        "--restart", action="store_true", help="discard the finished chunks of an interrupted run"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        result = embed_folder(
            args.run_dir,
            args.data,
            args.out,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            device=args.device,
            num_workers=args.num_workers,
            progress=args.progress,
            restart=args.restart,
        )
    except KeyboardInterrupt:
        print(
            f"\nmocolab embed: finished chunks are kept in {parts_dir(args.out)}; run the same "
            f"command again to continue",
            flush=True,
        )
        raise
    extra = f" (index {result.index})" if result.index else ""
    resumed = (
        f", {result.resumed_chunks} chunks from an earlier run" if result.resumed_chunks else ""
    )
    print(f"wrote {result.num_images}×{result.dim} embeddings to {result.out}{extra}{resumed}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable files, e.g. {result.skipped[0]}")
    return 0
