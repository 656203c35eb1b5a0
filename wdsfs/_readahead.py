"""The read-ahead of one reader: its planned shards fetched ahead of it, read as samples (the
:class:`~wdsfs.stream.ReadFn` of its :class:`~wdsfs.stream.ReaderStream`)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator, Sequence

from wdsfs.cache import ShardCache
from wdsfs.download import FetchedShard, Fetcher
from wdsfs.errors import IndexFormatError
from wdsfs.shard import Shard
from wdsfs.tar import Refer, Sample, read_samples


class Readahead:
    """Fetches a reader's planned shards ahead of the reader; serves other shards on demand."""

    def __init__(
        self,
        fetcher: Fetcher,
        shards: Sequence[Shard],
        planned: Sequence[int],
        window: int,
        slicing: Callable[[int], Refer] | None = None,
    ):
        self.fetcher = fetcher
        self.shards = shards
        self.slicing = slicing  # a shard's file descriptor -> its refer (file slices)
        self.planned = collections.deque(planned)
        self.ahead = fetcher.fetch_ahead((shards[i] for i in planned), window=window)
        self._lock = threading.Lock()

    def _get(self, index: int) -> FetchedShard:
        with self._lock:
            if self.planned and self.planned[0] == index:
                self.planned.popleft()
                return next(self.ahead)
        return self.fetcher.fetch(self.shards[index])

    def read(
        self,
        shard: int,
        *,
        select: Callable[[int], bool] | None,
        start: int,
        stop: int | None,
    ) -> Iterator[tuple[int, Sample]]:
        """The ReadFn of ReaderStream: samples of ``shard`` with index >= start, < stop."""
        wanted = select
        if start > 0:

            def wanted(index: int) -> bool:
                return index >= start and (select is None or select(index))

        with self._get(shard) as fetched:
            refer = self.slicing(fetched.file.fileno()) if self.slicing is not None else None
            url = fetched.shard.url
            if stop is not None:
                yield from read_samples(
                    fetched.file, url=url, select=wanted, stop=stop, refer=refer
                )
                return
            seen = 0

            def counting(index: int) -> bool:
                nonlocal seen
                seen = index + 1
                return wanted is None or wanted(index)

            yield from read_samples(fetched.file, url=url, select=counting, refer=refer)
        listed = self.shards[shard].num_samples
        if listed is not None and seen != listed:
            # equalize= and num_samples trust the index: a wrong count must not pass silently
            raise IndexFormatError(
                f"{fetched.shard.url}: {seen} samples, but index.wds says {listed} "
                "(the index does not describe this shard: rebuild it with `wdsfs index`)"
            )
        # read to its end: remember its sample count (num_samples without an index.wds)
        self.fetcher.cache.remember_count(ShardCache.key(self.shards[shard]), seen)

    def close(self) -> None:
        self.ahead.close()
        self.fetcher.close()
