"""Matplotlib on the non-interactive Agg backend, imported only when a picture is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..safeio import write_atomic


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (parent folders created; atomically: a failed write leaves the
    previous picture) and close it."""
    path = Path(path)
    try:
        write_atomic(
            path,
            lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight", facecolor="white"),
        )
    finally:
        pyplot().close(fig)
    return path


def to_hwc(image: Tensor) -> np.ndarray:
    """A uint8 ``C×H×W`` image → ``H×W×3`` or ``H×W`` array for ``imshow``."""
    a = image.detach().cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def show(ax: Any, image: Tensor) -> None:
    """Draw a uint8 ``C×H×W`` image on ``ax`` without axes (grayscale with the gray map)."""
    a = to_hwc(image)
    ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
