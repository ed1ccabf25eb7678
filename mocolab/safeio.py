"""Writing a run's files when things go wrong: a full disk, a read-only folder, two processes
claiming one run directory, temporary files left by a killed write.

Every command turns a failed write into one line that names the file, the cause and, for a
full disk, how much space there is and how much the file needs (:class:`OutputError`); a
result that was already printed is not lost because its JSON copy could not be saved
(:func:`save_json_or_warn`).

Exit codes of ``mocolab`` (also in the README): 0 success, 1 an unexpected error (a bug: a
traceback), 2 bad input (options, data, checkpoint), :data:`EXIT_WRITE_FAILED` a file could
not be written, 130 interrupted at once (a second Ctrl-C), :data:`EXIT_PREEMPTED` stopped by
SIGTERM after saving a checkpoint, :data:`EXIT_HANGUP` stopped by SIGHUP (the terminal closed)
after saving a checkpoint. A first Ctrl-C stops after a checkpoint and exits 0.

Every file is written to a temporary file beside it and renamed over it (:func:`write_atomic`),
a folder of several files is built beside it and swapped in (:func:`staged_folder`), so a full
disk or a kill at any moment leaves the previous version whole. New files get the permissions
the umask gives (0644 under umask 022), as ``open()`` would create them. A temporary file is
locked (``flock``) by the process writing it: one left by a killed process is unlocked, and the
next write of the same name removes it (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
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
EXIT_HANGUP = 129
"""``pretrain`` stopped by SIGHUP (its terminal closed; 128 + 1) after saving a checkpoint: as
:data:`EXIT_PREEMPTED`, saved but not finished."""

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

    named = path if path is not None else getattr(e, "filename", None)
    path = Path(os.fsdecode(named) if named else "a file")
    code = e.errno if isinstance(e, OSError) else None
    free = free_bytes(path.parent) if named else None  # not the space of some other disk
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


def umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``; elsewhere by
    setting and restoring it, which another thread creating a file meanwhile could notice)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def created_mode(directory: bool = False) -> int:
    """The permissions ``open()`` (or ``mkdir``) gives a new file (folder) under the umask:
    0644 (0755) under umask 022. ``tempfile`` creates 0600 (0700); atomic writes use this."""
    return (0o777 if directory else 0o666) & ~umask()


def _lock(fd: int) -> None:
    """Mark a temporary file (or folder) as being written by this process (see
    :func:`remove_stale_temporaries`); the kernel drops the lock when the process ends."""
    with suppress(OSError):  # no flock on this file system: removed on a failure all the same
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def write_atomic(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    *,
    need: int | None = None,
    note: str | None = None,
) -> Path:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, rename over
    ``path``: never a partial file, whatever stops the write (a full disk, ``kill -9``). The
    file gets the permissions the umask gives (0644 under umask 022); temporary files that
    killed writes of ``path`` left are removed first.

    Args:
        need: the bytes the file needs, for the message of a full disk.
        note: what is kept, for the message of a failed write (see :func:`write_error`).

    Raises:
        OutputError: the file could not be written (full disk, read-only folder), naming it.
    """
    path = Path(path)
    with writing(path, need=need, note=note):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, [path.name])
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            _lock(fd)
            os.fchmod(fd, created_mode())  # as open() would create it, not mkstemp's 0600
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)  # still locked: no cleaner takes it for a stale one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (a full disk leaves the old file, not an empty
    one); a failed write raises :class:`OutputError`."""
    data = text.encode()
    write_atomic(path, lambda f: f.write(data))


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


def claim_run_dir(run_dir: str | Path, *, fix: str = "choose another --run-name") -> None:
    """Take the run directory's lock (``.mocolab.lock``, ``flock``), so that a second
    ``pretrain`` into the same directory fails at once instead of interleaving its files with
    the first. The lock is the kernel's: it is released when the process ends, however it
    ends (no stale lock after ``kill -9``). A process may claim a directory again (a resume in
    the same process); call :func:`release_run_dir` when done. ``fix`` ends the message of a
    directory in use (``mocolab embed`` claims its ``FILE.parts`` folder this way).

    Raises:
        RunClaimedError: another live process holds the lock.
    """
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
            f"or {fix}"
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


def _is_stale(tmp: Path) -> bool:
    """Whether no live process writes the temporary ``tmp`` (its ``flock`` is free)."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files (and folders) in ``folder`` that writes of ``NAME``
    killed mid-way left behind, for the given ``names``. A temporary still locked by a live
    writer (:func:`write_atomic`, :func:`staged_folder`) is left alone."""
    prefixes = tuple(f".{name}." for name in names)
    try:
        with os.scandir(folder) as entries:
            found = [
                Path(e.path)
                for e in entries
                if e.name.startswith(prefixes) and e.name.endswith(".tmp")
            ]
    except OSError:
        return []
    removed = []
    for tmp in found:
        if not _is_stale(tmp):
            continue
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


# --- folders replaced as a whole ------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fsdecode(b))


def _move_into(stage: Path, out: Path, last: str | None) -> None:
    """Move each entry of ``stage`` into ``out`` (replacing one of the same name; each move
    atomic), ``last`` last."""
    entries = sorted(stage.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        target = out / entry.name
        if entry.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)


@contextmanager
def staged_folder(
    out: str | Path,
    *,
    replace: bool = True,
    keep_previous: bool = False,
    last: str | None = None,
    note: str | None = None,
) -> Iterator[Path]:
    """Build a folder of several files in a temporary folder beside ``out`` (yielded) and put
    it in place when the block ends without an error; on an error (a full disk) or a kill,
    ``out`` is left as it was and the temporary folder is removed (after a kill: by the next
    run for ``out``).

    Args:
        out: the folder to write.
        replace: ``out`` is replaced as a whole, in one step (``renameat2(RENAME_EXCHANGE)``;
            two renames where the file system cannot). ``False``: each entry of the new folder
            replaces its namesake in ``out`` and the other files of ``out`` stay (for a folder
            that also holds files that are not ours); ``last`` is moved last.
        keep_previous: the temporary folder starts as a copy of ``out`` (what the new version
            does not rewrite stays).
        note: what is kept, for the message of a failed write.

    Raises:
        OutputError: a file could not be written (named, with its file system's free space).
        ConfigError: ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; choose a folder to write into")
    with writing(out, note=note):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out.parent, [out.name])
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    fd = os.open(stage, os.O_RDONLY)
    _lock(fd)
    try:
        try:
            if keep_previous and out.is_dir():
                shutil.copytree(out, stage, symlinks=True, dirs_exist_ok=True)
            yield stage
            os.chmod(stage, created_mode(directory=True))  # mkdtemp's is 0700
            if not out.exists():
                os.rename(stage, out)
            elif not replace:
                _move_into(stage, out, last)
                stage.rmdir()
            elif _exchange(stage, out):
                shutil.rmtree(stage)  # now the previous version
            else:  # two renames: a kill between them leaves the previous one in a .tmp folder
                _rename_twice(stage, out)
        except OutputError as e:  # from a write inside: name the file by its place in out
            raise OutputError(_kept(str(e).replace(str(stage), str(out)), out)) from None
        except (OSError, RuntimeError) as e:
            if not is_write_error(e):
                raise
            raise _staged_error(e, stage, out, note) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _rename_twice(stage: Path, out: Path) -> None:
    """Replace the folder ``out`` by ``stage`` where one atomic exchange is not possible."""
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.rename(out, old / out.name)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old)


def _kept(message: str, out: Path) -> str:
    note = f"the previous {out} is intact"
    return message if not out.exists() or note in message else f"{message}; {note}"


def _staged_error(e: BaseException, stage: Path, out: Path, note: str | None) -> OutputError:
    """:func:`write_error` for a file of a staged folder, named by its place in ``out``."""
    name = getattr(e, "filename", None)
    path = out
    if name:
        try:
            path = out / Path(os.fsdecode(name)).relative_to(stage)
        except ValueError:
            path = Path(os.fsdecode(name))
    return OutputError(_kept(str(write_error(e, path, note=note or "")), out))
