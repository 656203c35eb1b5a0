"""File slices: shard bytes a DataLoader worker points the main process to (not public API).

With the shared-memory rings (:mod:`wdsfs._shared_rings`) a worker reads each large field of a
sample out of the cached shard, copies it into its ring, and the main process copies it out:
three copies of every byte on the way to the user. When no code runs on a field in the worker
(no decoder for it, no ``transform``, no ``process_sample`` override, the default collate), the
worker's tar reader makes a :class:`FileSlice` for it instead, the shard's open file with an
offset and a size, and skips its bytes. The worker passes the shard's file descriptor to the main
process once (``SCM_RIGHTS`` over a Unix socket pair made before the fork) and pickles only
``(shard token, offset, size)``; the main process reads the bytes with ``pread`` while it
unpickles the batch. The user gets the same ``bytes`` as without slices.

A descriptor, not a path: the cache may evict the shard while its samples are on their way, and
an open descriptor keeps its data readable. The worker closes its descriptor once no slice of
the shard is left in the worker (all sent or dropped), and names the shard in its next batch;
the main process closes its own descriptor once it has unpickled that batch, after every batch
that read from it. A descriptor the socket cannot take at once (the main process is not reading)
is not waited for: that slice is pickled as its bytes, as without slices. Anything else that
pickles a slice gets its bytes too.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import socket
import struct
import weakref
from collections.abc import Callable

__all__ = ["FileSlice", "ShardFile", "SliceChannel", "slicer"]

_TOKEN = struct.Struct("Q")
_RECEIVE_TIMEOUT = 10.0

_tokens = itertools.count()
# in a worker: tokens of shard files the main process holds and no slice needs any more
_released: collections.deque[int] = collections.deque()


class ShardFile:
    """A worker's own descriptor of one shard file, shared by the slices read from it."""

    __slots__ = ("__weakref__", "_sent", "fd", "token")

    def __init__(self, fileno: int) -> None:
        self.fd = os.dup(fileno)
        self.token = next(_tokens)
        self._sent = [False]  # shared with the finalizer, which must not hold the object
        weakref.finalize(self, _close, self.fd, self.token, self._sent)

    @property
    def sent(self) -> bool:
        """Whether the main process has (or will receive) a copy of the descriptor."""
        return self._sent[0]


def _close(fd: int, token: int, sent: list[bool]) -> None:
    os.close(fd)
    if sent[0]:
        _released.append(token)


def released() -> tuple[int, ...]:
    """In a worker: the shard files sent to the main process that no slice needs any more."""
    tokens = []
    while _released:
        tokens.append(_released.popleft())
    return tuple(tokens)


class FileSlice:
    """``nbytes`` bytes at ``offset`` of a shard file: a sample field not read in the worker.

    ``nbytes`` is what the shuffle buffer's byte bound counts (see
    :func:`wdsfs.shuffle.sample_nbytes`), as it would count the bytes.
    """

    __slots__ = ("file", "nbytes", "offset")

    def __init__(self, file: ShardFile, offset: int, nbytes: int) -> None:
        self.file = file
        self.offset = offset
        self.nbytes = nbytes

    def read(self) -> bytes:
        """The bytes, read from the shard file."""
        return _pread(self.file.fd, self.nbytes, self.offset)

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (self.read(),)  # pickled other than through a channel: the bytes

    def __repr__(self) -> str:
        return f"FileSlice(token={self.file.token}, offset={self.offset}, nbytes={self.nbytes})"


def slicer(
    fileno: int, *, fields: Callable[[str], bool], min_bytes: int
) -> Callable[[str, int, int], FileSlice | None]:
    """The ``refer`` of :func:`wdsfs.tar.read_samples` for the shard open as ``fileno``:
    a slice for each member of at least ``min_bytes`` whose field ``fields`` accepts."""
    file: ShardFile | None = None

    def refer(field: str, offset: int, size: int) -> FileSlice | None:
        nonlocal file
        if size < min_bytes or not fields(field):
            return None
        if file is None:  # the shard's first slice: a descriptor of the worker's own
            file = ShardFile(fileno)
        return FileSlice(file, offset, size)

    return refer


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise pickle.UnpicklingError(
            f"a shard file slice: read {len(data)} of {size} bytes at offset {offset} "
            "(the cached shard file was truncated)"
        )
    return data


class SliceChannel:
    """One worker's socket pair: shard descriptors to the main process, which reads slices."""

    def __init__(self) -> None:
        self._main, self._worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._worker.setblocking(False)
        self._main.settimeout(_RECEIVE_TIMEOUT)
        self._fds: dict[int, int] = {}  # main process: token -> its copy of the descriptor
        self.reads = 0  # main process: slices read

    # -- worker side -----------------------------------------------------------------------

    def send(self, file: ShardFile) -> bool:
        """Make sure the main process gets ``file``'s descriptor; False if it cannot now."""
        if file.sent:
            return True
        try:
            socket.send_fds(self._worker, [_TOKEN.pack(file.token)], [file.fd])
        except OSError:  # the queue is full (the main process is not reading) or closed
            return False
        file._sent[0] = True
        return True

    # -- main process side -----------------------------------------------------------------

    def read(self, token: int, offset: int, size: int) -> bytes:
        """The bytes of a slice of the shard file ``token``."""
        fd = self._fds.get(token)
        while fd is None:
            try:
                message, fds, _, _ = socket.recv_fds(self._main, _TOKEN.size, 1)
            except TimeoutError:
                raise pickle.UnpicklingError(
                    f"a DataLoader worker's shard file {token} did not arrive within "
                    f"{_RECEIVE_TIMEOUT:.0f} s"
                ) from None
            if len(fds) != 1 or len(message) != _TOKEN.size:
                for extra in fds:
                    os.close(extra)
                raise pickle.UnpicklingError(
                    "a DataLoader worker's shard file came without its descriptor "
                    "(is the limit of open files, ulimit -n, reached?)"
                )
            (got,) = _TOKEN.unpack(message)
            self._fds[got] = fds[0]
            fd = self._fds.get(token)
        self.reads += 1
        return _pread(fd, size, offset)

    def release(self, tokens: tuple[int, ...]) -> None:
        """Close the descriptors of shard files no later batch reads."""
        for token in tokens:
            fd = self._fds.pop(token, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        """Close every descriptor and both ends (descriptors still in flight close with them)."""
        self.release(tuple(self._fds))
        self._main.close()
        self._worker.close()
