"""Process-group helpers: gathers and the batch shuffle of shuffle-BN.

Everything works on one process (no process group) and under ``torchrun`` with
torch.distributed (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order, without gradient
    (MoCo: keys are gathered before they are enqueued). Identity on one process."""
    if not is_distributed():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Shuffle a key batch before the key encoder (MoCo §3.3, Shuffling BN).

    On one process the batch is permuted; BN then sees different sub-batches for a query and
    its key when the encoder uses split BN (:class:`mocolab.backbones.SplitBatchNorm2d`).
    Across ranks (official ``_batch_shuffle_ddp``): the batches of all ranks are gathered, a
    permutation drawn on rank 0 is broadcast, and each rank keeps its shard of the permuted
    batch.

    Returns:
        ``(x_shuffled, idx_unshuffle)``; pass the latter to :func:`batch_unshuffle`.
    """
    if not is_distributed():
        perm = torch.randperm(x.shape[0], generator=generator,
                              device=generator.device if generator is not None else x.device)
        perm = perm.to(x.device)
        return x[perm], torch.argsort(perm)
    local = x.shape[0]
    x_all = concat_all_gather(x)
    total = x_all.shape[0]
    perm = torch.randperm(total, generator=generator,
                          device=generator.device if generator is not None else x.device)
    perm = perm.to(x.device)
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    mine = perm.view(world_size(), local)[rank()]
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Undo :func:`batch_shuffle` on the key encoder's output."""
    if not is_distributed():
        return x[idx_unshuffle]
    local = x.shape[0]
    x_all = concat_all_gather(x)
    mine = idx_unshuffle.view(world_size(), local)[rank()]
    return x_all[mine]
