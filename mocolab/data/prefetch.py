"""Batches gathered ahead of the training loop, so the model never waits for its data.

The training images are one uint8 tensor — in memory, or memory-mapped from an image folder's
decoded cache (:mod:`mocolab.data.folder`) when they are too large for it. Gathering a random
batch of rows from a memory map reads the disk; doing it on the training thread would stall
every step. :class:`BatchPrefetcher` gathers the next batches in a background thread (torch's
indexing and copies release the GIL), into pinned memory when the model is on CUDA so that the
copy to the GPU is asynchronous (``non_blocking=True``). Augmentation happens after the copy,
batched, on the training device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

_DONE = object()


class BatchPrefetcher:
    """Iterate over ``images[batch]`` for each index tensor of ``batches``, in order, with up to
    ``depth`` batches gathered ahead by a background thread.

    Args:
        images: uint8 ``N×C×H×W`` on the CPU (a tensor or a memory map).
        batches: index tensors, one per step.
        depth: how many batches to hold ready.
        pin: gather into pinned (page-locked) memory, for asynchronous copies to a GPU.

    Use as an iterator; :meth:`close` (or leaving a ``with`` block) stops the thread early. An
    error while gathering is raised on the training thread at the batch where it happened.
    """

    def __init__(
        self, images: Tensor, batches: Sequence[Tensor], depth: int = 4, pin: bool = False
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.images = images
        self.batches = list(batches)
        self.pin = pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="mocolab-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            # NumPy's take copies on this thread alone (torch's indexing would start its own
            # OpenMP team and compete with the training thread's for the cores).
            source = self.images.numpy()
            for idx in self.batches:
                batch = torch.from_numpy(np.take(source, idx.numpy(), axis=0))
                if self.pin:
                    batch = batch.pin_memory()
                if not self._put(batch):
                    return
        except BaseException as e:  # handed to the training thread
            self._put(e)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread (the remaining batches are dropped)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
