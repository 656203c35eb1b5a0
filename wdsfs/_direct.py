"""Direct I/O for downloads: shard bytes to disk and back without the page cache (not public API).

A freshly downloaded shard is read once soon (or never, by ``prefetch``) and re-read only in a
later epoch, long after a dataset larger than memory has pushed it out of the page cache. Writing
it through the page cache costs a new page per 4 KiB, which on virtual machines that hand freed
memory back to the host costs more CPU than the transfer itself (measured here: 1.5-1.7 s of
system CPU per GB for buffered writes and reads of new data, 0.04 s with ``O_DIRECT``).

:class:`DirectWriter` gathers the pieces of one chunk in a reusable page-aligned buffer and
writes whole aligned blocks with ``O_DIRECT``; a chunk that ends at the end of the object writes
its last block padded, and the file is cut to its size afterwards. Where ``O_DIRECT`` is not
available (macOS, Windows, some filesystems) :func:`open_direct` returns None and the caller
writes buffered as before.

:class:`DirectReader` reads cached shards the same way (a fetcher with ``direct_io`` serves its
downloads and cache hits on one, for a dataset larger than memory): aligned blocks of
``O_DIRECT`` reads into one reused buffer, from which the reader's bytes are copied, so no
page-cache page is made for them. :func:`read_direct` turns an open handle into one, or returns
it unchanged where the filesystem refuses ``O_DIRECT``.
"""

from __future__ import annotations

import collections
import errno
import io
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import IO, cast

__all__ = [
    "ALIGNMENT",
    "READ_BLOCK",
    "BufferPool",
    "DirectReader",
    "DirectWriter",
    "open_direct",
    "pwrite_all",
    "read_direct",
]

ALIGNMENT = 4096
READ_BLOCK = 4 * 1024 * 1024  # bytes per O_DIRECT read: smaller reads cost more CPU per byte
_Block = tuple[mmap.mmap, int, int, int]  # buffer, file offset, bytes to write, payload bytes
_FLUSH_BYTES = 1024 * 1024


def open_direct(path: str) -> int | None:
    """A write-only ``O_DIRECT`` descriptor on the existing file ``path``, or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | flag)
    except OSError:  # EINVAL: the filesystem does not do direct I/O
        return None
    probe = mmap.mmap(-1, ALIGNMENT)
    try:
        os.pwrite(fd, probe, 0)  # some filesystems open with O_DIRECT but refuse the writes
    except OSError:
        os.close(fd)
        return None
    finally:
        probe.close()
    return fd


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``pwrite`` may write less at once)."""
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


class BufferPool:
    """Page-aligned anonymous buffers, reused (new pages cost a fault each on first touch)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: collections.deque[mmap.mmap] = collections.deque()
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buffer)
                return
        buffer.close()


class DirectWriter:
    """Writes the consecutive bytes of one chunk, from ``offset`` on, to an ``O_DIRECT`` fd.

    Two threads share it: the one receiving the bytes calls :meth:`write` for each piece, which
    only copies it into the buffer and, every :data:`_FLUSH_BYTES`, posts the full blocks; the
    one that waits for the transfer calls :meth:`drain` meanwhile, which writes posted blocks to
    disk, so a disk write never holds up the network. Then, in the waiting thread,
    :meth:`finish` writes what is left (the object's last block padded with zeros) and
    :meth:`close` returns the buffers.

    ``offset`` must be a multiple of :data:`ALIGNMENT`, and so must the chunk's length unless it
    ends the object (``last``).
    """

    __slots__ = ("_buffer", "_fd", "_fill", "_last", "_on_data", "_pool", "_position", "_posted")

    def __init__(
        self,
        fd: int,
        offset: int,
        pool: BufferPool,
        *,
        last: bool,
        on_data: Callable[[memoryview], None],
    ) -> None:
        if offset % ALIGNMENT:
            raise ValueError(f"direct writes start at a multiple of {ALIGNMENT}, not {offset}")
        self._fd = fd
        self._position = offset  # file offset of the buffer's first byte
        self._pool = pool
        self._buffer: mmap.mmap | None = pool.take()
        self._fill = 0
        self._last = last
        self._on_data = on_data
        self._posted: queue.SimpleQueue[_Block | None] = queue.SimpleQueue()

    def write(self, piece: bytes) -> None:
        """Take the chunk's next bytes (receiving thread)."""
        buffer = self._buffer
        assert buffer is not None
        view = memoryview(piece)
        while view:
            take = min(len(buffer) - self._fill, len(view))
            buffer[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill >= _FLUSH_BYTES:
                self._post()

    def _post(self) -> None:
        buffer = self._buffer
        assert buffer is not None
        aligned = self._fill - self._fill % ALIGNMENT
        rest = self._fill - aligned
        fresh = self._pool.take()
        fresh[:rest] = buffer[aligned : self._fill]
        self._posted.put((buffer, self._position, aligned, aligned))
        self._buffer, self._position, self._fill = fresh, self._position + aligned, rest

    def wake(self) -> None:
        """Make a waiting :meth:`drain` return (the transfer ended)."""
        self._posted.put(None)

    def drain(self, timeout: float) -> None:
        """Write posted blocks until woken, or for up to ``timeout`` seconds (waiting thread)."""
        try:
            item = self._posted.get(timeout=timeout)
        except queue.Empty:
            return
        while item is not None:
            self._write_block(*item)
            try:
                item = self._posted.get_nowait()
            except queue.Empty:
                return

    def _take_posted(self) -> Iterator[_Block]:
        """The posted blocks not yet taken (wake-ups skipped), without waiting."""
        while True:
            try:
                item = self._posted.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                yield item

    def finish(self) -> None:
        """Write every posted block, then what is held (waiting thread, after the transfer)."""
        for block in self._take_posted():
            self._write_block(*block)
        buffer = self._buffer
        assert buffer is not None
        data = length = self._fill
        if length % ALIGNMENT:
            if not self._last:
                raise ValueError("a chunk that does not end the object must be block-aligned")
            padded = length + ALIGNMENT - length % ALIGNMENT
            buffer[length:padded] = bytes(padded - length)
            length = padded
        self._buffer, self._fill = None, 0
        if length:
            self._write_block(buffer, self._position, length, data)  # gives the buffer back
            self._position += length
        else:
            self._pool.give(buffer)

    def close(self) -> None:
        """Return every buffer to the pool (blocks not yet written are dropped).

        The caller makes sure :meth:`write` is not running and will not be called again.
        """
        for block in self._take_posted():
            self._pool.give(block[0])
        if self._buffer is not None:
            self._pool.give(self._buffer)
        self._buffer = None

    def _write_block(self, buffer: mmap.mmap, position: int, length: int, data: int) -> None:
        view = memoryview(buffer)
        try:
            with view[:data] as payload:
                self._on_data(payload)  # checksum here, not on the event loop thread
            pwrite_all(self._fd, view[:length], position)
        finally:
            view.release()
            self._pool.give(buffer)


def read_direct(handle: IO[bytes], pool: BufferPool) -> IO[bytes]:
    """``handle`` as a :class:`DirectReader` (which then owns it), or unchanged.

    Unchanged where ``O_DIRECT`` is unknown (macOS, Windows) or the filesystem refuses it.
    ``pool`` lends the reader its block buffer (of ``pool.size`` bytes, a multiple of
    :data:`ALIGNMENT`) while it reads.
    """
    if not _set_direct(handle.fileno(), True):
        return handle
    return cast(IO[bytes], DirectReader(handle, pool))


def _set_direct(fd: int, on: bool) -> bool:
    """Set or clear ``O_DIRECT`` on an open ``fd``; False if the platform or filesystem refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    import fcntl  # POSIX only, like O_DIRECT

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:  # EINVAL: the filesystem does not do direct I/O
        return False
    return True


class DirectReader(io.RawIOBase):
    """A seekable raw reader of an ``O_DIRECT`` handle, through one aligned block at a time.

    Reads return fewer bytes than asked only at the end of the file, as a regular file's do.

    Each block is read into a buffer taken from ``pool`` on the first read and given back on
    :meth:`close`; reads copy their bytes out of it. If the filesystem refuses a direct read
    after all (``EINVAL``), ``O_DIRECT`` is cleared and the same reads go through the page
    cache. The handle stays open until :meth:`close`, so the file stays readable if it is
    deleted meanwhile (a cache eviction).
    """

    def __init__(self, handle: IO[bytes], pool: BufferPool) -> None:
        super().__init__()
        self.name = handle.name
        self._handle = handle
        self._fd = handle.fileno()
        self._pool = pool
        self._buffer: mmap.mmap | None = None
        self._start = 0  # file offset of the buffer's first byte
        self._length = 0  # bytes of the file in the buffer
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        self._checkClosed()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = os.fstat(self._fd).st_size + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if position < 0:
            raise OSError(errno.EINVAL, f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``b`` from the current position; fewer bytes only at the end of the file."""
        self._checkClosed()
        done = 0
        with memoryview(b) as out, out.cast("B") as view:
            while done < len(view):
                offset = self._position - self._start
                if not 0 <= offset < self._length:
                    self._fill()
                    offset = self._position - self._start
                    if offset >= self._length:
                        break  # at or past the end of the file
                take = min(len(view) - done, self._length - offset)
                assert self._buffer is not None
                view[done : done + take] = self._buffer[offset : offset + take]
                self._position += take
                done += take
        return done

    def _fill(self) -> None:
        if self._buffer is None:
            self._buffer = self._pool.take()
        start = self._position - self._position % ALIGNMENT
        self._start, self._length = start, 0
        try:
            self._length = os.preadv(self._fd, [self._buffer], start)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not _set_direct(self._fd, False):
                raise
            self._length = os.preadv(self._fd, [self._buffer], start)

    def close(self) -> None:
        if not self.closed:
            if self._buffer is not None:
                self._pool.give(self._buffer)
                self._buffer = None
            self._handle.close()
        super().close()
