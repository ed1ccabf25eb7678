"""The one training loop, for every method.

Read top to bottom: a :class:`Run` is built once (data, views, method, optimiser, random
streams; restored from a checkpoint when resuming), then :func:`pretrain` steps it: views →
:func:`train_step` (``method(views)`` → backward → optimiser → ``on_step_end``) →
:func:`log_save_stop`. The loop never asks which method it runs.

Reproducibility and resume: the data order of an epoch is a pure function of (seed, epoch),
the LR of a step a pure function of the step, and every other random number (augmentation,
shuffle-BN) comes from one generator whose state is in the checkpoint, so a run resumed from
a checkpoint at step s repeats exactly the steps an uninterrupted run would take after s. On a
GPU the views' parameters come from a second generator, on the host (also checkpointed): the
host then knows them without waiting for the GPU, and a step never synchronises the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any, cast

import torch
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .augment import AugmentConfig, ViewGenerator, recipe
from .augment.ops import to_device
from .augment.per_image import per_image_loader
from .backbones import default_stem, is_vit
from .checkpoint import (
    FORMAT_VERSION,
    expected_shapes,
    load_checkpoint,
    save_atomic,
    state_mismatch,
)
from .config import PretrainConfig, config_from_dict, resolve
from .data import (
    ImageDataset,
    absolute_data,
    data_fingerprint,
    evaluation_splits,
    load_train_set,
)
from .data import shards as shard_data
from .data.prefetch import BatchPrefetcher
from .data.whole import DEFAULT_SIDE
from .device import amp_dtype, compile_works, select_device, views_compile_mode
from .device_defaults import apply_device_defaults, choose_view_path, is_folder
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .eta import RunTimer, shorter_options
from .evaluate.diagnostics import training_diagnostics
from .evaluate.knn import knn_accuracy
from .features import extract_features
from .loggers import Trackers
from .methods import build_method
from .methods.base import LossOutput, Method
from .optim import build_optimizer, clip_gradients
from .results import KnnResult, PretrainResult
from .safeio import (
    CHECKPOINT_NAME,
    LOCK_NAME,
    claim_run_dir,
    release_run_dir,
    remove_stale_temporaries,
    write_text_atomic,
)
from .schedules import cosine_weight_decay, learning_rate, scaled_lr
from .typecheck import load_yaml
from .utilisation import (
    RUN_FILE,
    Peak,
    UtilisationMeter,
    fork,
    peak_dtype,
    peak_flops,
    step_flops,
)
from .vit import VIT_SIZES, default_patch_size
from .weights import init_backbone

# Re-exported from their new homes (callers import them from here).
__all__ = [
    "METRICS_NAME",
    "RESULTS_NAME",
    "NonFiniteLossError",
    "Run",
    "compile_works",
    "evaluation_splits",
    "pretrain",
    "select_device",
    "train_step",
]

METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"

STOP_CHECK_EVERY = 20
"""Under torchrun, how often (in steps) the ranks agree on a Ctrl-C / SIGTERM when the step is
neither logged nor saved (those steps always check): one all-reduce then, instead of one per
step."""

VIEW_SEED = 7919  # the host generator of the views on a GPU starts at seed + VIEW_SEED
GPU_RESIDENT_BYTES = 4 * 2**30
"""Training images smaller than this (uint8 bytes) are copied to the GPU once and batches are
indexed there; larger ones stay in host memory and each batch is gathered on a background
thread into pinned memory and copied without blocking (:class:`BatchPrefetcher`)."""

_views_compile_mode = views_compile_mode  # its name here before mocolab.device


def channel_stats(images: torch.Tensor, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, from up to ``max_images`` evenly spaced images."""
    step = max(1, images.shape[0] // max_images)
    x = images[::step].float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch: a pure function of (seed, epoch), so resume can skip to any step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def knn_eval(
    backbone: torch.nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    *,
    size: int,
    mean: list[float],
    std: list[float],
    device: torch.device,
    k: int,
    t: float,
    progress: bool = False,
) -> KnnResult:
    """Weighted kNN (InstDisc) top-1/top-5 of ``test`` against ``train`` with frozen features."""
    assert train.labels is not None and test.labels is not None  # labelled splits only
    kw: dict[str, Any] = dict(size=size, mean=mean, std=std, device=device, progress=progress)
    bank = extract_features(backbone, train.images, desc="bank features", **kw)
    query = extract_features(backbone, test.images, desc="test features", **kw)
    return knn_accuracy(
        bank,
        train.labels,
        query,
        test.labels,
        len(train.classes or []) or int(train.labels.max()) + 1,
        k=k,
        temperature=t,
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``. A cut-off last line (a crash or a full disk mid-write)
    is dropped with a warning; a damaged line before the last (not JSON, or not an object
    with a numeric step) is a :class:`ConfigError`."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            step = row.get("step", 0) if isinstance(row, dict) else None
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                raise ValueError("not a row of metrics")
            rows.append(row)
        except ValueError:
            if i < len(lines) - 1:
                raise ConfigError(
                    f"{path}: line {i + 1} of {len(lines)} is not JSON, or not a row of "
                    "metrics; the log is damaged beyond a cut-off last line (delete that "
                    "line, or the file, to resume)"
                ) from None
            warnings.warn(
                f"{path}: dropped a cut-off last line ({line[:60]!r}), left by a run "
                "that stopped mid-write",
                stacklevel=2,
            )
    return rows


class MetricsLog:
    """Metrics as JSON lines (``metrics.jsonl``), and the same rows to the run's experiment
    trackers (``--logger``: TensorBoard scalars in ``tb/``, W&B, MLflow; :mod:`mocolab.loggers`).

    On resume, rows after the checkpoint's step (and a cut-off last line) are dropped, so the
    log continues as if the run had never stopped; the trackers continue their runs.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        logger: str = "tensorboard",
        config: dict[str, Any] | None = None,
    ):
        self.path = run_dir / METRICS_NAME
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.trackers = Trackers(logger, run_dir, config or {}, resume_step)

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.trackers.log(row)

    def close(self, status: str = "KILLED", artifacts: Sequence[Path] = ()) -> None:
        """End the trackers' runs (``FINISHED``, ``KILLED``: stopped, ``FAILED``) with
        ``artifacts`` (``results.json``) added."""
        self.trackers.log_artifacts(artifacts)
        self.trackers.close(status)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a run after its current step, with a checkpoint: Ctrl-C, SIGTERM (a
scheduler's preemption) and SIGHUP (the terminal closed). One that the process was started to
ignore (``nohup`` ignores SIGHUP) stays ignored."""


def _silence_closed_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails: send what this process
    prints there (progress bar, messages) to ``/dev/null`` instead; a log file stays."""
    devnull = None
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                devnull = os.open(os.devnull, os.O_WRONLY) if devnull is None else devnull
                os.dup2(devnull, fd)
        except OSError:
            pass
    if devnull is not None:
        os.close(devnull)


def _install(handler: Callable[..., Any], signals: tuple[int, ...]) -> dict[int, Any]:
    """Set ``handler`` for each of ``signals`` that is not ignored; returns the previous ones."""
    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # signals only work in the main thread
        for sig in signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    return previous


_wakeup_in_use = False  # a StopRequest counts signals through the wakeup pipe


def _forget_wakeup_fd() -> None:
    """In a forked child (a DataLoader worker), the parent's wakeup pipe is not its own: a
    Ctrl-C at the terminal reaches the workers too, and must not count as a second one."""
    if _wakeup_in_use:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_fd)


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM / SIGHUP into a request to stop after the current step
    (with a checkpoint); a second Ctrl-C interrupts at once: through the SIGINT handler that
    was in place before (``mocolab pretrain``'s ends the process with status 130 and one
    line), else by raising :class:`KeyboardInterrupt`.

    Two Ctrl-Cs that arrive during one long step make Python run the handler once; the
    signals are counted through the wakeup pipe (``signal.set_wakeup_fd``: a byte per signal
    received), so they still count as two. Under ``torchrun`` one Ctrl-C at the terminal
    reaches each worker twice (from the terminal, and forwarded by the agent): there the
    third interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None  # the first one's name: SIGINT, SIGTERM or SIGHUP
        self._previous: dict[int, Any] = {}
        self._sigints = 0
        self._pipe: tuple[int, int] | None = None  # the wakeup pipe (read, write)

    def _count_sigints(self, signum: int) -> None:
        drained = b""
        while self._pipe is not None:  # every byte pending (other signals' too)
            try:
                chunk = os.read(self._pipe[0], 65536)
            except OSError:  # BlockingIOError: nothing more
                break
            drained += chunk
            if not chunk:
                break
        before = self._sigints
        self._sigints += drained.count(bytes([signal.SIGINT]))
        if signum == signal.SIGINT and self._sigints == before:
            self._sigints += 1  # counted by an earlier handler call, or no pipe

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            _silence_closed_terminal()
        was_requested = self.requested
        self._count_sigints(signum)
        presses = 3 if "TORCHELASTIC_RUN_ID" in os.environ else 2  # see the class docstring
        again = self._sigints >= presses or (was_requested and self.signal != "SIGINT")
        if signum == signal.SIGINT and again:
            previous = self._previous.get(signal.SIGINT)
            if callable(previous) and previous is not signal.default_int_handler:
                previous(signum, frame)
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        global _wakeup_in_use
        self._previous = _install(self._handler, STOP_SIGNALS)
        if self._previous:  # the main thread: count the signals through a wakeup pipe
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            theirs = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            if theirs == -1:
                self._pipe, _wakeup_in_use = (read, write), True
            else:  # another wakeup pipe is in use (an event loop's): leave it to it
                signal.set_wakeup_fd(theirs)
                os.close(read)
                os.close(write)
        return self

    def __exit__(self, *exc: object) -> None:
        global _wakeup_in_use
        if self._pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._pipe:
                os.close(fd)
            self._pipe, _wakeup_in_use = None, False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SignalStop(BaseException):
    """SIGTERM or SIGHUP during the final evaluation (a :class:`BaseException`, like
    :class:`KeyboardInterrupt`: no ``except Exception`` on the way catches it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _signals_stop_evaluation() -> Generator[None, None, None]:
    """SIGTERM and SIGHUP raise :class:`SignalStop` inside the block (the final evaluation:
    the training is saved, so there is nothing to finish first)."""

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            _silence_closed_terminal()
        raise SignalStop(signal.Signals(signum).name)

    previous = _install(handler, (signal.SIGTERM, signal.SIGHUP))
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


RUN_FILES = (
    CHECKPOINT_NAME,
    "config.yaml",
    "metrics.jsonl",
    "results.json",
    "tb",
    LOCK_NAME,
    RUN_FILE,  # utilisation.json
)
"""What a run writes into its directory before its first checkpoint (and the checkpoint)."""


def check_run_name(name: str | None, out_dir: str) -> None:
    """A run's name must name a folder inside ``--out-dir``: not empty, ``.``, ``..`` or an
    absolute path (sub-folders such as ``group/run`` are fine).

    Raises:
        ConfigError: the name would put the run elsewhere.
    """
    if name is None:
        return
    parts = PurePath(name).parts
    if not name.strip() or not parts or PurePath(name).is_absolute() or ".." in parts:
        raise ConfigError(
            f"--run-name {name!r} does not name a folder inside --out-dir {out_dir}: a run "
            "name must not be empty, '.', '..', contain '..' or be an absolute path (use "
            "--out-dir for the parent folder, e.g. --out-dir /data/runs --run-name my-run)"
        )


def _not_a_run(run_dir: Path) -> list[str]:
    """The entries of an existing ``run_dir`` that no run writes (a folder that is not a
    run's, whose files a new run would overwrite), or whose ``config.yaml`` is not a run's."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return []
    foreign = [
        n
        for n in names
        if n not in RUN_FILES
        and not (n.endswith(".tmp") and any(n.startswith(f".{f}.") for f in RUN_FILES))
    ]
    config = run_dir / "config.yaml"
    if not foreign and config.is_file():
        on_disk = _read_run_config(run_dir, errors="replace")
        if not (on_disk is not None and {"method", "data"} <= on_disk.keys()):
            foreign = ["config.yaml (not a mocolab run's)"]
    return foreign


def _read_run_config(run_dir: Path, errors: str = "strict") -> dict[str, Any] | None:
    """The options of a run's ``config.yaml``, read as every options file is
    (:func:`~mocolab.typecheck.load_yaml`: duplicate keys and alias bombs refused); ``None``
    where it cannot be read, or is not UTF-8 (with ``errors="strict"``) or a YAML mapping."""
    path = run_dir / "config.yaml"
    try:
        on_disk = load_yaml(path.read_bytes().decode("utf-8", errors=errors), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    return on_disk if isinstance(on_disk, dict) else None


def new_run_dir(cfg: PretrainConfig) -> Path:
    """Create the run directory (rank 0 picks the name, every rank gets the same path).

    Raises:
        ConfigError: the name leaves ``--out-dir``, names a file, a folder that is not a
            run's, or a run that has a checkpoint (resume it instead).
    """
    check_run_name(cfg.run_name, cfg.out_dir)
    name = cfg.run_name
    if name is None and distributed.is_main_process():
        elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        suffix = (
            datetime.now().strftime("%Y%m%d-%H%M%S") if elastic_id == "none" else elastic_id[:12]
        )
        name = f"{cfg.method}-{Path(cfg.data).name or 'data'}-{suffix}"
    run_dir = Path(cfg.out_dir) / str(distributed.broadcast_object(name))
    if distributed.is_main_process():
        for folder, flag in ((Path(cfg.out_dir), "--out-dir"), (run_dir, "--run-name")):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(
                    f"{flag}: {folder} is a file, not a folder; choose another {flag}"
                )
        has_run = (run_dir / CHECKPOINT_NAME).exists()  # said below, after the claim
        foreign = _not_a_run(run_dir) if run_dir.is_dir() and not has_run else []
        if foreign:
            raise ConfigError(
                f"{run_dir} exists and is not a mocolab run (it holds {', '.join(foreign[:3])}"
                f"{' …' if len(foreign) > 3 else ''}); a new run would overwrite its "
                "config.yaml, metrics.jsonl and results.json. Choose another --run-name (or "
                "an empty folder)"
            )
        claim_run_dir(run_dir)  # before the check: a second run started now fails here
        if (run_dir / CHECKPOINT_NAME).exists():
            release_run_dir(run_dir)
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with `mocolab pretrain --resume {run_dir}` "
                "or choose another --run-name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return run_dir


def _restart_checkpoint(cfg: PretrainConfig) -> Path | None:
    """Under ``torchrun --max-restarts``, a restarted worker continues its run's last checkpoint."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    name = cfg.run_name
    elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if name is None and elastic_id != "none":
        name = f"{cfg.method}-{Path(cfg.data).name or 'data'}-{elastic_id[:12]}"
    if name and (Path(cfg.out_dir) / name / CHECKPOINT_NAME).exists():
        return Path(cfg.out_dir) / name
    return None


def _check_resumed_method(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """A run directory whose ``config.yaml`` names another method or architecture than its
    checkpoint mixes two runs (e.g. two started under one name by an older version): say so
    in one line instead of resuming one of them silently."""
    try:
        text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{run_dir / 'config.yaml'} is not UTF-8 text (byte {e.start}); restore it, or "
            f"delete it to resume with the checkpoint's own options"
        ) from None
    except OSError:
        return  # no readable config.yaml: the checkpoint's own config is the run's
    try:
        on_disk = load_yaml(text, str(run_dir / "config.yaml"))
    except ConfigError:
        return  # not YAML: the checkpoint's own config is the run's
    if not isinstance(on_disk, dict):
        return
    ours = {k: ckpt["config"].get(k) for k in ("method", "arch")}
    theirs = {k: on_disk.get(k) for k in ("method", "arch")}
    if ours != theirs:
        raise CheckpointError(
            f"{run_dir} mixes two runs: its checkpoint holds a {ours['method']} / {ours['arch']} "
            f"run but its config.yaml says {theirs['method']} / {theirs['arch']}; resume only a "
            "directory with one run in it, or start again with another --run-name"
        )


def _check_same_data(
    saved: dict[str, Any], n: int, fingerprint: str | None, data: str, run_dir: Path
) -> None:
    """A resumed run reads the images it was trained on: their number (which sets the steps of
    an epoch and the schedule) and, when the checkpoint holds it, their fingerprint (names and
    sizes of a folder's files, a shard index's names and counts). A checkpoint without them
    (an older version) is not checked."""
    then = saved.get("num_images")
    if isinstance(then, int) and then != n:
        raise CheckpointError(
            f"{run_dir}: the data changed since the checkpoint: {data} holds {n} images now, "
            f"{then} when it was trained (the epochs, the order and the schedule would change); "
            f"resume with the data it was trained on (--data PATH if it moved), or start a new "
            f"run from its weights with --init {run_dir}"
        )
    then_fp = saved.get("data_fingerprint")
    if then_fp is not None and fingerprint is not None and then_fp != fingerprint:
        raise CheckpointError(
            f"{run_dir}: the data changed since the checkpoint: {data} holds {n} images as "
            f"before, but other files (names or sizes differ); resume with the data it was "
            f"trained on (--data PATH if it moved), or start a new run from its weights with "
            f"--init {run_dir}"
        )


RESUME_OPTIONS = ("progress", "threads", "num_workers")
"""The options a resume takes (``pretrain --resume RUN_DIR --no-progress``): how the run is
shown and how many threads and decoding workers it uses, not what it computes (``threads``
may change the last bits of a CPU's sums; with shards ``num_workers`` is part of the data
order, so it must stay). Every other option is the run's own: a resume continues with the
options the run was started with (its checkpoint's)."""


def resume_config(ckpt_config: dict[str, Any], options: dict[str, Any] | None) -> PretrainConfig:
    """The config of a resumed run: its checkpoint's, with ``options`` (names of
    :data:`RESUME_OPTIONS`) changed.

    Raises:
        ConfigError: an option a resume does not take, or a changed ``num_workers`` of a run
            on shards.
    """
    options = {k: v for k, v in (options or {}).items() if v is not None}
    refused = [k for k in options if k not in RESUME_OPTIONS]
    if refused:
        raise ConfigError(
            f"--resume continues a run with the options it was started with; it takes only "
            f"{', '.join(_flag(k) for k in RESUME_OPTIONS)}, --no-final-eval and --data (the "
            f"same images, moved), not "
            f"{', '.join(_flag(k) for k in refused)} (to train with other options, start a new "
            "run: mocolab pretrain --preset RUN_DIR/config.yaml --run-name NEW …)"
        )
    workers = options.get("num_workers", ckpt_config.get("num_workers"))
    if shard_data.is_shards(ckpt_config.get("data", "")) and workers != ckpt_config.get(
        "num_workers"
    ):
        raise ConfigError(
            f"--num-workers: this run reads its shards with {ckpt_config.get('num_workers')} "
            "workers, and their number is part of the data order; resume without --num-workers"
        )
    return config_from_dict({**ckpt_config, **options})


def _flag(name: str) -> str:
    return "--no-progress" if name == "progress" else "--" + name.replace("_", "-")


def _check_config_unedited(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """A ``config.yaml`` whose options differ from the checkpoint's was edited by hand after
    the run started; a resume would ignore the edit (and overwrite the file), so say so."""
    theirs = _read_run_config(run_dir)
    if theirs is None:
        return  # no readable config.yaml: the checkpoint's own config is the run's
    ours = yaml.safe_load(yaml.safe_dump(ckpt["config"], sort_keys=False))  # as written
    changed = [
        k
        for k in list(ours) + [k for k in theirs if k not in ours]
        if k not in RESUME_OPTIONS and ours.get(k, "(absent)") != theirs.get(k, "(absent)")
    ]
    if changed:
        k = changed[0]
        path = run_dir / "config.yaml"
        raise ConfigError(
            f"{path} was edited after the run started ({k}: {ours.get(k, '(absent)')!r} in the "
            f"checkpoint, {theirs.get(k, '(absent)')!r} in config.yaml"
            f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); a resume "
            "continues with the checkpoint's options, config.yaml only records them. Undo the "
            f"edit, or train with the edited options as a new run: mocolab pretrain --preset "
            f"{path} --run-name NEW"
        )


def _load_model_state(
    model: nn.Module, state: dict[str, Tensor], cfg: PretrainConfig, source: str | Path
) -> None:
    """``model.load_state_dict(state)``, or one line naming the method and architecture of
    the config and what in the weights does not fit them."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        _check_model_state(
            {k: tuple(v.shape) for k, v in model.state_dict().items()}, state, cfg, source
        )
        raise


def _check_model_state(
    expected: dict[str, tuple[int, ...]],
    state: dict[str, Tensor],
    cfg: PretrainConfig,
    source: str | Path,
) -> None:
    """One line naming the config's method and architecture and what in the checkpoint's
    weights does not fit a model of ``expected`` shapes; nothing when they fit."""
    what = state_mismatch(expected, state)
    if what:
        raise CheckpointError(
            f"{source}: the checkpoint's config says {cfg.method} / {cfg.arch} (width "
            f"{cfg.width}) but its weights are another method's or architecture's "
            f"({'; '.join(what)}); resume from a checkpoint of this run"
        ) from None


def _workers_for_shards(
    cfg: PretrainConfig, shards: int, location: str, world: int, main: bool
) -> PretrainConfig:
    """Each decoding worker reads its own shards: with fewer shards than processes ×
    ``--num-workers`` (a small folder packed into one shard), as many workers as the shards
    allow, with a note. The config (and so the checkpoint) records the number used, which is
    part of the data order."""
    fit = shards // world
    if fit < 1 or max(1, cfg.num_workers) <= fit:
        return cfg  # enough shards; or fewer than the processes: ShardStream says so
    if main:
        print(
            f"note: {location} has {shards} shard{'s' if shards > 1 else ''}, fewer than "
            f"{world} process{'es' if world > 1 else ''} × {cfg.num_workers} workers that each "
            f"read their own; reading with {fit} worker{'s' if fit > 1 else ''} per process "
            "(pack with a smaller --shard-size for more)",
            file=sys.stderr,
            flush=True,
        )
    return dataclasses.replace(cfg, num_workers=fit)


def _backbone_text(cfg: PretrainConfig, stem: str, crop: int) -> str:
    """The backbone in the run's first line: a ResNet's stem and width, a ViT's depth and
    patch side (a ViT has no stem or width)."""
    if not is_vit(cfg.arch):
        return f"{cfg.arch}/{stem} width {cfg.width}"
    depth = cfg.vit_depth or VIT_SIZES[cfg.arch][1]
    return f"{cfg.arch} ({depth} blocks, {cfg.patch_size or default_patch_size(crop)}-px patches)"


def _slice_views(
    view_generators: list[ViewGenerator],
    x: torch.Tensor,
    global_batch: int,
    offset: int,
    generator: torch.Generator,
    sizes: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Views of this rank's images ``x`` (of true sizes ``sizes`` for whole images): the
    parameters are drawn for the whole global batch (the same stream on every rank) and this
    rank applies rows ``offset:offset+len(x)`` — so W processes make exactly the views one
    process makes for the global batch."""
    n, pin = x.shape[0], x.is_cuda and generator.device.type == "cpu"
    return [
        g.views_from_uniforms(
            x, g.draw_uniforms(global_batch, generator, pin_memory=pin)[offset : offset + n], sizes
        )
        for g in view_generators
    ]


# --- the run: everything built once ------------------------------------------------------------


@dataclass(eq=False)
class Run:
    """A pretraining run's state, built once by :meth:`build`.

    :meth:`state_dict` is the checkpoint: what it returns is written, what
    :meth:`load_state_dict` reads back is restored (the one place the checkpoint's contents
    are listed). ``config`` and ``info`` are read first, to build the run they describe.
    """

    cfg: PretrainConfig
    run_dir: Path
    device: torch.device
    world: int  # processes (torchrun), each with an equal share of the batch
    rank: int
    train_set: ImageDataset  # for shards: a sample of them (statistics, diagnostics)
    images: Tensor  # the training images, uint8; on the GPU when they are small
    sizes: Tensor | None  # whole images: each one's true (h, w) in its buffer; else None
    stream: shard_data.ShardStream | None  # WebDataset shards, streamed per rank
    info: dict[str, Any]  # in_channels, stem, width, crop_size, mean, std, dataset, num_images
    model: Method
    forward: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # the trained parameters, in the model's order (gradient clipping)
    decayed_groups: list[int]  # the optimiser's groups with weight decay (--weight-decay-end)
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    generator: torch.Generator  # augmentation and shuffle-BN: the same stream on every rank
    view_rng: torch.Generator  # the views' parameters, on the host (``generator`` on a CPU)
    view_configs: list[AugmentConfig]
    view_generators: list[ViewGenerator]
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    step: int = 0
    data_origin: str | None = None  # where cfg.data was read from; None: the user typed it
    view_path: str | None = None  # the line saying which view path auto chose
    # A non-finite loss is noted on the device, without a host sync, and checked when the
    # step is logged or saved: whether it happened, and its first step.
    nonfinite: Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    first_bad: Tensor = dataclasses.field(default_factory=lambda: torch.tensor(-1))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def crop(self) -> int:
        return int(self.info["crop_size"])

    @property
    def epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    @classmethod
    def build(
        cls,
        cfg: PretrainConfig,
        ckpt: dict[str, Any] | None,
        run_dir: Path | None,
        *,
        data_origin: str | None = None,
    ) -> Run:
        """The run of ``cfg`` (a new run directory when ``run_dir`` is ``None``), restored from
        ``ckpt`` when given. ``data_origin`` names where ``cfg.data`` was read from (a
        checkpoint) when the user did not type it: a ``pipe:`` command is then refused."""
        device = distributed.init_from_env(select_device(cfg.device))
        # channels-last, compile and a folder's stem on a CPU: by device and data
        cfg = apply_device_defaults(
            cfg, device, choose_stem=ckpt is None, resuming=ckpt is not None
        )
        world, rank = distributed.world_size(), distributed.rank()
        if run_dir is None:
            run_dir = new_run_dir(cfg)
        elif rank == 0 and ckpt is not None:  # a resume: claim the directory, check its files
            claim_run_dir(run_dir)
            _check_resumed_method(run_dir, ckpt)
            _check_config_unedited(run_dir, ckpt)
        if rank == 0:  # of writes killed mid-way
            remove_stale_temporaries(
                run_dir, (CHECKPOINT_NAME, "config.yaml", METRICS_NAME, RESULTS_NAME, RUN_FILE)
            )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # --bn-splits counts BN sub-batches of the global batch: each process computes its
        # share, so a configuration means the same on 1 or W processes (and a process is at
        # least one).
        local_splits = max(1, cfg.bn_splits // world)
        if cfg.batch_size % world or (cfg.bn_splits > world and cfg.bn_splits % world):
            raise ConfigError(
                f"--batch-size {cfg.batch_size} and --bn-splits {cfg.bn_splits} must be "
                f"multiples of the {world} processes (each process gets an equal share of both)"
            )

        # --- data -------------------------------------------------------------------------
        stream = None
        if shard_data.is_shards(cfg.data):
            index = shard_data.ShardIndex.load(cfg.data, origin=data_origin)
            cfg = _workers_for_shards(cfg, len(index.counts), index.location, world, rank == 0)
            stream = shard_data.ShardStream(
                index,
                side=cfg.image_size or DEFAULT_SIDE,
                batch_size=cfg.batch_size // world,
                seed=cfg.seed,
                rank=rank,
                world=world,
                streams=cfg.num_workers,
                epochs=cfg.epochs,
            )
            if cfg.augment_backend == "torchvision":
                raise ConfigError("shards are read with --augment-backend batched")
            train_set = shard_data.sample_images(stream.index, stream.side)
        else:
            train_set = load_train_set(
                cfg.data,
                crops=cfg.crops,
                root=cfg.data_root,
                image_size=cfg.image_size,
                num_workers=cfg.num_workers,
                progress=cfg.progress and rank == 0,
            )
        n = stream.index.total if stream is not None else len(train_set)
        fingerprint = data_fingerprint(cfg.data, stream.index if stream is not None else None)
        if ckpt is not None:
            _check_same_data(ckpt["info"], n, fingerprint, cfg.data, run_dir)
        if n < cfg.batch_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is larger than the dataset "
                f"({n} images in {train_set.name}); lower --batch-size"
            )
        crop = cfg.crop_size or train_set.image_size[0]
        stem = cfg.stem or default_stem(crop)
        mean, std = (
            (ckpt["info"]["mean"], ckpt["info"]["std"])
            if ckpt is not None
            else channel_stats(train_set.images)
        )
        info = {
            "in_channels": train_set.channels,
            "stem": stem,
            "width": cfg.width,
            "crop_size": crop,
            "mean": mean,
            "std": std,
            "dataset": train_set.name,
            "num_images": n,
        }
        if fingerprint is not None:
            info["data_fingerprint"] = fingerprint

        # --- method, views, optimiser, random streams ----------------------------------------
        def make_method() -> Method:
            return build_method(
                dataclasses.replace(cfg, bn_splits=local_splits),
                train_set.channels,
                stem,
                num_images=n,
                mean=mean,
                std=std,
                image_size=crop,
            )

        if ckpt is not None:  # the checkpoint's sizes, checked on the meta device: no memory
            expected = expected_shapes(make_method)
            if expected is not None:
                _check_model_state(expected, ckpt["model"], cfg, run_dir)
        torch.manual_seed(cfg.seed)
        model = make_method().to(device)
        if cfg.init and ckpt is None:  # pretrained start; f_k becomes a copy of the new f_q
            init_backbone(model, cfg.init)
        if ckpt is None:  # a method's start from the data (None: streamed, not all at hand)
            model.prepare(
                None if stream is not None else train_set.images,
                size=crop,
                mean=mean,
                std=std,
                device=device,
            )
        overrides: dict[str, Any] = {
            k: v
            for k, v in (  # --crop-scale, --blur-p
                ("scale", None if cfg.crop_scale is None else tuple(cfg.crop_scale)),
                ("blur_p", cfg.blur_p),
            )
            if v is not None
        }
        view_configs = [
            dataclasses.replace(recipe(name, crop, mean=mean, std=std), **overrides)
            for name in model.view_recipes(cast(str, cfg.augment))
        ]  # resolved
        views_compile = views_compile_mode(cfg.compile_views, device, bool(cfg.compile))
        # --augment-backend auto: the faster view path for this device and view size
        cfg, view_path = choose_view_path(
            cfg, device, crop, shards=stream is not None, compiled_views=bool(views_compile)
        )
        if cfg.augment_backend == "torchvision":  # batched views only for the diagnostics
            views_compile = False
        view_generators = [ViewGenerator(c, compile=views_compile) for c in view_configs]
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        peak_lr = scaled_lr(cfg.lr, cfg.batch_size)  # linear scaling on the global batch
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(
            cfg.optimizer,
            params,
            lr=peak_lr,
            momentum=cfg.sgd_momentum,
            weight_decay=cfg.weight_decay,
            eta=cfg.lars_eta,
            lars_trust=cfg.lars_trust,
            bias_lr_scale=1.0 if cfg.lr_biases is None else cfg.lr_biases / cfg.lr,
            no_decay=model.no_weight_decay(),
            betas=(cfg.adamw_betas[0], cfg.adamw_betas[1]),
        )
        # by position: a restored optimiser's groups are new dicts
        decayed = [i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] > 0]
        dtype = amp_dtype(cfg.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        # the views' parameters are drawn on the host (see the module's docstring); on a CPU
        # that is the one generator
        view_rng = (
            generator
            if device.type == "cpu"
            else torch.Generator().manual_seed(cfg.seed + VIEW_SEED)
        )
        steps_per_epoch = n // cfg.batch_size  # drop the last partial batch (MoCo)
        if stream is not None:  # equal on every rank and epoch (see ShardStream)
            steps_per_epoch = stream.steps_per_epoch
        images = train_set.images
        if device.type == "cuda" and images.numel() < GPU_RESIDENT_BYTES:
            images = images.to(device)  # small datasets live on the GPU: no copies per step
        run = cls(
            cfg=cfg,
            run_dir=run_dir,
            device=device,
            world=world,
            rank=rank,
            train_set=train_set,
            images=images,
            sizes=train_set.sizes,
            stream=stream,
            info=info,
            model=model,
            forward=model,
            optimizer=optimizer,
            params=params,
            decayed_groups=decayed,
            scaler=scaler,
            amp_dtype=dtype,
            generator=generator,
            view_rng=view_rng,
            view_configs=view_configs,
            view_generators=view_generators,
            peak_lr=peak_lr,
            steps_per_epoch=steps_per_epoch,
            total_steps=min(cfg.epochs * steps_per_epoch, cfg.max_steps or 2**62),
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            data_origin=data_origin,
            view_path=view_path,
            nonfinite=torch.zeros((), dtype=torch.bool, device=device),
            first_bad=torch.full((), -1, dtype=torch.long, device=device),
        )
        if ckpt is not None:
            run.load_state_dict(ckpt)

        # --- how the model runs: SyncBN, compile, DDP (after the restore) -------------------
        if cfg.sync_bn:
            if world == 1 or device.type != "cuda" or local_splits != 1:
                raise ConfigError(
                    "--sync-bn needs several CUDA processes (torchrun) and at most "
                    "one BN sub-batch per process (--bn-splits ≤ the number of "
                    "processes)"
                )
            model.query_encoder = nn.SyncBatchNorm.convert_sync_batchnorm(  # type: ignore[no-untyped-call]
                model.query_encoder
            )
        if cfg.compile and compile_works(device):
            model.compile()
        if world > 1:
            run.forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        return run

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: everything :meth:`build` and :meth:`load_state_dict` need to
        continue exactly where the run is now."""
        state = {
            "format": "mocolab",
            "version": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "info": self.info,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "scaler": self.scaler.state_dict(),
        }
        if self.view_rng is not self.generator:
            state["view_generator"] = self.view_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (``config`` and ``info`` built the run)."""
        _load_model_state(self.model, state["model"], self.cfg, self.run_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].cpu())
        if self.view_rng is not self.generator and "view_generator" in state:
            self.view_rng.set_state(state["view_generator"].cpu())
        self.step = int(state["step"])

    def save(self) -> None:
        """Write the checkpoint (rank 0; atomically: a crash leaves the previous one)."""
        if self.main:
            save_atomic(self.state_dict(), self.run_dir / CHECKPOINT_NAME)

    def batches(self, epoch: int, start: int) -> Generator[tuple[Tensor, list[Tensor]], None, None]:
        """``(indices, views)`` of this rank for the steps ``start..`` of ``epoch``, up to the
        epoch's end or the run's last step. Close it (``contextlib.closing``) to stop early."""
        cfg, device, local = self.cfg, self.device, self.local_batch
        last = min(self.steps_per_epoch, start + self.total_steps - self.step)
        if self.stream is not None:  # this rank's own shards; the order lives in the stream
            source = shard_data.device_batches(self.stream, epoch, start, last, device)
            try:
                for idx, x, true_sizes in source:
                    yield (
                        idx,
                        _slice_views(
                            self.view_generators,
                            x,
                            cfg.batch_size,
                            self.rank * local,
                            self.view_rng,
                            true_sizes,
                        ),
                    )
            finally:
                source.close()  # stops the shard workers of a run stopped mid-epoch
            return
        order = epoch_permutation(len(self.train_set), cfg.seed, epoch)  # the same on every rank
        shards = [
            order[i * cfg.batch_size : (i + 1) * cfg.batch_size][
                # this rank's share
                self.rank * local : (self.rank + 1) * local
            ]
            for i in range(start, last)
        ]
        if cfg.augment_backend == "torchvision":  # per image, in DataLoader workers
            per_image = per_image_loader(
                self.train_set.images,
                self.view_configs,
                shards,
                cfg.workers,
                seed=cfg.seed * 1_000_003 + epoch,
                pin_memory=device.type == "cuda",
                sizes=self.train_set.sizes,
            )
            for idx, views in zip(shards, per_image, strict=True):
                yield idx, [v.to(device, non_blocking=True) for v in views]
            return
        prefetch = None
        if self.images.device.type == "cpu":  # gather the next batches on a background thread
            prefetch = BatchPrefetcher(self.images, shards, pin=device.type == "cuda")
        try:
            for idx in shards:
                x = (
                    next(prefetch)
                    if prefetch is not None
                    else self.images[to_device(idx, self.images.device)]
                )
                sizes = None if self.sizes is None else self.sizes[idx]
                yield (
                    idx,
                    _slice_views(
                        self.view_generators,
                        x.to(device, non_blocking=True),
                        cfg.batch_size,
                        self.rank * local,
                        self.view_rng,
                        sizes,
                    ),
                )
        finally:
            if prefetch is not None:
                prefetch.close()


# --- one step ----------------------------------------------------------------------------


def train_step(
    run: Run, idx: Tensor, views: list[Tensor]
) -> tuple[LossOutput, float, dict[str, Any]]:
    """One optimiser step on a batch's views; returns the method's output, the step's LR and
    what ``on_step_end`` logs. A non-finite loss is only noted (on the device, no sync)."""
    cfg, step = run.cfg, run.step
    if cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    lr = learning_rate(
        step,
        run.total_steps,
        run.peak_lr,
        cast(str, cfg.lr_schedule),
        run.warmup_steps,
        cfg.lr_steps,
    )  # cast: resolve() set the schedule
    for group in run.optimizer.param_groups:  # lr_scale: --lr-biases's group
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if cfg.weight_decay_end is not None:
        wd = cosine_weight_decay(step, run.total_steps, cfg.weight_decay, cfg.weight_decay_end)
        for i in run.decayed_groups:
            run.optimizer.param_groups[i]["weight_decay"] = wd
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        out = run.forward(views, run.generator, index=to_device(idx, run.device))
    bad = ~torch.isfinite(out.loss.detach())
    run.first_bad = torch.where(  # numbered as metrics.jsonl and checkpoints count: from 1
        bad & ~run.nonfinite, torch.full_like(run.first_bad, step + 1), run.first_bad
    )
    run.nonfinite |= bad
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(out.loss).backward()
    if cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients (no-op without fp16)
        clip_gradients(run.params, cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    extra = run.model.on_step_end(out, step, run.total_steps)
    run.step += 1
    return out, lr, extra


# --- logging, saving, stopping ----------------------------------------------------------------


def utilisation_meter(run: Run) -> UtilisationMeter:
    """The meter of the run's logged rows (:mod:`mocolab.utilisation`): the FLOPs of one step
    of this process, counted on a batch of the first images whose views and forward draw
    from forked copies of the run's generators (so the run's streams, weights and optimiser
    are untouched), and the peak of the device (rank 0's, on every rank); rank 0 keeps both
    in ``utilisation.json``. A step that cannot be counted costs a warning, not the run."""
    idx = torch.arange(run.local_batch) % len(run.images)
    generator = fork(run.generator)
    view_rng = generator if run.view_rng is run.generator else fork(run.view_rng)
    views = _slice_views(
        run.view_generators,
        run.images[to_device(idx, run.images.device)].to(run.device),
        run.local_batch,
        0,
        view_rng,
        None if run.sizes is None else run.sizes[idx],
    )

    def loss(model: nn.Module) -> Tensor:
        with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp_dtype is not None):
            out: Tensor = model(views, generator, index=to_device(idx, run.device)).loss
            return out

    flops: int | None = None
    try:
        flops = step_flops(run.model, loss)
    except ConfigError:  # the options cannot make a step: said now, not after the kNN at init
        raise
    except Exception as e:  # a metric must not stop a run; say why it is missing
        warnings.warn(
            f"the FLOPs of a step could not be counted ({type(e).__name__}: {e}); the log "
            "has no tflops or mfu",
            stacklevel=2,
        )
    dtype = peak_dtype(run.device, run.amp_dtype)
    peak = distributed.broadcast_object(peak_flops(run.device, dtype) if run.main else None)

    def remeasure() -> Peak:  # rank 0, once, when a row achieves more than the kept peak
        meter.peak = peak_flops(run.device, dtype, measure=True)
        keep_utilisation(run, meter)
        return meter.peak

    meter = UtilisationMeter(flops, peak, run.world, remeasure if run.main else None)
    if run.main:
        keep_utilisation(run, meter)
    return meter


def keep_utilisation(run: Run, meter: UtilisationMeter) -> None:
    """Write the step's FLOPs and the peak the rows are measured against (``utilisation.json``)."""
    write_text_atomic(run.run_dir / RUN_FILE, json.dumps(meter.to_dict(), indent=2) + "\n")


class Progress:
    """What the loop reports: the metrics log (rank 0), the progress bar, the throughput."""

    def __init__(
        self, run: Run, resumed: bool, on_step: Callable[[int, dict[str, Any]], None] | None
    ) -> None:
        self.log: MetricsLog | None = None
        if run.main:
            write_text_atomic(
                run.run_dir / "config.yaml", yaml.safe_dump(run.cfg.to_dict(), sort_keys=False)
            )
            self.log = MetricsLog(
                run.run_dir,
                resume_step=run.step if resumed else None,
                logger=run.cfg.logger,
                config=run.cfg.to_dict(),
            )
        self.bar = tqdm(
            total=run.total_steps,
            initial=run.step,
            disable=not (run.cfg.progress and run.main),
            dynamic_ncols=True,
            unit="step",
            desc="pretrain",
        )
        self.on_step = on_step
        # the run's expected time, from its first steps, with the options that shorten it
        self.timer = RunTimer(
            run.step,
            run.total_steps,
            shorter_options(run.cfg, run.train_set.image_size[0], is_folder(run.cfg.data)),
            sync=torch.cuda.synchronize if run.device.type == "cuda" else lambda: None,
        )
        self.meter = utilisation_meter(run)  # tflops, mfu and data_wait of the logged rows
        self.t_last, self.step_last = time.perf_counter(), run.step
        self.loss_ema: float | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(row)

    def close(self, status: str = "KILLED", artifacts: Sequence[Path] = ()) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close(status, artifacts)


def log_save_stop(
    run: Run,
    progress: Progress,
    stop: StopRequest,
    out: LossOutput,
    lr: float,
    extra: dict[str, float],
    end_of_epoch: bool,
    monitor: _KnnMonitor | None,
) -> bool:
    """After a step: log it, at an epoch's end its kNN and diagnostics rows, save a checkpoint,
    and whether to stop (a Ctrl-C / SIGTERM on any rank). A loss that became non-finite at any
    step since the last check raises :class:`NonFiniteLossError`, before a checkpoint could
    keep the bad weights. The epoch's rows are written before its checkpoint, so a run killed
    after that checkpoint has lost none of them."""
    cfg, step, device = run.cfg, run.step, run.device
    progress.bar.update(1)
    eta = progress.timer.after_step(step) if run.main else None
    if eta:
        with progress.bar.external_write_mode():  # above a progress bar, flushed at once
            print(eta, flush=True)
    must_log = step % cfg.log_every == 0 or end_of_epoch or progress.on_step is not None
    must_save = end_of_epoch or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
    # Every rank must agree to stop, at the cost of an all-reduce (a device sync) under DDP:
    # asked at logged and saved steps (below) and otherwise every STOP_CHECK_EVERY steps.
    stop_now = (
        not (must_log or must_save)
        and (run.world == 1 or step % STOP_CHECK_EVERY == 0)
        and distributed.any_rank(stop.requested, device)
    )
    if must_log or must_save or stop_now:
        if distributed.any_rank(run.nonfinite, device):
            progress.close("FAILED")
            kept = (
                f"the last good checkpoint in {run.run_dir} is kept"
                if (run.run_dir / CHECKPOINT_NAME).exists()
                else "no checkpoint had been written yet"
            )
            bad = int(run.first_bad)
            bad_lr = learning_rate(
                bad - 1,
                run.total_steps,
                run.peak_lr,
                cast(str, cfg.lr_schedule),
                run.warmup_steps,
                cfg.lr_steps,
            )
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad} (lr {bad_lr:.4g}); "
                f"training stopped and {kept}. "
                "Lower --lr, add --warmup-epochs, or use --amp off, then start again."
            )
        metrics = {"loss": out.loss.detach(), **out.metrics}
        values = {k: float(distributed.all_reduce_mean(v.float())) for k, v in metrics.items()}
        ema = progress.loss_ema
        progress.loss_ema = values["loss"] if ema is None else 0.9 * ema + 0.1 * values["loss"]
        now = time.perf_counter()
        row = {
            "step": step,
            "epoch": run.epoch,
            **values,
            "lr": lr,
            **extra,
            "images_per_s": round(
                (step - progress.step_last) * cfg.batch_size / max(now - progress.t_last, 1e-9), 1
            ),
            **progress.meter.row(step - progress.step_last, now - progress.t_last),
        }
        progress.t_last, progress.step_last = now, step
        if step % cfg.log_every == 0 or end_of_epoch:
            progress.write(row)
        progress.bar.set_postfix(
            epoch=f"{row['epoch']:.2f}",
            loss=f"{progress.loss_ema:.3f}",
            img_s=f"{row['images_per_s']:.0f}",
            **progress.meter.postfix(row),
        )
        if progress.on_step is not None:
            progress.on_step(step, row)
        stop_now = distributed.any_rank(stop.requested, device)
    if end_of_epoch:
        epoch_evaluations(run, progress, monitor)
    if must_save or stop_now:
        run.save()
    if progress.step_last == step:  # the next row times steps, not this row's evaluations
        progress.t_last = time.perf_counter()
    return stop_now


def epoch_evaluations(run: Run, progress: Progress, monitor: _KnnMonitor | None) -> None:
    """At an epoch's end: the online kNN check and the diagnostics (rank 0)."""
    cfg, epoch = run.cfg, run.step // run.steps_per_epoch
    if monitor is not None and epoch % cfg.knn_every == 0:
        acc = monitor(run.model.backbone)
        if acc is not None and progress.log is not None:
            progress.write(
                {"step": run.step, "epoch": run.epoch, "knn_top1": acc.top1, "knn_top5": acc.top5}
            )
            progress.bar.write(f"epoch {epoch}: online kNN top-1 {acc.top1:.2f}%")
    if run.main and cfg.diagnostics_every and epoch % cfg.diagnostics_every == 0:
        progress.write(
            {
                "step": run.step,
                "epoch": run.epoch,
                **training_diagnostics(
                    run.model,
                    run.images,
                    run.view_generators,
                    size=run.crop,
                    mean=run.info["mean"],
                    std=run.info["std"],
                    seed=cfg.seed,
                ),
            }
        )


def knn_at_init(run: Run, progress: Progress, monitor: _KnnMonitor | None) -> None:
    """The online kNN check (``--knn-bank`` / ``--knn-queries``) of the encoder a fresh run
    starts from, before its first step (rank 0): the row at step 0 of ``metrics.jsonl``, the
    baseline the trained encoder is read against. The features are extracted without
    gradients in eval mode (the training mode is restored) and no random number is taken
    from the run's streams, so the run continues exactly as without it; the first logged
    row's interval starts after it."""
    monitor = monitor or _KnnMonitor(
        run.cfg, run.crop, run.info["mean"], run.info["std"], run.device, run.data_origin
    )
    if monitor.splits is None:
        return
    with torch.random.fork_rng(
        devices=[run.device.index or 0] if run.device.type == "cuda" else []
    ):
        acc = monitor(run.model.backbone)
    if acc is None:
        return
    progress.write({"step": 0, "epoch": 0.0, "knn_top1": acc.top1, "knn_top5": acc.top5})
    train, test = monitor.splits
    print(
        f"kNN of the encoder at the start (k={run.cfg.knn_k}, {len(test)} test images against "
        f"{len(train)}): top-1 {acc.top1:.2f}%",
        flush=True,
    )
    progress.t_last = time.perf_counter()


def final_evaluation(run: Run, progress: Progress) -> KnnResult | None:
    """The full kNN evaluation of the trained backbone (rank 0, labelled data only)."""
    cfg, splits = run.cfg, evaluation_splits(run.cfg, origin=run.data_origin)
    if splits is None:
        return None
    acc = knn_eval(
        run.model.backbone,
        *splits,
        size=run.crop,
        mean=run.info["mean"],
        std=run.info["std"],
        device=run.device,
        k=cfg.knn_k,
        t=cfg.knn_t,
        progress=cfg.progress,
    )
    progress.write(
        {"step": run.step, "epoch": run.epoch, "knn_top1": acc.top1, "knn_top5": acc.top5}
    )
    print(
        f"kNN (k={cfg.knn_k}, τ={cfg.knn_t}) on {len(splits[1])} test images: "
        f"top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%",
        flush=True,
    )
    return dataclasses.replace(acc, train_images=len(splits[0]), test_images=len(splits[1]))


# --- the loop ----------------------------------------------------------------------------------


def pretrain(
    cfg: PretrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    data: str | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    final_eval: bool = True,
    resume_with: dict[str, Any] | None = None,
) -> PretrainResult:
    """Pretrain a method; returns the run directory, the steps taken and the final kNN
    accuracy, or for a run stopped by Ctrl-C, SIGTERM or SIGHUP ``interrupted`` and the
    ``signal``'s name (a :class:`~mocolab.results.PretrainResult`; ``to_dict()`` is
    ``results.json``).

    Runs as one process, or as one of several under ``torchrun`` (DistributedDataParallel;
    ``batch_size`` is the global batch, split evenly over the processes; rank 0 logs, shows
    progress, checkpoints and evaluates).

    Args:
        cfg: the resolved configuration (ignored when resuming: the run's own is used).
        resume: a run directory (or checkpoint file) to continue from its last checkpoint.
        data: with ``resume``, the run's data given again (moved, or a ``pipe:`` command that
            is run only when typed): it must hold the images the run was trained on.
        on_step: called after every step with ``(step, metrics)``; for callers that watch.
        final_eval: run the full kNN evaluation at the end when the data has labels.
        resume_with: options a resume changes (:data:`RESUME_OPTIONS`, e.g.
            ``{"progress": False}``); any other is a :class:`ConfigError`.
    """
    ckpt, run_dir, origin = None, None, None
    if resume is None:
        cfg = resolve(cfg or PretrainConfig())
        cfg = dataclasses.replace(
            cfg,
            data=absolute_data(cfg.data),
            data_root=(
                None
                if cfg.data_root is None
                else os.path.abspath(os.path.expanduser(cfg.data_root))
            ),
        )
        resume = _restart_checkpoint(cfg)
        if resume is not None:  # torchrun restarted this command: its --data is typed
            data = cfg.data
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if "optimizer" not in ckpt:  # a backbone saved by `mocolab eval finetune --save`
            raise ConfigError(
                f"{resume} holds a saved backbone, not a pretraining run; it can be "
                "evaluated but not resumed"
            )
        lacking = [k for k in ("config", "info", "step", "generator") if k not in ckpt]
        if lacking:
            raise CheckpointError(
                f"{resume} is damaged: its checkpoint has no {lacking[0]}; resume from "
                "another checkpoint"
            )
        cfg = resume_config(ckpt["config"], resume_with)
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        if data is not None:
            cfg = dataclasses.replace(cfg, data=absolute_data(data))
        else:
            origin = f"the checkpoint of {run_dir}"
    assert cfg is not None
    run = Run.build(cfg, ckpt, run_dir, data_origin=origin)
    progress = Progress(run, resumed=ckpt is not None, on_step=on_step)
    monitor = (
        _KnnMonitor(cfg, run.crop, run.info["mean"], run.info["std"], run.device, run.data_origin)
        if cfg.knn_every and run.main
        else None
    )
    if run.main:
        print(
            f"mocolab: {cfg.method} on {run.train_set.name} ({run.info['num_images']} images, "
            f"{run.crop}px), {_backbone_text(cfg, run.info['stem'], run.crop)}, "
            f"{run.total_steps} steps of {cfg.batch_size} on {run.device}"
            f"{f' × {run.world} processes' if run.world > 1 else ''}; run directory "
            f"{run.run_dir}{f' (resuming at step {run.step})' if ckpt is not None else ''}",
            flush=True,
        )
        print(progress.meter.describe(run.local_batch), flush=True)
        if run.view_path:
            print(run.view_path, flush=True)
    if final_eval and ckpt is None and run.main:
        knn_at_init(run, progress, monitor)
    stopped = False
    run.model.train()
    with StopRequest() as stop:
        while run.step < run.total_steps and not stopped:
            epoch, position = divmod(run.step, run.steps_per_epoch)
            with contextlib.closing(run.batches(epoch, position)) as batches:
                for i, (idx, views) in enumerate(progress.meter.timed(batches), start=position):
                    out, lr, extra = train_step(run, idx, views)
                    last = i == run.steps_per_epoch - 1 or run.step == run.total_steps
                    stopped = log_save_stop(run, progress, stop, out, lr, extra, last, monitor)
                    if stopped:
                        break
            if not stopped:
                distributed.barrier()  # the other ranks wait for rank 0's epoch evaluations
    progress.bar.close()

    results = PretrainResult(run_dir=run.run_dir, step=run.step, total_steps=run.total_steps)
    if stopped:
        if run.main:
            print(
                f"\nStopped at step {run.step} of {run.total_steps}; checkpoint saved. "
                f"Continue with: mocolab pretrain --resume {run.run_dir}",
                flush=True,
            )
        progress.close()
        if run.main:
            release_run_dir(run.run_dir)
        # SIGTERM: the command line exits EXIT_PREEMPTED, so a scheduler sees no success
        return dataclasses.replace(results, interrupted=True, signal=stop.signal)
    if run.main:
        try:
            with _signals_stop_evaluation():
                if final_eval:
                    results = dataclasses.replace(results, knn=final_evaluation(run, progress))
        except SignalStop as e:  # the training is saved: say so, and how to evaluate it
            print(
                f"\nStopped by {e.name} during the final kNN evaluation; the training is "
                f"complete and saved (step {run.step}). Evaluate it with: mocolab eval knn "
                f"{run.run_dir}",
                flush=True,
            )
            results = dataclasses.replace(results, interrupted=True, signal=e.name)
        write_text_atomic(
            run.run_dir / RESULTS_NAME, json.dumps(results.to_dict(), indent=2) + "\n"
        )
        progress.close(
            "KILLED" if results.interrupted else "FINISHED",
            artifacts=[run.run_dir / RESULTS_NAME],
        )
        if not results.interrupted:
            print(f"Run directory: {run.run_dir}", flush=True)
        release_run_dir(run.run_dir)
    distributed.barrier()
    return results


class _KnnMonitor:
    """The online kNN check on a fixed subset of the evaluation splits."""

    def __init__(
        self,
        cfg: PretrainConfig,
        size: int,
        mean: list[float],
        std: list[float],
        device: torch.device,
        origin: str | None = None,
    ) -> None:
        self.splits = evaluation_splits(cfg, origin=origin)
        self.kw: dict[str, Any] = dict(
            size=size, mean=mean, std=std, device=device, k=cfg.knn_k, t=cfg.knn_t
        )
        if self.splits is not None:
            train, test = self.splits
            g = torch.Generator().manual_seed(cfg.seed)
            if cfg.knn_bank and len(train) > cfg.knn_bank:
                train = train.subset(torch.randperm(len(train), generator=g)[: cfg.knn_bank])
            if cfg.knn_queries and len(test) > cfg.knn_queries:
                test = test.subset(torch.randperm(len(test), generator=g)[: cfg.knn_queries])
            self.splits = (train, test)

    def __call__(self, backbone: torch.nn.Module) -> KnnResult | None:
        if self.splits is None:
            return None
        return knn_eval(backbone, *self.splits, **self.kw)
