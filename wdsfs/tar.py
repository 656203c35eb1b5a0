"""TarReader: a shard file object in, WebDataset samples out.

The tar headers (ustar, GNU long names, pax ``path``/``size``) are parsed by
``wdsfs/_tar_format.py``; this module groups the members into samples and reads member data
with one large ``read`` per member, so a warm local shard is read at close to the speed of a raw
``read()`` loop (see ``benchmarks/tar_read.py``). Reading through ``mmap`` was measured only
~4% faster and is not used: a shard file truncated while mapped would kill the process with
SIGBUS instead of raising an error; larger read buffers made no difference.

Grouping follows ``webdataset`` 1.0.2 (``tariterators.py``) exactly, so a shard yields the
same samples here as under ``webdataset.WebDataset``:

- only regular files count; directories, links, devices and headers are skipped;
- a member's key is its path up to the first dot of its basename and its field is the rest,
  lower-cased: ``a/b/x.seg.PNG`` is key ``a/b/x``, field ``seg.png``; a name with no such split
  (``README``, ``.hidden`` at top level) is skipped. webdataset's regular expression also turns
  ``d/.hidden`` into key ``d/``, field ``hidden``, and so does this reader;
- names such as ``__meta__`` or ``__meta__/x.json`` (webdataset's metadata convention) are
  skipped.

Where webdataset is lenient this reader is strict and raises :class:`CorruptShardError` naming
the shard URL and the byte offset: members of one key that are not contiguous, a field that
appears twice in a sample, a bad header checksum, garbage, an end of file inside a header,
member data or padding, and corrupt or truncated compressed streams. Offsets count bytes of
the tar stream, i.e. after decompression.

The end of an archive is a zero block, normally followed by a second one; nothing after them is
read. An archive that stops exactly at a member boundary without these blocks is accepted, as
``tarfile`` and webdataset accept it, with a WARNING on the ``wdsfs.tar`` logger (a download cut
at that point looks the same; the size and checksum from ``index.wds`` catch it), or rejected
with ``strict_end=True``. A zero block followed by anything but a zero block or the end of the
file is an error.

Compression (``compression=None`` picks it from the URL suffix, else sniffs the magic bytes as
``tarfile.open(mode="r|*")`` does): ``.tar``; ``.tar.gz``/``.tgz`` through :mod:`zlib`;
``.tar.bz2``/``.tbz2``; ``.tar.xz``/``.txz``; ``.tar.zst``/``.tzst`` through
:mod:`compression.zstd` (Python 3.14+) or the ``zstandard`` package. Decompression streams in one
sequential pass with bounded memory. GNU sparse members are not supported.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from typing import IO, cast

from wdsfs._decompress import Decompressing, decompressor_factory, zstd_factory
from wdsfs._tar_format import BLOCK, CHUNK, TarParser, plain_header, read_exact, read_more

__all__ = ["COMPRESSIONS", "TAR_SUFFIXES", "BinaryFile", "count_samples", "read_samples"]

#: File name suffixes of shards this module reads, mapped to their compression.
_SUFFIX_COMPRESSION = {
    ".tar": "none",
    ".tar.gz": "gzip",
    ".tgz": "gzip",
    ".tar.bz2": "bz2",
    ".tbz2": "bz2",
    ".tar.xz": "xz",
    ".txz": "xz",
    ".tar.zst": "zstd",
    ".tzst": "zstd",
}
#: Every shard suffix the reader supports (lower case); the source lister uses it.
TAR_SUFFIXES: tuple[str, ...] = tuple(_SUFFIX_COMPRESSION)
#: Values accepted by ``compression=``.
COMPRESSIONS: tuple[str, ...] = ("none", "gzip", "bz2", "xz", "zstd")

# webdataset.tariterators.base_plus_ext and its skip_meta pattern
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_MAGIC = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bz2"),
)

Sample = dict[str, object]
#: ``refer(field, file_offset, size)``: what stands for a member's data instead of its bytes.
Refer = Callable[[str, int, int], object | None]
#: What the reader accepts: any binary file object with ``read`` (``open(..., "rb")``, fsspec
#: files, ``io.BytesIO``, raw streams).
BinaryFile = IO[bytes] | io.RawIOBase | io.BufferedIOBase


def read_samples(
    fileobj: BinaryFile,
    *,
    url: str,
    compression: str | None = None,
    select: Callable[[int], bool] | None = None,
    stop: int | None = None,
    strict_end: bool = False,
    refer: Refer | None = None,
) -> Iterator[tuple[int, Sample]]:
    """Iterate over the samples of one tar shard, in tar order.

    Args:
        fileobj: The shard, opened for binary reading and positioned at its start. Read
            sequentially; seeked forward over unselected samples when it is seekable and not
            compressed. Not closed.
        url: The shard's URL: the ``__url__`` of every sample, and named in errors.
        compression: One of :data:`COMPRESSIONS`, or None to infer it from the suffix of
            ``url`` and else from the first bytes.
        select: Called once with each sample index, in order, when the sample's first member is
            reached; samples for which it returns False are checked for grouping errors but
            their bytes are skipped and they are not yielded.
        stop: Stop once sample ``stop - 1`` is complete, reading only one header past it.
        strict_end: Reject an archive without its end-of-archive zero blocks.
        refer: In an uncompressed shard on a seekable file, called with the field, the file
            offset and the size of each selected member's data; what it returns, unless None,
            stands for the data in the sample, and the data is seeked over unread.

    Returns:
        An iterator of ``(index, sample)``: ``index`` counts samples in the shard from 0; a
        sample maps ``__key__``, ``__url__`` and each field (extension, lower case) to its
        ``bytes``.

    Raises:
        ValueError: ``compression`` is unknown or ``stop`` is negative.
        ImportError: The shard is zstd-compressed and no zstd decoder is installed.
        CorruptShardError: While iterating: the shard is not a readable tar or breaks the
            grouping rules; the message names the URL and the byte offset.
    """
    if stop is not None and stop < 0:
        raise ValueError(f"stop must be >= 0, got {stop}")
    if compression is None:
        compression = compression_from_url(url)
    elif compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
    if compression == "zstd":
        zstd_factory()  # fail now, with the install hint
    return _read(fileobj, url, compression, select, stop, strict_end, refer)


def count_samples(fileobj: BinaryFile, *, url: str, compression: str | None = None) -> int:
    """Count the samples of a shard, reading (or seeking over) all of it once.

    Args:
        fileobj: The shard, as for :func:`read_samples`.
        url: The shard's URL, named in errors.
        compression: As for :func:`read_samples`.

    Returns:
        The number of samples :func:`read_samples` would yield.

    Raises:
        CorruptShardError: As for :func:`read_samples`.
    """
    count = 0

    def select(index: int) -> bool:
        nonlocal count
        count = index + 1
        return False

    for _ in read_samples(fileobj, url=url, compression=compression, select=select):
        pass  # pragma: no cover - nothing is selected
    return count


def compression_from_url(url: str) -> str | None:
    """The compression named by the suffix of ``url`` (query string ignored), else None."""
    name = url.split("?", 1)[0].lower() if "://" in url else url.lower()
    for suffix, kind in _SUFFIX_COMPRESSION.items():
        if kind != "none" and name.endswith(suffix):
            return kind
    return None


def _read(
    fileobj: BinaryFile,
    url: str,
    compression: str | None,
    select: Callable[[int], bool] | None,
    stop: int | None,
    strict_end: bool,
    refer: Refer | None,
) -> Iterator[tuple[int, Sample]]:
    if stop == 0:
        return
    head = b""
    source = cast(IO[bytes], fileobj)
    if compression is None:  # sniff, as tarfile.open(mode="r|*")
        head = read_exact(source.read, 6)
        compression = next((kind for magic, kind in _MAGIC if head.startswith(magic)), "none")
        if compression == "bz2" and not (len(head) > 3 and head[3] in b"123456789"):
            compression = "none"
    wrapper: io.BufferedReader | None = None
    stream: IO[bytes]
    seekable = False
    if compression == "none":
        if isinstance(fileobj, io.RawIOBase):
            stream = wrapper = io.BufferedReader(fileobj, 1 << 16)
        else:
            stream = source
        seekable = stream.seekable()
    else:
        raw = Decompressing(source, decompressor_factory(compression), head, url, compression)
        stream = wrapper = io.BufferedReader(raw, 1 << 18)
        head = b""
    parser = TarParser(stream, url, head, seekable)
    try:
        yield from _samples(parser, select, stop, strict_end, refer if seekable else None)
        if parser.complete and wrapper is not None and compression != "none":
            while wrapper.read(CHUNK):  # check the rest of the compressed stream
                pass
    finally:
        if wrapper is not None:
            wrapper.detach()


def _samples(
    parser: TarParser,
    select: Callable[[int], bool] | None,
    stop: int | None,
    strict_end: bool,
    refer: Refer | None,
) -> Iterator[tuple[int, Sample]]:
    """The grouping loop: members -> samples."""
    url = parser.url
    read = parser.read
    seen: set[str] = set()
    cur_key: str | None = None
    sample: Sample | None = None
    fields: set[str] = set()
    index = -1
    block = parser.first_block()
    while True:
        plain = plain_header(block)
        if plain is not None:  # the common case, checked in one go
            hoff = parser.offset
            parser.offset += BLOCK
            name, size = plain
            is_file = True
        else:
            member = parser.member(block, strict_end)
            if member is None:
                break
            hoff, name, size, is_file = member
        key = ext = None
        if is_file:
            key, ext = _split(name)
        if key is not None and ext is not None:
            ext = ext.lower()
            if key != cur_key:
                if sample is not None:
                    yield index, sample
                    sample = None
                if index + 1 == stop:
                    return
                if key in seen:
                    raise parser.error(
                        f"samples not contiguous: key {key!r} appears again after {cur_key!r}",
                        hoff,
                        name,
                    )
                seen.add(key)
                index += 1
                cur_key = key
                if select is None or select(index):
                    sample = {"__key__": key, "__url__": url}
                else:
                    fields = {"__key__", "__url__"}
            if sample is not None:
                if ext in sample:
                    raise parser.error(f"duplicate field {ext!r} in sample {key!r}", hoff, name)
                stand_in = None
                if refer is not None:
                    stand_in = refer(ext, parser.start + parser.offset, size)
                if stand_in is not None:
                    sample[ext] = stand_in
                    parser.skip(size, hoff, name)
                else:
                    data = read(size)
                    if len(data) != size:
                        data = read_more(read, data, size)
                        if len(data) != size:
                            raise parser.truncated(hoff, name, size, len(data))
                    sample[ext] = data
                    parser.offset += size
            else:
                if ext in fields:
                    raise parser.error(f"duplicate field {ext!r} in sample {key!r}", hoff, name)
                fields.add(ext)
                parser.skip(size, hoff, name)
        else:
            parser.skip(size, hoff, name)
        pad = -size % BLOCK
        block = read(pad + BLOCK)
        if len(block) != pad + BLOCK:
            block = read_more(read, block, pad + BLOCK)
            if len(block) < pad:
                parser.check_seeked_end(hoff, name)
                raise parser.error(
                    "truncated tar: the file ends inside the padding of a member", hoff, name
                )
        parser.offset += pad
        if pad:
            block = block[pad:]
    if sample is not None:
        yield index, sample


def _split(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a member name as webdataset groups it; (None, None) to skip it."""
    if name.startswith("__") and (
        ("/" not in name and name.endswith("__")) or _SKIP_META.match(name)
    ):
        return None, None
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1 and "\n" not in name:
        return name[:dot], name[dot + 1 :]
    match = _BASE_PLUS_EXT.match(name)
    if match is None:
        return None, None
    return match.group(1), match.group(2)
