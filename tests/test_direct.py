"""Direct I/O writes of downloads: block alignment, padding of the last block, fallbacks."""

from __future__ import annotations

import os
import random
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdsfs._direct import ALIGNMENT, BufferPool, DirectWriter, open_direct
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.source import list_shards

needs_direct_io = pytest.mark.skipif(
    not hasattr(os, "O_DIRECT"), reason="O_DIRECT exists on Linux only (elsewhere: buffered)"
)


def _write_chunks(path: Path, data: bytes, step: int, pieces: list[int]) -> list[bytes]:
    """Write ``data`` as chunks of ``step`` bytes through DirectWriters fed ``pieces``-sized
    pieces, draining from a second thread as the fetcher does; return what on_data saw."""
    path.write_bytes(b"")
    fd = open_direct(str(path))
    assert fd is not None, "this filesystem should do direct I/O"
    pool = BufferPool(2 * 1024 * 1024, keep=4)
    seen: list[bytes] = []
    try:
        for start in range(0, len(data), step):
            end = min(start + step, len(data))
            writer = DirectWriter(
                fd, start, pool, last=end == len(data), on_data=lambda v: seen.append(bytes(v))
            )
            done = threading.Event()

            def drain(writer: DirectWriter = writer, done: threading.Event = done) -> None:
                while not done.is_set():
                    writer.drain(0.01)

            drainer = threading.Thread(target=drain)
            drainer.start()
            position, sizes = start, iter(pieces * (1 + len(data) // max(1, sum(pieces))))
            while position < end:
                size = min(next(sizes), end - position)
                writer.write(data[position : position + size])
                position += size
            done.set()
            writer.wake()
            drainer.join()
            writer.finish()
            writer.close()
    finally:
        os.close(fd)
    os.truncate(path, len(data))
    return seen


@needs_direct_io
@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 5 * 1024 * 1024),
    blocks_per_chunk=st.integers(1, 400),
    pieces=st.lists(st.integers(1, 300_000), min_size=1, max_size=5),
)
def test_direct_writes_reproduce_the_bytes(tmp_path_factory, size, blocks_per_chunk, pieces):
    data = random.Random(size).randbytes(size)
    path = tmp_path_factory.mktemp("direct") / "out"
    seen = _write_chunks(path, data, blocks_per_chunk * ALIGNMENT, pieces)
    assert path.read_bytes() == data
    assert b"".join(seen) == data  # the checksum sees exactly the payload, never the padding


@needs_direct_io
def test_a_chunk_not_ending_the_object_must_be_aligned(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"")
    fd = open_direct(str(path))
    assert fd is not None
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            DirectWriter(fd, 100, BufferPool(8192, 1), last=True, on_data=lambda v: None)
        writer = DirectWriter(fd, 0, BufferPool(8192, 1), last=False, on_data=lambda v: None)
        writer.write(b"x" * 10)
        with pytest.raises(ValueError, match="block-aligned"):
            writer.finish()
        writer.close()
    finally:
        os.close(fd)


def test_no_o_direct_means_buffered_writes(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    path = tmp_path / "x"
    path.write_bytes(b"")
    assert open_direct(str(path)) is None


@pytest.mark.parametrize(
    ("direct_io", "platform_has_it"),
    [(True, True), (False, True), (True, False)],
    ids=["direct", "buffered", "no-o-direct"],
)
def test_downloads_are_identical_with_and_without_direct_io(
    remote, tmp_path, monkeypatch, direct_io, platform_has_it
):
    if not platform_has_it:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    size = 3 * 1024 * 1024 + 12_345  # several chunks, an unaligned end
    data = random.Random(7).randbytes(size)
    remote.put("ds/shard-000000.tar", data)
    (shard,) = list_shards(remote.join("ds"), storage_options=remote.storage_options)
    cache = ShardCache(tmp_path / "cache")
    with Fetcher(
        cache,
        storage_options=remote.storage_options,
        chunk_size=1024 * 1024,
        direct_io=direct_io,
    ) as fetcher:
        with fetcher.fetch(shard) as fetched:
            got = fetched.file.read()
            assert fetched.from_cache == (remote.protocol == "file")
    assert len(got) == size and zlib.crc32(got) == zlib.crc32(data)
    cache.close()
