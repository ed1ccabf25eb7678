"""Writing a run's files when things go wrong: a full disk, a read-only folder, two processes
claiming one run directory, temporary files left by a killed write.

Every command turns a failed write into one line that names the file, the cause and, for a
full disk, how much space there is and how much the file needs (:class:`OutputError`); a
result that was already printed is not lost because its JSON copy could not be saved
(:func:`save_json_or_warn`).

Exit codes of ``mocolab`` (also in the README): 0 success, 1 an unexpected error (a bug: a
traceback), 2 bad input (options, data, checkpoint), :data:`EXIT_WRITE_FAILED` a file could
not be written, 130 interrupted at once (a second Ctrl-C), :data:`EXIT_PREEMPTED` stopped by
SIGTERM after saving a checkpoint. A first Ctrl-C stops after a checkpoint and exits 0.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConfigError, OutputError

CHECKPOINT_NAME = "checkpoint.pt"  # a run's checkpoint (re-exported by mocolab.checkpoint)

EXIT_WRITE_FAILED = 74
"""A file could not be written (full disk, read-only folder): ``EX_IOERR`` of sysexits.h."""
EXIT_PREEMPTED = 143
"""``pretrain`` stopped by SIGTERM (128 + 15, as a shell reports a process killed by it): the
checkpoint is saved, the run is not finished; schedulers and ``torchrun`` must not read it as
success."""

WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos")
LOCK_NAME = ".mocolab.lock"


class RunClaimedError(ConfigError):
    """Another process is writing into the same run directory."""


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KB'`` (decimal units, as ``df -H``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_write_error(e: BaseException) -> bool:
    """An ``OSError`` of a full disk, a read-only folder or a denied permission, or torch's
    ``RuntimeError`` when ``torch.save`` runs out of space (``inline_container … unexpected
    pos``, ``PytorchStreamWriter failed writing file``)."""
    if isinstance(e, OSError):
        return e.errno in WRITE_ERRNOS
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILURES)


def write_error(
    e: BaseException,
    path: str | Path | None = None,
    *,
    need: int | None = None,
    note: str | None = None,
) -> OutputError:
    """The one-line :class:`OutputError` for a failed write of ``path`` (default: the
    exception's file name). ``need``: the bytes the file needs, when known. ``note``: what is
    kept (default: the run's last good checkpoint when ``path`` lies in a run directory)."""

    path = Path(path if path is not None else getattr(e, "filename", None) or "a file")
    code = e.errno if isinstance(e, OSError) else None
    free = free_bytes(path.parent)
    if code is None and free is not None and free < max(need or 0, 2**20):
        code = errno.ENOSPC  # torch.save's RuntimeError on a full disk
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        space = f"{human_bytes(free)} free" if free is not None else "no space"
        needed = f", about {human_bytes(need)} needed" if need else ""
        cause = f"the disk is full ({space}{needed}; free some space or choose another folder)"
    elif code == errno.EROFS:
        cause = "the folder is on a read-only file system (choose a writable folder)"
    elif code in (errno.EACCES, errno.EPERM):
        cause = "permission denied (choose a folder you can write to)"
    else:
        cause = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if note is None:
        ckpt = path.parent / CHECKPOINT_NAME
        note = (
            f"the last good checkpoint {ckpt} is intact" if ckpt.exists() and path != ckpt else ""
        )
    return OutputError(f"could not write {path}: {cause}" + (f"; {note}" if note else ""))


@contextmanager
def writing(
    path: str | Path, *, need: int | None = None, note: str | None = None
) -> Iterator[None]:
    """Turn a failed write inside the block into :func:`write_error`'s one line (one from a
    nested block gets ``note`` added)."""
    try:
        yield
    except OutputError as e:
        if note and note not in str(e):
            raise OutputError(f"{e}; {note}") from None
        raise
    except (OSError, RuntimeError) as e:
        if not is_write_error(e):
            raise
        raise write_error(e, path, need=need, note=note) from None


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, rename over
    ``path`` (the pattern of :func:`mocolab.checkpoint.save_atomic`): never a partial file.

    Raises:
        OutputError: the file could not be written (full disk, read-only folder), naming it.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (a full disk leaves the old file, not an empty
    one); a failed write raises :class:`OutputError`."""
    data = text.encode()

    def write(f) -> None:
        f.write(data)
        umask = os.umask(0)  # read the umask (there is no getter), then put it back
        os.umask(umask)
        os.fchmod(f.fileno(), 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600

    write_atomic(path, write)


def save_json_or_warn(path: str | Path, obj: Any) -> bool:
    """Write ``obj`` as JSON to ``path``; when the folder is read-only or full, warn in one
    line and go on (the caller has printed the result already). Returns whether it was saved."""
    try:
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
        return True
    except OutputError as e:
        warnings.warn(f"{e}; the result printed above was not saved", stacklevel=2)
        return False


_tensorboard_hook_installed = False


def quiet_tensorboard_write_errors() -> None:
    """TensorBoard writes its events on a thread; on a full disk that thread dies with a
    traceback, and its error reaches the training loop at the next write (where
    :func:`writing` turns it into one line). Drop the thread's traceback: only that one."""
    import threading

    global _tensorboard_hook_installed
    if _tensorboard_hook_installed:
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (
            type(args.thread).__name__ == "_AsyncWriterThread"
            and args.exc_value is not None
            and is_write_error(args.exc_value)
        ):
            previous(args)

    threading.excepthook = hook
    _tensorboard_hook_installed = True


# --- claiming a run directory ---------------------------------------------------------------

_claims: dict[Path, int] = {}  # run directory -> the descriptor holding its lock


def claim_run_dir(run_dir: str | Path) -> None:
    """Take the run directory's lock (``.mocolab.lock``, ``flock``), so that a second
    ``pretrain`` into the same directory fails at once instead of interleaving its files with
    the first. The lock is the kernel's: it is released when the process ends, however it
    ends (no stale lock after ``kill -9``). A process may claim a directory again (a resume in
    the same process); call :func:`release_run_dir` when done.

    Raises:
        RunClaimedError: another live process holds the lock.
    """
    import fcntl

    run_dir = Path(run_dir).absolute()
    release_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    with writing(lock):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise RunClaimedError(
            f"{run_dir} is in use by another mocolab process (pid {owner}); wait for it to end, "
            "or choose another --run-name"
        ) from None
    try:  # the owner's pid, for the message above (best effort: a full disk may refuse it)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    _claims[run_dir] = fd


def release_run_dir(run_dir: str | Path) -> None:
    """Release this process's lock on ``run_dir`` (no-op when it holds none)."""
    fd = _claims.pop(Path(run_dir).absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def remove_stale_temporaries(run_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that an atomic write of ``NAME`` killed mid-way left
    behind, for the given ``names`` (only call it while holding the directory's claim, for
    the files only its holder writes: then no live write owns them)."""
    removed = []
    for tmp in (t for name in names for t in Path(run_dir).glob(f".{name}.*.tmp")):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed
