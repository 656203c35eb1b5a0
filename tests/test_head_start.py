"""HeadStart: the main process fetches the DataLoader workers' first shards."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.datasets import make_shard
from wdsfs._head_start import HeadStart
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.source import list_shards

pytestmark = pytest.mark.s3


def _head_start_threads():
    return [t for t in threading.enumerate() if t.name == "wdsfs-head-start"]


def test_fetches_the_shards_into_the_cache(s3_bucket, tmp_path):
    for i in range(3):
        s3_bucket.put(f"shard-{i}.tar", make_shard(i, 3))
    shards = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    cache = ShardCache(tmp_path / "cache")
    fetcher = Fetcher(cache, storage_options=s3_bucket.storage_options)

    with HeadStart(fetcher, shards[:2]) as head_start:
        head_start._thread.join(timeout=60)

    assert [ShardCache.key(s) in cache for s in shards] == [True, True, False]
    assert not _head_start_threads()


def test_leaving_cancels_the_download_in_flight(s3_bucket, fault_proxy, tmp_path):
    s3_bucket.put("big.tar", make_shard(0, 40, payload=1_000_000))  # ~40 MB
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(2 * 1024 * 1024)  # per connection: the download would take seconds
    options = s3_bucket.options_for(proxy.endpoint_url)
    shards = list_shards(s3_bucket.url, storage_options=options)
    cache = ShardCache(tmp_path / "cache")

    with HeadStart(Fetcher(cache, storage_options=options), shards):
        time.sleep(0.3)  # transfers under way
        begun = time.monotonic()
    took = time.monotonic() - begun

    assert took < 1.0, took
    assert not _head_start_threads()
    assert ShardCache.key(shards[0]) not in cache
    assert not list(Path(cache.directory, "tmp").iterdir())


def test_an_error_is_left_to_the_worker_that_reads_the_shard(s3_bucket, tmp_path, caplog):
    import dataclasses
    import logging

    s3_bucket.put("shard-0.tar", make_shard(0, 3))
    (shard,) = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    gone = dataclasses.replace(shard, url=s3_bucket.join("missing.tar"))
    cache = ShardCache(tmp_path / "cache")

    with caplog.at_level(logging.DEBUG, logger="wdsfs._head_start"):
        with HeadStart(
            Fetcher(cache, storage_options=s3_bucket.storage_options), [gone, shard]
        ) as hs:
            hs._thread.join(timeout=60)

    assert "missing.tar" in caplog.text  # logged, not raised here; it stops there
    assert ShardCache.key(shard) not in cache


def test_claimed_shards_are_served_to_a_forked_worker_from_the_cache(s3_bucket, tmp_path):
    import multiprocessing

    s3_bucket.put("shard-0.tar", make_shard(0, 3))
    (shard,) = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    cache = ShardCache(tmp_path / "cache")
    head_start = HeadStart(Fetcher(cache, storage_options=s3_bucket.storage_options), [shard])
    head_start.claim()  # as the loader does, before its workers fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_fetch_in_worker, args=(cache, s3_bucket, shard, queue))
    worker.start()
    time.sleep(0.5)  # the worker asks for the shard before the head start's thread begins
    with head_start:
        from_cache = queue.get(timeout=60)
    worker.join(timeout=60)

    assert worker.exitcode == 0
    assert from_cache  # the worker waited for the head start instead of downloading it too


def _fetch_in_worker(cache, s3_bucket, shard, queue):
    with Fetcher(cache, storage_options=s3_bucket.storage_options).fetch(shard) as fetched:
        queue.put(fetched.from_cache)
