"""BatchPrefetcher: the batches of a step list, gathered ahead on a thread, in order."""

import threading

import numpy as np
import pytest
import torch

from mocolab.data.prefetch import BatchPrefetcher


def test_yields_each_batch_in_order_then_stops():
    images = torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2)
    batches = [torch.tensor([3, 1]), torch.tensor([9, 0, 4]), torch.tensor([7])]
    with BatchPrefetcher(images, batches, depth=1) as it:
        got = list(it)
        assert next(iter(it), None) is None  # stays exhausted
    assert len(got) == 3
    for g, b in zip(got, batches):
        assert torch.equal(g, images[b])


def test_memory_mapped_images(tmp_path):
    arr = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(6, 1, 3, 3))
    arr[:] = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
    arr.flush()
    images = torch.from_numpy(np.load(tmp_path / "x.npy", mmap_mode="r+"))
    (batch,) = list(BatchPrefetcher(images, [torch.tensor([5, 2])]))
    assert batch[:, 0, 0, 0].tolist() == [5, 2]


def test_an_error_is_raised_at_its_batch_and_close_stops_the_thread():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    it = BatchPrefetcher(images, [torch.tensor([0]), torch.tensor([99])])
    next(it)
    with pytest.raises(IndexError):
        next(it)
    long = BatchPrefetcher(images, [torch.tensor([0])] * 1000, depth=2)
    next(long)
    long.close()
    assert not any(t.name == "mocolab-prefetch" and t.is_alive() for t in threading.enumerate()
                   if t is long._thread)
