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
)
_NOT_PLOTTED = {"step", "epoch"}


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


def training_curves(metrics: str | Path | list[dict[str, Any]], path: str | Path) -> list[str]:
    """Draw one panel per logged quantity against the step; returns the panel titles.

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
    known = {k for _, ks in PANELS for k in ks}
    panels += [(k, (k,)) for k in keys if k not in known]
    if not panels:
        raise ValueError("no metric to draw: the metrics log is empty")
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, ks) in zip(axes.flat, panels):
        for k in ks:
            pts = [(r["step"], r[k]) for r in metrics if "step" in r and numeric(r.get(k))]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    return [t for t, _ in panels]
