"""How close a run comes to its hardware: the FLOPs of a training step, the device's peak, and
the share of the time the loop waits for data.

Three numbers, logged with every row of ``metrics.jsonl`` (and sent to the run's trackers):

- ``tflops``: achieved TFLOP/s of the whole run, ``step FLOPs × processes × steps / seconds``,
  over the same interval as ``images_per_s``: the steps since the previous logged row, timed
  from the end of that row (after its epoch's evaluations and its checkpoint) to this one.
- ``mfu``: model FLOP utilisation, ``tflops`` as a fraction of the peak of the devices
  (the peak of one device × processes).
- ``data_wait``: the share of that interval the training loop spent blocked in its batch
  iterator — reading and gathering the images, waiting for the prefetch thread or the loader
  workers, and making the views. On a CPU the views are computed there, so their cost counts
  as waiting for data; on CUDA the view kernels are only queued there (their GPU time is
  compute), so ``data_wait`` is the host's time without a batch to hand to the GPU. It is
  measured with the host's clock around the iterator: no device synchronisation is added.

The FLOPs of a step are counted once, at the start, by
:class:`torch.utils.flop_counter.FlopCounterMode` on a real step of the method — forward (key /
teacher forward included), loss and backward — of an eager deep copy of the model
(:func:`step_flops`). They are the FLOPs of the matrix products and convolutions, as model FLOP
utilisation counts them (PaLM, §4.1 and Appendix B); element-wise operations, normalisation,
the optimiser and the views are not counted.

The peak (:func:`peak_flops`) is a GPU model's datasheet figure for the run's dtype (dense,
without sparsity) where it is known, else measured once by a short dense matrix product and
kept in ``peak.json`` in mocolab's cache folder (``$MOCOLAB_CACHE``, default
``~/.cache/mocolab``), keyed by device, dtype and thread count.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .safeio import write_text_atomic

T = TypeVar("T")

CACHE_ENV = "MOCOLAB_CACHE"
PEAK_FILE = "peak.json"
RUN_FILE = "utilisation.json"
"""In a run directory: the FLOPs of its step and the peak its rows are measured against."""

# Dense datasheet peaks in TFLOP/s (NVIDIA's data sheets; the figures given "with sparsity"
# halved), by the name torch.cuda.get_device_name() reports; first match wins. Columns:
# model, pattern, float32 (no tensor cores), tf32, bfloat16, float16 (None: not supported).
_TABLE: tuple[tuple[str, str, float, float | None, float | None, float], ...] = (
    ("H100 PCIe", r"H100.*PCIE", 51.2, 378.0, 756.0, 756.0),
    ("H100 NVL", r"H100.*NVL", 60.0, 417.5, 835.5, 835.5),
    ("H200 NVL", r"H200.*NVL", 60.0, 417.5, 835.5, 835.5),
    ("H100 SXM / H200", r"H100.*(HBM3|SXM)|GH200|H200", 66.9, 494.7, 989.4, 989.4),
    ("A100", r"A100", 19.5, 156.0, 312.0, 312.0),
    ("A30", r"\bA30\b", 10.3, 82.0, 165.0, 165.0),
    ("A10", r"\bA10\b", 31.2, 62.5, 125.0, 125.0),
    ("L40S", r"L40S", 91.6, 183.0, 362.05, 362.05),
    ("L4", r"\bL4\b", 30.3, 60.0, 121.0, 121.0),
    ("RTX 4090", r"RTX 4090", 82.6, 82.6, 165.2, 165.2),
    ("V100", r"V100", 15.7, None, None, 125.0),
    ("T4", r"\bT4\b", 8.1, None, None, 65.0),
)
_COLUMNS = ("float32", "tf32", "bfloat16", "float16")


def cache_dir() -> Path:
    """mocolab's cache folder: ``$MOCOLAB_CACHE`` if set, else ``~/.cache/mocolab``. Read on
    every call, so setting the variable takes effect at once."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mocolab"


def format_flops(flops: float, unit: str = "FLOP") -> str:
    """``1.5e9`` → ``'1.50 GFLOP'`` (three significant digits, decimal prefixes).

    >>> format_flops(1.5e9), format_flops(2.345e13, "FLOP/s"), format_flops(12)
    ('1.50 GFLOP', '23.4 TFLOP/s', '12.0 FLOP')
    """
    prefixes = ("", "k", "M", "G", "T", "P", "E")
    i = 0
    while abs(flops) >= 999.5 and i < len(prefixes) - 1:
        flops, i = flops / 1000, i + 1
    return f"{flops:#.3g} {prefixes[i]}{unit}".replace(". ", " ")


# --- the FLOPs of a step -----------------------------------------------------------------------


def count_flops(fn: Callable[[], Any]) -> int:
    """The FLOPs :class:`~torch.utils.flop_counter.FlopCounterMode` counts while ``fn()`` runs
    (matrix products and convolutions; a multiply-add is 2 FLOPs).

    >>> layer = nn.Linear(16, 8)
    >>> x = torch.randn(4, 16, requires_grad=True)
    >>> count_flops(lambda: layer(x).sum().backward()) == 6 * 4 * 16 * 8  # forward + backward
    True
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def fork(generator: torch.Generator) -> torch.Generator:
    """A new generator on ``generator``'s device in the same state: drawing from it leaves
    ``generator`` where it was."""
    forked = torch.Generator(device=generator.device)
    forked.set_state(generator.get_state())
    return forked


def step_flops(model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> int:
    """The FLOPs of one training step: ``loss(m)`` and its backward, where ``m`` is an eager
    deep copy of ``model`` in training mode.

    The copy, not the model, runs: what a forward pass changes (batch-norm statistics, a
    queue or memory bank, the parameters' gradients) changes in the copy only; a model
    compiled with ``torch.compile`` is counted eagerly (the copy drops the compiled call,
    which would run the original module). The global random streams are forked around the
    count (:func:`torch.random.fork_rng`); ``loss`` must draw from forked generators
    (:func:`fork`). So counting leaves the run's weights, optimiser and random streams as they
    were, and the run repeats bit for bit.

    Args:
        model: the module a training step runs.
        loss: computes the step's loss with the module it is given.

    >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> before = [p.clone() for p in model.parameters()]
    >>> x = torch.randn(32, 16)
    >>> step_flops(model, lambda m: m(x).square().mean()) == 2 * 32 * (16 * 8 * 2 + 8 * 4 * 3)
    True
    >>> all(torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))
    True
    """
    twin = copy.deepcopy(model)
    for module in twin.modules():
        module._compiled_call_impl = None  # eager: the compiled call belongs to the original
    twin.train(model.training)
    devices = sorted(
        {p.device.index or 0 for p in twin.parameters() if p.device.type == "cuda"}
    )  # the CUDA devices whose random streams the step may draw from
    with torch.random.fork_rng(devices=devices):
        return count_flops(lambda: loss(twin).backward())


# --- the device's peak -------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """A device's peak rate of dense matrix products.

    Attributes:
        flops: FLOP/s of one device.
        device: its name (the CPU's model, or the GPU's).
        dtype: ``float32``, ``tf32``, ``bfloat16`` or ``float16``.
        threads: the CPU threads it was measured with (0 on CUDA).
        how: where the figure comes from, in words.
    """

    flops: float
    device: str
    dtype: str
    threads: int
    how: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_name(device: torch.device) -> str:
    """The device's model: ``torch.cuda.get_device_name`` on CUDA; on a CPU its ``model
    name`` (``/proc/cpuinfo``) or, where that is not readable, the platform's processor."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def peak_dtype(device: torch.device, amp: torch.dtype | None) -> str:
    """The dtype whose peak bounds a run: autocast's dtype (``bfloat16``, ``float16``), else
    ``float32`` — on CUDA ``tf32`` when cuDNN may use TF32 for convolutions (PyTorch's
    default)."""
    if amp is not None:
        return str(amp).removeprefix("torch.")
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "float32"


def datasheet_peak(name: str, dtype: str) -> tuple[str, float] | None:
    """``(model, TFLOP/s)``: the dense datasheet peak of a known GPU for ``dtype``, or
    ``None``.

    >>> datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16")
    ('H100 SXM / H200', 989.4)
    >>> datasheet_peak("NVIDIA A100-SXM4-40GB", "tf32"), datasheet_peak("NVIDIA A10G", "bfloat16")
    (('A100', 156.0), None)
    """
    for model, pattern, *peaks in _TABLE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            peak = dict(zip(_COLUMNS, peaks)).get(dtype)
            return None if peak is None else (model, peak)
    return None


_TORCH_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}
_TORCH_DTYPES["float16"] = torch.float16


def measure_peak(device: torch.device, dtype: str = "float32", seconds: float = 1.0) -> float:
    """FLOP/s of the fastest of repeated dense square matrix products in ``dtype`` on
    ``device`` for about ``seconds`` (after two warm-up products). The side starts at 512 and
    doubles (up to 8192) while one product takes under 20 ms, so the product is large enough
    to reach the BLAS library's (or the GPU's) peak.

    >>> measure_peak(torch.device("cpu"), seconds=0.05) > 1e8  # any CPU: above 0.1 GFLOP/s
    True
    """
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    tf32 = dtype == "tf32"
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 if cuda else before
    try:
        n = 512
        while True:
            a = torch.randn(n, n, device=device, generator=None).to(_TORCH_DTYPES[dtype])
            b = torch.randn(n, n, device=device).to(_TORCH_DTYPES[dtype])
            for _ in range(2):
                a @ b
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if time.perf_counter() - t0 >= 0.02 or n >= 8192:
                break
            n *= 2
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / max(time.perf_counter() - t0, 1e-9))
        return best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def peak_flops(device: torch.device, dtype: str, *, measure: bool = False) -> Peak:
    """The peak of ``device`` for ``dtype``: a known GPU's datasheet figure, else the one kept
    in ``peak.json`` in :func:`cache_dir` for this device, dtype and thread count, else
    measured now (:func:`measure_peak`, with the global random stream forked) and kept there.
    A cache that cannot be read is measured again; one that cannot be written costs only the
    next run's measurement.

    Args:
        device: the device.
        dtype: ``float32``, ``tf32``, ``bfloat16`` or ``float16``.
        measure: measure again even where a figure is kept. The higher of the two is kept and
            returned: a machine kept busy by other programs measures too low, never too high.
    """
    name = device_name(device)
    if device.type == "cuda":
        known = datasheet_peak(name, dtype)
        if known is not None:
            return Peak(known[1] * 1e12, name, dtype, 0, f"{known[0]} data sheet, dense {dtype}")
    threads = 0 if device.type == "cuda" else torch.get_num_threads()
    key = f"{name} | {dtype} | {threads} threads"
    path = cache_dir() / PEAK_FILE
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measured (again)
        loaded = None
    cached: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    entry = cached.get(key)
    kept = (
        entry if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) else None
    )
    if kept is not None and not measure:
        return Peak(
            float(kept["flops"]), name, dtype, threads, f"{kept.get('how')}; kept in {path}"
        )
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        flops = measure_peak(device, dtype)
    threads_text = f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""
    how = f"measured {date.today().isoformat()} by dense {dtype} matrix products{threads_text}"
    if kept is not None and float(kept["flops"]) >= flops:  # the earlier, higher figure stands
        return Peak(float(kept["flops"]), name, dtype, threads, f"{kept['how']}; kept in {path}")
    cached[key] = {"flops": flops, "how": how}
    try:
        write_text_atomic(path, json.dumps(cached, indent=1, sort_keys=True) + "\n")
    except Exception:  # a read-only home or a full disk: measured again next time
        warnings.warn(f"could not keep the measured peak in {path}", stacklevel=2)
    return Peak(flops, name, dtype, threads, f"{how}; kept in {path}")


# --- per logged row ----------------------------------------------------------------------------


class UtilisationMeter:
    """Achieved TFLOP/s, MFU and the data-wait share of the rows the loop logs.

    Wrap the loop's batch iterator in :meth:`timed`; call :meth:`row` when a row is logged,
    with the steps and seconds since the previous one.

    Args:
        step_flops: FLOPs of one step of one process (``None``: not counted, only
            ``data_wait`` is logged).
        peak: the peak of one device (``None``: no ``mfu``).
        processes: processes training together, each with its step and its device.

    >>> meter = UtilisationMeter(2e9, Peak(1e11, "CPU", "float32", 2, "measured"), 1)
    >>> meter.wait = 1.5  # seconds blocked in the batch iterator
    >>> meter.row(steps=10, seconds=6.0)
    {'tflops': 0.003333, 'mfu': 0.03333, 'data_wait': 0.25}
    """

    def __init__(
        self,
        step_flops: int | None,
        peak: Peak | None,
        processes: int = 1,
        remeasure: Callable[[], Peak] | None = None,
    ) -> None:
        self.step_flops, self.peak, self.processes = step_flops, peak, processes
        self.remeasure = remeasure
        self.wait = 0.0

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, with the time spent waiting for each item added to :attr:`wait`."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield item

    def row(self, steps: int, seconds: float) -> dict[str, float]:
        """The row's ``tflops``, ``mfu`` and ``data_wait`` over ``steps`` steps that took
        ``seconds``; the wait is counted again from zero."""
        seconds = max(seconds, 1e-9)
        out = {}
        if self.step_flops is not None:
            achieved = self.step_flops * self.processes * steps / seconds
            out["tflops"] = float(f"{achieved / 1e12:.4g}")
            if self.peak is not None and achieved > self.peak.flops * self.processes:
                self._peak_below(achieved / self.processes)
            if self.peak is not None:
                out["mfu"] = float(f"{achieved / (self.peak.flops * self.processes):.4g}")
        out["data_wait"] = round(min(self.wait / seconds, 1.0), 4)
        self.wait = 0.0
        return out

    def _peak_below(self, achieved: float) -> None:
        """A device achieves more than its peak: the peak was measured while other programs
        kept the machine busy. Measured again once (``remeasure``), and said in a warning."""
        assert self.peak is not None
        old, remeasure, self.remeasure = self.peak, self.remeasure, None
        if remeasure is None:
            return
        try:
            self.peak = remeasure()
        except Exception as e:  # e.g. out of memory on a full GPU: a metric must not stop a run
            warnings.warn(
                f"this run achieves {format_flops(achieved, 'FLOP/s')} per device, more than the "
                f"peak kept for it, {format_flops(old.flops, 'FLOP/s')}, which could not be "
                f"measured again ({type(e).__name__}: {e}); the MFU reads above 100 %",
                stacklevel=3,
            )
            return
        text = (
            f"this run achieves {format_flops(achieved, 'FLOP/s')} per device, more than the "
            f"peak kept for it, {format_flops(old.flops, 'FLOP/s')} ({old.how}): that peak was "
            "measured while other programs kept the machine busy. Measured again: "
            f"{format_flops(self.peak.flops, 'FLOP/s')}"
        )
        if self.peak.flops >= achieved:
            text += "; the MFU of the rows from here on is of this peak"
        else:
            text += (
                ", still below: the MFU reads above 100 %. Delete the entry in "
                f"{cache_dir() / PEAK_FILE} and start a run on a quiet machine to measure it again"
            )
        warnings.warn(text, stacklevel=3)

    @staticmethod
    def postfix(row: dict[str, Any]) -> dict[str, str]:
        """The progress bar's short form of a row's numbers.

        >>> UtilisationMeter.postfix({"tflops": 0.0213, "mfu": 0.0891, "data_wait": 0.31})
        {'tflops': '0.0213', 'mfu': '8.9%', 'data': '31%'}
        """
        out = {}
        if "tflops" in row:
            out["tflops"] = f"{row['tflops']:.3g}"
        if "mfu" in row:
            percent = 100 * row["mfu"]
            out["mfu"] = f"{percent:.2g}%" if percent < 10 else f"{percent:.0f}%"
        if "data_wait" in row:
            out["data"] = f"{100 * row['data_wait']:.0f}%"
        return out

    def describe(self, images: int) -> str:
        """The line printed at the start of a run: the step's FLOPs and the peak."""
        if self.step_flops is None:
            return "mocolab: the FLOPs of a step could not be counted: no tflops or mfu in the log"
        text = (
            f"mocolab: one step is {format_flops(self.step_flops)} (forward and backward, "
            f"{images} images{' per process' if self.processes > 1 else ''})"
        )
        if self.peak is not None:
            text += (
                f"; peak of {self.peak.device}: {format_flops(self.peak.flops, 'FLOP/s')} "
                f"({self.peak.how})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        """What :data:`RUN_FILE` keeps."""
        return {
            "step_flops": self.step_flops,
            "processes": self.processes,
            "peak": None if self.peak is None else self.peak.to_dict(),
        }
