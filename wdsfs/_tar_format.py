"""The tar format: 512-byte headers, pax and GNU extended headers, the end-of-archive blocks.

:class:`TarParser` reads the headers of a tar stream (ustar name/prefix, octal and base-256
sizes, header checksums, GNU ``L`` long names, pax ``x`` headers with ``path``/``size``) for the
sample grouping of :mod:`wdsfs.tar`, which reads the member data. The usual header, a regular file
with octal fields and no prefix, is checked in one short function, :func:`plain_header` (~20%
less time per sample than the full parser, which takes every other header). Errors are
:class:`~wdsfs.errors.CorruptShardError` naming the shard URL and the tar-stream byte offset.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable
from typing import IO

from wdsfs.errors import CorruptShardError

__all__ = ["BLOCK", "CHUNK", "TarParser", "plain_header", "read_exact", "read_more"]

logger = logging.getLogger("wdsfs.tar")  # the public module's logger, as documented

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20  # discard size when skipping data that cannot be seeked over
_REGULAR = frozenset(b"0\x0007")  # tarfile.REGULAR_TYPES without GNU sparse
# tarfile.SUPPORTED_TYPES that carry no data of their own (links, dirs, devices, fifos)
_NO_DATA = frozenset(b"123456")
_PAX = frozenset(b"xX")
_SPARSE_KEYS = ("GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.major")
_SIGNED = struct.Struct("148b8x356b")


class TarParser:
    """One pass over one tar stream; tracks the tar-stream offset for error messages.

    ``head`` holds the bytes of the stream already read (sniffing its compression); ``seekable``
    says that member data can be seeked over.
    """

    def __init__(self, stream: IO[bytes], url: str, head: bytes, seekable: bool) -> None:
        self.stream = stream
        self.read = stream.read
        self.url = url
        self.head = head
        self.seekable = seekable
        self.start = stream.tell() - len(head) if seekable else 0  # file offset of the tar
        self.seeked = False
        self.offset = 0  # tar-stream offset of the next unread byte
        self.complete = False  # an end-of-archive zero block was read

    def error(self, what: str, offset: int, member: str | None = None) -> CorruptShardError:
        where = f"member {member!r} at byte offset {offset}" if member else f"byte offset {offset}"
        return CorruptShardError(f"{self.url}: {what} ({where})", url=self.url)

    def first_block(self) -> bytes:
        """The first header block (shorter only at the end of the file)."""
        return self.head + read_exact(self.read, BLOCK - len(self.head))

    def member(self, block: bytes, strict_end: bool) -> tuple[int, str, int, bool] | None:
        """Parse the header chain that starts with ``block``; None at the end of the archive.

        Returns:
            (offset of the chain, member name, bytes of data that follow, whether it is a
            regular file). Extended headers (pax, GNU long names) are consumed.
        """
        first = self.offset
        name: str | None = None
        size: int | None = None
        while True:
            offset = self.offset
            if len(block) != BLOCK:
                self.end_of_file(block, first, name is not None or size is not None, strict_end)
                return None
            if block == _ZERO_BLOCK:
                if name is not None or size is not None:
                    raise self.error("extended header not followed by a member", first)
                self.offset += BLOCK
                self.end_marker()
                return None
            self.offset += BLOCK
            hname, flag, hsize = self.header(block, offset)
            if flag in _PAX or flag in b"LKg":
                payload = self.payload(hsize, offset)
                if flag == 0x4C:  # GNU 'L'; the outermost name wins, as in tarfile
                    if name is None:
                        name = _nts(payload)
                elif flag in _PAX:  # 'g' (global) and 'K' (long link name) are ignored
                    pax = self.pax(payload, offset)
                    if any(k in pax for k in _SPARSE_KEYS):
                        raise self.error("GNU sparse members are not supported", offset)
                    if name is None and "path" in pax:
                        name = pax["path"].rstrip("/")
                    if size is None and "size" in pax:
                        size = self.pax_size(pax["size"], offset)
                block = read_exact(self.read, BLOCK)
                continue
            if flag == 0x53:  # 'S'
                raise self.error("GNU sparse members are not supported", offset, hname)
            if name is None:
                name = hname
            if flag in _NO_DATA:
                return first, name, 0, False
            if size is None:
                size = hsize
            return first, name, size, flag in _REGULAR

    def header(self, block: bytes, offset: int) -> tuple[str, int, int]:
        """Check one ustar/GNU/v7 header block; return (name, type flag, size)."""
        field = block[148:156]
        chksum = self.octal(field, "not a tar header (bad checksum field)", offset)
        if block.count(0) >= 256:  # byte sum < 65521: adler32's low half is 1 + sum, in C
            unsigned = ((zlib.adler32(block) & 0xFFFF) - 1) % 65521
        else:
            unsigned = sum(block)
        if chksum != unsigned + 256 - sum(field) and chksum != sum(_SIGNED.unpack(block)) + 256:
            raise self.error("bad tar header checksum (corrupt or not a tar file)", offset)
        flag = block[156]
        raw = block[:100]
        end = raw.find(0)
        if end >= 0:
            raw = raw[:end]
        if flag == 0 and raw.endswith(b"/"):
            flag = 0x35  # a v7 directory, as tarfile reads it
        if block[124] & 0x80:
            if block[124] != 0x80:
                raise self.error("negative member size", offset)
            size = int.from_bytes(block[125:136], "big")
        else:
            size = self.octal(block[124:136], "bad size field in tar header", offset)
            if size < 0:
                raise self.error("negative member size", offset)
        name = raw.decode("utf-8", "surrogateescape")
        if block[345] and flag not in b"LKS":
            prefix = _nts(block[345:500])
            if prefix:
                name = prefix + "/" + name
        return name, flag, size

    def octal(self, field: bytes, what: str, offset: int) -> int:
        """A header's octal number field (NUL- or space-terminated), or ``what`` as the error."""
        end = field.find(0)
        try:
            return int((field if end < 0 else field[:end]).strip() or b"0", 8)
        except ValueError:
            raise self.error(what, offset) from None

    def pax_size(self, value: str, offset: int) -> int:
        """The ``size`` record of a pax header."""
        try:
            size = int(value)
        except ValueError:
            raise self.error(f"bad size {value!r} in pax header", offset) from None
        if size < 0:
            raise self.error(f"negative size {size} in pax header", offset)
        return size

    def payload(self, size: int, offset: int) -> bytes:
        """Read the data of an extended header and its padding."""
        data = read_exact(self.read, size + (-size % BLOCK))
        if len(data) < size + (-size % BLOCK):
            raise self.error("truncated tar: the file ends inside an extended header", offset)
        self.offset += len(data)
        return data[:size]

    def pax(self, payload: bytes, offset: int) -> dict[str, str]:
        """Parse pax records (``"%d %s=%s\\n"``) into a dict."""
        records: dict[str, str] = {}
        pos = 0
        while pos < len(payload) and payload[pos] != 0:
            space = payload.find(b" ", pos)
            try:
                length = int(payload[pos:space]) if space > pos else 0
            except ValueError:
                length = 0
            record = payload[space + 1 : pos + length - 1]
            if length <= 0 or pos + length > len(payload) or payload[pos + length - 1] != 10:
                raise self.error("malformed pax extended header", offset)
            keyword, eq, value = record.partition(b"=")
            if not eq:
                raise self.error("malformed pax extended header", offset)
            records[keyword.decode("utf-8", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
            pos += length
        return records

    def skip(self, size: int, hoff: int, name: str) -> None:
        """Move past ``size`` bytes of member data without keeping them."""
        if not size:
            return
        if self.seekable:
            self.stream.seek(size, io.SEEK_CUR)
            self.seeked = True
            self.offset += size
            return
        readinto = getattr(self.stream, "readinto", None)
        buf = memoryview(bytearray(min(size, CHUNK)))
        left = size
        while left:
            want = min(left, len(buf))
            got = readinto(buf[:want]) if readinto is not None else len(self.read(want))
            if not got:
                raise self.truncated(hoff, name, size, size - left)
            left -= got
            self.offset += got

    def truncated(self, hoff: int, name: str, size: int, got: int) -> CorruptShardError:
        return self.error(
            f"truncated tar: the member needs {size} bytes of data, the file ends after {got}",
            hoff,
            name,
        )

    def end_of_file(self, block: bytes, first: int, pending: bool, strict_end: bool) -> None:
        """Handle a header read that hit the end of the file."""
        if block:
            raise self.error("truncated tar: the file ends inside a header", self.offset)
        if pending:
            raise self.error("truncated tar: extended header not followed by a member", first)
        self.check_seeked_end(first, None)
        if self.offset == 0:
            raise self.error("empty file, not a tar archive", 0)
        if strict_end:
            raise self.error("truncated tar: no end-of-archive blocks", self.offset)
        logger.warning(
            "%s: no end-of-archive blocks after the last member (byte offset %d); "
            "accepted as tarfile does, but a truncated download looks the same",
            self.url,
            self.offset,
        )

    def check_seeked_end(self, hoff: int, name: str | None) -> None:
        """Seeking past the end of a file succeeds: after a short read, check the real size."""
        if self.seeked:
            end = self.stream.seek(0, io.SEEK_END) - self.start
            if end < self.offset:
                raise self.error(
                    f"truncated tar: the file ends at byte {end}, inside skipped member data",
                    hoff,
                    name,
                )

    def end_marker(self) -> None:
        """After a first zero block: accept a second one or the end of the file."""
        block = read_exact(self.read, BLOCK)
        if not block:
            logger.debug("%s: a lone zero block ends the archive", self.url)
        elif len(block) < BLOCK:
            raise self.error(
                "truncated tar: the file ends inside the end-of-archive blocks", self.offset
            )
        elif block != _ZERO_BLOCK:
            raise self.error("a zero block followed by data (corrupt header?)", self.offset - BLOCK)
        self.complete = True


def plain_header(block: bytes) -> tuple[str, int] | None:
    """(name, size) of a plain regular-file header, or None for anything else.

    Plain: a whole block of a regular file (type ``0`` or NUL), no ustar prefix, octal size
    and checksum fields, and the unsigned checksum right. Any other block (an extended header,
    a zero block, a short or corrupt one) goes to :meth:`TarParser.member`, which accepts or
    rejects it; this only makes the common case cheap.
    """
    if len(block) != BLOCK or block[345] or (block[156] != 0x30 and block[156] != 0):
        return None
    try:
        chksum = int(block[148:156].rstrip(b"\0 "), 8)
        size = int(block[124:136].rstrip(b"\0 "), 8)
    except ValueError:
        return None
    if size < 0:
        return None
    # the byte sum of each half block is < 65521: adler32's low half is 1 + that sum, in C
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    if chksum != unsigned + 256 - sum(block[148:156]):
        return None
    end = block.find(0, 0, 100)
    name = block[: end if end >= 0 else 100].decode("utf-8", "surrogateescape")
    if block[156] == 0 and name.endswith("/"):
        return None  # a v7 directory
    return name, size


def _nts_bytes(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _nts(field: bytes) -> str:
    return _nts_bytes(field).decode("utf-8", "surrogateescape")


def read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the file."""
    data = read(size)
    if len(data) != size:
        data = read_more(read, data, size)
    return data


def read_more(read: Callable[[int], bytes], data: bytes, size: int) -> bytes:
    parts = [data]
    have = len(data)
    while have < size:
        more = read(size - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)
