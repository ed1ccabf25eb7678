"""Process-group helpers: gathers and the batch shuffle of shuffle-BN.

Everything works on one process (no process group) and under ``torchrun`` with
torch.distributed (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, the rank that writes checkpoints, logs and reports."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` from torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` started as one of several workers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR...): NCCL on GPUs, gloo on CPUs. Returns the device this rank should use
    (``cuda:LOCAL_RANK`` on GPUs). A no-op outside torchrun."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        if device.type == "cuda" and launched_by_torchrun():
            return torch.device("cuda", local_rank())
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    # The env:// store of torchrun's agent outlives a restart of the workers, and with it the
    # addresses the dead workers published; a prefix per restart keeps a restarted group from
    # reading them (pytorch/pytorch#167288: "Connection refused" after --max-restarts).
    timeout = timedelta(minutes=30)
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timeout,
        store=dist.PrefixStore(f"mocolab/attempt{attempt}", store),
        rank=rank_,
        world_size=world,
    )
    return device


def barrier() -> None:
    """Wait until every rank reaches this point (a no-op on one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (e.g. the run directory chosen by rank 0)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over ranks (a copy; identity on one process)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def any_rank(flag: bool | Tensor, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (one small all-reduce)."""
    if not is_distributed():
        return bool(flag)
    t = torch.as_tensor(flag, dtype=torch.int32, device=device).clone().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order, without gradient
    (MoCo: keys are gathered before they are enqueued). Identity on one process."""
    if not is_distributed():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order, with gradient: the
    gradient of each rank's rows flows back to the rank that computed them (SimCLR's and MoCo
    v3's negatives from the whole global batch). Identity on one process.

    Each rank's loss sees the other ranks' rows as constants in its own graph; the backward of
    the gather sums, over ranks, the gradients with respect to a rank's rows and returns them
    to it — so with DDP's gradient averaging the result equals one process's loss on the
    global batch."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over ranks (an all-reduce) and
    hands each rank the rows it contributed (solo-learn's ``GatherLayer``). Written here rather
    than taken from ``torch.distributed.nn.functional.all_gather``, which is deprecated and, on
    gloo, intermittently aborted the process at exit ("terminate called without an active
    exception") after its backward had run."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(out, tensor)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks, with gradient: the backward sums the incoming
    gradients over ranks too, so that with DDP's gradient averaging the result equals one
    process's loss on the global batch (as :func:`all_gather_with_grad`). Barlow Twins sums
    its cross-correlation matrix this way. Identity on one process.

    The official Barlow Twins ``main.py`` calls ``torch.distributed.all_reduce(c)`` in place,
    outside autograd: each rank then back-propagates only through its own share, and after
    DDP's averaging the gradient is ``1/W`` of one process's on the global batch."""
    if not is_distributed():
        return tensor
    return _AllReduceWithGrad.apply(tensor.contiguous())


class _AllReduceWithGrad(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces (sums) the gradients: every rank computes
    the same loss of the summed tensor, and its share receives the gradient of all of them."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


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
        perm = torch.randperm(
            x.shape[0],
            generator=generator,
            device=generator.device if generator is not None else x.device,
        )
        perm = perm.to(x.device)
        return x[perm], torch.argsort(perm)
    local = x.shape[0]
    x_all = concat_all_gather(x)
    total = x_all.shape[0]
    perm = torch.randperm(
        total, generator=generator, device=generator.device if generator is not None else x.device
    )
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


@torch.no_grad()
def on_shuffled_batch(
    encode: Callable[[Tensor], tuple[Tensor, ...]],
    x: Tensor,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> tuple[Tensor, ...]:
    """``encode(x)`` computed on a shuffled batch, each of its outputs unshuffled: shuffle-BN
    around a key encoder (MoCo §3.3; the official ``_batch_shuffle_ddp`` …
    ``_batch_unshuffle_ddp``). With ``shuffle=False``, simply ``encode(x)``.

    Every output must have the batch as its first dimension. The outputs match ``encode(x)``
    up to the batch statistics BN sees: a key's statistics come from other images than its
    query's when BN is computed per sub-batch (split BN, or several ranks).

    Examples:
        Without BN the order of the batch does not matter, so the keys come back in place:

        >>> layer = torch.nn.Linear(3, 2)
        >>> x = torch.randn(5, 3)
        >>> (k,) = on_shuffled_batch(lambda x: (layer(x),), x, torch.Generator().manual_seed(0))
        >>> torch.allclose(k, layer(x))
        True
    """
    if not shuffle:
        return encode(x)
    x, idx_unshuffle = batch_shuffle(x, generator)
    return tuple(batch_unshuffle(out, idx_unshuffle) for out in encode(x))


def gather_keys(keys: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The keys of every rank's batch (``concat_all_gather``) and, when given, the indices of
    the images they came from, so that a dictionary holds the same global batch on every
    rank (the official ``_dequeue_and_enqueue``). Identity on one process."""
    if index is not None:
        index = concat_all_gather(index.to(keys.device))
    return concat_all_gather(keys), index
