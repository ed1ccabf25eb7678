"""Multi-crop (SwAV §3.2, DINO): a few large views and many small ones, batched by size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError


def multi_crop_recipes(augment: str, num_global: int, num_local: int) -> list[str]:
    """One recipe per view of a multi-crop method from ``--augment``: ``GLOBAL,LOCAL`` (each
    used for its kind), ``GLOBAL1,GLOBAL2,LOCAL`` (DINO's two different large views) or one
    name per view."""
    names = [a.strip() for a in augment.split(",")]
    total = num_global + num_local
    if len(names) == total:
        return names
    if len(names) == 2:
        return [names[0]] * num_global + [names[1]] * num_local
    if len(names) == 3 and num_global == 2:
        return names[:2] + [names[2]] * num_local
    raise ConfigError(
        f"--augment {augment!r} names {len(names)} recipes for {num_global} large and "
        f"{num_local} small views; give GLOBAL,LOCAL (e.g. swav-global,swav-local), "
        f"GLOBAL1,GLOBAL2,LOCAL or {total} names"
    )


def encode_views(model: Callable[..., Tensor], views: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """``model`` applied to each view, consecutive views of the same size batched together in
    one forward pass (as the SwAV / DINO code: the large crops, then the small ones)."""
    outputs: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
            end += 1
        out = model(torch.cat(views[start:end]), **kwargs)
        outputs.extend(out.chunk(end - start))
        start = end
    return outputs
