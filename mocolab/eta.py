"""The expected duration of a run, from its first timed steps, and how to make it shorter: one
line printed at the start of training, so that a user learns in seconds, not at the end, that
a run on a large folder takes an hour."""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import PretrainConfig

ETA_SKIP = 2
"""Steps not timed: the first builds the ``torch.compile`` programs and warms the caches."""
ETA_STEPS = 4
"""Steps timed after those for the estimate."""


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min 30 s"``, ``"2 h 05 min"`` (rounded to the unit shown).

    >>> format_duration(44.6), format_duration(750), format_duration(7500)
    ('45 s', '12 min 30 s', '2 h 05 min')
    """
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    m = round(seconds / 60)
    return f"{m // 60} h {m % 60:02d} min"


def shorter_options(cfg: PretrainConfig, image_side: int, folder: bool) -> list[str]:
    """Flags that make ``cfg``'s run shorter, with the share of the time each leaves.

    Fewer epochs scale the time linearly; a smaller decode side (folders, ``--image-size``)
    scales it about with the pixels, ``(3/4)² ≈ 0.56``; ``--compile`` makes a CPU step about
    1.5× faster (``benchmarks/step_modes.py``).
    """
    out = []
    if cfg.epochs > 1:
        half = cfg.epochs // 2
        out.append(f"--epochs {half} (×{half / cfg.epochs:.2f})")
    if folder and image_side >= 32 and cfg.crop_size is None:
        side = image_side * 3 // 4 // 8 * 8
        out.append(f"--image-size {side} (×{(side / image_side) ** 2:.2f})")
    if not cfg.compile:
        out.append("--compile (×0.67 on a CPU)")
    out.append("--max-steps N")
    return out


def eta_line(
    seconds_per_step: float,
    remaining_steps: int,
    total_steps: int,
    shorter: list[str],
    timed: tuple[int, int],
) -> str:
    """The one line printed: the expected time of the remaining steps and the ways to shorten.

    >>> print(eta_line(0.5, 1500, 1506, ["--epochs 4 (×0.50)"],
    ...                (3, 6)))  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    mocolab: about 12 min 30 s of training left for 1500 of 1506 steps (0.500 s a step, ...
    ...; shorter: --epochs 4 (×0.50)
    """
    return (
        f"mocolab: about {format_duration(seconds_per_step * remaining_steps)} of training "
        f"left for {remaining_steps} of {total_steps} steps ({seconds_per_step:.3f} s a step, "
        f"timed on steps {timed[0]}-{timed[1]}; the final kNN evaluation comes on top); "
        "shorter: " + ", ".join(shorter)
    )


class RunTimer:
    """Times steps ``start + ETA_SKIP`` to ``start + ETA_SKIP + ETA_STEPS`` of a run and gives
    :func:`eta_line` once, when they are done (never for a run too short to need it).

    ``sync`` waits for the device (``torch.cuda.synchronize`` on CUDA, whose steps are
    asynchronous); it is called twice per run.
    """

    def __init__(
        self,
        start_step: int,
        total_steps: int,
        shorter: list[str],
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        self.first = start_step + ETA_SKIP
        self.last = self.first + ETA_STEPS
        self.total, self.shorter, self.sync = total_steps, shorter, sync
        self.t0: float | None = None

    def after_step(self, step: int) -> str | None:
        """Call after each step with the number of steps done; returns the line once."""
        if self.last >= self.total or step not in (self.first, self.last):
            return None
        self.sync()
        now = time.perf_counter()
        if step == self.first:
            self.t0 = now
            return None
        if self.t0 is None:
            return None
        per_step = (now - self.t0) / ETA_STEPS
        return eta_line(
            per_step, self.total - step, self.total, self.shorter, (self.first + 1, self.last)
        )
