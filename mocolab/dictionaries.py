"""Where the negatives come from: the dictionary of keys (MoCo §3.1).

A dictionary exposes ``keys()`` for the loss and ``push(keys)`` after the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Queue(nn.Module):
    """A FIFO queue of ``K`` L2-normalised keys of dimension ``C`` (MoCo §3.1, "Dictionary as a
    queue"): the keys of the current mini-batch are enqueued after the step and the oldest are
    dequeued, so the dictionary size is decoupled from the batch size.

    Stored as a ``K×C`` ring buffer with a write pointer (registered buffers, so the queue is in
    the model's state dict and in every checkpoint). When ``K`` is not a multiple of the batch,
    a push wraps around the end of the buffer; the entries overwritten are always the oldest.

    Args:
        size: K, the number of keys (MoCo: 65536 on ImageNet, 4096 on CIFAR).
        dim: C, the key dimension.
        generator: optional generator for the random initial keys (unit vectors).

    Examples:
        A queue of K = 4 keys: pushing 3 keys, then 2 more, overwrites the oldest entry
        (the random initial keys count as the oldest):

        >>> queue = Queue(4, dim=2)
        >>> queue.push(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        >>> queue.push(torch.tensor([[0.0, -1.0], [0.6, 0.8]]))
        >>> queue.keys()  # the ring buffer: the 5th key went to slot 0
        tensor([[ 0.6000,  0.8000],
                [ 0.0000,  1.0000],
                [-1.0000,  0.0000],
                [ 0.0000, -1.0000]])
        >>> queue.ordered()[0], queue.full
        (tensor([0., 1.]), True)
    """

    queue: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        init = torch.randn(size, dim, generator=generator)
        self.register_buffer("queue", F.normalize(init, dim=1))  # K×C
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        # How many real keys were pushed so far (capped at K): the initial random keys count
        # as negatives too, as in the official code, but it is useful to know when it is full.
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # Which training image each key came from (-1: unknown, e.g. the random initial keys),
        # so the dictionary's consistency can be measured (evaluate.diagnostics).
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        # Python mirrors of (ptr, filled), read from the buffers once (and again after a
        # state-dict load), so that a push never waits for the GPU to read a pointer.
        self._host: tuple[int, int] | None = (0, 0)  # the buffers' values at construction
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_host", None))

    def _pointers(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.ptr), int(self.filled))
        return self._host

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def full(self) -> bool:
        """Whether K real keys have been pushed (read from the host mirror: no device sync)."""
        return self._pointers()[1] == self.size

    def keys(self) -> Tensor:
        """All ``K×C`` keys, detached (negatives carry no gradient)."""
        return self.queue.detach()

    @torch.no_grad()
    def push(self, keys: Tensor, index: Tensor | None = None) -> None:
        """Enqueue ``keys`` (``N×C``) in order, overwriting the oldest entries; ``index`` (``N``)
        records the images they came from (-1 when not given)."""
        keys = keys.detach().to(self.queue.dtype)
        n, k = keys.shape[0], self.size
        if index is None:
            index = torch.full((n,), -1, dtype=torch.long, device=self.index.device)
        index = index.to(device=self.index.device, dtype=torch.long)
        if n >= k:  # more keys than slots: only the newest K survive, oldest first
            keys, index = keys[n - k :], index[n - k :]
            n = k
        ptr, filled = self._pointers()
        end = ptr + n
        if end <= k:
            self.queue[ptr:end] = keys
            self.index[ptr:end] = index
        else:  # wrap around the end of the ring buffer
            first = k - ptr
            self.queue[ptr:] = keys[:first]
            self.queue[: n - first] = keys[first:]
            self.index[ptr:] = index[:first]
            self.index[: n - first] = index[first:]
        self._host = (end % k, min(filled + n, k))
        self.ptr.fill_(self._host[0])
        self.filled.fill_(self._host[1])

    def ordered(self) -> Tensor:
        """Keys from oldest to newest (for inspection and tests)."""
        ptr = self._pointers()[0]
        return torch.cat([self.queue[ptr:], self.queue[:ptr]], dim=0)


class MemoryBank(nn.Module):
    """One L2-normalised feature per training image (InstDisc, Wu et al. 2018, §3.1–3.2): the
    dictionary holds every instance, and a batch's entries move towards the features just
    computed for its images.

    The update at the batch's indices ``i`` is the proximal step of §3.4 with momentum λ
    (the official code's ``nce_m = 0.5``): ``v_i ← normalize(λ·v_i + (1 − λ)·f_i)``.

    Args:
        size: n, the number of training images.
        dim: C, the feature dimension (128 in the paper).
        momentum: λ of the update.
        generator: optional generator for the random initial features (unit vectors).

    Examples:
        With λ = 0.5, an entry at (1, 0) moved towards a feature (0, 1) becomes their
        normalised mean, (1, 1)/√2:

        >>> bank = MemoryBank(3, dim=2, momentum=0.5)
        >>> bank.bank[1] = torch.tensor([1.0, 0.0])
        >>> bank.push(torch.tensor([[0.0, 1.0]]), index=torch.tensor([1]))
        >>> bank.keys(torch.tensor([1]))
        tensor([[0.7071, 0.7071]])
    """

    bank: Tensor

    def __init__(
        self, size: int, dim: int, momentum: float = 0.5, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"memory bank size must be positive, got {size}")
        init = torch.randn(size, dim, generator=generator)
        self.register_buffer("bank", F.normalize(init, dim=1))  # n×C
        self.momentum = momentum

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def keys(self, index: Tensor | None = None) -> Tensor:
        """The stored features (``n×C``), or those at ``index``; detached."""
        bank = self.bank.detach()
        return bank if index is None else bank[index]

    def sample(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` indices drawn uniformly with replacement (InstDisc's noise distribution
        ``P_n = 1/n``), on the generator's device."""
        device = generator.device if generator is not None else self.bank.device
        return torch.randint(self.size, (k,), generator=generator, device=device).to(
            self.bank.device
        )

    @torch.no_grad()
    def push(self, features: Tensor, index: Tensor) -> None:
        """``v_i ← normalize(λ·v_i + (1 − λ)·f_i)`` at the rows ``index`` (``N``) with the
        features ``f`` (``N×C``)."""
        index = index.to(self.bank.device)
        mixed = self.momentum * self.bank[index] + (1 - self.momentum) * features.detach().to(
            self.bank.dtype
        )
        self.bank[index] = F.normalize(mixed, dim=1)


@torch.no_grad()
def nearest_neighbours(query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest neighbour of each query among the stored keys by cosine similarity (NNCLR,
    Dwibedi et al. 2021, §3: ``NN(z, Q) = argmin_{q∈Q} ‖z − q‖₂`` on unit vectors, i.e. the
    largest ``z·q``; the function ``NN`` of Algorithm 1), without gradient.

    Args:
        query: ``N×C`` embeddings (normalised here).
        keys: ``K×C`` support set (a :class:`Queue`'s keys; normalised here).

    Returns:
        ``(index, neighbours)``: the ``N`` rows of ``keys`` chosen and those ``N×C`` keys, as
        stored.

    Examples:
        A support set of three keys; each query finds the closest direction:

        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> index, nn = nearest_neighbours(torch.tensor([[0.2, 0.9], [-3.0, 1.0]]), keys)
        >>> index
        tensor([1, 2])
        >>> nn
        tensor([[ 0.,  1.],
                [-1.,  0.]])
    """
    q = F.normalize(query.detach().float(), dim=1)
    k = F.normalize(keys.detach().float(), dim=1)
    index = (q @ k.T).argmax(dim=1)  # N
    return index, keys.detach()[index]


@torch.no_grad()
def mochi_negatives(
    query: Tensor,
    keys: Tensor,
    n: int,
    s: int,
    s_prime: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hard negative mixing (MoCHi, Kalantidis et al. 2020, §4): synthetic negatives per query,
    made from the ``n`` keys of the dictionary most similar to it (its hardest negatives).

    With ``Q̃ = {k̃_1 … k̃_n}`` the hardest keys of query ``q`` (sorted by ``q·k``):

    - ``s`` mixes of two of them (Eq. 4): ``h = normalize(α·k̃_i + (1 − α)·k̃_j)``, ``α ~ U(0, 1)``;
    - ``s′`` mixes with the query (Eq. 5): ``h′ = normalize(β·q + (1 − β)·k̃_j)``, ``β ~ U(0, 0.5)``
      (the query contributes less than half).

    Random numbers are drawn from ``generator`` in this order: pairs ``(i, j)`` (``N×s×2``
    integers in ``[0, n)``), α (``N×s``), partners ``j`` (``N×s′``), β (``N×s′``, as ``0.5·U``).
    The result carries no gradient (the paper's synthetic points are constants).

    Args:
        query: ``N×C`` L2-normalised queries.
        keys: ``K×C`` dictionary (the queue), ``K ≥ n``.

    Returns:
        ``N×(s + s′)×C`` unit vectors: the ``s`` key mixes first, then the ``s′`` query mixes.
    """
    query = query.detach()
    keys = keys.detach().to(query.dtype)
    num = query.shape[0]
    device = generator.device if generator is not None else query.device
    hard_idx = (query @ keys.T).topk(n, dim=1).indices  # N×n, hardest first
    hard = keys[hard_idx]  # N×n×C
    rows = torch.arange(num, device=query.device)
    out = []
    if s > 0:
        pairs = torch.randint(n, (num, s, 2), generator=generator, device=device).to(query.device)
        alpha = torch.rand(num, s, 1, generator=generator, device=device).to(
            query.device, query.dtype
        )
        ki = hard[rows[:, None], pairs[..., 0]]  # N×s×C
        kj = hard[rows[:, None], pairs[..., 1]]
        out.append(F.normalize(alpha * ki + (1 - alpha) * kj, dim=2))
    if s_prime > 0:
        partner = torch.randint(n, (num, s_prime), generator=generator, device=device).to(
            query.device
        )
        beta = 0.5 * torch.rand(num, s_prime, 1, generator=generator, device=device).to(
            query.device, query.dtype
        )
        kj = hard[rows[:, None], partner]  # N×s′×C
        out.append(F.normalize(beta * query[:, None, :] + (1 - beta) * kj, dim=2))
    if not out:
        return query.new_zeros(num, 0, query.shape[1])
    return torch.cat(out, dim=1)
