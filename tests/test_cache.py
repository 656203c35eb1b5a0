"""ShardCache: LRU limit, sharing between processes, crash safety."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.datasets import make_shard
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.errors import CacheError
from wdsfs.shard import Shard
from wdsfs.source import list_shards

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):  # tolerant of concurrent eviction
        for name in files:
            if name.endswith(".val"):
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
    return total


def test_cache_limit_parsing(tmp_path):
    assert ShardCache(tmp_path, cache_limit="500MB").cache_limit == 500_000_000
    assert ShardCache(tmp_path, cache_limit="2GiB").cache_limit == 2 * 1024**3
    assert ShardCache(tmp_path, cache_limit=1234).cache_limit == 1234
    for bad in ("lots", "10XB", 0, -5, "0GB"):
        with pytest.raises(ValueError):
            ShardCache(tmp_path, cache_limit=bad)
    with pytest.raises(TypeError):
        ShardCache(tmp_path, cache_limit=1.5)  # type: ignore[arg-type]


def test_eviction_keeps_the_directory_under_the_limit(memory_remote, tmp_path):
    for i in range(8):
        memory_remote.put(f"shard-{i:06d}.tar", os.urandom(3 * MiB))
    shards = list_shards(memory_remote.url)
    cache = ShardCache(tmp_path / "c", cache_limit=10 * MiB)
    with Fetcher(cache) as fetcher:
        for fetched in fetcher.fetch_ahead(shards, window=0):  # sequential: a strict LRU order
            with fetched:
                assert len(fetched.file.read()) == 3 * MiB
            assert cache.volume() <= 10 * MiB
            assert _dir_bytes(tmp_path / "c") <= 10 * MiB
    keys = cache.keys()
    # least recently used went first: the last shards are the ones kept
    assert 1 <= len(keys) <= 3
    assert all(any(s.url in k for s in shards[-3:]) for k in keys)


def test_open_reader_survives_eviction(memory_remote, tmp_path):
    memory_remote.put("shard-000000.tar", b"a" * 4 * MiB)
    memory_remote.put("shard-000001.tar", b"b" * 4 * MiB)
    first, second = list_shards(memory_remote.url)
    cache = ShardCache(tmp_path / "c", cache_limit=6 * MiB)
    with Fetcher(cache) as fetcher:
        reader = fetcher.fetch(first)
        reader.file.read(10)
        with fetcher.fetch(second):
            pass
        assert cache.key(first) not in cache  # evicted...
        assert reader.file.read() == b"a" * (4 * MiB - 10)  # ...yet still fully readable
        reader.close()


def test_shard_larger_than_the_cache_is_refused(memory_remote, tmp_path):
    memory_remote.put("shard-000000.tar", b"x" * 2 * MiB)
    (shard,) = list_shards(memory_remote.url)
    with Fetcher(ShardCache(tmp_path / "c", cache_limit=MiB)) as fetcher:
        with pytest.raises(CacheError, match=r"shard-000000\.tar.*cache_limit"):
            fetcher.fetch(shard)


def test_cache_pickles_as_its_recipe(tmp_path):
    cache = ShardCache(tmp_path / "c", cache_limit="1GB")
    assert len(cache) == 0
    clone = pickle.loads(pickle.dumps(cache))
    assert (clone.directory, clone.cache_limit) == (cache.directory, cache.cache_limit)
    assert clone._cache is None


def test_version_is_part_of_the_key():
    a = Shard("s3://b/x.tar", size=1, version="1-etagA")
    b = Shard("s3://b/x.tar", size=1, version="1-etagB")
    assert ShardCache.key(a) != ShardCache.key(b)


_SHARED_FETCH = textwrap.dedent(
    """
    import json, sys
    from wdsfs.cache import ShardCache
    from wdsfs.download import Fetcher
    from wdsfs.shard import Shard
    url, cache_dir, barrier_file = sys.argv[1], sys.argv[2], sys.argv[4]
    options = json.loads(sys.argv[3])
    import os, time
    while not os.path.exists(barrier_file):
        time.sleep(0.005)
    with Fetcher(ShardCache(cache_dir), storage_options=options) as fetcher:
        with fetcher.fetch(Shard(url)) as fetched:
            data = fetched.file.read()
    metrics = fetcher.metrics
    print(json.dumps({"misses": metrics.misses, "hits": metrics.hits, "size": len(data)}))
    """
)


@pytest.mark.s3
def test_processes_sharing_a_cache_download_once(s3_bucket, fault_proxy, tmp_path):
    import json

    data = os.urandom(24 * MiB)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(4 * MiB)  # per connection: long enough for the processes to overlap
    options = s3_bucket.options_for(proxy.endpoint_url)
    barrier = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SHARED_FETCH,
                s3_bucket.join("shard-000000.tar"),
                str(tmp_path / "c"),
                json.dumps(options),
                str(barrier),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    time.sleep(1.0)  # all interpreters up and waiting
    proxy.reset_counters()
    barrier.write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["misses"] for r in results) == 1
    assert sum(r["hits"] for r in results) == 2
    assert all(r["size"] == len(data) for r in results)
    assert proxy.bytes_to_client < 1.5 * len(data)


_KILLED_FETCH = textwrap.dedent(
    """
    import json, sys
    from wdsfs.cache import ShardCache
    from wdsfs.download import Fetcher
    from wdsfs.shard import Shard
    url, cache_dir, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with Fetcher(ShardCache(cache_dir), storage_options=options) as fetcher:
        fetcher.fetch(Shard(url))
    """
)


@pytest.mark.s3
def test_sigkill_mid_download_leaves_a_usable_cache(s3_bucket, fault_proxy, tmp_path):
    import json

    data = os.urandom(60 * MiB)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(2 * MiB)  # per connection
    options = s3_bucket.options_for(proxy.endpoint_url)
    cache_dir = tmp_path / "c"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_FETCH,
            s3_bucket.join("shard-000000.tar"),
            str(cache_dir),
            json.dumps(options),
        ],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while proxy.bytes_to_client < 10 * MiB and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list((cache_dir / "tmp").glob("*.part")), "the download should be in progress"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    proxy.throttle(None)
    cache = ShardCache(cache_dir)
    assert len(cache) == 0  # nothing half-written is served
    assert not list((cache_dir / "tmp").glob("*.part"))  # the dead process's temp file is gone
    with Fetcher(cache, storage_options=options) as fetcher:
        with fetcher.fetch(Shard(s3_bucket.join("shard-000000.tar"))) as fetched:
            assert not fetched.from_cache
            assert fetched.file.read() == data


def _fetch_in_child(args):
    url, cache_dir = args
    with Fetcher(ShardCache(cache_dir)) as fetcher, fetcher.fetch(Shard(url)) as fetched:
        return len(fetched.file.read())


def test_cache_works_in_spawned_processes(tmp_path):
    path = tmp_path / "data" / "shard-000000.tar"
    path.parent.mkdir()
    path.write_bytes(make_shard(0, 3))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        sizes = pool.map(_fetch_in_child, [(str(path), str(tmp_path / "c"))] * 2)
    assert sizes == [path.stat().st_size] * 2


@pytest.fixture
def memory_remote():
    """A fresh memory:// prefix (pure in-process storage for cache logic)."""
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/cache-test-{uuid.uuid4().hex}"

    class _Memory:
        url = f"memory://{base}"

        @staticmethod
        def put(relpath: str, data: bytes) -> None:
            fs.pipe(f"{base}/{relpath}", data)

    yield _Memory()
    if fs.exists(base):
        fs.rm(base, recursive=True)


def _count_in_child(directory: str, key: str) -> None:
    ShardCache(directory).remember_count(key, 42)


def test_sample_counts_survive_eviction_are_shared_and_cleared(tmp_path):
    cache = ShardCache(tmp_path / "c", cache_limit=3 * MiB)
    assert cache.known_counts(["a#1"]) == [None]
    assert not cache.exists()  # asking does not create a cache
    cache.remember_count("a#1", 7)
    temp = cache.temp_path()
    Path(temp).write_bytes(b"x" * (2 * MiB))
    cache.commit("a#1", temp).close()
    temp = cache.temp_path()
    Path(temp).write_bytes(b"y" * (2 * MiB))
    cache.commit("b#1", temp).close()  # evicts a#1
    assert "a#1" not in cache
    assert cache.known_counts(["a#1", "b#1"]) == [7, None]
    process = multiprocessing.get_context("spawn").Process(
        target=_count_in_child, args=(cache.directory, "b#1")
    )
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert ShardCache(tmp_path / "c").known_counts(["a#1", "b#1"]) == [7, 42]
    assert cache.clear() == 1
    assert cache.known_counts(["a#1", "b#1"]) == [None, None]
    cache.close()


def test_a_lowered_cache_limit_applies_to_what_earlier_runs_left(remote, tmp_path):
    for i in range(4):
        remote.put(f"shard-{i:06d}.tar", make_shard(i, 4, payload=100_000))
    size = len(make_shard(0, 4, payload=100_000))
    shards = list_shards(remote.url, storage_options=remote.storage_options)
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=remote.storage_options) as fetcher:
        for shard in shards:
            fetcher.fetch(shard).close()
    if remote.protocol == "file":  # read in place: nothing is cached, nothing to trim
        assert not ShardCache(tmp_path / "c").exists()
        return
    assert len(ShardCache(tmp_path / "c")) == 4
    smaller = ShardCache(tmp_path / "c", cache_limit=int(2.5 * size))
    with Fetcher(smaller, storage_options=remote.storage_options) as fetcher:
        with fetcher.fetch(shards[3]) as fetched:  # a hit: nothing downloaded, yet trimmed
            assert fetched.from_cache
        assert fetcher.metrics.snapshot()["misses"] == 0
    assert _dir_bytes(tmp_path / "c") <= 2.5 * size
    kept = smaller.keys()  # a list of cache keys (URL#version)
    assert sorted(k.split("#")[0] for k in kept) == [s.url for s in shards[2:]]
    smaller.close()


def test_a_session_keeps_the_thread_connection_until_its_outermost_end(tmp_path):
    cache = ShardCache(tmp_path / "c")
    temp = cache.temp_path()
    Path(temp).write_bytes(b"x" * 100_000)
    cache.commit("k#1", temp).close()

    def connection():
        return getattr(cache._db._local, "con", None)

    assert connection() is None  # closed after each use outside a session
    with cache.session():
        cache.open("k#1").close()
        first = connection()
        assert first is not None
        with cache.session():
            cache.remember_count("k#1", 3)
            cache.open("k#1").close()
        assert connection() is first  # the inner session's end closes nothing
        assert cache.known_counts(["k#1"]) == [3]
        seen_elsewhere = []
        other = threading.Thread(target=lambda: seen_elsewhere.append(cache.open("k#1")))
        other.start()
        other.join()
        seen_elsewhere[0].close()  # another thread: its own connection, closed after use
    assert connection() is None
    cache.close()


# -- claims: the head start's locks, taken before DataLoader workers fork ----------------------


def _lock_and_report(cache: ShardCache, key: str, queue) -> None:
    begun = time.monotonic()
    with cache.lock(key):
        queue.put(time.monotonic() - begun)


def _claim_fails(cache: ShardCache, key: str, queue) -> None:
    queue.put(cache.claim(key))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="claims serve forked workers")
def test_a_claim_makes_a_forked_child_wait_and_is_taken_over_by_this_process(tmp_path):
    cache = ShardCache(tmp_path / "cache")
    key = "s3://b/shard-0.tar#etag"
    assert cache.claim(key)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_lock_and_report, args=(cache, key, queue))
    child.start()
    try:
        time.sleep(0.5)
        assert queue.empty()  # the child waits on the claimed lock
        with cache.lock(key):  # this process takes the claim over, without waiting
            assert queue.empty()
        waited = queue.get(timeout=30)  # released at the end of lock(): the child gets it
        assert waited >= 0.45
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="claims serve forked workers")
def test_a_forked_child_never_releases_its_parents_claim(tmp_path):
    cache = ShardCache(tmp_path / "cache")
    key = "s3://b/shard-1.tar#etag"
    assert cache.claim(key)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    # a child drops its inherited copy (release_claim closes its descriptor only)...
    dropper = context.Process(target=cache.release_claim, args=(key,))
    dropper.start()
    dropper.join(timeout=30)
    # ...and the lock is still held: another process cannot claim it
    other = context.Process(target=_claim_fails, args=(ShardCache(tmp_path / "cache"), key, queue))
    other.start()
    assert queue.get(timeout=30) is False
    other.join(timeout=30)
    cache.release_claim(key)
    assert cache.claim(key)  # free again
    cache.release_claim(key)


def _small_disk(monkeypatch, directory: Path, capacity: int) -> None:
    """Make the cache see a disk of ``capacity`` bytes holding only ``directory``'s files."""
    import types

    import wdsfs.cache

    def disk_usage(path):
        used = sum(
            os.stat(os.path.join(root, name)).st_size
            for root, _dirs, files in os.walk(directory)
            for name in files
        )
        return types.SimpleNamespace(total=capacity, used=used, free=max(0, capacity - used))

    monkeypatch.setattr(wdsfs.cache.shutil, "disk_usage", disk_usage)


def test_a_disk_smaller_than_cache_limit_evicts_to_make_room(
    memory_remote, tmp_path, monkeypatch, caplog
):
    """cache_limit above what the disk holds: least-recently-used shards make room, with one
    warning; every shard is read whole, and the cache keeps the newest that fit."""
    payloads = [os.urandom(3 * MiB) for _ in range(8)]
    for i, payload in enumerate(payloads):
        memory_remote.put(f"shard-{i:06d}.tar", payload)
    shards = list_shards(memory_remote.url)
    cache = ShardCache(tmp_path / "c", cache_limit="1GB")
    _small_disk(monkeypatch, tmp_path / "c", capacity=64 * MiB + 10 * MiB)
    with caplog.at_level("WARNING", logger="wdsfs.cache"), Fetcher(cache) as fetcher:
        for fetched, payload in zip(fetcher.fetch_ahead(shards, window=0), payloads, strict=True):
            with fetched:
                assert fetched.file.read() == payload
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "full before cache_limit" in warnings[0], warnings
    assert str(cache.directory) in warnings[0]
    keys = cache.keys()
    assert 1 <= len(keys) <= 3
    assert all(any(s.url in k for s in shards[-3:]) for k in keys)
    cache.close()


def test_a_disk_without_room_for_a_shard_is_a_clear_error(memory_remote, tmp_path, monkeypatch):
    memory_remote.put("shard-000000.tar", b"x" * 3 * MiB)
    (shard,) = list_shards(memory_remote.url)
    cache = ShardCache(tmp_path / "c", cache_limit="1GB")
    _small_disk(monkeypatch, tmp_path / "c", capacity=64 * MiB + 2 * MiB)
    with Fetcher(cache) as fetcher, pytest.raises(CacheError) as info:
        fetcher.fetch(shard)
    message = str(info.value)
    assert shard.url in message and str(cache.directory) in message
    assert "not enough free disk" in message and "64 MiB margin" in message
    assert not list((tmp_path / "c" / "tmp").iterdir())
    cache.close()
