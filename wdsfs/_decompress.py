"""The compressed-stream layer under the tar reader (not public API).

:class:`Decompressing` is a raw stream of the decompressed bytes of a shard file: gzip through
:mod:`zlib`, bz2 and xz through the stdlib, zstd through :mod:`compression.zstd` (Python 3.14+)
or the ``zstandard`` package. It reads the compressed input in 1 MiB pieces, bounds the output
of each call by what the caller asked for (so memory stays bounded, whatever the ratio), follows
concatenated streams (pigz, pbzip2, pzstd) and skips zero padding between and after them.

Errors of the underlying ``read`` pass unchanged (they are I/O errors, possibly transient);
errors of the decompressor, a stream that ends before its end marker and garbage after the
last stream become :class:`~wdsfs.errors.CorruptShardError` naming the URL.
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol

from wdsfs.errors import CorruptShardError

__all__ = ["Decompressing", "decompressor_factory", "zstd_factory"]

_CHUNK = 1 << 20  # compressed bytes read per call


class _Decompressor(Protocol):
    """What the stdlib decompressor objects (bz2, lzma, compression.zstd) have in common."""

    @property
    def eof(self) -> bool: ...  # pragma: no cover

    @property
    def needs_input(self) -> bool: ...  # pragma: no cover

    @property
    def unused_data(self) -> bytes: ...  # pragma: no cover

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...  # pragma: no cover


class _Gzip:
    """zlib's gzip decompressor with the bz2/lzma interface (bounded output)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._tail

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._d.decompress(self._tail + data if self._tail else data, max(max_length, 0))
        self._tail = self._d.unconsumed_tail
        return out


class _Zstandard:
    """The ``zstandard`` package's decompressor with the bz2/lzma interface."""

    def __init__(self, module: Any) -> None:
        self._d = module.ZstdDecompressor().decompressobj()

    @property
    def eof(self) -> bool:
        return bool(self._d.eof)

    @property
    def needs_input(self) -> bool:
        return True

    @property
    def unused_data(self) -> bytes:
        return bytes(self._d.unused_data)

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return bytes(self._d.decompress(data))


#: (make a decompressor, the exceptions it raises on bad data)
_Factory = tuple[Callable[[], _Decompressor], tuple[type[Exception], ...]]


def zstd_factory() -> _Factory:
    """The zstd decompressor; ImportError naming the package when there is none."""
    try:
        from compression import zstd  # type: ignore[import-not-found, unused-ignore]

        return zstd.ZstdDecompressor, (zstd.ZstdError, EOFError)
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise ImportError(
            "reading .tar.zst shards needs Python 3.14+ or zstandard: pip install zstandard"
        ) from None
    return (lambda: _Zstandard(zstandard)), (zstandard.ZstdError,)


def decompressor_factory(kind: str) -> _Factory:
    """The decompressor for ``kind`` (``gzip``, ``bz2``, ``xz``, ``zstd``)."""
    if kind == "gzip":
        return _Gzip, (zlib.error,)
    if kind == "bz2":
        return bz2.BZ2Decompressor, (OSError, EOFError)
    if kind == "xz":
        return lzma.LZMADecompressor, (lzma.LZMAError, EOFError)
    return zstd_factory()


class Decompressing(io.RawIOBase):
    """A raw stream of the decompressed bytes of ``fileobj`` (concatenated streams too).

    Errors of the raw ``fileobj.read`` pass unchanged; errors of the decompressor become
    :class:`CorruptShardError`, as does a stream that ends before its end marker.
    """

    def __init__(
        self, fileobj: IO[bytes], factory: _Factory, head: bytes, url: str, kind: str
    ) -> None:
        super().__init__()
        self._fp = fileobj
        self._new, self._errors = factory
        self._dec = self._new()
        self._input = head
        self._out = memoryview(b"")
        self._done = False
        self._url = url
        self._kind = kind
        self._raw_offset = 0  # compressed bytes read, for messages

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._out:
            self._fill(len(view))
        n = min(len(view), len(self._out))
        view[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _fill(self, max_length: int) -> None:
        while not self._done:
            if self._dec.eof:
                self._next_stream()
                continue
            data = self._input
            self._input = b""
            if not data and self._dec.needs_input:
                data = self._fp.read(_CHUNK)
                self._raw_offset += len(data)
                if not data:
                    raise self._error("the compressed stream ends before its end marker")
            try:
                out = self._dec.decompress(data, max_length)
            except self._errors as exc:
                raise self._error(f"corrupt compressed data: {exc}") from exc
            if out:
                self._out = memoryview(out)
                return

    def _next_stream(self) -> None:
        """After one stream ends: skip zero padding, start on a concatenated stream or stop."""
        rest = (self._dec.unused_data + self._input).lstrip(b"\0")
        while not rest:
            data = self._fp.read(_CHUNK)
            self._raw_offset += len(data)
            if not data:
                self._done = True
                return
            rest = data.lstrip(b"\0")
        self._dec = self._new()
        self._input = rest

    def _error(self, what: str) -> CorruptShardError:
        return CorruptShardError(
            f"{self._url}: {self._kind}: {what} (near compressed byte {self._raw_offset})",
            url=self._url,
        )
