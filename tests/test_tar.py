"""TarReader: the same samples as webdataset, strict errors, select/stop, compression."""

from __future__ import annotations

import bz2
import gc
import gzip
import io
import logging
import lzma
import pickle
import re
import sys
import tarfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest
import webdataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webdataset import tariterators

from wdsfs._tar_format import TarParser, plain_header
from wdsfs.errors import CorruptShardError
from wdsfs.tar import COMPRESSIONS, TAR_SUFFIXES, _split, count_samples, read_samples

URL = "s3://bucket/ds/shard-000000.tar"

Member = tuple[str, bytes] | tarfile.TarInfo


# ----------------------------------------------------------------------------- helpers


def make_tar(members: Iterable[Member], *, fmt: int = tarfile.GNU_FORMAT, mode: str = "w") -> bytes:
    """A tar written by tarfile: (name, data) pairs are files, TarInfos are added as is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tf:  # type: ignore[call-overload]
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def wds_samples(data: bytes, url: str = URL) -> list[dict[str, object]]:
    """What webdataset's own tar iterators make of ``data`` (tarfile "r|*" + group_by_keys)."""
    files = tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    return list(tariterators.group_by_keys(files))


def wds_pipeline(path: Path) -> list[dict[str, object]]:
    """What ``webdataset.WebDataset(path, shardshuffle=False)`` yields (``__local_path__`` dropped).

    webdataset leaves its shard file for the garbage collector to close: collect inside a block
    that ignores that ResourceWarning (pytest turns warnings into errors).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        dataset = webdataset.WebDataset(str(path), shardshuffle=False)
        samples = list(dataset)
        del dataset
        gc.collect()
    for sample in samples:
        sample.pop("__local_path__", None)
    return samples


def ours(data: bytes, url: str = URL, **kwargs: object) -> list[dict[str, object]]:
    return [sample for _, sample in read_samples(io.BytesIO(data), url=url, **kwargs)]  # type: ignore[arg-type]


def assert_corrupt(
    data: bytes | io.IOBase, match: str, url: str = URL, **kwargs: object
) -> CorruptShardError:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    with pytest.raises(CorruptShardError, match=match) as info:
        for _ in read_samples(stream, url=url, **kwargs):  # type: ignore[arg-type]
            pass
    assert info.value.url == url
    assert url in str(info.value)
    assert "byte" in str(info.value)
    return info.value


class NonSeekable(io.RawIOBase):
    """A forward-only stream (like an HTTP body) that records how far it was read."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data[self.pos : self.pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


class ReadTracker(io.BytesIO):
    """A seekable BytesIO that counts the bytes read (not those seeked over)."""

    furthest = 0  # bytes read

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.furthest += len(data)
        return data


def sample_dicts(n: int, size: int = 700) -> list[dict[str, object]]:
    return [
        {
            "__key__": f"sample{i:04d}",
            "jpg": bytes([i % 256]) * (size + i),
            "json": b'{"i": %d}' % i,
            "cls": str(i % 7).encode(),
            "seg.png": b"\x89PNG" * i,
            "empty": b"",
        }
        for i in range(n)
    ]


def write_with_tarwriter(path: Path, samples: list[dict[str, object]]) -> None:
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


# ------------------------------------------------------------- equality with webdataset


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tarwriter_dataset_reads_like_webdataset(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"shard-000000{suffix}"
    write_with_tarwriter(path, sample_dicts(25))
    expected = wds_pipeline(path)
    with open(path, "rb") as f:
        got = list(read_samples(f, url=str(path)))
    assert [sample for _, sample in got] == expected
    assert [index for index, _ in got] == list(range(25))
    assert all(s["__url__"] == str(path) for _, s in got)
    assert expected[3]["seg.png"] == b"\x89PNG" * 3 and expected[0]["empty"] == b""


NAMES = [
    ("a/b/x.seg.png", b"seg"),
    ("a/b/x.JPG", b"upper-case extension"),
    ("a/b/x.json", b"{}"),
    ("top.txt", b"top"),
    ("d" * 120 + "/long.name.with.dots.txt", b"long name"),
    ("dir.with.dots/y.cls", b"3"),
    ("dir.with.dots/y.tar.gz", b"nested extension"),
    ("README", b"no extension: skipped"),
    ("__meta__", b"webdataset metadata: skipped"),
    ("__meta__/inside.json", b"skipped too"),
    ("__k__.txt", b"a key that looks like metadata"),
    ("d/.hidden", b"key 'd/', field 'hidden' (webdataset's regex)"),
    (".toplevel", b"skipped"),
    ("x.", b"empty field name"),
    ("ünïcödé/ñame.txt", b"non-ASCII"),
    ("z", b""),
    ("zero.bin", b""),
    ("block.bin", b"\x01" * 512),
    ("twoblocks.bin", b"\x02" * 1024),
]


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu-longname", "pax-path"]
)
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tarfile_archives_read_like_webdataset(fmt: int, mode: str) -> None:
    members: list[Member] = [
        special("a", tarfile.DIRTYPE),
        special("a/b", tarfile.DIRTYPE),
        *NAMES[:4],
        special("a/link.txt", tarfile.SYMTYPE, "top.txt"),
        special("hard.txt", tarfile.LNKTYPE, "top.txt"),
        *NAMES[4:],
    ]
    data = make_tar(members, fmt=fmt, mode=mode)
    expected = wds_samples(data)
    assert len(expected) > 10
    assert ours(data) == expected
    assert count_samples(io.BytesIO(data), url=URL) == len(expected)


def test_ustar_prefix_names() -> None:
    name = "p" * 90 + "/" + "q" * 60 + "/file.name.txt"  # > 100: split into prefix + name
    data = make_tar([(name, b"x"), ("short.txt", b"y")], fmt=tarfile.USTAR_FORMAT)
    assert data[345:350] == b"ppppp"
    assert ours(data) == wds_samples(data)
    assert ours(data)[0]["__key__"] == "p" * 90 + "/" + "q" * 60 + "/file"


def test_webdataset_pipeline_on_a_file_of_odd_members(tmp_path: Path) -> None:
    path = tmp_path / "odd.tar"
    path.write_bytes(make_tar(NAMES, fmt=tarfile.PAX_FORMAT))
    expected = wds_pipeline(path)
    with open(path, "rb", buffering=0) as f:  # a raw FileIO: wrapped, then released
        assert [s for _, s in read_samples(f, url=str(path))] == expected
        assert not f.closed


member_names = st.text(alphabet=st.sampled_from(list("ab./_-Xé\n")), min_size=0, max_size=12)


@given(member_names)
@settings(max_examples=500)
def test_split_is_webdatasets_rule(name: str) -> None:
    skipped = ("/" not in name and name.startswith("__") and name.endswith("__")) or re.match(
        r"__[^/]*__($|/)", name
    )
    expected = (None, None) if skipped else tariterators.base_plus_ext(name)
    assert _split(name) == expected


keys = st.text(alphabet="abcXYZ019_-/.", min_size=1, max_size=8).filter(
    lambda k: "." not in k.rsplit("/", 1)[-1] and not k.endswith("/") and "//" not in k
)
extensions = st.text(alphabet="abcJPG.", min_size=1, max_size=6).filter(
    lambda e: not e.startswith(".") and not e.endswith(".")
)
sizes = st.sampled_from([0, 1, 511, 512, 513, 1024, 1500]) | st.integers(0, 3000)


@st.composite
def archives(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Contiguous samples with distinct keys and distinct (lower-cased) fields."""
    names = draw(st.lists(keys, min_size=0, max_size=6, unique=True))
    members = []
    for number, key in enumerate(names):
        exts = draw(st.lists(extensions, min_size=1, max_size=4, unique_by=str.lower))
        for ext in exts:
            size = draw(sizes)
            members.append((f"{key}.{ext}", bytes([number % 256]) * size))
    return members


@given(archives(), st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_generated_archives_read_like_webdataset(
    members: list[tuple[str, bytes]], fmt: int
) -> None:
    data = make_tar(members, fmt=fmt)
    expected = wds_samples(data)
    assert ours(data) == expected
    assert [s for _, s in read_samples(NonSeekable(data), url=URL)] == expected
    got = list(read_samples(io.BytesIO(data), url=URL, select=lambda i: i % 2 == 1))
    assert got == [(i, s) for i, s in enumerate(expected) if i % 2 == 1]
    assert count_samples(NonSeekable(data), url=URL) == len(expected)


# ------------------------------------------------------------------------ select / stop


def test_select_calls_once_per_sample_in_order_and_skips_bytes() -> None:
    data = make_tar([(f"s{i}.{e}", b"z" * 3000) for i in range(6) for e in ("a", "b")])
    calls: list[int] = []

    def select(index: int) -> bool:
        calls.append(index)
        return index in (1, 4)

    got = list(read_samples(io.BytesIO(data), url=URL, select=select))
    assert calls == list(range(6))
    assert [(i, s["__key__"]) for i, s in got] == [(1, "s1"), (4, "s4")]
    assert got[0][1]["a"] == b"z" * 3000


@pytest.mark.parametrize("stream", ["seekable", "non-seekable"])
def test_stop_reads_no_further_than_the_next_header(stream: str) -> None:
    members = [("s0.a", b"0" * 100), ("s0.b", b"1" * 100), ("s1.a", b"2" * 100_000)]
    data = make_tar(members)
    f: io.IOBase = ReadTracker(data) if stream == "seekable" else NonSeekable(data)
    got = list(read_samples(f, url=URL, stop=1))  # type: ignore[arg-type]
    assert [s["__key__"] for _, s in got] == ["s0"]
    position = f.furthest if isinstance(f, ReadTracker) else f.pos  # type: ignore[attr-defined]
    assert position < 70_000  # s1's data is never read (buffering reads at most 64 KiB ahead)
    assert list(read_samples(io.BytesIO(data), url=URL, stop=0)) == []
    assert len(list(read_samples(io.BytesIO(data), url=URL, stop=5))) == 2
    with pytest.raises(ValueError, match="stop"):
        read_samples(io.BytesIO(data), url=URL, stop=-1)


def test_select_false_seeks_over_data_of_a_seekable_file() -> None:
    data = make_tar([("big.bin", b"b" * 1_000_000), ("small.txt", b"s")])
    f = ReadTracker(data)
    assert count_samples(f, url=URL) == 2
    assert f.furthest < 200_000


def test_stop_with_select() -> None:
    data = make_tar([(f"s{i}.txt", b"%d" % i) for i in range(10)])
    got = list(read_samples(io.BytesIO(data), url=URL, select=lambda i: i >= 5, stop=7))
    assert [i for i, _ in got] == [5, 6]


# ------------------------------------------------------------------------------- errors


def test_non_contiguous_key() -> None:
    data = make_tar([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")])
    err = assert_corrupt(data, "not contiguous: key 'a'.*'a.txt'.*byte offset 2048")
    assert "b" in str(err)
    # also when the samples are not selected
    assert_corrupt(data, "not contiguous", select=lambda i: False)
    # the samples before the error were yielded
    it = read_samples(io.BytesIO(data), url=URL)
    assert [s["__key__"] for _, s in (next(it), next(it))] == ["a", "b"]


@pytest.mark.parametrize("second", ["a.jpg", "a.JPG"])
def test_duplicate_field(second: str) -> None:
    data = make_tar([("a.jpg", b"1"), (second, b"2")])
    assert_corrupt(data, f"duplicate field 'jpg' in sample 'a'.*{second}.*byte offset 1024")
    assert_corrupt(data, "duplicate field", select=lambda i: False)


def test_field_colliding_with_metadata_is_a_duplicate() -> None:
    assert_corrupt(make_tar([("a.__key__", b"1")]), "duplicate field '__key__'")


def boundaries(data: bytes) -> tuple[list[int], int]:
    """Header offsets of the members, and where the end-of-archive blocks start."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        offsets = [m.offset for m in members]
        last = members[-1]
        end = last.offset_data + (last.size + 511) // 512 * 512
    return offsets, end


def test_truncation_at_every_offset_raises_or_stops_at_a_boundary() -> None:
    members: list[Member] = [
        ("s0.jpg", b"j" * 700),
        ("s0.json", b"{}"),
        ("s1." + "x" * 150, b"long extension: a GNU long-name header"),
        special("dir", tarfile.DIRTYPE),
        ("s2.bin", b"\0" * 1024),
        ("s3.txt", b""),
    ]
    data = make_tar(members)
    offsets, end = boundaries(data)
    full = ours(data)
    accepted = []
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        if cut == 0:
            assert_corrupt(prefix, "empty file")
            continue
        if cut in offsets[1:] or cut in (end, end + 512) or cut >= end + 1024:
            got = ours(prefix)
            assert got == wds_samples(prefix)
            if cut >= end:
                assert got == full
            else:  # the members entirely before the cut, grouped
                assert len(got) <= len(full)
            accepted.append(cut)
            if cut < end:
                assert_corrupt(prefix, "no end-of-archive", strict_end=True)
        else:
            assert_corrupt(prefix, "truncated|extended header")
            assert_corrupt(NonSeekable(prefix), "truncated|extended header")
            assert_corrupt(prefix, "truncated|extended header", select=lambda i: False)
    assert len(accepted) > 5


def test_truncated_inside_data_skipped_by_seeking(tmp_path: Path) -> None:
    data = make_tar([("a.bin", b"a" * 10_000), ("b.bin", b"b" * 10_000)])
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: 512 + 10_240 + 512 + 5_000])  # inside b.bin's data
    with open(path, "rb") as f, pytest.raises(CorruptShardError, match="file ends at byte"):
        count_samples(f, url=URL)
    with open(path, "rb") as f:
        assert_corrupt(f, "truncated", select=lambda i: i == 0)


def test_missing_end_blocks_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = make_tar([("a.txt", b"1"), ("b.txt", b"2")])
    _, end = boundaries(data)
    with caplog.at_level(logging.WARNING, logger="wdsfs.tar"):
        assert ours(data[:end]) == ours(data) == wds_samples(data[:end])
    assert any(
        "no end-of-archive" in r.getMessage() and URL in r.getMessage() for r in caplog.records
    )
    assert_corrupt(data[:end], "no end-of-archive", strict_end=True)


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1 :]


@pytest.mark.parametrize("where", [0, 50, 124, 148, 156, 300, 511])
def test_bad_header_checksum(where: int) -> None:
    data = make_tar([("a.txt", b"1"), ("b.txt", b"2")])
    assert_corrupt(flip(data, 1024 + where), "checksum.*byte offset 1024")


def test_garbage() -> None:
    assert_corrupt(b"hello, this is not a tar file\n" * 40, "checksum.*byte offset 0")
    assert_corrupt(b"x" * 100, "truncated.*header")
    assert_corrupt(b"", "empty file")
    assert ours(bytes(1024)) == []  # an empty archive
    assert ours(bytes(10240)) == []


def test_zero_block_followed_by_data() -> None:
    data = make_tar([("a.txt", b"1")])
    _, end = boundaries(data)
    header = make_tar([("b.txt", b"2")])[:1024]
    assert_corrupt(data[:end] + bytes(512) + header, "zero block followed by data")
    # after two zero blocks nothing is read (a concatenated tar's rest is ignored, as tarfile)
    assert ours(data[:end] + bytes(1024) + header) == ours(data)
    assert ours(data[:end] + bytes(512)) == ours(data)  # a lone zero block ends it


def test_extended_header_without_member() -> None:
    data = make_tar([("x" * 200 + ".txt", b"1")])  # GNU 'L' header, then the member
    assert data[156:157] == b"L"
    assert_corrupt(data[:1024] + bytes(1024), "extended header not followed by a member")


def retype(data: bytes, offset: int, flag: bytes) -> bytes:
    """Change the type flag of the header at ``offset`` and fix its checksum."""
    block = bytearray(data[offset : offset + 512])
    block[156:157] = flag
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:offset] + bytes(block) + data[offset + 512 :]


def test_unknown_member_type_is_skipped_with_its_data() -> None:
    data = make_tar([("a.txt", b"1"), ("v.txt", b"volume" * 200), ("b.txt", b"2")])
    data = retype(data, 1024, b"V")
    assert [s["__key__"] for s in ours(data)] == ["a", "b"]
    assert ours(data) == wds_samples(data)


def test_sparse_members_are_rejected() -> None:
    data = retype(make_tar([("a.txt", b"1")]), 0, b"S")
    assert_corrupt(data, "sparse")


def test_signed_checksum_and_base256_size() -> None:
    data = bytearray(make_tar([("é.txt", b"hello"), ("b.txt", b"x")]))
    block = data[:512]
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)  # old Sun tar
    block[124:136] = b"\x80" + (5).to_bytes(11, "big")  # base-256 size (GNU, > 8 GiB)
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    data[:512] = block
    assert ours(bytes(data)) == wds_samples(bytes(data))
    assert ours(bytes(data))[0]["txt"] == b"hello"
    block[124] = 0xFF  # negative base-256
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data[:512] = block
    assert_corrupt(bytes(data), "negative")


def test_plain_headers_take_the_fast_path() -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        data = make_tar([("dir/a.seg.png", b"x" * 700), ("b" * 100, b"")], fmt=fmt)
        assert plain_header(data[:512]) == ("dir/a.seg.png", 700)
        assert plain_header(data[1536:2048]) == ("b" * 100, 0)  # a name of all 100 bytes
    assert plain_header(bytes(512)) is None  # zero block
    v7_dir = bytearray(make_tar([("d/", b"")])[:512])  # a v7 directory: type NUL, name "d/"
    v7_dir[156] = 0
    v7_dir[148:156] = b" " * 8
    v7_dir[148:156] = b"%06o\0 " % sum(v7_dir)
    assert plain_header(bytes(v7_dir)) is None
    assert TarParser(io.BytesIO(), URL, b"", True).header(bytes(v7_dir), 0)[1] == 0x35
    assert plain_header(make_tar([("a.txt", b"1")])[:511]) is None


_FIELD_BYTES = st.sampled_from([0, 0x20, 0x2F, 0x30, 0x35, 0x37, 0x38, 0x2D, 0x80, 0xFF, 0x61])


@given(
    st.sampled_from([tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
    st.lists(
        st.tuples(st.sampled_from([*range(0, 6), 99, *range(124, 157), 345, 346]), _FIELD_BYTES),
        max_size=4,
    ),
    st.booleans(),
)
@settings(max_examples=400)
def test_the_fast_path_agrees_with_the_full_header_parser(
    fmt: int, changes: list[tuple[int, int]], fix_checksum: bool
) -> None:
    """Whatever a header holds, the fast path gives the full parser's (name, size) or None."""
    block = bytearray(make_tar([("k/sample.jpg", b"x" * 1300)], fmt=fmt)[:512])
    for offset, value in changes:
        block[offset] = value
    if fix_checksum:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    plain = plain_header(bytes(block))
    parser = TarParser(io.BytesIO(), URL, b"", True)
    try:
        name, flag, size = parser.header(bytes(block), 0)
    except CorruptShardError:
        assert plain is None
        return
    if plain is not None:
        assert flag in b"0\0"
        assert plain == (name, size)


def pax_header(records: dict[str, str]) -> bytes:
    create = tarfile.TarInfo._create_pax_generic_header  # type: ignore[attr-defined]
    return bytes(create(records, tarfile.XHDTYPE, "utf-8"))


def test_pax_size_and_path_override_the_ustar_fields() -> None:
    body = make_tar([("short.txt", b"")], fmt=tarfile.USTAR_FORMAT)[:512]  # size field 0
    data = pax_header({"size": "5", "path": "real/name.TXT"}) + body + b"hello" + bytes(507 + 1024)
    assert (
        ours(data)
        == wds_samples(data)
        == [{"__key__": "real/name", "__url__": URL, "txt": b"hello"}]
    )


def test_global_pax_header_is_ignored() -> None:
    glob = tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
        {"comment": "hi"}, tarfile.XGLTYPE, "utf-8"
    )
    data = glob + make_tar([("a.txt", b"1")])
    assert ours(data) == wds_samples(data)


@pytest.mark.parametrize(
    "records",
    [b"5 a=b\n", b"xx path=a\n", b"100 path=a.txt\n", b"10 path=a.t", b"11 patha.txt\n"],
)
def test_malformed_pax_records(records: bytes) -> None:
    header = pax_header({"path": "a.txt"})
    block = bytearray(header[:512])
    size = len(records)
    block[124:136] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data = bytes(block) + records + bytes(-size % 512) + make_tar([("a.txt", b"1")])
    assert_corrupt(data, "pax")


# -------------------------------------------------------------------------- compression


def test_suffixes_and_compressions() -> None:
    assert TAR_SUFFIXES[:3] == (".tar", ".tar.gz", ".tgz")
    assert {".tar.bz2", ".tar.xz", ".tar.zst"} <= set(TAR_SUFFIXES)
    assert COMPRESSIONS == ("none", "gzip", "bz2", "xz", "zstd")
    with pytest.raises(ValueError, match="unknown compression 'lz4'"):
        read_samples(io.BytesIO(b""), url=URL, compression="lz4")


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "bz2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    import zstandard

    return bytes(zstandard.ZstdCompressor().compress(data))


SUFFIX = {"gzip": ".tar.gz", "bz2": ".tar.bz2", "xz": ".tar.xz", "zstd": ".tar.zst"}


@pytest.mark.parametrize("kind", ["gzip", "bz2", "xz", "zstd"])
def test_compressed_by_suffix_sniffed_or_explicit(kind: str) -> None:
    plain = make_tar([(f"s{i}.{e}", bytes([i]) * 2000) for i in range(20) for e in ("a", "b")])
    data = compress(plain, kind)
    expected = ours(plain)
    url = "s3://b/shard" + SUFFIX[kind]
    assert ours(data, url=url) == [{**s, "__url__": url} for s in expected]
    assert ours(data) == expected  # named .tar: sniffed, as tarfile "r|*"
    assert ours(data, url="x", compression=kind) == [{**s, "__url__": "x"} for s in expected]
    got = [s for _, s in read_samples(NonSeekable(data), url=URL, select=lambda i: i > 15)]
    assert got == expected[16:]
    assert count_samples(NonSeekable(data), url=url) == 20
    # concatenated streams (pigz/pbzip2/pzstd style), with zero padding after them
    offsets, _ = boundaries(plain)
    cut = offsets[len(offsets) // 2]
    joined = compress(plain[:cut], kind) + compress(plain[cut:], kind) + bytes(100)
    assert ours(joined, url=url) == ours(data, url=url)


@pytest.mark.parametrize("kind", ["gzip", "bz2", "xz", "zstd"])
def test_truncated_or_corrupt_compressed_stream(kind: str) -> None:
    plain = make_tar([(f"s{i}.bin", bytes([i]) * 3000) for i in range(5)])
    data = compress(plain, kind)
    url = "s3://b/shard" + SUFFIX[kind]
    step = max(1, len(data) // 60)
    for cut in [*range(1, len(data), step), len(data) - 1]:
        assert_corrupt(data[:cut], f"{kind}|truncated|checksum", url=url)
    assert_corrupt(data + b"garbage!", kind, url=url)
    middle = len(data) // 2
    broken = (
        data[:middle] + bytes(b ^ 0x55 for b in data[middle : middle + 16]) + data[middle + 16 :]
    )
    assert_corrupt(broken, f"{kind}|checksum|truncated|offset", url=url)


def test_gzip_is_streamed_not_loaded(tmp_path: Path) -> None:
    """A large .tar.gz read from a forward-only stream keeps memory bounded."""
    import tracemalloc

    plain = make_tar([(f"s{i}.bin", bytes([i]) * 200_000) for i in range(100)])
    data = gzip.compress(plain, compresslevel=1)
    tracemalloc.start()
    try:
        assert count_samples(NonSeekable(data), url="x.tar.gz") == 100
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plain) > 20_000_000 and peak < 8_000_000


def test_zstd_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    with pytest.raises(ImportError, match="pip install zstandard"):
        read_samples(io.BytesIO(b""), url="s3://b/x.tar.zst")


def test_error_pickles() -> None:
    err = assert_corrupt(b"x" * 600, "checksum")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CorruptShardError and again.url == URL and str(again) == str(err)


def test_fsspec_file_object() -> None:
    import fsspec

    data = make_tar([(f"s{i}.txt", b"%d" % i) for i in range(50)])
    fs = fsspec.filesystem("memory")
    fs.pipe("/wdsfs-test/shard.tar", data)
    try:
        with fs.open("/wdsfs-test/shard.tar", "rb") as f:
            assert [s for _, s in read_samples(f, url="memory://x.tar")] == ours(
                data, url="memory://x.tar"
            )
        with fs.open("/wdsfs-test/shard.tar", "rb") as f:
            assert count_samples(f, url="memory://x.tar") == 50
    finally:
        fs.rm("/wdsfs-test", recursive=True)
