"""The shared-memory rings that carry large bytes of DataLoader workers' batches."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import sys
from multiprocessing.reduction import ForkingPickler

import pytest

from wdsfs import _shared_rings as shared_rings
from wdsfs._shared_rings import MIN_BYTES, BatchRings

pytestmark = pytest.mark.skipif(
    not hasattr(os, "memfd_create"), reason="the rings are memfds (Linux)"
)


class Box:
    """What a worker's batch is wrapped in: a factory the main process calls on the batch."""

    def __init__(self, batch, tag=None):
        self.batch = batch
        self.tag = tag


def through(rings: BatchRings, batch, worker: int = 0):
    """A batch as the main process receives it: reduced in the 'worker', pickled, unpickled."""

    class Carrier:
        def __reduce__(self):
            return rings.reduce(worker, Box, batch, "tag")

    box = pickle.loads(ForkingPickler.dumps(Carrier()))
    assert isinstance(box, Box) and box.tag == "tag"
    return box.batch


@pytest.fixture
def rings():
    rings = BatchRings(2, 1024 * 1024)
    yield rings
    rings.close()


def test_large_bytes_cross_through_the_ring_small_ones_inline(rings):
    big = os.urandom(300_000)
    batch = {"__key__": "k", "jpg": big, "cls": b"1", "many": [os.urandom(MIN_BYTES)] * 3}
    got = through(rings, batch)
    assert got == batch and type(got["jpg"]) is bytes
    assert rings.batches == 1
    # the payload pickled inline is small: the big bytes are not in it
    payload = rings.reduce(1, Box, batch)[1][2]
    assert len(payload) < 10_000


def test_buffers_come_back_as_inline_pickling_gives():
    np = pytest.importorskip("numpy")
    rings = BatchRings(1, 1024 * 1024)
    try:
        array = np.arange(50_000, dtype=np.int32).reshape(100, 500)
        batch = [array, bytearray(os.urandom(20_000)), array[:, ::2]]
        got = through(rings, batch)
        assert np.array_equal(got[0], array) and got[0].flags.writeable
        assert type(got[1]) is bytearray and got[1] == batch[1]
        assert np.array_equal(got[2], array[:, ::2])
        assert rings.batches == 1
    finally:
        rings.close()


def test_many_batches_wrap_around_the_ring_in_order():
    rng = random.Random(5)
    rings = BatchRings(1, 256 * 1024)
    try:
        for _ in range(200):
            batch = [
                rng.randbytes(rng.randrange(MIN_BYTES, 120_000)) for _ in range(rng.randrange(1, 4))
            ]
            assert through(rings, batch) == batch
        assert rings.batches > 100  # most fitted; the others went inline, unchanged
    finally:
        rings.close()


def test_a_full_ring_sends_inline_and_never_overwrites_uncopied_bytes():
    rings = BatchRings(1, 256 * 1024)
    try:
        first = [os.urandom(100_000), os.urandom(100_000)]
        sent = rings.reduce(0, Box, first)  # put in the ring, not yet copied out
        second = [os.urandom(100_000)]  # does not fit in the 56 KB left
        late = rings.reduce(0, Box, second)
        assert late[1][3] is None  # nothing of it in the ring
        func, args = sent
        assert func(*args).batch == first  # the first batch's bytes are intact
        func, args = late
        assert func(*args).batch == second
        third = [os.urandom(150_000)]  # fits again once the first was copied out
        func, args = rings.reduce(0, Box, third)
        assert args[3] is not None and func(*args).batch == third
    finally:
        rings.close()


def test_a_batch_for_closed_rings_is_a_clear_error(rings):
    func, args = rings.reduce(0, Box, [os.urandom(50_000)])
    rings.close()
    with pytest.raises(RuntimeError, match="DataLoader that has ended"):
        func(*args)


class _Carrier:
    def __init__(self, rings, batch):
        self.rings = rings
        self.batch = batch

    def __reduce__(self):
        return self.rings.reduce(1, Box, self.batch)


def _child(rings, conn, seed):
    rng = random.Random(seed)
    for _ in range(50):
        batch = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(3)]
        conn.send_bytes(ForkingPickler.dumps(_Carrier(rings, batch)))
    conn.close()


def test_a_forked_worker_writes_and_the_parent_reads():
    rings = BatchRings(2, 512 * 1024)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(rings, send, 3))
    child.start()
    send.close()
    try:
        rng = random.Random(3)
        for _ in range(50):
            expected = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(3)]
            assert pickle.loads(receive.recv_bytes()).batch == expected
        assert rings.batches > 0
    finally:
        child.join(10)
        if child.exitcode is None:
            child.kill()
            child.join()
        rings.close()
    assert child.exitcode == 0


def test_only_fork_workers_get_rings():
    assert shared_rings.available(multiprocessing.get_context("fork")) is sys.platform.startswith(
        "linux"
    )
    assert not shared_rings.available(multiprocessing.get_context("spawn"))
    # the default start method is read, not chosen
    before = multiprocessing.get_start_method(allow_none=True)
    shared_rings.available(None)
    assert multiprocessing.get_start_method(allow_none=True) == before
