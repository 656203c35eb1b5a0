"""One chunk of a download: a byte range of the object, written at its offset into the temp
file and hashed as it arrives, with transient errors retried (not public API).

A chunk is read by a plain ranged GET of its own (:class:`wdsfs._http_get.RangeGetter`, for S3
presigned URLs) into aligned buffers, or else streamed by the filesystem's event loop
(:func:`wdsfs._ranged.stream_range`). A storage that refuses presigned requests is sent every
later request through s3fs instead. A body shorter or longer than the range is retried like a
reset connection, then raised as :class:`IntegrityError`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from fsspec.spec import AbstractFileSystem

from wdsfs._callback import TransferCallback
from wdsfs._direct import ALIGNMENT, BufferPool, DirectWriter, pwrite_all
from wdsfs._fs import is_transient
from wdsfs._http_get import RangeGetter, RequestRefused
from wdsfs._presign import refused
from wdsfs._ranged import stream_range
from wdsfs._retry import Retries
from wdsfs.checksum import ChunkDigest, ObjectDigest
from wdsfs.errors import DownloadCancelled, DownloadError, IntegrityError

__all__ = ["ChunkReader", "Remote", "Target", "refuse_presigned"]

logger = logging.getLogger("wdsfs.download")  # the fetcher's documented logger

# bytes read per readinto, then hashed and written: O_DIRECT writes of less than 1 MiB cost
# far more CPU per byte here; buffered writes do as well with 256 KiB, and use less memory
_SLICE_SIZE = {True: 1024 * 1024, False: 256 * 1024}  # by direct I/O
_DIRECT_BUFFER = 2 * 1024 * 1024  # DirectWriter's
_REPORT_BYTES = 512 * 1024


@dataclass(frozen=True)
class Remote:
    """The object a download reads: by its filesystem, and by a plain GET where one applies."""

    fs: AbstractFileSystem
    path: str
    shard_url: str
    getter: RangeGetter | None = None
    get_url: str | None = None


@dataclass(frozen=True)
class Target:
    """The temp file a download writes: buffered, and with ``O_DIRECT`` if ``direct``."""

    fd: int
    direct: int | None
    size: int


class ChunkReader:
    """Reads chunks into their download's temp file, retried by ``retries``.

    Args:
        retries: The fetcher's retry policy.
        max_workers: Chunks read at once (buffers kept for reuse).
    """

    def __init__(self, retries: Retries, max_workers: int) -> None:
        self.retries = retries
        self._buffers = BufferPool(_DIRECT_BUFFER, keep=max_workers)
        self._slices = {  # the range getter's, by direct I/O
            direct: BufferPool(size, keep=max_workers) for direct, size in _SLICE_SIZE.items()
        }

    def read(
        self,
        remote: Remote,
        file: Target,
        start: int,
        end: int,
        callback: TransferCallback,
        digest: ObjectDigest,
    ) -> None:
        """Write bytes ``start``-``end`` of ``remote`` into ``file``; hash them into ``digest``."""
        url = remote.shard_url
        retries = self.retries
        for attempt in range(1, retries.max_attempts + 1):
            callback.check()
            chunk = digest.chunk(start)
            try:
                if remote.getter is not None:
                    try:
                        received = self._get(remote, file, start, end, callback, chunk)
                    except RequestRefused as exc:
                        remote, chunk = _without_presign(remote, exc), digest.chunk(start)
                if remote.getter is None:
                    received = self._stream_range(remote, file, start, end, callback, chunk)
            except DownloadCancelled:
                raise
            except Exception as exc:
                if not is_transient(exc) or attempt == retries.max_attempts:
                    raise retries.final_error(exc, url, attempt) from exc
                retries.wait(exc, url, attempt, callback)
                continue
            if received != end - start:
                # a short or long body: retried like a reset connection
                short = DownloadError(
                    f"{url}: range {start}-{end} returned {received} bytes", url=url
                )
                if attempt == retries.max_attempts:
                    raise IntegrityError(
                        f"{url}: size {received} bytes for range {start}-{end}, expected "
                        f"{end - start} (object changed or truncated download)",
                        url=url,
                    )
                retries.wait(short, url, attempt, callback)
                continue
            digest.done(chunk)
            return

    def _get(
        self,
        remote: Remote,
        file: Target,
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
        remote: Remote,
        file: Target,
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


def refuse_presigned(fs: AbstractFileSystem, url: str, request: str, exc: Exception) -> None:
    """Send every later request to ``fs``'s storage through s3fs (it refused a presigned one)."""
    refused(fs)
    logger.warning(
        "%s: the storage refused a presigned %s (%s); sending it through s3fs instead",
        url,
        request,
        exc,
    )


def _without_presign(remote: Remote, exc: RequestRefused) -> Remote:
    """Send through s3fs what the storage refused as a presigned GET (from now on)."""
    refuse_presigned(remote.fs, remote.shard_url, "GET", exc)
    return Remote(remote.fs, remote.path, remote.shard_url)
