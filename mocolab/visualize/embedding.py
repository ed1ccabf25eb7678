"""A 2-D map of embeddings, coloured by class: t-SNE (scikit-learn) or UMAP (when installed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._mpl import pyplot, save

METHODS = ("auto", "tsne", "umap")


def project_2d(features: Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``N×D`` features (L2-normalised here, as the kNN sees them) → ``N×2`` coordinates.

    ``tsne``: scikit-learn's t-SNE, PCA initialisation, perplexity min(30, (N−1)/3).
    ``umap``: umap-learn with cosine metric (``pip install umap-learn``).
    ``auto``: UMAP when installed, else t-SNE.
    """
    if method not in METHODS:
        raise ValueError(f"unknown embedding map {method!r}; choose one of {', '.join(METHODS)}")
    x = F.normalize(features.float(), dim=1).cpu().numpy()
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ImportError(
                    "the UMAP map needs umap-learn: pip install umap-learn (or use the t-SNE map)"
                ) from None
        else:
            return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if x.shape[0] < 3:
        raise ValueError(f"a t-SNE map needs at least 3 points, got {x.shape[0]}")
    perplexity = min(30.0, (x.shape[0] - 1) / 3)
    tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
    # One OpenMP thread: Barnes-Hut t-SNE on a few thousand points takes seconds on one core,
    # while its threads spin-wait for minutes on a busy machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x)


def embedding_map(
    features: Tensor,
    path: str | Path,
    *,
    labels: Tensor | None = None,
    classes: Sequence[str] | None = None,
    method: str = "tsne",
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Draw the 2-D map of ``features`` (see :func:`project_2d`), one colour per class."""
    plt = pyplot()
    xy = project_2d(features, method, seed)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c="#4575b4", alpha=0.7)
    else:
        labels = torch.as_tensor(labels).cpu()
        cmap = plt.get_cmap("tab10" if int(labels.max()) < 10 else "tab20")
        for c in torch.unique(labels).tolist():
            pts = xy[(labels == c).numpy()]
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                s=6,
                alpha=0.8,
                color=cmap(c % cmap.N),
                label=classes[c] if classes else str(c),
            )
        if len(torch.unique(labels)) <= 20:
            ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    used = method if method != "auto" else "UMAP or t-SNE"
    ax.set_title(title or f"{len(xy)} embeddings ({used})", fontsize=9)
    return save(fig, path)
