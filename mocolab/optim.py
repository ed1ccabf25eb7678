"""Optimisers: SGD with momentum (MoCo), LARS (SimCLR, BYOL, MoCo v3 ResNet), AdamW (MoCo v3 ViT).

``--optimizer`` picks one; the training loop sets each group's ``lr`` every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

OPTIMIZERS = ("sgd", "lars", "adamw")
LARS_TRUST = ("update", "you")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling as SimCLR, BYOL and MoCo v3 use it for large batches.

    For a weight tensor ``w`` with gradient ``g``, the weight decay is added to the gradient
    first, ``u = g + wd·w``, and the local learning rate is the trust ratio

    ``λ = η·‖w‖ / ‖g + wd·w‖``   (``trust="update"``, the default; 1 when a norm is 0),

    as the official code of MoCo v3 (``moco/optimizer.py``) and SimCLR (``lars_optimizer.py``;
    BYOL's optax ``lars`` the same). You, Gitman & Ginsburg (2017, Alg. 1) write it
    ``λ = η·‖w‖ / (‖g‖ + wd·‖w‖)`` (``trust="you"``). The step is ``v ← m·v + λ·u``,
    ``w ← w − lr·v`` (momentum outside the LR, as torch's SGD and MoCo v3's LARS). Biases
    and BN parameters — every tensor with at most one dimension — are excluded from both the
    adaptation and the weight decay (SimCLR, BYOL): for them ``v ← m·v + g``.

    Args:
        params: parameters or parameter groups.
        lr: the global learning rate (the loop overwrites it every step).
        momentum: m (0.9).
        weight_decay: wd (1e-6 in SimCLR; 1.5e-6 in BYOL).
        eta: η, the trust coefficient (0.001).
        trust: ``"update"`` (the official codes) or ``"you"`` (the LARS paper).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        trust: str = "update",
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS: invalid lr {lr}, momentum {momentum}, weight_decay {weight_decay} "
                f"or eta {eta}"
            )
        if trust not in LARS_TRUST:
            raise ValueError(f"LARS: trust must be update or you, got {trust!r}")
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust=trust)
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, m, lr = group["weight_decay"], group["eta"], group["momentum"], group["lr"]
            paper = group.get("trust", "update") == "you"  # groups of old checkpoints: update
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:  # weights: adapted and decayed; biases and BN: plain momentum SGD
                    u = g + wd * p
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    if paper:  # You et al.: 1 where ‖w‖ or ‖g‖ is 0
                        denominator, defined = g_norm + wd * w_norm, (w_norm > 0) & (g_norm > 0)
                    else:  # MoCo v3 / SimCLR: 1 where ‖w‖ or ‖g + wd·w‖ is 0
                        denominator = torch.linalg.vector_norm(u)
                        defined = (w_norm > 0) & (denominator > 0)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(defined, eta * w_norm / denominator, one)
                    g = u * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(g)
                p.add_(buf, alpha=-lr)
        return loss


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float = 0.001,
    lars_trust: str = "update",
    no_decay: Iterable[nn.Parameter] = (),
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimiser named by ``--optimizer``.

    - ``"sgd"``: ``torch.optim.SGD`` with momentum and weight decay on every parameter (MoCo).
    - ``"lars"``: :class:`LARS` (biases and BN excluded from adaptation and decay; its trust
      ratio ``lars_trust``).
    - ``"adamw"``: ``torch.optim.AdamW`` (MoCo v3 ViT, DINO), weight decay on weights only
      (biases and BN parameters, at most one dimension, get none, as DINO); ``betas`` its
      (β1, β2) (MAE: 0.9, 0.95).

    ``no_decay``: parameters of ``params`` that get no weight decay with any optimiser (a
    method's :meth:`~mocolab.methods.base.Method.no_weight_decay`: MSN's prototypes); they form
    a group of their own, after the others.
    """
    params = list(params)
    skip = {id(p) for p in no_decay}
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in skip]}]
    if skip:
        groups.append({"params": [p for p in params if id(p) in skip], "weight_decay": 0.0})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust=lars_trust
        )
    if name == "adamw":
        decay = [p for p in params if p.ndim > 1 and id(p) not in skip]
        no_decay = [p for p in params if p.ndim <= 1 or id(p) in skip]
        return torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=betas,
        )
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, eps: float = 1e-6) -> None:
    """Clip each parameter's gradient to L2 norm ``max_norm``, separately (DINO's
    ``utils.clip_gradients``, ``--clip_grad 3.0``): ``g ← g·min(1, max_norm / (‖g‖ + ε))``.
    Unlike ``torch.nn.utils.clip_grad_norm_`` the norm is per tensor, not global. Runs without
    a host sync (the coefficients stay on the device)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + eps), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
