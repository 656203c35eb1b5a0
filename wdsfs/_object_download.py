"""One object -> a verified temp file: its chunks on a priority pool of connections
(not public API).

Each object is fetched as ranged reads of up to ``chunk_size`` bytes (smaller for small
objects, so they too use every connection) spread over a priority thread pool of
``max_workers`` connections, and written at their offsets into a temp file (never the whole
object in memory). Chunks run in priority order (the fetcher's shard order), then offset order,
so the shard the reader needs next gets the connections first.

A finished download is verified: its size always; its checksum where the backend or index
gives one (CRCs per chunk as bytes arrive, MD5 in offset order); else the object's version is
checked again, so an object replaced mid-download is noticed. A wrong size or checksum is
retried as a whole download, then raised as :class:`IntegrityError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.spec import AbstractFileSystem

from wdsfs._callback import TransferCallback
from wdsfs._chunk import ChunkReader, Remote, Target, refuse_presigned
from wdsfs._direct import ALIGNMENT, open_direct
from wdsfs._fs import translate_error
from wdsfs._http_get import RequestRefused
from wdsfs._pool import PriorityPool
from wdsfs._presign import s3_gets
from wdsfs._ranged import call, run_cancellable
from wdsfs._retry import Retries
from wdsfs.checksum import Checksum, ObjectDigest, best
from wdsfs.errors import CacheError, DownloadCancelled, IntegrityError, WdsfsError
from wdsfs.shard import Shard
from wdsfs.source import checksum_of_head, s3_store_checksum, shard_from_info

__all__ = ["ObjectDownloader"]

logger = logging.getLogger("wdsfs.download")  # the fetcher's documented logger

_MIN_CHUNK_SIZE = 1024 * 1024


class ObjectDownloader:
    """Downloads objects into verified temp files over ``max_workers`` connections.

    Args:
        retries: The retry policy (its ``max_attempts`` also bounds whole-download retries).
        max_workers: Concurrent connections (chunk transfers).
        chunk_size: Bytes per ranged read, at most.
        verify: Check the object's checksum when one is known (the size is always checked).

    The pool's threads start with the first download; :meth:`close` joins them.
    """

    def __init__(
        self, retries: Retries, *, max_workers: int, chunk_size: int, verify: bool
    ) -> None:
        self.retries = retries
        self.max_workers = max_workers
        self.chunk_size = chunk_size
        self.verify = verify
        self.chunks = ChunkReader(retries, max_workers)
        self._pool: PriorityPool | None = None
        self._lock = threading.Lock()
        self._downloading = 0  # objects whose chunks are being planned or transferred

    def close(self) -> None:
        """Cancel queued chunk transfers and join the pool's threads."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def _chunk_pool(self) -> PriorityPool:
        with self._lock:
            if self._pool is None:
                self._pool = PriorityPool(self.max_workers, thread_name_prefix="wdsfs-fetch")
            return self._pool

    def resolve(
        self, fs: AbstractFileSystem, path: str, shard: Shard, callback: TransferCallback
    ) -> Shard:
        """Fill in size and version (one HEAD) for shards given by name only."""
        if shard.size is not None and shard.version is not None:
            return shard
        info = self.retries.lookup(
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

    def with_store_checksum(
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
            found = self.retries.lookup(
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

    def download_verified(
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
        metrics = self.retries.metrics
        for attempt in range(1, self.retries.max_attempts + 1):
            temp = temp_path()
            try:
                written, digest = self._download(
                    fs, path, shard, temp, callback, priority, direct_io
                )
                self._verify(fs, path, shard, temp, written, digest, callback)
            except IntegrityError as exc:
                metrics.add(integrity_failures=1)
                logger.warning("%s (attempt %d/%d)", exc, attempt, self.retries.max_attempts)
                last = exc
                remove(temp)
                continue
            except BaseException as exc:
                remove(temp)
                if isinstance(exc, OSError) and not isinstance(exc, WdsfsError):
                    raise CacheError(
                        f"{shard.url}: cannot write {temp}: {exc}", url=shard.url
                    ) from exc
                raise
            metrics.add(misses=1, bytes_downloaded=written)
            logger.debug("downloaded %s (%d bytes)", shard.url, written)
            return temp, written
        assert last is not None
        raise last

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
            remote = self.remote(fs, path, shard.url, callback)
            abort = threading.Event()
            chunk_callback = TransferCallback(shard.url, (*callback.stop_events, abort), callback)
            with self._chunk_step(size) as step:
                direct = open_direct(temp) if direct_io else None
                file = Target(fd, direct, size)
                pool = self._chunk_pool()
                futures = [
                    pool.submit(
                        (priority, start),
                        self.chunks.read,
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

    def remote(
        self, fs: AbstractFileSystem, path: str, url: str, callback: TransferCallback
    ) -> Remote:
        """Where a download's chunks come from: the filesystem, and a signed plain GET if any."""
        gets = s3_gets(fs, max_idle=self.max_workers)
        if gets is None:
            return Remote(fs, path, url)
        get_url = self.retries.lookup(
            lambda: gets.url(path, callback), url, "signing the request", callback
        )
        return Remote(fs, path, url, gets.getter, get_url)

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
                refuse_presigned(fs, url, "HEAD", exc)
                return None

        answer: dict[str, Any] | None = self.retries.lookup(head, url, "looking up", callback)
        return answer

    @contextlib.contextmanager
    def _chunk_step(self, size: int) -> Iterator[int]:
        """Bytes per ranged read of a ``size``-byte object, while its chunks download.

        An object downloading alone (the reader waits for it) is split so that it uses every
        connection, however small; with several downloading, each gets its share of the
        connections, so a prefetch of many small shards makes no more requests than it needs
        (each costs ~1 ms of CPU). Large objects stream in ``chunk_size`` pieces. Steps are
        whole blocks, as direct I/O needs.
        """
        with self._lock:
            self._downloading += 1
            connections = max(1, self.max_workers // self._downloading)
        try:
            step = max(_MIN_CHUNK_SIZE, min(self.chunk_size, -(-size // connections)))
            yield -(-step // ALIGNMENT) * ALIGNMENT
        finally:
            with self._lock:
                self._downloading -= 1

    def _expected_checksum(self, shard: Shard) -> Checksum | None:
        return Checksum.parse(shard.checksum) if self.verify else None

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
            raise self.retries.final_error(exc, url, 1) from exc
        digest.done(chunk)

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


def remove(path: str) -> None:
    """Delete ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
