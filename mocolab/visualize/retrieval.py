"""The nearest-neighbour retrieval grid: each query and its top-K neighbours, framed green when
a neighbour has the query's class and red otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ._mpl import pyplot, save, show

CORRECT, WRONG = "#1a9850", "#d73027"


def retrieval_grid(
    queries: Tensor,
    neighbours: Tensor,
    path: str | Path,
    *,
    query_labels: Tensor | None = None,
    neighbour_labels: Tensor | None = None,
    similarities: Tensor | None = None,
    classes: Sequence[str] | None = None,
    cell: float = 1.3,
) -> Path:
    """Draw one row per query: the query (black frame), then its K neighbours.

    Args:
        queries: uint8 ``M×C×H×W``.
        neighbours: uint8 ``M×K×C×H×W``, most similar first.
        path: the PNG to write.
        query_labels / neighbour_labels: ``M`` and ``M×K`` classes; when given, a neighbour
            of the query's class is framed green, another red. Without labels, no colours.
        similarities: ``M×K`` cosine similarities, written under the neighbours.
        classes: class names for the titles.
    """
    plt = pyplot()
    m, k = neighbours.shape[:2]
    fig, axes = plt.subplots(m, k + 1, figsize=(cell * (k + 1), cell * m + 0.4), squeeze=False)
    name = lambda c: classes[c] if classes else str(c)
    for i in range(m):
        ax = axes[i, 0]
        show(ax, queries[i])
        for s in ax.spines.values():
            s.set_edgecolor("black")
            s.set_linewidth(3)
        if query_labels is not None:
            ax.set_title(f"query: {name(int(query_labels[i]))}", fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            show(ax, neighbours[i, j])
            if query_labels is not None and neighbour_labels is not None:
                right = int(neighbour_labels[i, j]) == int(query_labels[i])
                for s in ax.spines.values():
                    s.set_edgecolor(CORRECT if right else WRONG)
                    s.set_linewidth(4)
            label = name(int(neighbour_labels[i, j])) if neighbour_labels is not None else ""
            if similarities is not None:
                label = f"{label} {float(similarities[i, j]):.2f}".strip()
            ax.set_title(label, fontsize=6)
    fig.suptitle(
        "nearest neighbours (green: same class, red: other class)"
        if query_labels is not None
        else "nearest neighbours",
        fontsize=9,
    )
    fig.tight_layout()
    return save(fig, path)
