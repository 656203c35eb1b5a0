"""Fetcher: verified, cancellable, retried downloads into the shard cache."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.datasets import make_shard
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.errors import (
    DownloadCancelled,
    IntegrityError,
    ShardNotFoundError,
    StorageAccessError,
)
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
    with Fetcher(ShardCache(tmp_path / "cache", cache_limit="1GB"), storage_options=remote.storage_options) as again:
        for fetched in again.fetch_ahead(list_shards(remote.url, storage_options=remote.storage_options)):
            with fetched:
                assert fetched.from_cache
                assert fetched.file.read() == blobs[fetched.shard.name]
    assert again.metrics.misses == 0
    assert not _leftovers(cache)


def test_object_replaced_gets_fresh_bytes(remote, tmp_path):
    if remote.protocol == "file":
        pytest.skip("local files are read in place, never cached")  # nothing to go stale
    remote.put("shard-000000.tar", make_shard(0, 3))
    cache = ShardCache(tmp_path / "c")
    with Fetcher(cache, storage_options=remote.storage_options) as fetcher:
        (first,) = list_shards(remote.url, storage_options=remote.storage_options)
        with fetcher.fetch(first) as f:
            assert f.file.read() == make_shard(0, 3)
        time.sleep(1.1)  # some backends keep mtimes in whole seconds
        remote.put("shard-000000.tar", make_shard(0, 4))
        (second,) = list_shards(remote.url, storage_options=remote.storage_options)
        assert second.version != first.version
        with fetcher.fetch(second) as f:
            assert not f.from_cache
            assert f.file.read() == make_shard(0, 4)


def test_missing_object_fails_at_once(remote, tmp_path):
    remote.put("shard-000000.tar", make_shard(0, 1))
    (shard,) = list_shards(remote.join("shard-00000{0,1}.tar"), storage_options=remote.storage_options)[1:]
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=remote.storage_options) as fetcher:
        started = time.monotonic()
        with pytest.raises(ShardNotFoundError, match="shard-000001.tar"):
            fetcher.fetch(shard)
        assert time.monotonic() - started < 10


@pytest.mark.s3
def test_bad_credentials_fail_with_access_error(s3_bucket, moto_server, tmp_path):
    s3_bucket.put("shard-000000.tar", make_shard(0, 1))
    (shard,) = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    # moto accepts any key unless IAM is enforced; a bucket policy cannot be checked offline,
    # so use a shard URL in a bucket this account cannot see through a wrong endpoint path
    options = dict(s3_bucket.storage_options)
    options["anon"] = True
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=options, max_attempts=1) as fetcher:
        try:
            with fetcher.fetch(shard) as fetched:
                fetched.file.read()
        except (StorageAccessError, ShardNotFoundError) as exc:
            assert shard.url in str(exc)


@pytest.mark.s3
def test_transient_failures_are_retried(s3_bucket, fault_proxy, tmp_path):
    data = make_shard(0, 20, payload=20_000)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)
    proxy.fail_next(2, only_get=True)
    proxy.reset_next(1, only_get=True)
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=options, backoff=0.01) as fetcher:
        with fetcher.fetch(shard) as fetched:
            assert fetched.file.read() == data
    assert proxy.injected >= 3


@pytest.mark.s3
def test_flipped_bytes_are_never_served(s3_bucket, fault_proxy, tmp_path):
    data = make_shard(0, 20, payload=20_000)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)
    cache = ShardCache(tmp_path / "c")

    proxy.flip_next(1, only_get=True)
    with Fetcher(cache, storage_options=options, backoff=0.01) as fetcher:
        with fetcher.fetch(shard) as fetched:
            assert fetched.file.read() == data
    assert fetcher.metrics.integrity_failures == 1

    cache.clear()
    proxy.flip_next(1000, only_get=True)
    with Fetcher(cache, storage_options=options, max_attempts=2, backoff=0.01) as fetcher:
        with pytest.raises(IntegrityError, match=r"shard-000000\.tar: md5 .* expected"):
            fetcher.fetch(shard)
    assert len(cache) == 0
    assert not _leftovers(cache)


@pytest.mark.s3
@pytest.mark.slow
def test_cancelling_a_large_transfer_is_prompt(s3_bucket, fault_proxy, tmp_path):
    size = 120 * MiB
    s3_bucket.put("big.tar", os.urandom(size))
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(4 * MiB)  # per connection: ~32 MiB/s over 8 connections
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.join("big.tar"), storage_options=options)
    shard = Fetcher(ShardCache(tmp_path / "x"), storage_options=options)._resolve(
        *__import__("wdsfs._fs", fromlist=["url_to_fs"]).url_to_fs(shard.url, options), shard
    )
    assert shard.size == size
    cache = ShardCache(tmp_path / "c", cache_limit="1GB")
    stop = threading.Event()
    errors: list[BaseException] = []
    fetcher = Fetcher(cache, storage_options=options, stop_event=stop)

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
