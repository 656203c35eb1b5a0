"""The fetcher: shard URL -> verified local file in the ShardCache.

A shard is served from the cache when it is there (on the caller's thread, no request), else
downloaded once across every process sharing the cache (a cross-process lock per key), verified
and committed atomically. :meth:`Fetcher.fetch_ahead` keeps a window of shards downloading
ahead of the reader; the first shard of a read-ahead downloads alone.

Downloads are ranged reads spread over ``max_workers`` connections
(:mod:`wdsfs._object_download`, one chunk in :mod:`wdsfs._chunk`). Every transfer reports to a
:class:`TransferCallback` (an fsspec ``Callback``) that counts bytes for progress and
verification and raises :class:`DownloadCancelled` once the stop event is set. With async
backends (s3fs, gcsfs, http, adlfs) a chunk in flight is cancelled on its event loop within
~50 ms, so a cancelled download stops moving bytes at once; sync backends (memory) stop at the
next chunk.

A finished download is verified (size always; CRC32C, CRC32 or MD5 where the backend or index
gives one; else the object's version is checked again so an object replaced mid-download is
noticed), then moved into the cache atomically. Transient errors are retried with exponential
backoff and full jitter up to ``max_attempts`` (:mod:`wdsfs._retry`); a wrong size or checksum
is retried as a whole download, then raised as :class:`IntegrityError`. Missing objects and
denied access fail at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from fsspec.callbacks import Callback

from wdsfs._callback import AnyEvent, TransferCallback
from wdsfs._direct import READ_BLOCK, BufferPool, read_direct
from wdsfs._fs import is_local, translate_error, url_to_fs
from wdsfs._object_download import ObjectDownloader, remove
from wdsfs._presign import s3_gets
from wdsfs._retry import Retries
from wdsfs.cache import ShardCache
from wdsfs.errors import CacheError, IntegrityError
from wdsfs.metrics import FetchMetrics
from wdsfs.shard import Shard

__all__ = ["DEFAULT_CHUNK_SIZE", "FetchedShard", "Fetcher", "TransferCallback"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # as many requests as 8 MiB raw reads: each costs ~1 ms of CPU


@dataclass
class FetchedShard:
    """A shard ready to read: an open handle that stays valid even if the cache evicts it.

    Use as a context manager, or call :meth:`close`.
    """

    shard: Shard
    file: IO[bytes]
    from_cache: bool
    path: str = field(init=False)

    def __post_init__(self) -> None:
        self.path = str(self.file.name)

    def close(self) -> None:
        """Release the handle."""
        self.file.close()

    def __enter__(self) -> FetchedShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fetcher:
    """Downloads shards into a :class:`ShardCache`, verified, cancellable and retried.

    Args:
        cache: The cache to fill; default: a :class:`ShardCache` in the default directory.
        storage_options: fsspec options for the shard URLs.
        max_workers: Concurrent connections (chunk transfers) of this fetcher.
        chunk_size: Bytes per ranged read.
        max_attempts: Tries per chunk for transient errors, and per shard for integrity errors.
        verify: Check the object's checksum when one is known (CRC32C, CRC32 or MD5, the
            cheapest the index or store gives); the size is always checked.
        stop_event: Setting it cancels every transfer of this fetcher.
        progress: fsspec Callback (e.g. ``fsspec.callbacks.TqdmCallback``) receiving all bytes.
        backoff: Base seconds of the exponential retry backoff.
        direct_io: Write downloads with ``O_DIRECT`` where available, bypassing the page
            cache, and serve every cached shard on an ``O_DIRECT`` handle: for shards fetched
            to be read later (prefetching a cache), whose pages would only push out others,
            and for datasets larger than memory where new page-cache pages cost more CPU than
            a fast disk's reads (see docs/concepts/cache.md). Off by default: a shard read
            right after its download is then found in the page cache, the disk sees its
            bytes once, and a dataset that fits in memory is read from it in later epochs.

    No thread starts before the first download; :meth:`close` joins them.
    """

    def __init__(
        self,
        cache: ShardCache | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_workers: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_attempts: int = 5,
        verify: bool = True,
        stop_event: threading.Event | None = None,
        progress: Callback | None = None,
        backoff: float = 0.2,
        direct_io: bool = False,
    ) -> None:
        if max_workers < 1 or chunk_size < 1 or max_attempts < 1:
            raise ValueError("max_workers, chunk_size and max_attempts must be >= 1")
        self.cache = cache if cache is not None else ShardCache()
        self.storage_options = dict(storage_options or {})
        self.max_workers = max_workers
        self.chunk_size = chunk_size
        self.max_attempts = max_attempts
        self.verify = verify
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.progress = progress
        self.backoff = backoff
        self.direct_io = direct_io
        self._blocks = BufferPool(READ_BLOCK, keep=2)  # DirectReader's
        self.metrics = FetchMetrics()
        self.downloader = ObjectDownloader(
            Retries(max_attempts, backoff, self.metrics, self.cache.directory),
            max_workers=max_workers,
            chunk_size=chunk_size,
            verify=verify,
        )
        self._lock = threading.Lock()
        self._trimmed: int | None = None  # pid of the process that applied cache_limit
        self._order = itertools.count()  # priority of direct fetch() calls: first come first

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel queued chunk transfers and join the fetcher's threads."""
        self.downloader.close()

    # -- one shard ---------------------------------------------------------------------------

    def fetch(
        self,
        shard: Shard,
        *,
        stop: threading.Event | None = None,
        priority: int | None = None,
        direct_io: bool | None = None,
    ) -> FetchedShard:
        """Return the shard from the cache, downloading it first if needed (blocking).

        Args:
            shard: The shard to fetch.
            stop: An extra event that cancels this fetch only.
            priority: Lower is served first when several downloads share the connections
                (default: the order of the calls).
            direct_io: Override the fetcher's ``direct_io`` for this shard (its download and
                its handle).

        Raises:
            DownloadCancelled: A stop event was set.
            ShardNotFoundError, StorageAccessError: At once, naming the URL.
            DownloadError: A transient failure persisted after ``max_attempts``.
            IntegrityError: Size or checksum stayed wrong after ``max_attempts``.
            CacheError: The shard cannot fit in the cache or on the disk.
        """
        with self.cache.session():  # one connection to the index for all its lookups
            return self._fetch(shard, stop, priority, direct_io)

    def _fetch(
        self,
        shard: Shard,
        stop: threading.Event | None,
        priority: int | None,
        direct_io: bool | None,
    ) -> FetchedShard:
        events = (self.stop_event, stop) if stop is not None else (self.stop_event,)
        callback = TransferCallback(shard.url, events, self.progress)
        callback.check()
        order = next(self._order) if priority is None else priority
        fs, path = url_to_fs(shard.url, self.storage_options)
        if is_local(fs):
            return self._open_local(shard, path)
        s3_gets(fs, max_idle=self.max_workers)  # its signer gets ready meanwhile
        self._trim_once()
        shard = self.downloader.resolve(fs, path, shard, callback)
        key = self.cache.key(shard)
        direct = self.direct_io if direct_io is None else direct_io
        hit = self._hit(shard, key, direct)
        if hit is not None:
            return hit
        self.cache.check_fits(shard)
        with self.cache.lock(key, stop_event=AnyEvent(events)):
            handle = self.cache.open(key)  # another process may have just fetched it
            if handle is None:
                shard = self.downloader.with_store_checksum(fs, path, shard, callback)
                temp, _ = self.downloader.download_verified(
                    fs, path, shard, callback, self.cache.temp_path, order, direct
                )
                try:
                    handle = self.cache.commit(key, temp)
                except OSError as exc:
                    raise CacheError(
                        f"{shard.url}: cannot store in the cache {self.cache.directory}: {exc}",
                        url=shard.url,
                    ) from exc
                finally:
                    remove(temp)
                if direct:  # its pages are not in the page cache: read it as it was written
                    handle = read_direct(handle, self._blocks)
                self.metrics.shard_ready()
                return FetchedShard(shard, handle, from_cache=False)
        return self._served(shard, handle, direct)

    def _hit(self, shard: Shard, key: str, direct: bool) -> FetchedShard | None:
        handle = self.cache.open(key)
        return None if handle is None else self._served(shard, handle, direct)

    def _served(self, shard: Shard, handle: IO[bytes], direct: bool) -> FetchedShard:
        self.metrics.add(hits=1, bytes_from_cache=shard.size or 0)
        self.metrics.shard_ready()
        logger.debug("cache hit %s", shard.url)
        if direct:
            handle = read_direct(handle, self._blocks)
        return FetchedShard(shard, handle, from_cache=True)

    def _cached(self, shard: Shard) -> FetchedShard | None:
        """The shard when it can be served without a request (local, or a cache hit)."""
        if self.stop_event.is_set():
            return None  # fetch() raises DownloadCancelled
        fs, path = url_to_fs(shard.url, self.storage_options)
        if is_local(fs):
            return self._open_local(shard, path)
        if shard.size is None or shard.version is None:
            return None  # a HEAD first: that is fetch()'s job
        s3_gets(fs, max_idle=self.max_workers)  # a miss downloads next: its signer gets ready
        self._trim_once()
        return self._hit(shard, self.cache.key(shard), self.direct_io)

    def _trim_once(self) -> None:
        """Apply ``cache_limit`` to what earlier runs left (once per fetcher and process)."""
        pid = os.getpid()
        if self._trimmed != pid:
            with self._lock:
                if self._trimmed != pid:
                    self.cache.trim()
                    self._trimmed = pid

    def _open_local(self, shard: Shard, path: str) -> FetchedShard:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - owned by FetchedShard
        except OSError as exc:
            raise translate_error(exc, shard.url, "opening") from exc
        size = os.fstat(handle.fileno()).st_size
        if shard.size is not None and size != shard.size:
            handle.close()
            raise IntegrityError(
                f"{shard.url}: size {size} bytes, expected {shard.size} "
                "(file changed since listing)",
                url=shard.url,
            )
        return FetchedShard(shard, handle, from_cache=True)

    def download_to(
        self, shard: Shard, output_path: str, *, stop: threading.Event | None = None
    ) -> None:
        """Download ``shard`` to ``output_path`` (verified, atomic), bypassing the cache.

        Raises:
            DownloadCancelled: A stop event was set; ``output_path`` is left untouched.
        """
        events = (self.stop_event, stop) if stop is not None else (self.stop_event,)
        callback = TransferCallback(shard.url, events, self.progress)
        fs, path = url_to_fs(shard.url, self.storage_options)
        shard = self.downloader.resolve(fs, path, shard, callback)
        directory = os.path.dirname(os.path.abspath(output_path))
        os.makedirs(directory, exist_ok=True)

        def temp_path() -> str:
            return os.path.join(
                directory, f".{os.path.basename(output_path)}.{uuid.uuid4().hex}.part"
            )

        temp, _ = self.downloader.download_verified(
            fs, path, shard, callback, temp_path, next(self._order), self.direct_io
        )
        os.replace(temp, output_path)

    # -- a read-ahead window -----------------------------------------------------------------

    def fetch_ahead(
        self, shards: Iterable[Shard], *, window: int = 2
    ) -> Generator[FetchedShard, None, None]:
        """Yield fetched shards in order while up to ``window`` more download ahead.

        The first shard downloads alone (the reader waits for it: time to first sample), then
        the window opens; shards earlier in the order get the connections first.
        Closing the iterator (``break``, an exception, garbage collection) cancels the downloads
        still in flight, waits for them, and closes handles the caller never received.
        """
        if window < 0:
            raise ValueError("window must be >= 0")
        stop = threading.Event()
        pending: collections.deque[concurrent.futures.Future[FetchedShard]] = collections.deque()
        with (
            self.cache.session(),
            concurrent.futures.ThreadPoolExecutor(
                window + 1, thread_name_prefix="wdsfs-shard"
            ) as pool,
        ):
            todo = iter(shards)

            def top_up(count: int) -> None:
                while len(pending) < count and (shard := next(todo, None)) is not None:
                    priority = next(self._order)
                    hit: concurrent.futures.Future[FetchedShard] = concurrent.futures.Future()
                    try:  # cache hits and local files: here, on the reader's open connection
                        cached = self._cached(shard)
                    except BaseException as exc:
                        hit.set_exception(exc)  # raised in its turn, as the pool's would be
                        pending.append(hit)
                        continue
                    if cached is not None:
                        hit.set_result(cached)
                        pending.append(hit)
                    else:
                        pending.append(pool.submit(self.fetch, shard, stop=stop, priority=priority))

            try:
                top_up(1)  # the first shard alone
                while pending:
                    fetched = pending.popleft().result()
                    top_up(window)  # these download while the caller reads ``fetched``
                    yield fetched
                    top_up(1)  # window=0: one shard at a time
            finally:
                stop.set()
                for future in pending:
                    future.cancel()
                for future in pending:
                    if not future.cancelled() and future.exception() is None:
                        future.result().close()
