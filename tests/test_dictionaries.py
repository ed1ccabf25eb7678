"""The queue: FIFO order, wrap-around, K not a multiple of the batch."""

import torch

from mocolab.dictionaries import Queue


def keys(*values, dim=2):
    return torch.tensor([[float(v)] * dim for v in values])


def test_fifo_order_and_pointer():
    q = Queue(size=6, dim=2)
    q.push(keys(1, 2))
    q.push(keys(3, 4))
    assert int(q.ptr) == 4
    assert q.queue[:4, 0].tolist() == [1, 2, 3, 4]
    q.push(keys(5, 6))  # fills exactly
    assert int(q.ptr) == 0 and int(q.filled) == 6
    q.push(keys(7, 8))  # overwrites the two oldest
    assert q.queue[:, 0].tolist() == [7, 8, 3, 4, 5, 6]
    assert q.ordered()[:, 0].tolist() == [3, 4, 5, 6, 7, 8]


def test_wrap_around_when_size_not_multiple_of_batch():
    q = Queue(size=5, dim=2)
    q.push(keys(1, 2, 3))
    q.push(keys(4, 5, 6))  # 4, 5 at the end, 6 wraps to slot 0
    assert q.queue[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert int(q.ptr) == 1
    assert q.ordered()[:, 0].tolist() == [2, 3, 4, 5, 6]
    q.push(keys(7, 8, 9))
    assert q.ordered()[:, 0].tolist() == [5, 6, 7, 8, 9]


def test_batch_larger_than_queue_keeps_newest():
    q = Queue(size=3, dim=2)
    q.push(keys(1, 2, 3, 4, 5))
    assert q.ordered()[:, 0].tolist() == [3, 4, 5]


def test_initial_keys_are_unit_vectors_and_detached():
    q = Queue(size=10, dim=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.queue.norm(dim=1), torch.ones(10))
    k = torch.randn(2, 4, requires_grad=True)
    q.push(k)
    assert not q.keys().requires_grad


def test_queue_is_in_state_dict():
    q = Queue(size=4, dim=3)
    q.push(torch.ones(2, 3))
    state = q.state_dict()
    assert set(state) == {"queue", "ptr", "filled", "index"}
    r = Queue(size=4, dim=3)
    r.load_state_dict(state)
    torch.testing.assert_close(r.queue, q.queue)
    assert int(r.ptr) == 2


def test_queue_records_the_image_of_each_key_in_the_same_ring_slots():
    q = Queue(size=5, dim=2)
    assert q.index.tolist() == [-1] * 5  # the random initial keys come from no image
    q.push(keys(1, 2, 3), index=torch.tensor([10, 20, 30]))
    q.push(keys(4, 5, 6))  # no index given: unknown
    q.push(keys(7, 8), index=torch.tensor([70, 80]))
    # slots: 0..2 ← 10 20 30; 3, 4, 0 ← -1 -1 -1 (wrap); 1, 2 ← 70 80
    assert q.index.tolist() == [-1, 70, 80, -1, -1]
    assert q.queue[1, 0].item() == 7 and q.queue[2, 0].item() == 8
    q.push(keys(*range(1, 8)), index=torch.arange(100, 107))  # more keys than slots
    assert sorted(q.index.tolist()) == [102, 103, 104, 105, 106]
    assert "index" in q.state_dict()


def test_push_never_reads_the_device():
    """A step's push must not sync a GPU: on the meta device any read of a value would raise,
    so pushing there proves the pointer arithmetic runs on host-side ints."""
    q = Queue(size=5, dim=2).to("meta")
    q.push(torch.empty(3, 2, device="meta"))
    q.push(torch.empty(3, 2, device="meta"), index=torch.empty(3, dtype=torch.long, device="meta"))
    q.ordered()
    assert q.ptr.device.type == "meta"


def test_a_loaded_queue_continues_from_the_checkpointed_pointer():
    q = Queue(size=5, dim=2)
    q.push(keys(1, 2, 3))
    q.push(keys(4, 5, 6))  # ptr 1, filled 5
    r = Queue(size=5, dim=2)
    r.push(keys(9, 9))  # its own pointer, 2, which the load must replace
    r.load_state_dict(q.state_dict())
    for queue in (q, r):  # the loaded queue writes where the saved one would
        queue.push(keys(7, 8))
    torch.testing.assert_close(r.queue, q.queue)
    assert r.ordered()[:, 0].tolist() == [4, 5, 6, 7, 8] == q.ordered()[:, 0].tolist()
    assert int(r.ptr) == 3 and int(r.filled) == 5
