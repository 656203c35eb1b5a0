"""The fetcher: shard URL -> verified local file in the ShardCache.

Each shard is fetched as ranged reads of up to ``chunk_size`` bytes (smaller for small shards,
so they too use every connection) spread over a priority thread pool of ``max_workers``
connections, and written at their offsets into a temp file in the cache directory (never the
whole shard in memory). Chunks run in shard order, then offset order, so the shard the reader
needs next gets the connections first; the first shard of a read-ahead downloads alone.

Every transfer reports to a :class:`TransferCallback` (an fsspec ``Callback``) that counts bytes
for progress and verification and raises :class:`DownloadCancelled` once the stop event is set.
With async backends (s3fs, gcsfs, http, adlfs) a chunk in flight is cancelled on its event loop
within ~50 ms, so a cancelled download stops moving bytes at once; sync backends (memory) stop
at the next chunk.

A finished download is verified (size always; MD5 where the backend or index gives one, hashed in
offset order while chunks arrive; else the object's version is checked again so an object
replaced mid-download is noticed), then moved into the cache atomically. Transient errors are
retried with exponential backoff and full jitter up to ``max_attempts``; a wrong size or
checksum is retried as a whole download, then raised as :class:`IntegrityError`. Missing
objects and denied access fail at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import random
import threading
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from fsspec.callbacks import Callback
from fsspec.spec import AbstractFileSystem

from wdsfs._direct import (
    ALIGNMENT,
    READ_BLOCK,
    BufferPool,
    DirectWriter,
    open_direct,
    pwrite_all,
    read_direct,
)
from wdsfs._fs import describe, is_local, is_transient, translate_error, url_to_fs
from wdsfs._http_get import RangeGetter, RequestRefused
from wdsfs._pool import PriorityPool
from wdsfs._presign import refused, s3_gets
from wdsfs._ranged import call, run_cancellable, stream_range
from wdsfs.cache import ShardCache
from wdsfs.checksum import Checksum, ChunkDigest, ObjectDigest, best
from wdsfs.errors import CacheError, DownloadCancelled, DownloadError, IntegrityError, WdsfsError
from wdsfs.metrics import FetchMetrics
from wdsfs.shard import Shard
from wdsfs.source import checksum_of_head, s3_store_checksum, shard_from_info

__all__ = ["DEFAULT_CHUNK_SIZE", "FetchedShard", "Fetcher", "TransferCallback"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # as many requests as 8 MiB raw reads: each costs ~1 ms of CPU
_MIN_CHUNK_SIZE = 1024 * 1024
# bytes read per readinto, then hashed and written: O_DIRECT writes of less than 1 MiB cost
# far more CPU per byte here; buffered writes do as well with 256 KiB, and use less memory
_SLICE_SIZE = {True: 1024 * 1024, False: 256 * 1024}  # by direct I/O
_REPORT_BYTES = 512 * 1024


class TransferCallback(Callback):  # type: ignore[misc]
    """fsspec Callback of one transfer: counts bytes, forwards progress, raises on cancel.

    Args:
        url: The shard URL, for the cancellation message.
        stop_events: Any of these set cancels the transfer.
        progress: An optional outer Callback (a tqdm bar) that receives every byte count.
    """

    def __init__(
        self,
        url: str,
        stop_events: Iterable[threading.Event] = (),
        progress: Callback | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.stop_events = tuple(stop_events)
        self.progress = progress
        self._lock = threading.Lock()

    def cancelled(self) -> bool:
        """Whether any stop event is set."""
        return any(event.is_set() for event in self.stop_events)

    def check(self) -> None:
        """Raise :class:`DownloadCancelled` if the transfer must stop."""
        if self.cancelled():
            raise DownloadCancelled(f"{self.url}: download cancelled", url=self.url)

    def relative_update(self, inc: int = 1) -> None:
        with self._lock:
            self.value += inc
        if self.progress is not None:
            self.progress.relative_update(inc)
        self.call()

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.check()


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
        self._buffers = BufferPool(2 * _MIN_CHUNK_SIZE, keep=max_workers)  # DirectWriter's
        self._blocks = BufferPool(READ_BLOCK, keep=2)  # DirectReader's
        self._slices = {  # the range getter's, by direct I/O
            direct: BufferPool(size, keep=max_workers) for direct, size in _SLICE_SIZE.items()
        }
        self.metrics = FetchMetrics()
        self._pool: PriorityPool | None = None
        self._pool_lock = threading.Lock()
        self._trimmed: int | None = None  # pid of the process that applied cache_limit
        self._downloading = 0  # shards whose chunks are being planned or transferred
        self._order = itertools.count()  # priority of direct fetch() calls: first come first

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel queued chunk transfers and join the fetcher's threads."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def _chunk_pool(self) -> PriorityPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = PriorityPool(self.max_workers, thread_name_prefix="wdsfs-fetch")
            return self._pool

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
        shard = self._resolve(fs, path, shard, callback)
        key = self.cache.key(shard)
        direct = self.direct_io if direct_io is None else direct_io
        hit = self._hit(shard, key, direct)
        if hit is not None:
            return hit
        self.cache.check_fits(shard)
        with self.cache.lock(key, stop_event=_AnyEvent(events)):
            handle = self.cache.open(key)  # another process may have just fetched it
            if handle is None:
                shard = self._with_store_checksum(fs, path, shard, callback)
                temp, _ = self._download_verified(
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
                    _remove(temp)
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
            with self._pool_lock:
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

    def _lookup(
        self, request: Callable[[], _T], url: str, doing: str, callback: TransferCallback
    ) -> _T:
        """``request()`` (a HEAD or similar), with transient errors retried as chunks are."""
        for attempt in range(1, self.max_attempts + 1):
            callback.check()
            try:
                return request()
            except Exception as exc:
                if not is_transient(exc) or attempt == self.max_attempts:
                    raise self._final_error(exc, url, attempt, doing) from exc
                self._sleep_before_retry(exc, url, attempt, callback)
        raise AssertionError("unreachable")  # pragma: no cover

    def _resolve(
        self, fs: AbstractFileSystem, path: str, shard: Shard, callback: TransferCallback
    ) -> Shard:
        """Fill in size and version (one HEAD) for shards given by name only."""
        if shard.size is not None and shard.version is not None:
            return shard
        info = self._lookup(
            lambda: call(fs, "info", path, transfer=callback), shard.url, "looking up", callback
        )
        found = shard_from_info(fs, info)
        return Shard(
            url=shard.url,
            size=found.size,
            version=shard.version or found.version,
            checksum=shard.checksum or found.checksum,
            num_samples=shard.num_samples,
        )

    def _with_store_checksum(
        self, fs: AbstractFileSystem, path: str, shard: Shard, callback: TransferCallback
    ) -> Shard:
        """Add a checksum the store keeps beyond ``info()`` (S3: CRC32/CRC32C), if cheaper.

        Only when the store's version is the one the shard was listed with: an index's MD5
        names the content itself and stays the checksum to verify.
        """
        if not self.verify or (shard.version or "").startswith("md5:"):
            return shard
        head = self._presigned_head(fs, path, shard.url, callback)
        if head is not None:
            found = checksum_of_head(head, shard)
        else:
            found = self._lookup(
                lambda: s3_store_checksum(
                    fs, path, shard, run=lambda request: run_cancellable(fs.loop, request, callback)
                ),
                shard.url,
                "looking up",
                callback,
            )
        chosen = best([Checksum.parse(shard.checksum), found])
        if chosen is None or str(chosen) == shard.checksum:
            return shard
        return dataclasses.replace(shard, checksum=str(chosen))

    def _download_verified(
        self,
        fs: AbstractFileSystem,
        path: str,
        shard: Shard,
        callback: TransferCallback,
        temp_path: Callable[[], str],
        priority: int,
        direct_io: bool,
    ) -> tuple[str, int]:
        """Download and verify into a fresh temp file; return its path and size.

        The caller moves the file into place; on any error no temp file is left behind.
        """
        last: IntegrityError | None = None
        for attempt in range(1, self.max_attempts + 1):
            temp = temp_path()
            try:
                written, digest = self._download(
                    fs, path, shard, temp, callback, priority, direct_io
                )
                self._verify(fs, path, shard, temp, written, digest, callback)
            except IntegrityError as exc:
                self.metrics.add(integrity_failures=1)
                logger.warning("%s (attempt %d/%d)", exc, attempt, self.max_attempts)
                last = exc
                _remove(temp)
                continue
            except BaseException as exc:
                _remove(temp)
                if isinstance(exc, OSError) and not isinstance(exc, WdsfsError):
                    raise CacheError(
                        f"{shard.url}: cannot write {temp}: {exc}", url=shard.url
                    ) from exc
                raise
            self.metrics.add(misses=1, bytes_downloaded=written)
            logger.debug("downloaded %s (%d bytes)", shard.url, written)
            return temp, written
        assert last is not None
        raise last

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
        shard = self._resolve(fs, path, shard, callback)
        directory = os.path.dirname(os.path.abspath(output_path))
        os.makedirs(directory, exist_ok=True)

        def temp_path() -> str:
            return os.path.join(
                directory, f".{os.path.basename(output_path)}.{uuid.uuid4().hex}.part"
            )

        temp, _ = self._download_verified(
            fs, path, shard, callback, temp_path, next(self._order), self.direct_io
        )
        os.replace(temp, output_path)

    def _download(
        self,
        fs: AbstractFileSystem,
        path: str,
        shard: Shard,
        temp: str,
        callback: TransferCallback,
        priority: int,
        direct_io: bool,
    ) -> tuple[int, str | None]:
        """Write the object into ``temp`` with ranged reads on the pool.

        Returns:
            Bytes written, and the object's checksum in hex for the algorithm of the shard's
            checksum (CRCs computed per chunk as bytes arrive, MD5 in offset order), else None.
        """
        size = shard.size
        expected = self._expected_checksum(shard)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        digest = ObjectDigest(expected.algorithm if expected else None, fd)
        try:
            if size is None:
                self._stream(fs, path, fd, shard.url, callback, digest)
                return digest.length, digest.hexdigest()
            callback.set_size(size)
            remote = self._remote(fs, path, shard.url, callback)
            abort = threading.Event()
            chunk_callback = TransferCallback(shard.url, (*callback.stop_events, abort), callback)
            with self._chunk_step(size) as step:
                direct = open_direct(temp) if direct_io else None
                file = _Target(fd, direct, size)
                pool = self._chunk_pool()
                futures = [
                    pool.submit(
                        (priority, start),
                        self._chunk,
                        remote,
                        file,
                        start,
                        min(start + step, size),
                        chunk_callback,
                        digest,
                    )
                    for start in range(0, size, step)
                ]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    abort.set()
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures)
                    raise
                finally:
                    if direct is not None:
                        os.close(direct)
                        os.ftruncate(fd, size)  # the last block was written padded
            return digest.length, digest.hexdigest()
        finally:
            os.close(fd)

    def _remote(
        self, fs: AbstractFileSystem, path: str, url: str, callback: TransferCallback
    ) -> _Remote:
        """Where a download's chunks come from: the filesystem, and a signed plain GET if any."""
        gets = s3_gets(fs, max_idle=self.max_workers)
        if gets is None:
            return _Remote(fs, path, url)
        get_url = self._lookup(
            lambda: gets.url(path, callback), url, "signing the request", callback
        )
        return _Remote(fs, path, url, gets.getter, get_url)

    def _presigned_head(
        self, fs: AbstractFileSystem, path: str, url: str, callback: TransferCallback
    ) -> dict[str, Any] | None:
        """A presigned ``HeadObject``'s answer, or None where presigned requests do not apply
        (or the storage refused this one: s3fs sends it, and every later one, instead)."""
        gets = s3_gets(fs, max_idle=self.max_workers)
        if gets is None:
            return None

        def head() -> dict[str, Any] | None:
            try:
                return gets.head(path, callback)
            except RequestRefused as exc:
                _refuse_presigned(fs, url, "HEAD", exc)
                return None

        answer: dict[str, Any] | None = self._lookup(head, url, "looking up", callback)
        return answer

    @staticmethod
    def _without_presign(remote: _Remote, exc: RequestRefused) -> _Remote:
        """Send through s3fs what the storage refused as a presigned GET (from now on)."""
        _refuse_presigned(remote.fs, remote.shard_url, "GET", exc)
        return _Remote(remote.fs, remote.path, remote.shard_url)

    @contextlib.contextmanager
    def _chunk_step(self, size: int) -> Iterator[int]:
        """Bytes per ranged read of a ``size``-byte shard, while its chunks download.

        A shard downloading alone (the reader waits for it) is split so that it uses every
        connection, however small; with several downloading, each gets its share of the
        connections, so a prefetch of many small shards makes no more requests than it needs
        (each costs ~1 ms of CPU). Large shards stream in ``chunk_size`` pieces. Steps are
        whole blocks, as direct I/O needs.
        """
        with self._pool_lock:
            self._downloading += 1
            connections = max(1, self.max_workers // self._downloading)
        try:
            step = max(_MIN_CHUNK_SIZE, min(self.chunk_size, -(-size // connections)))
            yield -(-step // ALIGNMENT) * ALIGNMENT
        finally:
            with self._pool_lock:
                self._downloading -= 1

    def _expected_checksum(self, shard: Shard) -> Checksum | None:
        return Checksum.parse(shard.checksum) if self.verify else None

    def _chunk(
        self,
        remote: _Remote,
        file: _Target,
        start: int,
        end: int,
        callback: TransferCallback,
        digest: ObjectDigest,
    ) -> None:
        url = remote.shard_url
        for attempt in range(1, self.max_attempts + 1):
            callback.check()
            chunk = digest.chunk(start)
            try:
                if remote.getter is not None:
                    try:
                        received = self._get(remote, file, start, end, callback, chunk)
                    except RequestRefused as exc:
                        remote, chunk = self._without_presign(remote, exc), digest.chunk(start)
                if remote.getter is None:
                    received = self._stream_range(remote, file, start, end, callback, chunk)
            except DownloadCancelled:
                raise
            except Exception as exc:
                if not is_transient(exc) or attempt == self.max_attempts:
                    raise self._final_error(exc, url, attempt) from exc
                self._sleep_before_retry(exc, url, attempt, callback)
                continue
            if received != end - start:
                # a short or long body: retried like a reset connection
                short = DownloadError(
                    f"{url}: range {start}-{end} returned {received} bytes", url=url
                )
                if attempt == self.max_attempts:
                    raise IntegrityError(
                        f"{url}: size {received} bytes for range {start}-{end}, expected "
                        f"{end - start} (object changed or truncated download)",
                        url=url,
                    )
                self._sleep_before_retry(short, url, attempt, callback)
                continue
            digest.done(chunk)
            return

    def _get(
        self,
        remote: _Remote,
        file: _Target,
        start: int,
        end: int,
        callback: TransferCallback,
        chunk: ChunkDigest,
    ) -> int:
        """One try of a chunk read by the range getter into one of our aligned buffers."""
        assert remote.getter is not None and remote.get_url is not None
        slices = self._slices[file.direct is not None]
        buffer = slices.take()
        view = memoryview(buffer)
        position = start

        def consume(piece: memoryview) -> None:
            nonlocal position
            length = len(piece)
            chunk.update(piece)
            if file.direct is None:
                pwrite_all(file.fd, piece, position)
            else:  # only the object's last slice is not whole blocks: written padded
                padded = -(-length // ALIGNMENT) * ALIGNMENT
                view[length:padded] = bytes(padded - length)
                pwrite_all(file.direct, view[:padded], position)
            position += length
            callback.relative_update(length)

        try:
            return remote.getter.get(remote.get_url, start, end, view, consume, callback)
        finally:
            view.release()
            slices.give(buffer)

    def _stream_range(
        self,
        remote: _Remote,
        file: _Target,
        start: int,
        end: int,
        callback: TransferCallback,
        chunk: ChunkDigest,
    ) -> int:
        """One try of a chunk streamed by the filesystem's event loop (``stream_range``)."""
        blocks = (
            DirectWriter(
                file.direct, start, self._buffers, last=end == file.size, on_data=chunk.update
            )
            if file.direct is not None
            else None
        )
        writer = _ChunkWriter(file.fd, chunk, callback, blocks)
        try:
            received = stream_range(remote.fs, remote.path, start, end, writer, callback, blocks)
            if received == end - start:
                writer.finish()
            return received
        finally:
            writer.close()

    def _stream(
        self,
        fs: AbstractFileSystem,
        path: str,
        fd: int,
        url: str,
        callback: TransferCallback,
        digest: ObjectDigest,
    ) -> None:
        """Sequential download for objects of unknown size (some HTTP servers)."""
        chunk = digest.chunk(0)
        try:
            with fs.open(path, "rb", block_size=0) as remote:
                while True:
                    callback.check()
                    data = remote.read(min(self.chunk_size, 1024 * 1024))
                    if not data:
                        break
                    os.pwrite(fd, data, chunk.length)
                    chunk.update(data)
                    callback.relative_update(len(data))
        except (DownloadCancelled, OSError) as exc:
            if isinstance(exc, WdsfsError):
                raise
            raise self._final_error(exc, url, 1) from exc
        digest.done(chunk)

    def _final_error(
        self, exc: BaseException, url: str, attempt: int, doing: str = "downloading"
    ) -> WdsfsError:
        if isinstance(exc, OSError) and exc.errno in _LOCAL_DISK_ERRNOS:
            # only the local disk fails so (the cache's file being written), not the storage
            return CacheError(
                f"{url}: cannot write the download into {self.cache.directory}: {exc}", url=url
            )
        if "checksum" in str(exc).lower():  # e.g. botocore's response checksum validation
            return IntegrityError(f"{url}: checksum mismatch while {doing}: {exc}", url=url)
        error = translate_error(exc, url, doing)
        if attempt > 1 and type(error) is DownloadError:
            return DownloadError(f"{error} (gave up after {attempt} attempts)", url=url)
        return error

    def _sleep_before_retry(
        self, exc: BaseException, url: str, attempt: int, callback: TransferCallback
    ) -> None:
        delay = random.uniform(0, self.backoff * 2 ** (attempt - 1))
        self.metrics.add(retries=1)
        logger.warning(
            "%s: transient error (%s), retry %d/%d in %.2fs",
            url,
            describe(exc),
            attempt,
            self.max_attempts - 1,
            delay,
        )
        if _AnyEvent(callback.stop_events).wait(delay):
            callback.check()

    def _verify(
        self,
        fs: AbstractFileSystem,
        path: str,
        shard: Shard,
        temp: str,
        written: int,
        digest: str | None,
        callback: TransferCallback,
    ) -> None:
        size_on_disk = os.path.getsize(temp)
        if shard.size is not None and (written != shard.size or size_on_disk != shard.size):
            raise IntegrityError(
                f"{shard.url}: size {written} bytes, expected {shard.size} "
                "(object changed or truncated download)",
                url=shard.url,
            )
        expected = self._expected_checksum(shard)
        if expected is not None:
            if digest != expected.value:
                raise IntegrityError(
                    f"{shard.url}: {expected.algorithm} checksum {digest}, "
                    f"expected {expected.value} (corrupted download or object changed)",
                    url=shard.url,
                )
        elif shard.version is not None and not shard.version.startswith("md5:"):
            # No checksum applies: make sure the object did not change while we read it.
            try:
                now = shard_from_info(fs, call(fs, "info", path, transfer=callback)).version
            except Exception as exc:
                raise translate_error(exc, shard.url, "checking the version") from exc
            if now != shard.version:
                raise IntegrityError(
                    f"{shard.url}: object changed during download "
                    f"(version {shard.version} -> {now})",
                    url=shard.url,
                )

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


@dataclass(frozen=True)
class _Remote:
    """The object a download reads: by its filesystem, and by a plain GET where one applies."""

    fs: AbstractFileSystem
    path: str
    shard_url: str
    getter: RangeGetter | None = None
    get_url: str | None = None


@dataclass(frozen=True)
class _Target:
    """The temp file a download writes: buffered, and with ``O_DIRECT`` if ``direct``."""

    fd: int
    direct: int | None
    size: int


class _ChunkWriter:
    """The sink of one chunk transfer: writes each piece at its offset and hashes it.

    It runs on the event loop thread for every piece (tens of KB), so progress (and with it the
    cancellation check) is reported per ``_REPORT_BYTES`` rather than per piece. After a
    cancellation the event loop may still deliver a piece for a moment: once :meth:`close` has
    returned, pieces are dropped, so nothing is written to a descriptor closed (and perhaps
    reused by another file) or into a buffer that serves another chunk.
    """

    __slots__ = ("_lock", "_open", "blocks", "callback", "chunk", "fd", "received", "reported")

    def __init__(
        self,
        fd: int,
        chunk: ChunkDigest,
        callback: TransferCallback,
        blocks: DirectWriter | None = None,
    ) -> None:
        self.fd = fd
        self.chunk = chunk
        self.callback = callback
        self.blocks = blocks
        self.received = 0
        self.reported = 0
        self._lock = threading.Lock()
        self._open = True

    def __call__(self, piece: bytes) -> None:
        with self._lock:
            if not self._open:
                return
            if self.blocks is not None:
                self.blocks.write(piece)  # written and hashed by the waiting pool thread
            else:
                os.pwrite(self.fd, piece, self.chunk.offset + self.received)
                self.chunk.update(piece)
            self.received += len(piece)
        if self.received - self.reported >= _REPORT_BYTES:
            self.report()

    def finish(self) -> None:
        """Write what the direct writer holds and report the last bytes."""
        if self.blocks is not None:
            self.blocks.finish()
        self.report()

    def close(self) -> None:
        """Stop taking pieces; return the direct writer's buffers."""
        with self._lock:
            self._open = False
            if self.blocks is not None:
                self.blocks.close()

    def report(self) -> None:
        """Send the bytes not yet reported to the callback (which may cancel)."""
        new, self.reported = self.received - self.reported, self.received
        if new:
            self.callback.relative_update(new)


class _AnyEvent:
    """Wait on several events (the fetcher's and a caller's) as if they were one."""

    def __init__(self, events: Iterable[threading.Event]) -> None:
        self.events = tuple(events)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)

    def wait(self, timeout: float) -> bool:
        # Sleep on the first event; re-check all of them (cancellation granularity: timeout).
        deadline_step = min(timeout, 0.1) if len(self.events) > 1 else timeout
        waited = 0.0
        while waited < timeout:
            if self.events[0].wait(min(deadline_step, timeout - waited)) or self.is_set():
                return True
            waited += deadline_step
        return self.is_set()


def _refuse_presigned(fs: AbstractFileSystem, url: str, request: str, exc: Exception) -> None:
    refused(fs)
    logger.warning(
        "%s: the storage refused a presigned %s (%s); sending it through s3fs instead",
        url,
        request,
        exc,
    )


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
