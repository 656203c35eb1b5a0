"""StreamingWebDataset: a torch IterableDataset over WebDataset shards in any fsspec storage.

It only wires the stages together::

    Source -> plan_epoch -> Fetcher (read-ahead window) -> ShardCache -> read_samples
           -> ReaderStream (shuffle buffer, resumable state) -> Decoder -> process_sample
           -> transform -> sample

Each DataLoader worker of each rank is one *reader*; the plan gives every reader its own shards
(or parts of shards when there are fewer shards than readers), so every sample is read exactly
once per epoch across all ranks and workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.context import get_spawning_popen
from typing import Any, Literal

from torch.utils.data import IterableDataset, get_worker_info

from wdsfs._dist import rank_and_world_size, worker_and_count
from wdsfs._file_slices import slicer
from wdsfs._fs import parse_size
from wdsfs._packs import packed
from wdsfs._readahead import Readahead
from wdsfs._reader_work import ReaderWork, Resume
from wdsfs.cache import DEFAULT_CACHE_LIMIT, ShardCache
from wdsfs.decode import Decoder
from wdsfs.download import DEFAULT_CHUNK_SIZE, Fetcher
from wdsfs.plan import ReaderId, WorkItem, count_samples, equalize_quotas, plan_epoch
from wdsfs.shard import Shard
from wdsfs.source import Source
from wdsfs.stream import ReaderState, ReaderStream, reader_seed
from wdsfs.tar import Refer

__all__ = ["StreamingWebDataset"]

logger = logging.getLogger(__name__)

Sample = dict[str, Any]

# the methods through which samples pass: a subclass that overrides one may read any field
_SEES = ("__iter__", "_iterate", "process_sample")


class StreamingWebDataset(IterableDataset[Sample]):
    """Stream WebDataset samples from any fsspec storage through a shared LRU disk cache.

    Args:
        remote: Dataset URL (``s3://bucket/ds``, ``gs://``, ``az://``, ``https://``, local path,
            brace pattern) or a list of shard URLs.
        split: Optional sub-prefix of ``remote`` (``"train"``).
        storage_options: fsspec options (credentials, ``endpoint_url``...).
        profile: AWS profile for ``s3://`` (as in streaming-wds).
        decode: Decoders per field: ``{"jpg": "pil", "json": "json", "cls": "int"}`` or
            callables; fields not listed stay bytes. ``schema=`` is the streaming-wds alias.
        transform: Called on each decoded sample (after :meth:`process_sample`).
        shuffle: Shuffle shard order and samples (through a buffer), per (seed, epoch).
        seed: Base seed of the shuffle, an int, the same on every rank (ranks split the
            shards by the order it gives); the same seed gives the same order in every run.
        buffer_size: Samples held by the shuffle buffer of each reader.
        memory_buffer_limit: Bytes bound of each reader's shuffle buffer (``"512MB"``).
        cache_dir: Directory of the shared shard cache (default: the user cache dir).
        cache_limit: Bytes of the shard cache (int or ``"10GB"``).
        max_workers: Concurrent connections per reader.
        prefetch: Shards downloading ahead of the one being read, per reader.
        equalize: ``None`` (each sample exactly once), ``"drop"`` or ``"repeat"``: every rank
            yields the same number of samples per epoch (needs sample counts from index.wds).
        max_attempts: Tries for transient errors and integrity failures.
        verify: Check MD5s where known (sizes are always checked).
        chunk_size: Bytes per ranged read.
        direct_io: Write each download with ``O_DIRECT`` and read shards from the cache the
            same way, bypassing the page cache. Faster for datasets larger than memory, with
            the cache on a fast local disk (NVMe) of a machine where new page-cache pages are
            costly (virtual machines); slower where the disk is slower than the network
            (network volumes), and for a dataset that fits in memory (later epochs read the
            disk, not the page cache). See docs/concepts/cache.md.

    Raises:
        ValueError: An unknown decoder name, a bad size, or a bad option value.
    """

    def __init__(
        self,
        remote: str | Sequence[str],
        split: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        profile: str | None = None,
        decode: Mapping[str, str | Callable[[bytes], Any]] | None = None,
        transform: Callable[[Sample], Any] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 1000,
        memory_buffer_limit: int | str = "1GB",
        cache_dir: str | None = None,
        cache_limit: int | str = DEFAULT_CACHE_LIMIT,
        max_workers: int = 8,
        prefetch: int = 2,
        equalize: Literal["drop", "repeat"] | None = None,
        max_attempts: int = 5,
        verify: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        direct_io: bool = False,
        schema: Mapping[str, str | Callable[[bytes], Any]] | None = None,
        memory_buffer_limit_bytes: int | str | None = None,
        file_cache_limit_bytes: int | str | None = None,
    ) -> None:
        if equalize not in (None, "drop", "repeat"):
            raise ValueError(f"equalize must be None, 'drop' or 'repeat', not {equalize!r}")
        if buffer_size < 0 or prefetch < 0 or max_workers < 1:
            raise ValueError("buffer_size and prefetch must be >= 0, max_workers >= 1")
        if decode is not None and schema is not None:
            raise ValueError("give decode= or its streaming-wds alias schema=, not both")
        self.source = Source(remote, split=split, storage_options=storage_options, profile=profile)
        self.decoder = Decoder(decode if decode is not None else schema)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = _integer("seed", seed)
        self.buffer_size = buffer_size if shuffle else 0
        self.memory_buffer_limit = parse_size(
            memory_buffer_limit_bytes
            if memory_buffer_limit_bytes is not None
            else memory_buffer_limit
        )
        self.cache = ShardCache(
            cache_dir,
            cache_limit=file_cache_limit_bytes
            if file_cache_limit_bytes is not None
            else cache_limit,
        )
        self.max_workers = max_workers
        self.prefetch = prefetch
        self.equalize = equalize
        self.max_attempts = max_attempts
        self.verify = verify
        self.chunk_size = chunk_size
        self.direct_io = direct_io
        self._distributed = rank_and_world_size()
        self.batch_size_hint = 1
        """Batch size of the loader (set by StreamingDataLoader): equalized quotas are whole
        batches, so every rank gets the same number of batches, not only of samples."""
        self.num_workers_hint: int | None = None
        """``num_workers`` of the loader (set by StreamingDataLoader): how this rank's samples
        are shared among its readers, which ``len()`` needs under torch.distributed."""
        self.pack_size_hint = 1
        """Samples a DataLoader worker yields at once, as one :class:`~wdsfs._packs.Pack`
        (set by StreamingDataLoader for ``batch_size=None``; 1: one by one)."""
        self.file_slices_hint = 0
        """In a forked DataLoader worker whose batches reach the main process through shared
        memory (set by StreamingDataLoader while it forks them): fields of at least this many
        bytes that no code reads in the worker travel as file slices (see
        :mod:`wdsfs._file_slices`); 0: never."""
        # In shared memory, so DataLoader workers (persistent ones too) see set_epoch; a plain
        # int after ordinary pickling (see __getstate__).
        self._epoch: Any = multiprocessing.get_context().Value("q", 0, lock=False)
        self._resume: Resume | None = None
        self._active: ReaderStream | None = None
        self._active_work: ReaderWork | None = None

    # -- pickling: travel to DataLoader workers as a recipe ---------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_active"] = None
        state["_active_work"] = None
        if get_spawning_popen() is None and not isinstance(self._epoch, int):
            state["_epoch"] = self.epoch  # plain pickling (not process start): a plain int
        return state

    # -- public API ---------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The current epoch (seeds the shuffle)."""
        return self._epoch if isinstance(self._epoch, int) else int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: shard order and sample shuffle are deterministic per (seed, epoch)."""
        epoch = _integer("epoch", epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        self.capture_distributed()
        if isinstance(self._epoch, int):
            self._epoch = epoch
        else:
            self._epoch.value = epoch

    def shards(self) -> list[Shard]:
        """The dataset's shards (listed on first use)."""
        return self.source.shards()

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.shards())

    @property
    def num_samples(self) -> int | None:
        """Total samples, once every shard's count is known, else None.

        A count comes from ``index.wds``, or from the shared cache, which remembers it for
        every shard read to its end (by any process using the same ``cache_dir``): without an
        index, ``num_samples`` is known after the first full epoch.
        """
        counts = self._shard_counts()
        return None if counts is None else sum(counts)

    def _shard_counts(self) -> list[int] | None:
        """Every shard's sample count (index.wds, else remembered by the cache), or None."""
        shards = self.shards()
        counts = [shard.num_samples for shard in shards]
        if None in counts:
            remembered = self.cache.known_counts([ShardCache.key(shard) for shard in shards])
            counts = [c if c is not None else r for c, r in zip(counts, remembered, strict=True)]
        if None in counts:
            return None
        return [count or 0 for count in counts]

    def __len__(self) -> int:
        """Samples this rank yields in an epoch (all of them without torch.distributed).

        Known once every shard's count is (see :attr:`num_samples`); a ``TypeError`` until
        then, as for any object without a length. Under torch.distributed, or with
        ``equalize``, the count depends on the DataLoader's ``num_workers``: only in a
        :class:`~wdsfs.StreamingDataLoader`, whose own ``len()`` counts its batches.
        """
        _, world_size = self.rank_and_world_size()
        workers = self.num_workers_hint
        if workers is None and (world_size > 1 or self.equalize):
            raise TypeError(
                "len() of a StreamingWebDataset under torch.distributed or with equalize "
                "depends on the DataLoader's num_workers: iterate it with StreamingDataLoader"
            )
        return sum(self.reader_lengths(workers or 0))

    def reader_lengths(self, num_workers: int) -> list[int]:
        """Samples each of this rank's readers yields in the current epoch, from its start.

        One reader per DataLoader worker (in worker order), one for ``num_workers=0``.

        Raises:
            TypeError: A shard's sample count is not known yet.
        """
        counts = self._shard_counts()
        if counts is None or (self.equalize and None in (s.num_samples for s in self.shards())):
            raise TypeError(
                f"the length of {self.source.url} is not known yet: it needs every shard's "
                f"sample count, from an index.wds (`wdsfs index {self.source.url}`) or from "
                "one full epoch read through the same cache_dir"
            )
        rank, world_size = self.rank_and_world_size()
        workers = max(num_workers, 1)
        readers = [ReaderId(rank, world_size, w, workers) for w in range(workers)]
        items = self._epoch_items(readers[0].count)
        if self.equalize:
            quotas = self._quotas(items, readers[0])
            return [quotas[r.index] for r in readers]
        return [count_samples(items[r.index], counts) for r in readers]

    def process_sample(self, sample: Sample) -> Sample:
        """Hook for subclasses: called on every decoded sample, before ``transform``."""
        return sample

    # -- iteration ------------------------------------------------------------------------------

    def capture_distributed(self) -> None:
        """Remember this process's rank and world size for its DataLoader workers.

        DataLoader workers do not see the parent's torch.distributed process group, so the rank
        is read in the parent: at construction, ``set_epoch`` and when StreamingDataLoader
        starts an epoch.
        """
        self._distributed = rank_and_world_size()

    def rank_and_world_size(self) -> tuple[int, int]:
        """``(rank, world_size)``: torch.distributed or RANK/WORLD_SIZE, else as captured."""
        live = rank_and_world_size()
        return self._distributed if live == (0, 1) else live

    def reader(self) -> ReaderId:
        """This process's reader: rank and DataLoader worker."""
        rank, world_size = self.rank_and_world_size()
        worker, num_workers = worker_and_count()
        offset = self._resume_offset()
        return ReaderId(rank, world_size, (worker + offset) % num_workers, num_workers)

    def _resume_offset(self) -> int:
        resume = self._resume
        if resume is None or resume.epoch != self.epoch:
            return 0
        return resume.worker_offset

    def plan(self, reader: ReaderId) -> ReaderWork:
        """The work of ``reader`` this epoch (resumed from a loaded state when there is one)."""
        resume = self._resume
        if resume is not None and resume.epoch == self.epoch and reader.index not in resume.used_by:
            resume.used_by.add(reader.index)
            return resume.work_for(reader, self)
        return self.epoch_work(reader)

    def epoch_work(self, reader: ReaderId) -> ReaderWork:
        """The work of ``reader`` in the current epoch, from its start."""
        items = self._epoch_items(reader.count)
        return ReaderWork(reader, items[reader.index], None, self.quota(items, reader))

    def _epoch_items(self, num_readers: int) -> list[list[WorkItem]]:
        return plan_epoch(
            self.num_shards, num_readers, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle
        )

    def quota(self, items: Sequence[Sequence[WorkItem]], reader: ReaderId) -> int | None:
        """The sample quota of ``reader`` when ``equalize`` is on (every reader's ``items``)."""
        return self._quotas(items, reader)[reader.index] if self.equalize else None

    def _quotas(self, items: Sequence[Sequence[WorkItem]], reader: ReaderId) -> list[int]:
        shards = self.shards()
        missing = [s.url for s in shards if s.num_samples is None]
        if missing:
            raise ValueError(
                f"equalize={self.equalize!r} needs the sample count of every shard; "
                f"{self.source.url} has no index.wds with counts "
                f"(run `wdsfs index {self.source.url}`)"
            )
        counts = [
            sum(item.count(shards[item.shard].num_samples or 0) for item in reader_items)
            for reader_items in items
        ]
        assert self.equalize is not None
        return equalize_quotas(
            counts,
            world_size=reader.world_size,
            num_workers=reader.num_workers,
            policy=self.equalize,
            batch_size=self.batch_size_hint,
        )

    def __iter__(self) -> Iterator[Sample]:
        if self.pack_size_hint > 1 and get_worker_info() is not None:
            return packed(  # type: ignore[return-value]
                self._iterate(self.plan(self.reader())), self._stream_state, self.pack_size_hint
            )
        return self._iterate(self.plan(self.reader()))

    def _stream_state(self) -> ReaderState:
        assert self._active is not None
        return self._active.state()

    def fetcher(self) -> Fetcher:
        """A fetcher into the dataset's cache, with its download settings."""
        return Fetcher(
            self.cache,
            storage_options=self.source.storage_options,
            max_workers=self.max_workers,
            chunk_size=self.chunk_size,
            max_attempts=self.max_attempts,
            verify=self.verify,
            direct_io=self.direct_io,
        )

    def first_shards(self, num_workers: int) -> list[Shard]:
        """The shard each of this rank's DataLoader workers reads first in the current epoch.

        Empty when the epoch resumes from a loaded state (its readers start elsewhere).
        """
        if self._resume is not None and self._resume.epoch == self.epoch:
            return []
        rank, world_size = self.rank_and_world_size()
        readers = [ReaderId(rank, world_size, w, num_workers) for w in range(max(num_workers, 1))]
        shards, items = self.shards(), self._epoch_items(readers[0].count)
        return [shards[items[r.index][0].shard] for r in readers if items[r.index]]

    def _iterate(self, work: ReaderWork) -> Iterator[Sample]:
        shards = self.shards()
        fetcher = self.fetcher()
        start_item = work.state.item if work.state is not None else 0
        readahead = Readahead(
            fetcher,
            shards,
            [i.shard for i in work.items[start_item:]],
            self.prefetch,
            self._slicing(),
        )
        stream = ReaderStream(
            work.items,
            readahead.read,
            buffer_size=self.buffer_size,
            seed=reader_seed(self.seed, self.epoch, work.reader.index),
            max_buffer_bytes=self.memory_buffer_limit,
            state=work.state,
            quota=work.quota,
            policy=self.equalize or "drop",
        )
        self._active, self._active_work = stream, work
        logger.debug("reader %s: %d items", work.reader, len(work.items))
        try:
            for sample in stream:
                sample = self.process_sample(self.decoder(sample))
                yield self.transform(sample) if self.transform is not None else sample
        finally:
            readahead.close()  # cancels downloads in flight, joins threads; state stays readable

    def _slicing(self) -> Callable[[int], Refer] | None:
        """How this reader leaves fields unread, as file slices: the ``refer`` of
        :func:`~wdsfs.tar.read_samples` for a shard open as a file descriptor; None: all are
        read.

        Only where the slices cannot meet code of the worker: no transform, no override of a
        method that sees samples, and only the fields no decoder reads.
        """
        cls = type(self)
        if (
            not self.file_slices_hint
            or self.direct_io
            or self.transform is not None
            or any(getattr(cls, name) is not getattr(StreamingWebDataset, name) for name in _SEES)
            or get_worker_info() is None
        ):
            return None
        decodes = self.decoder.decodes
        return functools.partial(
            slicer, fields=lambda field: not decodes(field), min_bytes=self.file_slices_hint
        )

    def loader_state(self) -> tuple[ReaderWork, ReaderState] | None:
        """The work and stream state of the reader iterating in this process, for the loader."""
        if self._active is None or self._active_work is None:
            return None
        return self._active_work, self._active.state()


def _integer(name: str, value: object) -> int:
    """``value`` as an int (numpy integers too), or a TypeError naming ``name``.

    A seed of ``None`` or ``1.5`` would otherwise be used as its text, silently fixed.
    """
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)  # type: ignore[arg-type]
    raise TypeError(f"{name} must be an int, not {value!r}")
