"""Checksums: parsing, CRC combination, and object digests over out-of-order chunks."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import zlib

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdsfs.checksum import Checksum, ObjectDigest, best, crc_combine

CRC = {"crc32": zlib.crc32, "crc32c": google_crc32c.value}


def reference(algorithm: str, data: bytes) -> str:
    if algorithm == "md5":
        return hashlib.md5(data).hexdigest()
    return f"{CRC[algorithm](data):08x}"


def test_parse_and_format() -> None:
    assert Checksum.parse("crc32:0D4A1185") == Checksum("crc32", "0d4a1185")
    assert str(Checksum.parse("md5:" + "a" * 32)) == "md5:" + "a" * 32
    assert Checksum.parse(None) is None
    assert Checksum.parse("sha1:abcd") is None  # unknown algorithms are not checked
    with pytest.raises(ValueError, match="8 lower-case hex"):
        Checksum.parse("crc32c:123")
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        Checksum("sha256", "00")


def test_best_prefers_the_cheapest() -> None:
    md5 = Checksum("md5", "0" * 32)
    crc32 = Checksum("crc32", "0" * 8)
    crc32c = Checksum("crc32c", "1" * 8)
    assert best([md5, None, crc32]) == crc32
    assert best([crc32, crc32c, md5]) == crc32c
    assert best([None]) is None


@settings(max_examples=200, deadline=None)
@given(
    algorithm=st.sampled_from(["crc32", "crc32c"]),
    first=st.binary(max_size=300),
    second=st.binary(max_size=3000),
)
def test_crc_combine_equals_the_crc_of_the_concatenation(
    algorithm: str, first: bytes, second: bytes
) -> None:
    crc = CRC[algorithm]
    assert crc_combine(algorithm, crc(first), crc(second), len(second)) == crc(first + second)


def test_crc_combine_large_lengths() -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    for algorithm, crc in CRC.items():
        cut = 1024 * 1024 + 3
        assert crc_combine(algorithm, crc(data[:cut]), crc(data[cut:]), len(data) - cut) == crc(
            data
        )


@settings(max_examples=60, deadline=None)
@given(
    algorithm=st.sampled_from(["crc32", "crc32c", "md5"]),
    size=st.integers(0, 5000),
    cuts=st.lists(st.integers(1, 4999), max_size=8),
    pieces=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_object_digest_of_chunks_done_in_any_order(
    tmp_path_factory: pytest.TempPathFactory,
    algorithm: str,
    size: int,
    cuts: list[int],
    pieces: int,
    seed: int,
) -> None:
    data = random.Random(seed).randbytes(size)
    bounds = sorted({0, size, *(c for c in cuts if c < size)})
    chunks = list(itertools.pairwise(bounds))
    random.Random(seed).shuffle(chunks)
    path = tmp_path_factory.mktemp("d") / "object"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        digest = ObjectDigest(algorithm, fd)
        for start, end in chunks:
            chunk = digest.chunk(start)
            step = max(1, -(-(end - start) // pieces))
            for offset in range(start, end, step):
                piece = data[offset : min(offset + step, end)]
                os.pwrite(fd, piece, offset)
                chunk.update(piece)
            digest.done(chunk)
        assert digest.length == size
        assert digest.hexdigest() == reference(algorithm, data)
    finally:
        os.close(fd)


def test_object_digest_refuses_a_gap(tmp_path) -> None:
    fd = os.open(tmp_path / "o", os.O_RDWR | os.O_CREAT)
    try:
        digest = ObjectDigest("crc32", fd)
        chunk = digest.chunk(10)
        chunk.update(b"x" * 5)
        digest.done(chunk)
        with pytest.raises(ValueError, match="gap"):
            digest.hexdigest()
    finally:
        os.close(fd)


def test_object_digest_without_algorithm_counts_bytes(tmp_path) -> None:
    fd = os.open(tmp_path / "o", os.O_RDWR | os.O_CREAT)
    try:
        digest = ObjectDigest(None, fd)
        chunk = digest.chunk(0)
        chunk.update(b"abc")
        digest.done(chunk)
        assert (digest.length, digest.hexdigest()) == (3, None)
    finally:
        os.close(fd)


def test_md5_read_back_failure_never_leaves_hexdigest_waiting(tmp_path) -> None:
    fd = os.open(tmp_path / "o", os.O_RDWR | os.O_CREAT)
    digest = ObjectDigest("md5", fd)
    os.close(fd)  # the read-back fails
    chunk = digest.chunk(0)
    chunk.update(b"abc")
    with pytest.raises(OSError):
        digest.done(chunk)
    with pytest.raises(ValueError, match="MD5"):
        digest.hexdigest()  # returns at once instead of waiting for the dead hasher
