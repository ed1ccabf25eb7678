"""Training curves from a run's ``metrics.jsonl``: loss, learning rate, momentum, kNN accuracy
and any other logged scalar (diagnostics when the loop logs them)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from ._mpl import pyplot, save

#: Panels drawn first, in order, when their keys are logged: (title, keys).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("contrastive accuracy", ("acc",)),
    ("learning rate", ("lr",)),
    ("key-encoder momentum", ("momentum",)),
    ("kNN accuracy (%)", ("knn_top1", "knn_top5")),
    ("images / s", ("images_per_s",)),
    ("MFU and data wait (%)", ("mfu", "data_wait")),
)
_NOT_PLOTTED = {"step", "epoch"}
_PERCENT = {"mfu", "data_wait"}  # fractions, drawn in %
_NOISY = {"loss", "acc", "images_per_s", "mfu", "data_wait"}  # smoothed when long
_SECOND_AXIS = {"images_per_s": ("tflops", "TFLOP/s")}  # proportional: a right-hand axis
SMOOTH_FROM = 60
"""Rows from which a noisy curve is drawn faintly with its moving average over it."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``: lines that are not JSON objects (a torn last line
    from a crash, a damaged or edited line) are skipped, with one warning when any line
    other than the last is."""
    lines = Path(path).read_text(errors="replace").splitlines()
    rows, bad = [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip() and i < len(lines) - 1:
            bad.append(i + 1)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} line(s) that are not rows of metrics (first: line "
            f"{bad[0]}); the curves leave them out",
            stacklevel=2,
        )
    return rows


def moving_average(ys: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start).

    >>> moving_average([1.0, 2.0, 3.0, 4.0], 2)
    [1.0, 1.5, 2.5, 3.5]
    """
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _step_ticks(ax: Any, lo: int, hi: int) -> None:
    """Integer step ticks on ``ax`` over ``lo..hi`` (thousands as ``12k``), with a margin, so
    a run with one logged point shows it on the run's range rather than on fractional ticks."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    margin = max((hi - lo) * 0.03, 0.5)
    ax.set_xlim(lo - margin, hi + margin)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, min_n_ticks=1))
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 10000 else f"{x:.0f}")
    )


def training_curves(metrics: str | Path | list[dict[str, Any]], path: str | Path) -> list[str]:
    """Draw one panel per logged quantity against the step; returns the panel titles.

    Every panel spans the run's logged steps, with integer ticks (a quantity logged once, such
    as the final kNN of a short run, is a point on that range); the top row also counts the
    epochs when the run has at least two. Noisy curves of long runs (at least
    :data:`SMOOTH_FROM` points) are drawn faintly with their moving average over them;
    images/s carries TFLOP/s on a right-hand axis when the run logs it; MFU and the data-wait
    share are drawn in %.

    Args:
        metrics: a run directory, a ``metrics.jsonl`` path, or its rows.
        path: the PNG to write.

    Raises:
        ValueError: no numeric metric to draw.
    """
    if not isinstance(metrics, list):
        p = Path(metrics)
        metrics = read_metrics(p / "metrics.jsonl" if p.is_dir() else p)
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    keys: list[str] = []
    for row in metrics:
        keys += [
            k for k, v in row.items() if k not in keys and k not in _NOT_PLOTTED and numeric(v)
        ]
    panels = [(t, tuple(k for k in ks if k in keys)) for t, ks in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    known = {k for _, ks in PANELS for k in ks} | {k for k, _ in _SECOND_AXIS.values()}
    panels += [(k, (k,)) for k in keys if k not in known]
    if not panels:
        raise ValueError("no metric to draw: the metrics log is empty")
    steps = [r["step"] for r in metrics if numeric(r.get("step"))]
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    # steps per epoch, from a row that has both (for the epoch ticks of the top row)
    per_epoch = next(
        (r["step"] / r["epoch"] for r in metrics if numeric(r.get("epoch")) and r["epoch"] > 0),
        None,
    )
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for i, (ax, (title, ks)) in enumerate(zip(axes.flat, panels)):
        for k in ks:
            pts = [(r["step"], r[k]) for r in metrics if "step" in r and numeric(r.get(k))]
            xs, ys = [p[0] for p in pts], [p[1] * (100 if k in _PERCENT else 1) for p in pts]
            long = k in _NOISY and len(xs) >= SMOOTH_FROM
            (line,) = ax.plot(
                xs,
                ys,
                marker="o" if len(xs) < 20 else None,
                markersize=3,
                alpha=0.3 if long else 1.0,
                label=None if long else k,
            )
            if long:
                ax.plot(xs, moving_average(ys, len(xs) // 30), color=line.get_color(), label=k)
        if ks[0] in _SECOND_AXIS:
            _second_axis(ax, metrics, ks[0], *_SECOND_AXIS[ks[0]])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        _step_ticks(ax, lo, hi)
        if i < cols and per_epoch and hi / per_epoch >= 2:
            _epoch_axis(ax, per_epoch)
        ax.grid(alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    return [t for t, _ in panels]


def _second_axis(ax: Any, metrics: list[dict[str, Any]], key: str, other: str, label: str) -> None:
    """A right-hand axis of ``other`` on the panel of ``key``, when the two are proportional
    (TFLOP/s = images/s × FLOPs per image): the ratio of a row that logs both."""
    ratio = next(
        (r[other] / r[key] for r in metrics if r.get(key) and isinstance(r.get(other), float)),
        None,
    )
    if ratio:
        right = ax.secondary_yaxis("right", functions=(lambda y: y * ratio, lambda y: y / ratio))
        right.set_ylabel(label, fontsize=8)
        right.tick_params(labelsize=7)


def _epoch_axis(ax: Any, per_epoch: float) -> None:
    """The epochs on a top axis, at integer epochs."""
    from matplotlib.ticker import MaxNLocator

    top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
    top.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    top.set_xlabel("epoch", fontsize=8)
    top.tick_params(labelsize=7)
