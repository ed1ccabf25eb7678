"""The momentum (key / teacher) encoder: an exponential moving average of the query encoder.

MoCo §3.2: ``θk ← m·θk + (1−m)·θq``, with f_k receiving no gradient.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .distributed import all_reduce_mean, is_distributed


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """``θ_target ← m·θ_target + (1−m)·θ_source`` for every parameter (MoCo Eq. 2).

    Only parameters move; buffers (BN running statistics) stay the target's own, accumulated
    by its own forward passes, as in the official code. Frozen source parameters
    (``requires_grad`` False, e.g. MoCo v3's random patch projection) are skipped: the
    target's copy stays bit-identical (``m·θ + (1−m)·θ`` is not always ``θ`` in floating point).
    """
    t_all, s_all = list(target.parameters()), list(source.parameters())
    if len(t_all) != len(s_all):
        raise ValueError("momentum_update: target and source have different parameter lists")
    t_params: list[Tensor] = [t for t, s in zip(t_all, s_all) if s.requires_grad]
    s_params: list[Tensor] = [s.detach() for s in s_all if s.requires_grad]
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - m)


class MomentumEncoder(nn.Module):
    """A frozen copy of ``module`` that follows it by EMA.

    The copy starts with identical weights (MoCo: "f_k is initialised as f_q"), requires no
    gradient, and is updated after each optimiser step: :meth:`step` with the scheduled
    momentum (the one place every momentum method updates its key / target / teacher
    encoder), or :meth:`update` with a given ``m``.

    Args:
        module: the query / online / student encoder to copy.
        momentum: m, the base momentum (MoCo 0.999, BYOL and DINO 0.996, MoCo v3 0.99).
        schedule: ``"constant"`` (MoCo v1/v2), ``"cosine"`` (m ramped to 1: BYOL, MoCo v3,
            DINO) or ``"linear"`` (I-JEPA, MSN); see :func:`scheduled_momentum`.

    Examples:
        ``θ_k ← m·θ_k + (1 − m)·θ_q`` (MoCo Eq. 2): with m = 0.9, a weight 1 following a
        query weight 0 moves to 0.9, then 0.81:

        >>> query = nn.Linear(1, 1, bias=False)
        >>> _ = query.weight.data.fill_(1.0)
        >>> key = MomentumEncoder(query)
        >>> key.module.weight.requires_grad, key.module.weight.item()
        (False, 1.0)
        >>> _ = query.weight.data.fill_(0.0)
        >>> key.update(query, m=0.9)
        >>> round(key.module.weight.item(), 4)
        0.9
        >>> key.update(query, m=0.9)
        >>> round(key.module.weight.item(), 4)
        0.81
    """

    def __init__(
        self, module: nn.Module, momentum: float = 0.999, schedule: str = "constant"
    ) -> None:
        super().__init__()
        self.module = copy.deepcopy(module)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.schedule = schedule

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, source: nn.Module, m: float) -> None:
        """EMA step towards ``source`` with momentum ``m``."""
        momentum_update(self.module, source, m)

    @torch.no_grad()
    def step(self, source: nn.Module, step: int, total_steps: int) -> float:
        """EMA step towards ``source`` with the momentum scheduled for ``step`` of
        ``total_steps``; returns that momentum (logged as ``momentum``)."""
        m = scheduled_momentum(self.momentum, self.schedule, step, total_steps)
        self.update(source, m)
        return m


def cosine_momentum(base: float, step: int, total_steps: int, final: float = 1.0) -> float:
    """Momentum increased from ``base`` to ``final`` with a half-cosine over training
    (BYOL §3.2: ``τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2``)."""
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def linear_momentum(base: float, step: int, total_steps: int, final: float = 1.0) -> float:
    """Momentum increased linearly from ``base`` to ``final`` over training: ``m = base +
    (final − base)·step/total`` (I-JEPA's ``momentum_scheduler`` in ``src/train.py``; MSN's
    ``src/msn_train.py`` stretches the ramp over 1.25× the training steps)."""
    if total_steps <= 0:
        return base
    return base + (final - base) * min(max(step / total_steps, 0.0), 1.0)


#: The EMA momentum schedules of ``--momentum-schedule``.
MOMENTUM_SCHEDULES = ("constant", "cosine", "linear")


def scheduled_momentum(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The EMA momentum at ``step``: ``base`` throughout (``"constant"``, MoCo v1/v2), ramped
    to 1 by :func:`cosine_momentum` (``"cosine"``, BYOL and MoCo v3) or by
    :func:`linear_momentum` (``"linear"``, I-JEPA and MSN)."""
    if schedule == "cosine":
        return cosine_momentum(base, step, total_steps)
    if schedule == "linear":
        return linear_momentum(base, step, total_steps)
    if schedule != "constant":
        raise ValueError(
            f"unknown momentum schedule {schedule!r}; choose one of {', '.join(MOMENTUM_SCHEDULES)}"
        )
    return base


class Center(nn.Module):
    """DINO's center ``c`` of the teacher outputs (Caron et al. 2021, Eq. 4), an EMA of the
    batch means: ``c ← m·c + (1 − m)·mean_b g_t(x_b)``, the mean taken over the global batch
    (all-reduced across ranks). Subtracting it from the teacher output avoids collapse to one
    dimension; the sharpening of a low teacher temperature avoids collapse to uniform.

    Args:
        dim: K, the output dimension.
        momentum: m (0.9).
    """

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probs(self, teacher_output: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher's centred, sharpened distribution ``softmax((g_t − c) / τ_t)`` over the
        last dimension (Eq. 4), in float32."""
        return torch.softmax((teacher_output.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_output: torch.Tensor) -> None:
        """One EMA step with the mean of ``teacher_output`` (``B×K``, this rank's rows) over
        every rank's rows. The ranks may hold different numbers of rows (DINOv2's masked
        patches): the mean is the all-reduced sum over the all-reduced count, as
        ``iBOTPatchLoss.update_center``; with no row anywhere the centre stays."""
        rows = teacher_output.detach().float()
        if not is_distributed():  # the count is known here: no step without rows
            if rows.shape[0]:
                batch_mean = rows.mean(dim=0, keepdim=True)
                self.center.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
            return
        count = rows.new_full((1, 1), float(rows.shape[0]))
        total = all_reduce_mean(torch.cat([rows.sum(dim=0, keepdim=True), count], dim=1))
        sums, count = total[:, :-1], total[:, -1:]  # both ÷ the world size, which cancels
        batch_mean = sums / count.clamp(min=torch.finfo(torch.float32).tiny)
        momentum = torch.where(count > 0, self.momentum, 1.0)  # no row anywhere: no step
        self.center.mul_(momentum).add_(batch_mean * (1 - momentum))
