"""Learning-rate schedules as pure functions of the step (so a resumed run needs no state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .momentum import cosine_momentum  # the same half-cosine ramp as the EMA momentum


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr = base_lr × batch / 256``."""
    return base_lr * batch_size / reference_batch


def learning_rate(
    step: int,
    total_steps: int,
    peak_lr: float,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.6, 0.8),
    gamma: float = 0.1,
) -> float:
    """The LR at ``step`` (0-based) of ``total_steps``.

    Linear warmup from ~0 to ``peak_lr`` over ``warmup_steps``, then:
    - ``"cosine"``: ``peak·½(1 + cos(π·t))`` with ``t`` the post-warmup progress in [0, 1]
      (SGDR without restarts; MoCo v2);
    - ``"step"``: ``peak·γ^j`` after the j-th milestone (fractions of training; MoCo v1 drops
      ×0.1 at epochs 120 and 160 of 200, i.e. 0.6 and 0.8);
    - ``"constant"``: ``peak``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule == "step":
        progress = step / max(total_steps, 1)
        return peak_lr * gamma ** sum(progress >= m for m in milestones)
    if schedule == "cosine":
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    raise ValueError(f"unknown LR schedule {schedule!r}")


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """The weight decay at ``step``: ``end − (end − start)·½(1 + cos(π·step/total_steps))``,
    from ``start`` at step 0 to ``end`` at the last step (DINO's ``wd_schedule``, 0.04 → 0.4)."""
    return cosine_momentum(start, step, total_steps, final=end)
