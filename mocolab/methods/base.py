"""The contract between a method and the one training loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..momentum import MomentumEncoder


@dataclass
class LossOutput:
    """What a method's ``forward`` returns: the loss to minimise, named scalars to log
    (detached tensors; the loop turns them into numbers only when it logs) and ``carry``, what
    the method's :meth:`Method.on_step_end` needs after the optimiser step (detached tensors:
    MoCo's keys to enqueue, DINO's teacher outputs for the center), handed back by the loop."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    carry: dict[str, Any] = field(default_factory=dict)


class Method(nn.Module):
    """A self-supervised method: a short composition of a backbone, heads, a dictionary, a
    momentum encoder and a loss.

    - ``forward(views, generator, index=None) -> LossOutput``: ``views`` is the list of
      augmented batches produced by the method's :attr:`num_views` view generators;
      ``generator`` is the run's random stream on the training device (for shuffles), saved
      with every checkpoint; ``index`` holds the batch's image indices in the training set
      (for a memory bank; methods that need no index ignore it).
    - ``on_step_end(out, step, total_steps) -> dict``: called after each optimiser step with
      the step's :class:`LossOutput` (its ``carry``) for momentum and dictionary updates;
      returns scalars to log (e.g. the momentum in use).
    - ``view_recipes(augment) -> list[str]``: the augmentation recipe of each view.
    - ``query_encoder``: backbone + head trained by gradient (``query_encoder.backbone`` is
      the encoder that evaluation and export use; checkpoints keep it under that name).

    The parts the loop and the diagnostics may ask for, each mapped by the method to its
    paper's name: :attr:`backbone`, :attr:`momentum_encoder` (MoCo's ``key_encoder``, BYOL's
    ``target_encoder``, DINO's ``teacher_encoder``) and :attr:`dictionary` (MoCo's ``queue``,
    InstDisc's ``memory_bank``); ``None`` where the method has none.
    """

    num_views: int = 2
    query_encoder: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._scalars: dict[str, float] = {}  # Python mirrors of scalar buffers
        self.register_load_state_dict_post_hook(lambda module, _: module._scalars.clear())

    def scalar(self, name: str) -> float:
        """The value of scalar buffer ``name`` (a step count, a scheduled temperature), read
        from the device once and then mirrored, so a forward pass can use it every step
        without a device sync. Re-read after a state-dict load."""
        if name not in self._scalars:
            self._scalars[name] = getattr(self, name).item()
        return self._scalars[name]

    @torch.no_grad()
    def set_scalar(self, name: str, value: float) -> None:
        """Set scalar buffer ``name`` (saved in checkpoints) and its mirror; no device write
        when the mirror already holds ``value`` (a constant set every step costs nothing)."""
        if self._scalars.get(name) == value:
            return
        getattr(self, name).fill_(value)
        self._scalars[name] = value

    @property
    def backbone(self) -> nn.Module:
        """The encoder that evaluation and export use (``query_encoder.backbone``)."""
        return self.query_encoder.backbone

    @property
    def momentum_encoder(self) -> MomentumEncoder | None:
        """The EMA of the query encoder (key / target / teacher encoder), or ``None``."""
        return None

    @property
    def dictionary(self) -> nn.Module | None:
        """The stored keys the loss contrasts against (a queue, a memory bank), or ``None``."""
        return None

    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """After the optimiser step: momentum and dictionary updates from ``out.carry``."""
        return {}

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Parameters the optimiser must not decay beyond the biases and norms it always
        spares (timm's ``no_weight_decay``; MSN's prototypes). None by default."""
        return []

    def prepare(
        self,
        images: Tensor | None,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
    ) -> None:
        """Called once before the first step of a fresh run (not on resume) with the training
        images (uint8, in index order; ``None`` when they are streamed from shards) and their
        evaluation pipeline; a method that needs a start from the data (InstDisc's
        ``--bank-init encoder``) does it here. No-op by default."""

    def view_recipes(self, augment: str) -> list[str]:
        """One recipe name per view from ``--augment``: a single name is used for every view;
        a comma-separated list gives each view its own (BYOL's asymmetric ``byol-view1,byol-view2``)."""
        names = [a.strip() for a in augment.split(",")]
        if len(names) == 1:
            return names * self.num_views
        if len(names) != self.num_views:
            raise ConfigError(
                f"--augment {augment!r} names {len(names)} recipes but the method "
                f"makes {self.num_views} views; give one recipe or {self.num_views}"
            )
        return names


def encoder(backbone: nn.Module, head: nn.Module) -> nn.Sequential:
    """``backbone → head`` as one module with those two names (the query / online encoder)."""
    model = nn.Sequential()
    model.add_module("backbone", backbone)
    model.add_module("head", head)
    return model
