"""Direct I/O writes of downloads: block alignment, padding of the last block, fallbacks."""

from __future__ import annotations

import errno
import io
import os
import random
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdsfs._direct import (
    ALIGNMENT,
    READ_BLOCK,
    BufferPool,
    DirectReader,
    DirectWriter,
    open_direct,
    read_direct,
)
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
            downloaded = direct_io and not fetched.from_cache
            assert isinstance(fetched.file, DirectReader) == (downloaded and platform_has_it)
    assert len(got) == size and zlib.crc32(got) == zlib.crc32(data)
    cache.close()


# ------------------------------------------------------------------------ direct reads


def _direct_reader(path: Path, block: int = 2 * ALIGNMENT) -> DirectReader:
    handle = open(path, "rb")  # noqa: SIM115 - owned by the reader
    reader = read_direct(handle, BufferPool(block, keep=1))
    assert isinstance(reader, DirectReader), "this filesystem should do direct I/O"
    return reader


@needs_direct_io
@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 5 * ALIGNMENT + 17),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["read", "readinto", "seek", "seek_cur", "seek_end"]),
            st.integers(-3 * ALIGNMENT, 3 * ALIGNMENT),
        ),
        max_size=25,
    ),
)
def test_direct_reads_and_seeks_match_a_buffered_file(tmp_path_factory, size, steps):
    data = random.Random(size).randbytes(size)
    path = tmp_path_factory.mktemp("direct") / "in"
    path.write_bytes(data)
    with open(path, "rb") as expected, _direct_reader(path) as reader:
        for op, n in steps:
            if op == "read":
                assert reader.read(abs(n)) == expected.read(abs(n))
            elif op == "readinto":
                ours, theirs = bytearray(abs(n)), bytearray(abs(n))
                assert reader.readinto(ours) == expected.readinto(theirs)
                assert ours == theirs
            else:
                whence = {"seek": os.SEEK_SET, "seek_cur": os.SEEK_CUR, "seek_end": os.SEEK_END}
                target = {"seek": 0, "seek_cur": expected.tell(), "seek_end": size}[op] + n
                if target < 0:
                    with pytest.raises(OSError):
                        reader.seek(n, whence[op])
                    continue
                assert reader.seek(n, whence[op]) == expected.seek(n, whence[op])
            assert reader.tell() == expected.tell()
        assert reader.read() == expected.read()


@needs_direct_io
def test_a_direct_reader_reads_a_deleted_file_and_returns_its_buffer(tmp_path):
    data = random.Random(1).randbytes(3 * ALIGNMENT + 5)
    path = tmp_path / "in"
    path.write_bytes(data)
    pool = BufferPool(ALIGNMENT, keep=1)
    reader = read_direct(open(path, "rb"), pool)  # noqa: SIM115
    assert isinstance(reader, DirectReader) and reader.name == str(path)
    path.unlink()  # a cache eviction while the shard is being read
    assert io.BufferedReader(reader, 100).read() == data  # as the tar reader wraps it
    reader.close()
    assert reader.closed and len(pool._free) == 1
    with pytest.raises(ValueError):
        reader.read(1)


def test_without_o_direct_the_handle_stays_buffered(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    path = tmp_path / "in"
    path.write_bytes(b"abc")
    with open(path, "rb") as handle:
        assert read_direct(handle, BufferPool(ALIGNMENT, keep=1)) is handle


@needs_direct_io
def test_a_refused_direct_read_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT on open() and fcntl() but refuse the reads (EINVAL)."""
    import fcntl

    data = random.Random(2).randbytes(ALIGNMENT + 9)
    path = tmp_path / "in"
    path.write_bytes(data)
    real_preadv = os.preadv

    def refusing_preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refusing_preadv)
    with _direct_reader(path) as reader:
        assert reader.read() == data
        assert not fcntl.fcntl(reader.fileno(), fcntl.F_GETFL) & os.O_DIRECT


@needs_direct_io
def test_other_read_errors_are_raised(tmp_path, monkeypatch):
    path = tmp_path / "in"
    path.write_bytes(b"x" * 10)

    def failing_preadv(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with _direct_reader(path) as reader, pytest.raises(OSError, match="Input/output"):
        reader.read(1)


@needs_direct_io
@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
def test_the_tar_reader_reads_the_same_samples_through_a_direct_reader(tmp_path, compress):
    from tests.datasets import make_shard
    from wdsfs.tar import read_samples

    name = "shard.tar.gz" if compress else "shard.tar"
    path = tmp_path / name
    path.write_bytes(make_shard(0, 30, payload=5_000, compress=compress))
    with open(path, "rb") as plain:
        expected = list(read_samples(plain, url=str(path)))
    with _direct_reader(path, block=READ_BLOCK) as reader:
        assert list(read_samples(reader, url=str(path))) == expected
    with _direct_reader(path) as reader:  # every 3rd sample: seeks past the others' members
        picked = list(read_samples(reader, url=str(path), select=lambda i: i % 3 == 0))
    assert picked == [s for s in expected if s[0] % 3 == 0]
