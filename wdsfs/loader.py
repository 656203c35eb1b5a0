"""StreamingDataLoader: a torch DataLoader that knows what it delivered, for exact resumption.

Each batch reaches the main process with its reader's stream state after it (see
:mod:`wdsfs._tracking`); the main process unwraps it, keeps the state of the last batch it
handed out per reader, and returns the user's batch untouched. ``state_dict()`` is therefore
exact at any point between batches and its size does not depend on the number of samples.

Resuming with the same world size, ``num_workers`` and batch size continues each reader exactly
where it stopped, shuffle buffer included, and rotates the DataLoader's round robin so that the
order of batches is identical to the uninterrupted run. Resuming with a different number of
workers or ranks (elastic) deals the remaining work out again: every sample of the epoch is still
delivered exactly once, in a different order.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
import weakref
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from wdsfs import _shared_rings as shared_rings
from wdsfs._head_start import HeadStart
from wdsfs._loader_state import (
    FORMAT,
    VERSION,
    dataset_fingerprint,
    gather_state_dict,
    merge_state_dicts,
    validated,
)
from wdsfs._malloc import keep_freed_memory
from wdsfs._reader_work import Resume, ResumedWork
from wdsfs._tracking import Tracked, TrackingCollate, convert_sample
from wdsfs._workers import frozen_heap, widen_result_pipe
from wdsfs.dataset import StreamingWebDataset
from wdsfs.errors import StateMismatchError
from wdsfs.plan import WorkItem
from wdsfs.stream import ReaderState

__all__ = ["StreamingDataLoader", "gather_state_dict", "merge_state_dicts"]

# the workers' shared-memory rings (see wdsfs._shared_rings): bounds, and the size of a sample
# assumed when the index does not tell
_RING_MIN = 1024 * 1024
_RING_MAX = 64 * 1024 * 1024
_RING_SAMPLE_GUESS = 128 * 1024


class StreamingDataLoader(DataLoader[Any]):
    """A DataLoader over a :class:`StreamingWebDataset` with ``state_dict``/``load_state_dict``.

    Takes DataLoader's arguments (``batch_size``, ``num_workers``, ``collate_fn``,
    ``persistent_workers``, ``pin_memory``, ``multiprocessing_context``...). ``collate_fn`` is
    wrapped, never replaced: batches are exactly what it returns.

    When it starts workers, the main process downloads each worker's first shard while they
    start (see the shard cache's docs). With ``num_workers=0`` and no ``pin_memory`` it makes
    the batches itself, exactly as torch's single-process iterator does, without that
    iterator's per-batch profiler range.

    With ``batch_size=None`` and workers, each worker sends its samples to the main process
    in packs of up to ``pack_size`` (the first ones smaller: 1, 1, 2, 4... so the first sample
    leaves at once), which hands them out one by one: the round robin over the workers then
    takes a pack from each, where torch's takes one sample.

    Args:
        dataset: The dataset to load.
        batch_size: Samples per batch (``None``: no batching, samples one by one).
        pack_size: With ``batch_size=None`` and workers: the most samples a worker sends at
            once (1: one by one, as torch does; more saves the main process ~100 us a sample).
            Always 1 for a dataset class that overrides ``__iter__``, which then gets
            samples from ``super().__iter__()`` one by one.
        **kwargs: Any other DataLoader argument.
    """

    def __init__(
        self,
        dataset: StreamingWebDataset,
        batch_size: int | None = 1,
        *,
        pack_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, StreamingWebDataset):
            raise TypeError("StreamingDataLoader needs a StreamingWebDataset")
        if pack_size < 1:
            raise ValueError(f"pack_size must be >= 1, not {pack_size}")
        for name in ("sampler", "batch_sampler", "shuffle"):
            if kwargs.get(name):
                raise ValueError(f"{name}= does not apply: the dataset plans and shuffles itself")
        user_collate = kwargs.pop("collate_fn", None)
        if user_collate is None:
            user_collate = default_collate if batch_size is not None else convert_sample
        dataset.shards()  # list once here; forked workers inherit the list
        super().__init__(
            dataset,
            batch_size=batch_size,
            collate_fn=TrackingCollate(user_collate, dataset),
            **kwargs,
        )
        dataset.batch_size_hint = batch_size or 1
        dataset.num_workers_hint = self.num_workers
        # a subclass's own __iter__ sees what the base one yields: samples, never packs
        own_iter = type(dataset).__iter__ is not StreamingWebDataset.__iter__
        packs = batch_size is None and self.num_workers > 0 and not own_iter
        self.pack_size = pack_size if packs else 1
        dataset.pack_size_hint = self.pack_size
        self._states: dict[int, ReaderState] = {}
        self._items: dict[int, list[list[int | None]]] = {}
        self._last_reader: int | None = None
        self._pack_open = False  # the last sample handed out was not the last of its pack
        self._delivered = 0
        self._finished = False
        self._iter_epoch = dataset.epoch

    def __len__(self) -> int:
        """Batches (samples with ``batch_size=None``) this rank yields in an epoch.

        Exact with workers too: each worker batches its own samples, so each ends the epoch
        with a partial batch of its own (dropped with ``drop_last``). A ``TypeError`` while a
        shard's sample count is unknown (see :attr:`StreamingWebDataset.num_samples`).
        """
        lengths = self.streaming_dataset.reader_lengths(self.num_workers)
        size = self.batch_size
        if size is None:
            return sum(lengths)
        return sum(n // size if self.drop_last else -(-n // size) for n in lengths)

    @property
    def streaming_dataset(self) -> StreamingWebDataset:
        dataset = self.dataset
        assert isinstance(dataset, StreamingWebDataset)
        return dataset

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.streaming_dataset
        resuming = dataset._resume is not None and dataset._resume.epoch == dataset.epoch
        if not resuming:
            self._states, self._items, self._last_reader, self._delivered = {}, {}, None, 0
            self._pack_open = False
        self._finished = False
        self._iter_epoch = dataset.epoch
        dataset.capture_distributed()
        starting = self.num_workers > 0 and not (
            self.persistent_workers and self._iterator is not None
        )
        here = self.num_workers == 0 and not self.pin_memory
        head_start = self._head_start(dataset, starting)
        try:
            # (torch's iterator forks the workers here, before any thread of the head start)
            iterator = self._batches_here(dataset) if here else super().__iter__()
        except BaseException:
            head_start.__exit__(None, None, None)  # releases its claims
            raise
        try:
            with head_start:
                for tracked in iterator:
                    if tracked.items is not None:
                        self._items[tracked.reader] = tracked.items
                    self._last_reader = tracked.reader
                    if tracked.states is None:
                        self._states[tracked.reader] = tracked.state
                        self._delivered += tracked.samples
                        yield tracked.batch
                        continue
                    states = tracked.states  # a pack: its samples one by one
                    for i, sample in enumerate(tracked.batch):
                        self._states[tracked.reader] = states[i]
                        self._pack_open = i < len(states) - 1
                        self._delivered += 1
                        yield sample
            self._finished = True
        finally:
            dataset._resume = None
            if isinstance(iterator, Generator):
                iterator.close()

    def _batches_here(self, dataset: StreamingWebDataset) -> Generator[Tracked, None, None]:
        """The batches of ``num_workers=0``, made here as torch's single-process iterator would.

        Same batches (``batch_size``, ``drop_last``, ``collate_fn``) without its per-batch
        bookkeeping (a profiler range, the fetcher), which costs ~10 us a sample: a third of
        the time of an unbatched epoch from the cache.
        """
        collate = self.collate_fn
        assert isinstance(collate, TrackingCollate)
        # torch's iterator draws its workers' base seed: the same draw keeps the random stream
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        samples = iter(dataset)
        try:
            if self.batch_size is None:
                for sample in samples:
                    yield collate(sample)
                return
            while batch := list(itertools.islice(samples, self.batch_size)):
                if self.drop_last and len(batch) < self.batch_size:
                    return
                yield collate(batch)
        finally:
            close = getattr(samples, "close", None)
            if close is not None:
                close()

    def _head_start(
        self, dataset: StreamingWebDataset, starting: bool
    ) -> contextlib.AbstractContextManager[object]:
        """Fetch the workers' first shards here while new workers start (none otherwise)."""
        if not starting:
            return contextlib.nullcontext()
        head_start = HeadStart(dataset.fetcher(), dataset.first_shards(self.num_workers))
        head_start.claim()  # before the workers fork: they wait for these shards
        return head_start

    def _get_iterator(self) -> Any:
        collate = self.collate_fn
        assert isinstance(collate, TrackingCollate)
        dataset = self.streaming_dataset
        if self.num_workers > 0:
            keep_freed_memory()  # the workers' batches arrive whole: keep their pages
        rings = None
        if self.num_workers > 0 and shared_rings.available(self.multiprocessing_context):
            rings = collate.rings = shared_rings.BatchRings(self.num_workers, self._ring_bytes())
            if collate.default:
                dataset.file_slices_hint = shared_rings.MIN_BYTES
        try:
            with frozen_heap():
                iterator = super()._get_iterator()  # forks the workers, which inherit the rings
        except BaseException:
            if rings is not None:
                rings.close()
            raise
        finally:
            collate.rings = None
            dataset.file_slices_hint = 0
        if rings is not None:
            weakref.finalize(iterator, rings.close)
        widen_result_pipe(iterator)
        return iterator

    def _ring_bytes(self) -> int:
        """Each worker's ring: its batches in flight (``prefetch_factor``) and one more."""
        shards = self.streaming_dataset.shards()
        sizes = [shard.size for shard in shards if shard.size is not None]
        counts = [shard.num_samples for shard in shards if shard.num_samples is not None]
        samples: int = sum(counts)
        per_sample = _RING_SAMPLE_GUESS
        if len(sizes) == len(counts) == len(shards) and samples:  # all known: an index
            per_sample = sum(sizes) // samples
        batches = (self.prefetch_factor or 2) + 1
        wanted = batches * (self.batch_size or self.pack_size) * per_sample
        return int(min(max(wanted, _RING_MIN), _RING_MAX))

    def _config(self) -> dict[str, Any]:
        dataset = self.streaming_dataset
        _, world_size = self.streaming_dataset.rank_and_world_size()
        return {
            "world_size": world_size,
            "num_workers": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "pack_size": self.pack_size,
            "seed": dataset.seed,
            "shuffle": dataset.shuffle,
            "buffer_size": dataset.buffer_size,
            "memory_buffer_limit": dataset.memory_buffer_limit,
            "equalize": dataset.equalize,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: JSON-serialisable, size independent of the number of samples.

        Under torch.distributed use :func:`gather_state_dict` to collect every rank's.
        """
        dataset = self.streaming_dataset
        rank, _ = self.streaming_dataset.rank_and_world_size()
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": dataset_fingerprint(dataset),
            "num_shards": dataset.num_shards,
            "epoch": self._iter_epoch,
            "finished": self._finished,
            "config": self._config(),
            "ranks": {
                str(rank): {
                    "last_reader": self._last_reader,
                    "delivered": self._delivered,
                    "pack_open": self._pack_open,
                }
            },
            "readers": {str(k): v.to_json() for k, v in sorted(self._states.items())},
            "items": {str(k): v for k, v in sorted(self._items.items())},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue after the last sample delivered when ``state_dict`` was taken.

        Call it before iterating, on a fresh loader over a fresh dataset of the same data.

        Raises:
            StateMismatchError: The state belongs to another dataset, or is malformed, or
                elastic resumption lacks the states of some ranks.
        """
        sd = validated(state_dict)
        dataset = self.streaming_dataset
        if sd["fingerprint"] != dataset_fingerprint(dataset):
            raise StateMismatchError(
                f"{dataset.source.url}: this state_dict was saved for another dataset "
                f"(shard list fingerprint {sd['fingerprint']} != {dataset_fingerprint(dataset)})",
                url=dataset.source.url,
            )
        old = sd["config"]
        for key in ("seed", "shuffle", "buffer_size", "memory_buffer_limit", "equalize"):
            if old[key] != getattr(dataset, key):
                raise StateMismatchError(
                    f"state_dict has {key}={old[key]!r} but the dataset has "
                    f"{key}={getattr(dataset, key)!r}; resume with the same plan settings"
                )
        if sd["finished"]:
            dataset.set_epoch(sd["epoch"] + 1)
            dataset._resume = None
            return
        dataset.set_epoch(sd["epoch"])
        new = self._config()
        old_count = old["world_size"] * old["num_workers"]
        rank, _ = self.streaming_dataset.rank_and_world_size()
        states = {int(k): ReaderState.from_json(v) for k, v in sd["readers"].items()}
        saved_items = {int(k): [WorkItem.from_json(i) for i in v] for k, v in sd["items"].items()}
        same = (old["world_size"], old["num_workers"]) == (new["world_size"], new["num_workers"])
        if same and str(rank) not in sd["ranks"]:
            raise StateMismatchError(f"state_dict has no state for rank {rank}")
        if not same:
            missing = set(range(old["world_size"])) - {int(r) for r in sd["ranks"]}
            if missing:
                raise StateMismatchError(
                    f"elastic resume needs every rank's state; missing ranks {sorted(missing)} "
                    "(save the output of wdsfs.gather_state_dict)"
                )
        offset = 0
        ours = sd["ranks"].get(str(rank), {})
        last = ours.get("last_reader")
        if same and last is not None:
            # the next reader in the round robin; the same one if it was in the middle of a pack
            step = 0 if ours.get("pack_open") else 1
            offset = (last % old["num_workers"] + step) % old["num_workers"]
        work_for = ResumedWork(states, saved_items, old_count, same)
        dataset._resume = Resume(uuid.uuid4().hex, sd["epoch"], work_for, worker_offset=offset)
        mine = range(rank * new["num_workers"], (rank + 1) * new["num_workers"])
        self._states = {k: v for k, v in states.items() if same and k in mine}
        self._items = {k: v for k, v in sd["items"].items() if same and int(k) in mine}
        self._last_reader = None
        self._pack_open = False
        self._delivered = sum(int(r.get("delivered", 0)) for r in sd["ranks"].values())
        self._iter_epoch = sd["epoch"]
