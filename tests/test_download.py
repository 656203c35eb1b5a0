"""Fetcher: verified, cancellable, retried downloads into the shard cache."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.datasets import make_shard
from tests.servers import MotoS3Server
from wdsfs._fs import url_to_fs
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher, TransferCallback
from wdsfs.errors import (
    DownloadCancelled,
    IntegrityError,
    ShardNotFoundError,
    StorageAccessError,
)
from wdsfs.shard import Shard
from wdsfs.source import list_shards

MiB = 1024 * 1024


def _leftovers(cache: ShardCache) -> list[Path]:
    return list(Path(cache.directory, "tmp").glob("*"))


def test_download_then_cache_hit(remote, tmp_path):
    blobs = {f"shard-{i:06d}.tar": make_shard(i, 5, payload=50_000) for i in range(3)}
    for name, data in blobs.items():
        remote.put(name, data)
    shards = list_shards(remote.url, storage_options=remote.storage_options)
    cache = ShardCache(tmp_path / "cache", cache_limit="1GB")

    with Fetcher(cache, storage_options=remote.storage_options, chunk_size=64 * 1024) as fetcher:
        for fetched in fetcher.fetch_ahead(shards, window=2):
            with fetched:
                assert fetched.file.read() == blobs[fetched.shard.name]
    local = remote.protocol == "file"
    assert fetcher.metrics.misses == (0 if local else 3)

    # a second run (new fetcher, same cache dir) downloads nothing
    with Fetcher(
        ShardCache(tmp_path / "cache", cache_limit="1GB"), storage_options=remote.storage_options
    ) as again:
        for fetched in again.fetch_ahead(
            list_shards(remote.url, storage_options=remote.storage_options)
        ):
            with fetched:
                assert fetched.from_cache
                assert fetched.file.read() == blobs[fetched.shard.name]
    assert again.metrics.misses == 0
    assert not _leftovers(cache)


def test_object_replaced_gets_fresh_bytes(remote, tmp_path):
    remote.put("shard-000000.tar", make_shard(0, 3))
    cache = ShardCache(tmp_path / "c")
    with Fetcher(cache, storage_options=remote.storage_options) as fetcher:
        (first,) = list_shards(remote.url, storage_options=remote.storage_options)
        with fetcher.fetch(first) as f:
            assert f.file.read() == make_shard(0, 3)
            first_version = f.shard.version
        time.sleep(1.1)  # some backends keep mtimes in whole seconds
        remote.put("shard-000000.tar", make_shard(0, 4))
        (second,) = list_shards(remote.url, storage_options=remote.storage_options)
        with fetcher.fetch(second) as f:
            if remote.protocol != "file":  # local files are read in place, not cached
                assert f.shard.version != first_version
                assert not f.from_cache
            assert f.file.read() == make_shard(0, 4)


def test_missing_object_fails_at_once(remote, tmp_path):
    remote.put("shard-000000.tar", make_shard(0, 1))
    (shard,) = list_shards(
        remote.join("shard-00000{0,1}.tar"), storage_options=remote.storage_options
    )[1:]
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=remote.storage_options) as fetcher:
        started = time.monotonic()
        with pytest.raises(ShardNotFoundError, match="shard-000001.tar"):
            fetcher.fetch(shard)
        assert time.monotonic() - started < 10


class _AuthenticatingMoto(MotoS3Server):
    """A moto server that checks credentials (its IAM knows no access key at all)."""

    def _environment(self) -> dict[str, str]:
        return {**super()._environment(), "INITIAL_NO_AUTH_ACTION_COUNT": "0"}


@pytest.mark.s3
def test_bad_credentials_fail_at_once_with_access_error(tmp_path):
    with _AuthenticatingMoto() as server:
        options = server.storage_options
        started = time.monotonic()
        with pytest.raises(StorageAccessError, match="s3://private/ds"):
            list_shards("s3://private/ds", storage_options=options)
        with Fetcher(ShardCache(tmp_path / "c"), storage_options=options) as fetcher:
            with pytest.raises(StorageAccessError, match=r"s3://private/ds/shard-000000\.tar"):
                fetcher.fetch(Shard("s3://private/ds/shard-000000.tar"))
        assert time.monotonic() - started < 15


@pytest.mark.s3
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_transient_failures_are_retried(s3_bucket, fault_proxy, tmp_path, direct_io):
    data = make_shard(0, 20, payload=20_000)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)
    proxy.fail_next(2, only_get=True)
    proxy.reset_next(1, only_get=True)
    with Fetcher(
        ShardCache(tmp_path / "c"), storage_options=options, backoff=0.01, direct_io=direct_io
    ) as fetcher:
        with fetcher.fetch(shard) as fetched:
            assert fetched.file.read() == data
    assert proxy.injected >= 3


@pytest.mark.s3
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_flipped_bytes_are_never_served(s3_bucket, fault_proxy, tmp_path, direct_io):
    data = make_shard(0, 20, payload=20_000)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)
    cache = ShardCache(tmp_path / "c")

    proxy.flip_next(1, only_get=True)
    with Fetcher(cache, storage_options=options, backoff=0.01, direct_io=direct_io) as fetcher:
        with fetcher.fetch(shard) as fetched:
            assert fetched.file.read() == data
    # caught by botocore's response checksum (a retried chunk) or by our MD5 (a retried shard)
    assert fetcher.metrics.retries + fetcher.metrics.integrity_failures >= 1

    cache.clear()
    proxy.flip_next(1000, only_get=True)
    with Fetcher(
        cache, storage_options=options, max_attempts=2, backoff=0.01, direct_io=direct_io
    ) as fetcher:
        with pytest.raises(IntegrityError, match=r"shard-000000\.tar: .*(md5|checksum)"):
            fetcher.fetch(shard)
    assert len(cache) == 0
    assert not _leftovers(cache)


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_cancelling_a_large_transfer_is_prompt(s3_bucket, fault_proxy, tmp_path, direct_io):
    size = 120 * MiB
    s3_bucket.put("big.tar", os.urandom(size))
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(4 * MiB)  # per connection: ~32 MiB/s over 8 connections
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.join("big.tar"), storage_options=options)
    fs, path = url_to_fs(shard.url, options)
    with Fetcher(ShardCache(tmp_path / "x"), storage_options=options) as resolver:
        shard = resolver.downloader.resolve(fs, path, shard, TransferCallback(shard.url))
    assert shard.size == size
    cache = ShardCache(tmp_path / "c", cache_limit="1GB")
    stop = threading.Event()
    errors: list[BaseException] = []
    fetcher = Fetcher(cache, storage_options=options, stop_event=stop, direct_io=direct_io)

    def run() -> None:
        try:
            fetcher.fetch(shard)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while proxy.bytes_to_client < 20 * MiB and thread.is_alive():
        time.sleep(0.01)
    stop.set()
    stopped_at = time.monotonic()
    bytes_at_stop = proxy.bytes_to_client
    thread.join(10)
    latency = time.monotonic() - stopped_at
    fetcher.close()
    time.sleep(0.2)
    after_stop = proxy.bytes_to_client - bytes_at_stop
    print(f"cancel latency {latency:.3f}s, {after_stop / MiB:.2f} MiB after stop")
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert latency < 1.0
    assert after_stop < 4 * MiB
    assert len(cache) == 0
    assert not _leftovers(cache)


@pytest.mark.http
def test_a_lookup_the_server_never_answers_is_cancelled_promptly(tmp_path):
    import http.server
    import socketserver

    answer = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            answer.wait(30)  # a server that accepted the request and went quiet

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ds/shard-000000.tar"
    stop = threading.Event()
    errors = []
    cache = ShardCache(tmp_path / "cache")
    fetcher = Fetcher(cache, max_attempts=1)

    def fetch():
        try:
            fetcher.fetch(Shard(url), stop=stop)  # no size: a HEAD first
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=fetch)
    try:
        thread.start()
        time.sleep(0.3)
        stop.set()
        begun = time.monotonic()
        thread.join(timeout=10)
        latency = time.monotonic() - begun
    finally:
        answer.set()
        server.shutdown()
        server.server_close()
        fetcher.close()
        cache.close()
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert latency < 1.0, latency


@pytest.mark.http
def test_unreachable_http_server_is_a_connection_error_not_a_missing_shard(tmp_path, caplog):
    from tests.servers import free_port
    from wdsfs.errors import DownloadError

    url = f"http://127.0.0.1:{free_port()}/ds/shard-000000.tar"  # nothing listens there
    cache = ShardCache(tmp_path / "cache")
    with (
        Fetcher(cache, max_attempts=3, backoff=0.01) as fetcher,
        pytest.raises(DownloadError, match="cannot connect while looking up") as info,
    ):
        fetcher.fetch(Shard(url))
    assert not isinstance(info.value, ShardNotFoundError)
    assert url in str(info.value) and "gave up after 3 attempts" in str(info.value)
    assert fetcher.metrics.snapshot()["retries"] == 2
    retries = [r.getMessage() for r in caplog.records if "transient error" in r.getMessage()]
    assert len(retries) == 2 and all("ClientConnectorError" in m for m in retries), retries
    cache.close()


def test_a_full_disk_during_a_download_is_a_cache_error(tmp_path):
    import errno

    from wdsfs.errors import CacheError

    cache = ShardCache(tmp_path / "c")
    with Fetcher(cache) as fetcher:
        full = OSError(errno.ENOSPC, "No space left on device")
        error = fetcher.downloader.retries.final_error(full, "s3://b/ds/shard-000000.tar", 1)
        assert isinstance(error, CacheError)
        assert "s3://b/ds/shard-000000.tar" in str(error) and str(cache.directory) in str(error)
        throttled = OSError(errno.EBUSY, "SlowDown")  # s3fs's throttling: the storage, not disk
        assert not isinstance(
            fetcher.downloader.retries.final_error(throttled, "s3://b/x.tar", 1), CacheError
        )


@pytest.mark.s3
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_a_disk_that_fills_up_mid_download_loses_nothing(
    s3_bucket, tmp_path, monkeypatch, direct_io
):
    """ENOSPC halfway through a shard: a CacheError naming the shard and the cache directory,
    no temp file left, the shards already cached intact, and the same fetch works once there
    is room again."""
    from wdsfs.errors import CacheError

    first, second = (random.Random(i).randbytes(3 * 1024 * 1024 + 777) for i in range(2))
    s3_bucket.put("ds/shard-000000.tar", first)
    s3_bucket.put("ds/shard-000001.tar", second)
    shards = list_shards(s3_bucket.join("ds"), storage_options=s3_bucket.storage_options)
    cache = ShardCache(tmp_path / "c")
    options = dict(storage_options=s3_bucket.storage_options, chunk_size=1024 * 1024)
    with Fetcher(cache, direct_io=direct_io, **options) as fetcher:
        with fetcher.fetch(shards[0]) as fetched:
            assert fetched.file.read() == first
        real_pwrite, written, lock = os.pwrite, [0], threading.Lock()

        def filling_pwrite(fd, data, offset):
            # checked and counted at once: chunks write on parallel threads, and with direct
            # I/O each 1 MiB chunk is one write, which could all pass a check made before any
            # of them counts
            with lock:
                if written[0] >= 1024 * 1024:
                    raise OSError(errno.ENOSPC, "No space left on device")
                written[0] += len(data)
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", filling_pwrite)
        with pytest.raises(CacheError) as info:
            fetcher.fetch(shards[1])
        assert shards[1].url in str(info.value) and str(cache.directory) in str(info.value)
        assert "No space left on device" in str(info.value)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        leftovers = [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()]
        assert not [name for name in leftovers if "tmp" in name or name.endswith(".part")]
        assert cache.keys() == [ShardCache.key(shards[0])]
        with fetcher.fetch(shards[0]) as fetched:
            assert fetched.from_cache and fetched.file.read() == first
        with fetcher.fetch(shards[1]) as fetched:
            assert not fetched.from_cache and fetched.file.read() == second
    cache.close()
