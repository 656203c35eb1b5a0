"""index.wds: round trips, version rules, malformed input, path resolution, scan_shard."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import json
import warnings
from pathlib import Path

import pytest
import webdataset
from hypothesis import given, settings
from hypothesis import strategies as st

from wdsfs.errors import CorruptShardError, IndexFormatError
from wdsfs.index import (
    FORMAT,
    INDEX_NAME,
    VERSION,
    IndexEntry,
    ShardStats,
    dumps_index,
    loads_index,
    parse_index,
    scan_shard,
)
from wdsfs.shard import Shard

BASE = "s3://bucket/ds"
INDEX_URL = f"{BASE}/{INDEX_NAME}"
MD5 = "0123456789abcdef0123456789abcdef"


def doc(shards: object = None, **top: object) -> bytes:
    body: dict[str, object] = {"format": FORMAT, "version": VERSION}
    body["shards"] = (
        [{"path": "train/a.tar", "size": 10, "num_samples": 2, "md5": MD5}]
        if shards is None
        else shards
    )
    body.update(top)
    return json.dumps(body).encode()


def test_constants() -> None:
    assert INDEX_NAME == "index.wds" and FORMAT == "wdsfs-index" and VERSION == 1


def test_parse_relative_and_absolute_paths() -> None:
    data = doc(
        [
            {"path": "train/shard-000000.tar", "size": 100, "num_samples": 7, "md5": MD5.upper()},
            {"path": "gs://other/x.tar.gz", "size": 0, "num_samples": 0, "md5": MD5},
        ]
    )
    digest = f"md5:{MD5}"
    expected = [
        Shard(f"{BASE}/train/shard-000000.tar", 100, digest, digest, 7),
        Shard("gs://other/x.tar.gz", 0, digest, digest, 0),
    ]
    assert parse_index(data, base_url=BASE) == expected
    assert parse_index(data, base_url=BASE + "/") == expected
    local = parse_index(data, base_url="file:///data/ds")
    assert local[0].url == "file:///data/ds/train/shard-000000.tar"


def test_unknown_keys_and_optional_fields_are_ignored() -> None:
    shard = {"path": "a.tar", "size": 1, "num_samples": 1, "md5": MD5, "etag": "x", "extra": [1]}
    data = doc([shard], created="2025-01-01T00:00:00Z", tool="t", future={"x": 1})
    assert loads_index(data, url=INDEX_URL) == [IndexEntry("a.tar", 1, 1, MD5)]
    assert loads_index(b"\xef\xbb\xbf" + data, url=INDEX_URL) == [IndexEntry("a.tar", 1, 1, MD5)]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\xfe{", "not UTF-8"),
        (b"{", "not valid JSON: .*line 1"),
        (b"[]", "expected a JSON object, got list"),
        (json.dumps({"version": 1, "shards": []}).encode(), "not a wdsfs index"),
        (doc(format="webdataset"), "not a wdsfs index"),
        (doc(version=2), "version 2 is newer.*upgrade wdsfs"),
        (doc(version="1"), "'version' must be a positive integer"),
        (doc(version=True), "'version' must be a positive integer"),
        (doc(version=0), "'version' must be a positive integer"),
        (doc(shards={"a": 1}), "'shards' must be a list, got dict"),
        (doc([3]), r"shards\[0\]: expected an object, got int"),
        (doc([{"path": "a.tar"}]), r"shards\[0\]: missing 'size', 'num_samples', 'md5'"),
        (doc([{"path": "", "size": 1, "num_samples": 1, "md5": MD5}]), "non-empty string"),
        (doc([{"path": 5, "size": 1, "num_samples": 1, "md5": MD5}]), "non-empty string"),
        (doc([{"path": "../a.tar", "size": 1, "num_samples": 1, "md5": MD5}]), "relative"),
        (doc([{"path": "/abs/a.tar", "size": 1, "num_samples": 1, "md5": MD5}]), "relative"),
        (doc([{"path": "a//b.tar", "size": 1, "num_samples": 1, "md5": MD5}]), "relative"),
        (doc([{"path": "a.tar", "size": -1, "num_samples": 1, "md5": MD5}]), "'size' must"),
        (doc([{"path": "a.tar", "size": 1.5, "num_samples": 1, "md5": MD5}]), "'size' must"),
        (doc([{"path": "a.tar", "size": 1, "num_samples": "2", "md5": MD5}]), "'num_samples'"),
        (doc([{"path": "a.tar", "size": 1, "num_samples": True, "md5": MD5}]), "'num_samples'"),
        (doc([{"path": "a.tar", "size": 1, "num_samples": 1, "md5": "abc"}]), "32 hex digits"),
        (doc([{"path": "a.tar", "size": 1, "num_samples": 1, "md5": None}]), "32 hex digits"),
        (
            doc([{"path": "a.tar", "size": 1, "num_samples": 1, "md5": MD5}] * 2),
            r"shards\[1\]: path 'a.tar' is listed twice",
        ),
    ],
)
def test_malformed_index(data: bytes, match: str) -> None:
    with pytest.raises(IndexFormatError, match=match) as info:
        parse_index(data, base_url=BASE)
    assert info.value.url == INDEX_URL
    assert str(info.value).startswith(INDEX_URL + ": ")
    assert info.value.__cause__ is None  # no JSONDecodeError/KeyError traceback chained


paths = st.lists(
    st.text(alphabet="abz019_-.é", min_size=1, max_size=8).filter(lambda p: p not in {".", ".."}),
    min_size=1,
    max_size=3,
).map("/".join) | st.text(alphabet="abc/", min_size=1, max_size=8).map(lambda p: "s3://bucket/" + p)
entries = st.lists(
    st.builds(
        IndexEntry,
        path=paths,
        size=st.integers(0, 2**63),
        num_samples=st.integers(0, 10**9),
        md5=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    ),
    max_size=20,
    unique_by=lambda e: e.path,
)


@given(entries, st.none() | st.text(max_size=20), st.none() | st.text(max_size=20))
@settings(max_examples=200)
def test_round_trip(items: list[IndexEntry], created: str | None, tool: str | None) -> None:
    data = dumps_index(items, created=created, tool=tool)
    assert loads_index(data, url=INDEX_URL) == items
    top = json.loads(data)
    assert top["format"] == FORMAT and top["version"] == VERSION
    assert top.get("created") == created and top.get("tool") == tool
    assert data.count(b"\n") == len(items) + 3  # one shard per line
    shards = parse_index(data, base_url=BASE)
    assert [s.num_samples for s in shards] == [e.num_samples for e in items]
    assert all(s.url.startswith(("s3://bucket/", BASE + "/")) for s in shards)


def test_dumps_rejects_what_loads_would() -> None:
    with pytest.raises(ValueError, match="entry 0: 'md5'"):
        dumps_index([IndexEntry("a.tar", 1, 1, "nope")])
    with pytest.raises(ValueError, match="entry 1: path 'a.tar' is listed twice"):
        dumps_index([IndexEntry("a.tar", 1, 1, MD5)] * 2)
    with pytest.raises(ValueError, match="relative"):
        dumps_index([IndexEntry("../a.tar", 1, 1, MD5)])
    upper = dumps_index([IndexEntry("a.tar", 1, 1, MD5.upper())])
    assert loads_index(upper, url="x")[0].md5 == MD5


def write_shard(path: Path, count: int) -> None:
    with webdataset.TarWriter(str(path)) as sink:
        for i in range(count):
            sink.write({"__key__": f"{i:05d}", "txt": b"x" * (i * 37), "cls": b"%d" % i})


def webdataset_count(path: Path) -> int:
    with warnings.catch_warnings():  # webdataset leaves its file to the garbage collector
        warnings.simplefilter("ignore", ResourceWarning)
        dataset = webdataset.WebDataset(str(path), shardshuffle=False)
        count = sum(1 for _ in dataset)
        del dataset
        gc.collect()
    return count


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_scan_shard_matches_md5_and_webdataset(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"shard-000000{suffix}"
    write_shard(path, 57)
    with open(path, "rb") as f:
        stats = scan_shard(f, url=str(path))
    data = path.read_bytes()
    assert stats == ShardStats(len(data), 57, hashlib.md5(data).hexdigest())
    assert stats.num_samples == webdataset_count(path)
    # the same through a non-seekable stream, and with trailing padding bytes after the tar
    with_padding = data + (bytes(4096) if suffix == ".tar" else b"")
    stats2 = scan_shard(io.BufferedReader(io.BytesIO(with_padding)), url=str(path))
    assert stats2.md5 == hashlib.md5(with_padding).hexdigest()
    assert stats2.size == len(with_padding) and stats2.num_samples == 57


def test_scan_then_parse(tmp_path: Path) -> None:
    items = []
    for i, count in enumerate([3, 0, 11]):
        name = f"train/shard-{i:06d}.tar"
        (tmp_path / "train").mkdir(exist_ok=True)
        write_shard(tmp_path / name, count)
        with open(tmp_path / name, "rb") as f:
            stats = scan_shard(f, url=name)
        items.append(IndexEntry(name, stats.size, stats.num_samples, stats.md5))
    (tmp_path / INDEX_NAME).write_bytes(dumps_index(items, tool="test"))
    shards = parse_index((tmp_path / INDEX_NAME).read_bytes(), base_url=f"file://{tmp_path}")
    assert [s.num_samples for s in shards] == [3, 0, 11]
    assert shards[2].url == f"file://{tmp_path}/train/shard-000002.tar"
    assert shards[2].checksum == shards[2].version == f"md5:{items[2].md5}"


def test_scan_shard_corrupt() -> None:
    data = gzip.compress(b"not a tar" * 100)
    with pytest.raises(CorruptShardError, match="x.tar.gz"):
        scan_shard(io.BytesIO(data), url="x.tar.gz")
