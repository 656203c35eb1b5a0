"""StreamingDataLoader's workers: packs of unbatched samples, large fields through shared
memory or left in the cached shard, forking with the parent's heap frozen, and the head start
(the main process fetches each new worker's first shard)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from tests.datasets import make_shard, sample_key, write_dataset
from tests.loader_helpers import (
    flat,
    keys_collate,
    make_loader,
    make_sample_loader,
    run_epoch,
    write,
)
from wdsfs import StreamingDataLoader, StreamingWebDataset
from wdsfs._packs import ends_pack

pytestmark = pytest.mark.torch


def test_workers_send_unbatched_samples_in_packs(tmp_path):
    root = tmp_path / "ds"
    write(root, [6, 6])
    loader = make_sample_loader(root, tmp_path / "c", num_workers=2, pack_size=3, shuffle=False)
    assert loader.pack_size == 3 and loader.batch_size is None
    # reader 0 reads shard 0, reader 1 shard 1; packs end after a reader's 1st, 2nd, 3rd, 6th
    runs = [(0, [0]), (1, [0]), (0, [1]), (1, [1]), (0, [2]), (1, [2])]
    runs += [(0, [3, 4, 5]), (1, [3, 4, 5])]
    assert list(loader) == [sample_key(shard, i) for shard, indices in runs for i in indices]
    one_by_one = make_sample_loader(root, tmp_path / "c", num_workers=2, pack_size=1, shuffle=False)
    assert list(one_by_one) == [sample_key(i % 2, i // 2) for i in range(12)]  # as torch's
    batched = make_loader(root, tmp_path / "c", num_workers=2, batch_size=2)
    assert batched.pack_size == 1  # batches travel as they are
    with pytest.raises(ValueError, match="pack_size"):
        make_sample_loader(root, tmp_path / "c", num_workers=2, pack_size=0)


def test_packs_grow_from_one_sample_to_pack_size():
    ends = [n for n in range(1, 100) if ends_pack(n, 32)]
    assert ends == [1, 2, 4, 8, 16, 32, 64, 96]  # packs of 1, 1, 2, 4, 8, 16, then 32
    assert [n for n in range(1, 30) if ends_pack(n, 10)] == [1, 2, 4, 8, 10, 20]
    assert all(ends_pack(n, 1) for n in range(1, 10))


class _WaitsAfterFirst:
    """A transform: a worker's samples after its first wait until ``flag`` exists."""

    def __init__(self, flag: Path) -> None:
        self.flag, self.seen = flag, 0

    def __call__(self, sample):
        self.seen += 1
        if self.seen > 1:
            for _ in range(500):  # 10 s, then the loader fails
                if self.flag.exists():
                    return sample
                time.sleep(0.02)
            raise TimeoutError("the first sample never reached the main process")
        return sample


def test_a_worker_sends_its_first_sample_without_waiting_for_a_full_pack(tmp_path):
    root = tmp_path / "ds"
    write(root, [40])
    flag = tmp_path / "first-received"
    dataset = StreamingWebDataset(
        str(root), cache_dir=str(tmp_path / "c"), transform=_WaitsAfterFirst(flag)
    )
    loader = StreamingDataLoader(dataset, batch_size=None, num_workers=1, pack_size=32)
    keys = []
    for sample in loader:
        flag.touch()  # the worker's second sample and the rest go on only now
        keys.append(sample["__key__"])
    assert keys == [sample_key(0, i) for i in range(40)]


def test_plain_samples_pass_unconverted_and_others_as_default_convert() -> None:
    import numpy as np
    import torch
    from torch.utils.data._utils.collate import default_convert

    from wdsfs._tracking import convert_sample

    plain = {"__key__": "a", "jpg": b"x", "cls": 3, "score": 0.5, "none": None}
    assert convert_sample(plain) == default_convert(plain) == plain
    mixed = {"__key__": "a", "npy": np.arange(3)}
    converted = convert_sample(mixed)
    assert isinstance(converted["npy"], torch.Tensor)
    assert converted["npy"].tolist() == [0, 1, 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_worker_result_pipe_is_widened(tmp_path: Path) -> None:
    import fcntl

    keys = write(tmp_path / "ds", [3, 3])
    loader = make_loader(tmp_path / "ds", tmp_path / "c", num_workers=1, batch_size=2)
    iterator = loader._get_iterator()
    try:
        reader = iterator._worker_result_queue._reader
        size = fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ)
        with open("/proc/sys/fs/pipe-max-size") as f:
            assert size == min(1024 * 1024, int(f.read()))
        assert set(flat(t.batch for t in iterator)) == keys  # batches still cross intact
    finally:
        iterator._shutdown_workers()


def _samples_through(root, cache, **loader_kwargs):
    """Every sample of an epoch (as the collate got it, bytes and all), and whether some
    batches came through the workers' shared-memory rings."""
    from wdsfs import _shared_rings

    dataset = StreamingWebDataset(str(root), cache_dir=str(cache))
    loader = StreamingDataLoader(dataset, collate_fn=list, **loader_kwargs)
    samples, through_rings = [], False
    for batch in loader:
        samples.extend(batch)
        through_rings = through_rings or any(r.batches for r in _shared_rings._OPEN.values())
    return sorted(samples, key=lambda s: s["__key__"]), through_rings


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfds are Linux's")
def test_large_samples_cross_from_forked_workers_through_shared_memory(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    write_dataset(lambda name, data: (root / name).write_bytes(data), [9, 8, 7], payload=60_000)
    expected, _ = _samples_through(root, tmp_path / "c0", batch_size=4, num_workers=0)

    got, through_rings = _samples_through(
        root, tmp_path / "c1", batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    assert through_rings and got == expected
    assert all(type(s["bin"]) is bytes and len(s["bin"]) == 60_000 for s in got)

    # persistent workers keep their rings from one epoch to the next
    dataset = StreamingWebDataset(str(root), cache_dir=str(tmp_path / "c2"))
    loader = StreamingDataLoader(
        dataset,
        batch_size=None,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert sorted(s["__key__"] for s in loader) == [s["__key__"] for s in expected]


def _slice_reads() -> int:
    from wdsfs import _shared_rings

    return sum(c.reads for rings in _shared_rings._OPEN.values() for c in rings.channels)


def _epoch_and_slice_reads(dataset, **loader_kwargs):
    """Every sample of an epoch (batches unbatched) and the file slices the main process read."""
    loader = StreamingDataLoader(
        dataset, num_workers=2, multiprocessing_context="fork", **loader_kwargs
    )
    samples, reads = [], 0
    for batch in loader:
        if isinstance(batch, dict) and isinstance(batch["__key__"], list):  # default_collate
            batch = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["__key__"]))]
        samples.extend(batch if isinstance(batch, list) else [batch])
        reads = max(reads, _slice_reads())
    return samples, reads


def _same_sample(sample):
    """A user's collate_fn for batch_size=None that returns the sample (wdsfs cannot know)."""
    return sample


def _tag(sample):
    return {**sample, "tagged": True}


class _TaggingInIter(StreamingWebDataset):
    """A subclass that post-processes samples in its own ``__iter__``."""

    def __iter__(self):
        return map(_tag, super().__iter__())


def test_a_subclass_with_its_own_iter_gets_samples_not_packs(tmp_path: Path) -> None:
    keys = write(tmp_path / "ds", [5, 4])
    dataset = _TaggingInIter(str(tmp_path / "ds"), cache_dir=str(tmp_path / "c"))
    loader = StreamingDataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    assert loader.pack_size == 1
    samples = list(loader)
    assert {s["__key__"] for s in samples} == keys and all(s["tagged"] for s in samples)


class _Overriding(StreamingWebDataset):
    """A subclass with its own ``__iter__`` (which could read any field)."""

    def __iter__(self):
        yield from super().__iter__()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfds are Linux's")
@pytest.mark.parametrize("batch_size", [None, 4])
def test_workers_leave_fields_nobody_reads_in_the_shard_for_the_main_process(
    tmp_path: Path, batch_size
) -> None:
    """With the default collate, a field no code of the worker reads crosses as a place in
    the cached shard; the user gets the same bytes, and no descriptor is left open."""
    import gc

    root = tmp_path / "ds"
    root.mkdir()
    write_dataset(lambda name, data: (root / name).write_bytes(data), [9, 8, 7], payload=60_000)
    expected, _ = _samples_through(root, tmp_path / "c0", batch_size=4, num_workers=0)
    gc.collect()
    fds = set(os.listdir("/proc/self/fd"))

    dataset = StreamingWebDataset(str(root), cache_dir=str(tmp_path / "c1"))
    got, reads = _epoch_and_slice_reads(dataset, batch_size=batch_size)
    assert reads == 24  # every sample's 60 KB "bin"
    assert sorted(got, key=lambda s: s["__key__"]) == expected
    assert all(type(s["bin"]) is bytes for s in got)
    del dataset
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= fds

    # a decoded field is read in the worker (the others here are too small to leave)
    dataset = StreamingWebDataset(str(root), cache_dir=str(tmp_path / "c1"), decode={"bin": len})
    got, reads = _epoch_and_slice_reads(dataset, batch_size=batch_size)
    assert reads == 0 and all(int(s["bin"]) == 60_000 for s in got)

    # code that could read them in the worker: every field is read there
    for cls, kwargs, loader_kwargs in (
        (StreamingWebDataset, {"transform": _tag}, {}),
        (_Overriding, {}, {}),
        (StreamingWebDataset, {}, {"collate_fn": _same_sample if batch_size is None else list}),
    ):
        dataset = cls(str(root), cache_dir=str(tmp_path / "c1"), **kwargs)
        got, reads = _epoch_and_slice_reads(dataset, batch_size=batch_size, **loader_kwargs)
        assert reads == 0 and len(got) == 24


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfds are Linux's")
def test_file_slices_keep_the_shuffle_and_its_byte_bound_exactly(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    write_dataset(lambda name, data: (root / name).write_bytes(data), [9, 8, 7], payload=20_000)

    def order(collate_fn):
        dataset = StreamingWebDataset(
            str(root),
            cache_dir=str(tmp_path / "c"),
            shuffle=True,
            seed=3,
            buffer_size=6,
            memory_buffer_limit=70_000,  # the byte bound holds fewer samples than the slots
        )
        kwargs = {"collate_fn": collate_fn} if collate_fn else {}
        samples, reads = _epoch_and_slice_reads(dataset, batch_size=None, **kwargs)
        return [s["__key__"] for s in samples], reads

    sliced, reads = order(None)
    read, no_reads = order(_same_sample)
    assert reads > 0 and no_reads == 0
    assert sliced == read


def _with_freeze_count(sample):
    """A transform run in the workers: what gc.freeze() left frozen there."""
    import gc

    return {**sample, "frozen": gc.get_freeze_count()}


@pytest.mark.parametrize("user_froze", [False, True], ids=["default", "user-froze"])
def test_workers_fork_with_the_parents_objects_frozen(tmp_path: Path, user_froze) -> None:
    """The parent's objects are out of the forked workers' collections (no copy of its whole
    heap at their first full collection), and the parent gets its own objects back."""
    import gc

    keys = write(tmp_path / "ds", [4, 4])
    dataset = StreamingWebDataset(
        str(tmp_path / "ds"), cache_dir=str(tmp_path / "c"), transform=_with_freeze_count
    )
    loader = StreamingDataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    if user_froze:
        gc.freeze()  # the user's own freeze: left as it is
    try:
        samples = list(loader)
        assert (gc.get_freeze_count() > 0) == user_froze  # unfrozen, unless the user froze
    finally:
        gc.unfreeze()
    assert {s["__key__"] for s in samples} == keys
    assert all(s["frozen"] > 0 for s in samples)


@pytest.mark.slow
def test_spawned_workers_send_their_batches_inline(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    write_dataset(lambda name, data: (root / name).write_bytes(data), [5, 4], payload=60_000)
    expected, _ = _samples_through(root, tmp_path / "c0", batch_size=3, num_workers=0)

    got, through_rings = _samples_through(
        root, tmp_path / "c1", batch_size=3, num_workers=2, multiprocessing_context="spawn"
    )
    assert not through_rings and got == expected


def _first_shard_of_each_worker(dataset, num_workers):
    from wdsfs.plan import ReaderId

    shards = dataset.shards()
    return [
        shards[dataset.epoch_work(ReaderId(0, 1, worker, num_workers)).items[0].shard].url
        for worker in range(num_workers)
    ]


def _fetched_here(records):
    """URLs this process (not its workers, which log in their own) fetched or found cached."""
    return {
        record.args[0]
        for record in records
        if record.name == "wdsfs.download" and record.msg.startswith(("downloaded", "cache hit"))
    }


@pytest.mark.s3
def test_main_process_fetches_each_new_workers_first_shard(s3_bucket, tmp_path, caplog):
    write_dataset(s3_bucket.put, [4] * 6)
    dataset = StreamingWebDataset(
        s3_bucket.url,
        storage_options=s3_bucket.storage_options,
        cache_dir=str(tmp_path / "cache"),
        shuffle=True,
        seed=3,
    )
    loader = StreamingDataLoader(dataset, batch_size=2, num_workers=2, collate_fn=keys_collate)
    firsts = _first_shard_of_each_worker(dataset, 2)

    assert [s.url for s in dataset.first_shards(2)] == firsts
    with caplog.at_level(logging.DEBUG, logger="wdsfs.download"):
        keys = flat(run_epoch(loader))

    assert sorted(keys) == sorted(sample_key(s, i) for s in range(6) for i in range(4))
    # this process fetched exactly the workers' first shards: downloaded, or found in the
    # cache if a worker was first to take the shard's lock
    assert _fetched_here(caplog.records) == set(firsts)


@pytest.mark.s3
def test_a_cache_smaller_than_the_workers_read_ahead_neither_hangs_nor_repeats(s3_bucket, tmp_path):
    # 3 workers each keep up to 3 shards (the one read, prefetch=2) in flight: 9 shards
    # wanted at once in a cache that holds 2. Shards are evicted while workers read them.
    counts = [6] * 12
    write_dataset(s3_bucket.put, counts, payload=100_000)
    shard_bytes = len(make_shard(0, 6, 100_000))
    cache_dir = tmp_path / "cache"
    dataset = StreamingWebDataset(
        s3_bucket.url,
        storage_options=s3_bucket.storage_options,
        cache_dir=str(cache_dir),
        cache_limit=int(2.5 * shard_bytes) + 256 * 1024,  # 2 shards and the SQLite index
        shuffle=True,
        seed=1,
    )
    loader = StreamingDataLoader(dataset, batch_size=4, num_workers=3, collate_fn=keys_collate)
    expected = sorted(sample_key(s, i) for s, n in enumerate(counts) for i in range(n))
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert sorted(flat(run_epoch(loader))) == expected
        assert dataset.cache.volume() <= dataset.cache.cache_limit
        assert 1 <= len(dataset.cache.keys()) <= 2
    assert not list((cache_dir / "tmp").glob("*"))  # no download left half-written


def test_no_head_start_for_a_resumed_epoch(tmp_path):
    root = tmp_path / "ds"
    write(root, [3] * 4)
    loader = make_loader(root, tmp_path / "cache", num_workers=2, batch_size=2)
    first = run_epoch(loader, stop_after=1)
    resumed = make_loader(root, tmp_path / "cache", num_workers=2, batch_size=2)
    resumed.load_state_dict(loader.state_dict())

    assert resumed.streaming_dataset.first_shards(2) == []  # its readers start mid-shard
    assert len(flat(first)) + len(flat(run_epoch(resumed))) == 12


@pytest.mark.s3
def test_no_head_start_for_persistent_workers_already_running(s3_bucket, tmp_path, caplog):
    write_dataset(s3_bucket.put, [3] * 4)
    dataset = StreamingWebDataset(
        s3_bucket.url, storage_options=s3_bucket.storage_options, cache_dir=str(tmp_path / "c")
    )
    loader = StreamingDataLoader(
        dataset, batch_size=2, num_workers=2, persistent_workers=True, collate_fn=keys_collate
    )
    fetched = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="wdsfs.download"):
            assert len(flat(run_epoch(loader))) == 12
        fetched.append(_fetched_here(caplog.records))

    assert fetched == [set(_first_shard_of_each_worker(dataset, 2)), set()]
