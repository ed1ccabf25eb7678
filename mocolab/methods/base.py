"""The contract between a method and the one training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class LossOutput:
    """What a method's ``forward`` returns: the loss to minimise and named scalars to log
    (detached tensors; the loop turns them into numbers only when it logs)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A self-supervised method: a short composition of a backbone, heads, a dictionary, a
    momentum encoder and a loss.

    - ``forward(views, generator) -> LossOutput``: ``views`` is the list of augmented batches
      produced by the method's :attr:`num_views` view generators; ``generator`` is the run's
      random stream on the training device (for shuffles), saved with every checkpoint.
    - ``on_step_end(step, total_steps) -> dict``: called after each optimiser step for
      momentum and dictionary updates; returns scalars to log (e.g. the momentum in use).
    - ``backbone``: the encoder that evaluation and export use.
    """

    num_views: int = 2
    backbone: nn.Module

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        return {}
