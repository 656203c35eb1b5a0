"""File slices: sample fields a DataLoader worker leaves unread, read by the main process."""

from __future__ import annotations

import gc
import io
import os
import pickle
import socket
from multiprocessing.reduction import ForkingPickler

import pytest

from tests.datasets import make_shard
from wdsfs import _file_slices as file_slices
from wdsfs._file_slices import FileSlice, ShardFile, SliceChannel, slicer
from wdsfs._shared_rings import BatchRings
from wdsfs.tar import read_samples

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "memfd_create") and hasattr(socket, "send_fds")),
    reason="rings are memfds and descriptors pass over Unix sockets (Linux)",
)


class Box:
    def __init__(self, batch):
        self.batch = batch


def through(rings: BatchRings, batch, worker: int = 0):
    """A batch as the main process gets it: reduced in the 'worker', pickled, unpickled."""

    class Carrier:
        def __reduce__(self):
            return rings.reduce(worker, Box, batch)

    return pickle.loads(ForkingPickler.dumps(Carrier())).batch


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(make_shard(0, 6, payload=20_000))
    return path


def sliced_samples(path, fields=lambda field: field == "bin", min_bytes=8192):
    with open(path, "rb") as f:
        refer = slicer(f.fileno(), fields=fields, min_bytes=min_bytes)
        return list(read_samples(f, url=str(path), refer=refer))


def test_the_reader_leaves_big_chosen_fields_as_slices_of_the_shard_file(shard):
    with open(shard, "rb") as f:
        plain = list(read_samples(f, url=str(shard)))
    sliced = sliced_samples(shard)
    assert [i for i, _ in sliced] == [i for i, _ in plain]
    for (_, got), (_, want) in zip(sliced, plain, strict=True):
        assert isinstance(got["bin"], FileSlice) and got["bin"].nbytes == 20_000
        assert got["bin"].read() == want["bin"]
        assert {k: v for k, v in got.items() if k != "bin"} == {
            k: v for k, v in want.items() if k != "bin"
        }
    # small fields and fields not chosen are read
    assert not any(
        isinstance(s["bin"], FileSlice) for _, s in sliced_samples(shard, min_bytes=10**6)
    )
    assert all(type(s["bin"]) is bytes for _, s in sliced_samples(shard, lambda field: False))
    # one descriptor of the worker's own for the whole shard
    assert len({id(s["bin"].file) for _, s in sliced}) == 1


def test_no_slices_where_offsets_are_not_the_files(shard, tmp_path):
    gz = tmp_path / "shard-000001.tar.gz"
    gz.write_bytes(make_shard(1, 3, payload=20_000, compress=True))
    assert all(type(s["bin"]) is bytes for _, s in sliced_samples(gz))

    class Unseekable(io.RawIOBase):
        def __init__(self, data):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self.inner.readinto(buffer)

    stream = Unseekable(shard.read_bytes())
    with open(shard, "rb") as f:
        refer = slicer(f.fileno(), fields=lambda field: True, min_bytes=0)
        assert all(type(s["bin"]) is bytes for _, s in read_samples(stream, url="u", refer=refer))


def test_a_slice_pickled_any_other_way_is_its_bytes(shard):
    (_, sample), *_ = sliced_samples(shard)
    data = sample["bin"].read()
    assert pickle.loads(pickle.dumps(sample["bin"])) == data
    assert type(pickle.loads(pickle.dumps(sample))["bin"]) is bytes


def test_slices_cross_as_places_and_arrive_as_bytes_even_after_eviction(shard):
    with open(shard, "rb") as f:
        expected = [s for _, s in read_samples(f, url=str(shard))]
    samples = [s for _, s in sliced_samples(shard)]
    shard.unlink()  # the cache evicts the shard: open descriptors still read it
    rings = BatchRings(1, 1024 * 1024)
    try:
        first = [dict(s) for s in samples[:3]]

        class Carrier:
            def __reduce__(self):
                return rings.reduce(0, Box, first)

        payload = ForkingPickler.dumps(Carrier())
        assert len(payload) < 2_000  # places, not 60 KB of bytes
        assert pickle.loads(payload).batch == expected[:3]
        assert through(rings, samples[3:]) == expected[3:]
        assert rings.channels[0].reads == 6
        assert rings.batches == 0  # nothing went through the ring itself
    finally:
        rings.close()


def test_the_main_process_closes_a_shard_once_no_slice_needs_it(shard):
    rings = BatchRings(1, 1024 * 1024)
    channel = rings.channels[0]
    try:
        samples = [s for _, s in sliced_samples(shard)]
        through(rings, samples[:2])
        assert len(channel._fds) == 1
        through(rings, [{"__key__": "x"}])
        assert len(channel._fds) == 1  # the worker still holds slices of the shard
        del samples
        gc.collect()  # through()'s Carrier classes hold their batches in reference cycles
        through(rings, [{"__key__": "y"}])  # the next batch says so
        assert channel._fds == {}
    finally:
        rings.close()


def test_a_shard_never_sent_is_not_released(shard):
    file_slices.released()
    samples = [s for _, s in sliced_samples(shard)]
    del samples
    assert file_slices.released() == ()


def fill(channel: SliceChannel, fd: int) -> ShardFile:
    """Send shard files until the socket takes no more (the main process reads none)."""
    for _ in range(5000):
        file = ShardFile(fd)
        if not channel.send(file):
            return file
    raise AssertionError("the socket took 5000 descriptors")


def test_a_full_socket_sends_the_bytes_instead(shard):
    fd = os.open(shard, os.O_RDONLY)
    rings = BatchRings(1, 1024 * 1024)
    try:
        assert not fill(rings.channels[0], fd).sent
        samples = [s for _, s in sliced_samples(shard)]
        with open(shard, "rb") as f:
            expected = [s for _, s in read_samples(f, url=str(shard))]
        assert through(rings, samples) == expected
        assert rings.batches == 1  # the slices' bytes went through the ring
    finally:
        rings.close()
        os.close(fd)


def test_a_descriptor_that_never_comes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(file_slices, "_RECEIVE_TIMEOUT", 0.1)
    channel = SliceChannel()
    try:
        with pytest.raises(pickle.UnpicklingError, match="did not arrive within"):
            channel.read(12345, 0, 10)
    finally:
        channel.close()
