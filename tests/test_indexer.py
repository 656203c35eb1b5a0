"""build_index / write_index: list a prefix, scan each shard once, write index.wds beside it.

The behaviour is checked on every backend through the ``remote`` fixture; failure modes that do
not depend on the backend (corrupt shards, cancellation, objects changing) use ``memory://``,
and the ones that need a real transfer (MD5 from the storage, Ctrl-C mid-read) use moto.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fsspec.callbacks import Callback

from tests.datasets import make_shard, write_dataset
from tests.proxy import FaultProxy
from tests.remotes import Remote, memory_remote
from wdsfs.errors import (
    CorruptShardError,
    DownloadCancelled,
    IntegrityError,
    NoShardsError,
    ShardNotFoundError,
)
from wdsfs.index import INDEX_NAME, IndexEntry, loads_index
from wdsfs.indexer import build_index, check_writable, index_location, render_index, write_index
from wdsfs.source import list_shards

MiB = 1024 * 1024
COUNTS = [3, 4, 5]


def _expected(prefix: str = "train/") -> list[IndexEntry]:
    return [
        IndexEntry(
            path=f"{prefix}shard-{i:06d}.tar",
            size=len(make_shard(i, n)),
            num_samples=n,
            md5=hashlib.md5(make_shard(i, n)).hexdigest(),
        )
        for i, n in enumerate(COUNTS)
    ]


def _index_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("wdsfs-index")]


def test_index_is_built_written_and_then_used_instead_of_a_listing(
    remote: Remote, caplog: pytest.LogCaptureFixture
) -> None:
    write_dataset(remote.put, COUNTS, prefix="train/")
    entries = build_index(remote.url, storage_options=remote.storage_options, max_workers=2)
    assert entries == _expected()

    if remote.protocol == "http":  # read-only: a clear error, and the index can go up by hand
        with pytest.raises(ValueError, match=rf"{remote.url}/{INDEX_NAME}: cannot write"):
            write_index(remote.url, entries, storage_options=remote.storage_options)
        remote.put(INDEX_NAME, render_index(entries))
    else:
        url = write_index(remote.url, entries, storage_options=remote.storage_options)
        assert url == f"{remote.url}/{INDEX_NAME}"
    assert loads_index(remote.fs.cat_file(remote.join(INDEX_NAME)), url="x") == entries

    remote.put("train/shard-000099.tar", make_shard(99, 1))  # not in the index
    with caplog.at_level(logging.INFO, logger="wdsfs.source"):
        shards = list_shards(remote.url, storage_options=remote.storage_options)
    assert f"using {remote.url}/{INDEX_NAME}" in caplog.text  # read, not listed
    assert [s.url for s in shards] == [remote.join(e.path) for e in entries]
    assert [s.num_samples for s in shards] == COUNTS
    assert [s.checksum for s in shards] == [f"md5:{e.md5}" for e in entries]


def test_split_indexes_one_folder_and_ignores_an_existing_index(remote: Remote) -> None:
    write_dataset(remote.put, COUNTS, prefix="train/")
    write_dataset(remote.put, [2], prefix="val/")
    stale = render_index([IndexEntry("shard-000000.tar", 1, 1, "0" * 32)])
    remote.put(f"train/{INDEX_NAME}", stale)  # what is being rebuilt: never trusted

    entries = build_index(remote.url, split="train", storage_options=remote.storage_options)

    assert entries == _expected(prefix="")
    assert index_location(remote.url, split="train") == remote.join("train")


def test_progress_gets_the_total_and_every_byte() -> None:
    class Recorder(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()

        def relative_update(self, inc: int = 1) -> None:
            with self.lock:
                self.value += inc

    with memory_remote() as remote:
        write_dataset(remote.put, COUNTS)
        progress = Recorder()
        entries = build_index(remote.url, progress=progress, max_workers=3)
    total = sum(e.size for e in entries)
    assert progress.size == total
    assert progress.value == total


def test_gzip_shards_are_counted_after_decompression() -> None:
    with memory_remote() as remote:
        data = make_shard(0, 7, compress=True)
        remote.put("shard-000000.tar.gz", data)
        [entry] = build_index(remote.url)
    assert entry == IndexEntry("shard-000000.tar.gz", len(data), 7, hashlib.md5(data).hexdigest())


def test_a_corrupt_shard_is_named_and_stops_the_build() -> None:
    with memory_remote() as remote:
        write_dataset(remote.put, COUNTS)
        data = bytearray(make_shard(1, 4))
        data[2048:2052] = b"\xff" * 4  # a member header whose checksum no longer matches
        bad = remote.put("shard-000001.tar", bytes(data))
        with pytest.raises(CorruptShardError, match=bad):
            build_index(remote.url)
    assert _index_threads() == []


def test_an_object_changed_after_listing_is_not_indexed() -> None:
    class ReplaceAfterListing(Callback):  # type: ignore[misc]
        def set_size(self, size: int) -> None:
            remote.put("shard-000000.tar", make_shard(0, 9))

    with memory_remote() as remote:
        write_dataset(remote.put, COUNTS)
        with pytest.raises(
            IntegrityError, match=rf"{remote.join('shard-000000.tar')}: object changed"
        ):
            build_index(remote.url, progress=ReplaceAfterListing())


@pytest.mark.s3
def test_same_size_replacement_is_caught_by_the_storage_md5(s3_bucket: Remote) -> None:
    s3_bucket.put("shard-000000.tar", make_shard(0, 3))

    class ReplaceAfterListing(Callback):  # type: ignore[misc]
        def set_size(self, size: int) -> None:
            data = bytearray(make_shard(0, 3))
            data[600] ^= 1  # inside the first member's data: still a valid tar
            s3_bucket.put("shard-000000.tar", bytes(data))

    with pytest.raises(IntegrityError, match=r"shard-000000.tar: md5 \w+, storage says"):
        build_index(
            s3_bucket.url,
            storage_options=s3_bucket.storage_options,
            progress=ReplaceAfterListing(),
        )


def test_stop_event_cancels_the_scans() -> None:
    stop = threading.Event()

    class StopAtFirstByte(Callback):  # type: ignore[misc]
        def relative_update(self, inc: int = 1) -> None:
            stop.set()

    with memory_remote() as remote:
        write_dataset(remote.put, [50] * 4, payload=20_000)
        with pytest.raises(DownloadCancelled, match=remote.url):
            build_index(remote.url, progress=StopAtFirstByte(), stop_event=stop, max_workers=2)
    assert _index_threads() == []


@pytest.mark.s3
def test_ctrl_c_during_a_slow_scan_returns_promptly(
    s3_bucket: Remote, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    s3_bucket.put("shard-000000.tar", make_shard(0, 4, payload=3 * MiB))
    assert s3_bucket.endpoint_url is not None
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(1 * MiB)  # per connection: the scan would take ~12 s
    options = s3_bucket.options_for(proxy.endpoint_url)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    timer = threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGINT))  # a real Ctrl-C
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_index(s3_bucket.url, storage_options=options)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5.0
    assert _index_threads() == []


def test_prefix_problems_are_errors_naming_the_url(remote: Remote) -> None:
    # A missing prefix (ShardNotFoundError) or an empty one (NoShardsError), by backend.
    with pytest.raises(FileNotFoundError, match=remote.url):
        build_index(remote.url, storage_options=remote.storage_options)
    remote.put(INDEX_NAME, render_index([]))  # an index, but nothing to index
    with pytest.raises(NoShardsError, match=remote.url):
        build_index(remote.url, storage_options=remote.storage_options)


@pytest.mark.s3
def test_missing_bucket(s3_bucket: Remote) -> None:
    url = "s3://no-such-bucket-for-wdsfs/ds"
    with pytest.raises(ShardNotFoundError, match=url):
        build_index(url, storage_options=s3_bucket.storage_options)


@pytest.mark.parametrize(
    "remote_url",
    ["s3://b/ds/shard-000000.tar", "s3://b/ds/shard-{000000..000009}.tar", "  "],
)
def test_only_a_prefix_can_be_indexed(remote_url: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        build_index(remote_url)


def test_check_writable() -> None:
    assert check_writable("s3://b/ds/", split="train") == f"s3://b/ds/train/{INDEX_NAME}"
    with pytest.raises(ValueError, match=f"https://h/ds/{INDEX_NAME}: cannot write"):
        check_writable("https://h/ds")
    with pytest.raises(ValueError, match="max_workers"):
        build_index("memory://x/ds", max_workers=0)


def test_local_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / INDEX_NAME).write_text("old")
    entries = _expected()
    write_index(str(tmp_path), entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_NAME]
    assert loads_index((tmp_path / INDEX_NAME).read_bytes(), url="x") == entries
