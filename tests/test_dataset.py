"""StreamingWebDataset end to end: backends, DataLoader workers, ranks, shuffle, cleanup."""

from __future__ import annotations

import collections
import gc
import json
import os
import pickle
import threading
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from tests.datasets import make_shard, sample_key, write_dataset, write_indexed
from wdsfs import StreamingWebDataset
from wdsfs.errors import CorruptShardError

pytestmark = pytest.mark.torch


def keys_of(samples):
    return [s["__key__"] for s in samples]


def _dataset(remote, tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return StreamingWebDataset(remote.url, storage_options=remote.storage_options, **kwargs)


def _wdsfs_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("wdsfs-fetch", "wdsfs-shard"))]


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_reads_what_webdataset_reads(remote, tmp_path, direct_io):
    import webdataset as wds

    local = tmp_path / "written"
    local.mkdir()
    for shard in range(3):
        path = local / f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(7):
                sink.write(
                    {
                        "__key__": f"dir/{shard}/sample{i:03d}",
                        "txt": f"text {shard} {i}",
                        "cls": i % 3,
                        "seg.png": bytes([shard, i]) * 300,
                        "json": {"i": i},
                    }
                )
        remote.put(path.name, path.read_bytes())
    with warnings.catch_warnings():  # webdataset leaves its shard files to the GC to close
        warnings.simplefilter("ignore", ResourceWarning)
        expected = list(
            wds.WebDataset(sorted(str(p) for p in local.glob("*.tar")), shardshuffle=False)
        )
        gc.collect()
    got = list(_dataset(remote, tmp_path, direct_io=direct_io))
    assert len(got) == len(expected) == 21
    for ours, theirs in zip(got, expected, strict=True):
        assert ours["__url__"] == remote.join(os.path.basename(theirs["__url__"]))
        assert {k: v for k, v in ours.items() if k != "__url__"} == {
            k: v for k, v in theirs.items() if k not in ("__url__", "__local_path__")
        }


def test_decode_transform_and_process_sample(tmp_path):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [3])

    class Tagged(StreamingWebDataset):
        def process_sample(self, sample):
            sample["tag"] = sample["cls"] * 10
            return sample

    ds = Tagged(
        str(tmp_path),
        decode={".cls": "int", "json": "json", "txt": "text"},
        transform=lambda s: (s["tag"], s["json"]["index"], s["txt"]),
        cache_dir=str(tmp_path / "c"),
    )
    assert list(ds) == [
        (0, 0, "sample s0000-00000"),
        (10, 1, "sample s0000-00001"),
        (20, 2, "sample s0000-00002"),
    ]
    with pytest.raises(ValueError, match="no-such-decoder"):
        StreamingWebDataset(str(tmp_path), decode={"jpg": "no-such-decoder"})


def test_streaming_wds_aliases(tmp_path):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [2])
    ds = StreamingWebDataset(
        str(tmp_path),
        schema={"cls": "int"},
        file_cache_limit_bytes="1GB",
        memory_buffer_limit_bytes="100MB",
        cache_dir=str(tmp_path / "c"),
    )
    assert [s["cls"] for s in ds] == [0, 1]
    assert ds.cache.cache_limit == 10**9


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_workers_partition_every_sample_exactly_once(remote, tmp_path, num_workers):
    counts = [5, 0, 3, 8, 1, 6]
    write_dataset(remote.put, counts)
    ds = _dataset(remote, tmp_path)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    got = keys_of(loader)
    expected = [sample_key(s, i) for s, n in enumerate(counts) for i in range(n)]
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got))
    if num_workers <= 1:
        assert got == expected  # no shuffle: shard order


@pytest.mark.parametrize(("world_size", "num_workers", "shards"), [(2, 2, 6), (3, 2, 2), (2, 3, 1)])
def test_ranks_and_workers_partition(tmp_path, monkeypatch, world_size, num_workers, shards):
    counts = [7 + s for s in range(shards)]
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), counts)
    seen = collections.Counter()
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        ds = StreamingWebDataset(
            str(tmp_path), shuffle=True, seed=3, buffer_size=4, cache_dir=str(tmp_path / "c")
        )
        per_rank = keys_of(DataLoader(ds, batch_size=None, num_workers=num_workers))
        assert per_rank, f"rank {rank} got nothing"
        seen.update(per_rank)
    expected = {sample_key(s, i) for s, n in enumerate(counts) for i in range(n)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [10] * 6)

    def order(seed, epoch, shuffle=True):
        ds = StreamingWebDataset(
            str(tmp_path), shuffle=shuffle, seed=seed, buffer_size=20, cache_dir=str(tmp_path / "c")
        )
        ds.set_epoch(epoch)
        return keys_of(ds)

    first = order(1, 0)
    assert first == order(1, 0)
    assert sorted(first) == sorted(order(1, 1))
    assert first != order(1, 1)
    assert first != order(2, 0)
    assert order(1, 0, shuffle=False) == sorted(first)
    assert first != sorted(first)


@pytest.mark.parametrize("seed", [None, "7", 1.5, True])
def test_a_seed_that_is_not_an_int_is_a_clear_error(tmp_path, seed):
    # used as its text, None would silently give every run the same "random" order
    with pytest.raises(TypeError, match=r"seed must be an int, not "):
        StreamingWebDataset(str(tmp_path), shuffle=True, seed=seed, cache_dir=str(tmp_path / "c"))


def test_seeds_and_epochs_may_be_numpy_integers(tmp_path):
    np = pytest.importorskip("numpy")
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [5] * 3)
    orders = []
    for seed, epoch in ((3, 1), (np.int64(3), np.int32(1))):
        ds = StreamingWebDataset(
            str(tmp_path), shuffle=True, seed=seed, cache_dir=str(tmp_path / "c")
        )
        ds.set_epoch(epoch)
        orders.append(keys_of(ds))
    assert orders[0] == orders[1]
    with pytest.raises(TypeError, match=r"epoch must be an int, not 1.0"):
        ds.set_epoch(1.0)


@pytest.mark.parametrize("loader_class", ["DataLoader", "StreamingDataLoader"])
def test_persistent_workers_see_set_epoch(tmp_path, loader_class):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [6] * 4)
    from wdsfs import StreamingDataLoader

    ds = StreamingWebDataset(
        str(tmp_path), shuffle=True, buffer_size=8, cache_dir=str(tmp_path / "c")
    )
    cls = StreamingDataLoader if loader_class == "StreamingDataLoader" else DataLoader
    loader = cls(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        epochs.append([s["__key__"] for s in loader])
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_spawn_workers_and_pickling(remote, tmp_path):
    write_dataset(remote.put, [4, 4, 4])
    ds = _dataset(remote, tmp_path, decode={"cls": "int"})
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.source.storage_options == ds.source.storage_options
    # memory:// lives in one process: forked workers inherit it, spawned ones cannot see it
    context = "fork" if remote.protocol == "memory" else "spawn"
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    assert sorted(keys_of(loader)) == sorted(sample_key(s, i) for s in range(3) for i in range(4))


def test_num_samples_is_learned_from_full_reads(remote, tmp_path):
    counts = [3, 0, 5, 2]
    write_dataset(remote.put, counts)
    ds = _dataset(remote, tmp_path)
    assert ds.num_samples is None  # no index.wds, nothing read yet
    it = iter(ds)
    next(it)
    it.close()  # stopped inside the first shard: nothing is known
    assert ds.num_samples is None
    assert len(list(ds)) == sum(counts)
    assert ds.num_samples == sum(counts)
    # another process of the same machine (same cache_dir) knows it without reading
    assert _dataset(remote, tmp_path).num_samples == sum(counts)
    assert _dataset(remote, tmp_path, cache_dir=str(tmp_path / "other")).num_samples is None


def test_num_samples_learned_in_workers_and_forgotten_for_a_replaced_shard(tmp_path):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [4, 6, 1])
    ds = StreamingWebDataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert len(list(DataLoader(ds, batch_size=None, num_workers=2))) == 11
    assert ds.num_samples == 11
    (tmp_path / "shard-000001.tar").write_bytes(make_shard(1, 2))
    os.utime(tmp_path / "shard-000001.tar", (1, 1))  # a new version (size and mtime)
    fresh = StreamingWebDataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert fresh.num_samples is None
    assert len(list(fresh)) == 7
    assert fresh.num_samples == 7


def test_index_gives_num_samples_and_equalize(tmp_path, monkeypatch):
    counts = [9, 1, 4, 2, 7]
    write_indexed(tmp_path, counts)
    assert StreamingWebDataset(str(tmp_path)).num_samples == sum(counts)
    assert StreamingWebDataset(str(tmp_path)).num_shards == 5
    for policy in ("drop", "repeat"):
        per_rank = []
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            ds = StreamingWebDataset(str(tmp_path), equalize=policy, cache_dir=str(tmp_path / "c"))
            per_rank.append(keys_of(DataLoader(ds, batch_size=None, num_workers=2)))
        assert len(per_rank[0]) == len(per_rank[1]), policy
        if policy == "drop":
            assert len(set(per_rank[0]) | set(per_rank[1])) == len(per_rank[0]) * 2
        else:
            assert set(per_rank[0]) | set(per_rank[1]) == {
                sample_key(s, i) for s, n in enumerate(counts) for i in range(n)
            }


@pytest.mark.parametrize("equalize", [None, "drop", "repeat"])
def test_an_index_count_that_the_shard_does_not_match_is_an_error(tmp_path, equalize):
    from wdsfs.errors import IndexFormatError

    write_indexed(tmp_path, [5, 9], claimed=[9, 9])  # shard 0 holds 5, not 9
    dataset = StreamingWebDataset(str(tmp_path), equalize=equalize, cache_dir=str(tmp_path / "c"))

    with pytest.raises(
        IndexFormatError, match=r"shard-000000.tar: 5 samples, but index.wds says 9"
    ):
        list(dataset)


def test_equalize_without_counts_is_a_clear_error(tmp_path):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [2])
    with pytest.raises(ValueError, match="index.wds"):
        list(StreamingWebDataset(str(tmp_path), equalize="drop", cache_dir=str(tmp_path / "c")))


@pytest.mark.s3
def test_direct_io_reads_shards_split_between_workers_exactly_once(s3_bucket, tmp_path):
    """With direct I/O, readers that share a shard seek past each other's samples in it."""
    write_dataset(s3_bucket.put, [40, 3], payload=9_000)  # unaligned members, 2 shards, 3 readers
    buffered = _dataset(s3_bucket, tmp_path / "buffered")
    expected = sorted(buffered, key=lambda s: s["__key__"])
    assert len(expected) == 43
    for cache in ("cold", "warm"):
        ds = _dataset(s3_bucket, tmp_path, direct_io=True)
        samples = list(DataLoader(ds, batch_size=None, num_workers=3))
        assert sorted(samples, key=lambda s: s["__key__"]) == expected, cache
    assert len(ds.cache) == 2


@pytest.mark.s3
def test_break_and_consumer_errors_stop_background_work(s3_bucket, tmp_path):
    write_dataset(s3_bucket.put, [50] * 8, payload=20_000)
    ds = StreamingWebDataset(
        s3_bucket.url,
        storage_options=s3_bucket.storage_options,
        cache_dir=str(tmp_path / "c"),
        prefetch=4,
    )
    iterator = iter(ds)
    next(iterator)
    assert _wdsfs_threads()
    iterator.close()  # what `break` does once the loop's iterator is dropped
    assert not _wdsfs_threads()

    def consume():
        for i, _ in enumerate(ds):
            if i == 3:
                raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        consume()
    gc.collect()
    assert not _wdsfs_threads()


@pytest.mark.s3
def test_background_errors_surface_in_the_consumer(s3_bucket, tmp_path):
    write_dataset(s3_bucket.put, [3, 3])
    ds = StreamingWebDataset(
        s3_bucket.url, storage_options=s3_bucket.storage_options, cache_dir=str(tmp_path / "c")
    )
    ds.shards()
    s3_bucket.fs.rm(s3_bucket.join("shard-000001.tar"))  # vanishes after listing
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        list(DataLoader(ds, batch_size=None, num_workers=1))
    gc.collect()
    assert not _wdsfs_threads()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_is_an_error_naming_it(tmp_path, num_workers):
    good = make_shard(0, 5)
    (tmp_path / "shard-000000.tar").write_bytes(good)
    (tmp_path / "shard-000001.tar").write_bytes(make_shard(1, 5)[:1500])  # truncated
    ds = StreamingWebDataset(str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(CorruptShardError, match="shard-000001.tar"):
        list(DataLoader(ds, batch_size=None, num_workers=num_workers))


def _ddp_rank(rank, world_size, port, root, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        ds = StreamingWebDataset(root, shuffle=True, seed=5, cache_dir=os.path.join(root, "cache"))
        keys = [s["__key__"] for s in DataLoader(ds, batch_size=None, num_workers=2)]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(keys, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_distributed_ranks_partition(tmp_path):
    from tests.servers import free_port

    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [6, 5, 4, 3, 2])
    torch.multiprocessing.spawn(
        _ddp_rank, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] and ranks[1]
    assert not set(ranks[0]) & set(ranks[1])
    assert len(ranks[0]) + len(ranks[1]) == 20


_CTRL_C_SCRIPT = """
import json, sys, threading
from wdsfs import StreamingWebDataset
url, options, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ds = StreamingWebDataset(url, storage_options=options, cache_dir=cache, prefetch=3)
try:
    for i, sample in enumerate(ds):
        if i == 0:
            print("first", flush=True)
except KeyboardInterrupt:
    names = [t.name for t in threading.enumerate() if t.name.startswith("wdsfs-")]
    print("interrupted", json.dumps(names), flush=True)
    sys.exit(3)
"""


@pytest.mark.s3
def test_ctrl_c_stops_downloads_promptly(s3_bucket, fault_proxy, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    write_dataset(s3_bucket.put, [40] * 6, payload=100_000)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    proxy.throttle(2 * 1024 * 1024)  # per connection: the epoch would take many seconds
    options = s3_bucket.options_for(proxy.endpoint_url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CTRL_C_SCRIPT,
            s3_bucket.url,
            json.dumps(options),
            str(tmp_path / "c"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "first"
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, out
    line = out.strip().splitlines()[-1]
    assert line.startswith("interrupted")
    assert json.loads(line.split(" ", 1)[1]) == []  # no fetch thread left running
    assert elapsed < 3.0, elapsed
    assert not list((tmp_path / "c" / "tmp").glob("*.part"))
