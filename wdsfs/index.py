"""The ``index.wds`` format: read, write, and the per-shard statistics it records.

An ``index.wds`` file sits in a dataset directory (beside its shards, or above split
folders) and lists the shards, so a dataset needs no listing and knows its sample counts before
reading a byte of them. It is UTF-8 JSON::

    {"format": "wdsfs-index", "version": 1, "created": "2025-01-31T12:00:00Z",
     "shards": [
     {"path": "train/shard-000000.tar", "size": 1048576, "num_samples": 100,
      "md5": "9e107d9d372bb6826bd81d3542a419d6"},
     {"path": "s3://other-bucket/extra-000000.tar.gz", "size": 524288, "num_samples": 80,
      "md5": "e4d909c290d0fb1ca068ffaddf22cbd0"}
     ]}

(:func:`dumps_index` writes one shard per line.)

- ``format`` is always ``"wdsfs-index"``; ``version`` is the integer major version, 1 here.
  Readers reject a newer major version; additions that older readers may ignore keep version 1.
- ``shards`` lists the shards in dataset order. ``path`` is relative to the directory holding
  ``index.wds`` (``/``-separated, no ``..``, no leading ``/``) or a full URL (``scheme://...``);
  ``size`` is the object's size in bytes, ``num_samples`` its sample count as
  :func:`wdsfs.tar.read_samples` (and webdataset) reads it, ``md5`` the hex MD5 of its bytes
  as stored (compressed, for ``.tar.gz``). All four are required; paths are unique.
- ``created`` (ISO 8601) and ``tool`` are optional and informative. Unknown keys, at the top level
  or in a shard, are ignored, for forward compatibility.

Each shard becomes a :class:`~wdsfs.shard.Shard` whose ``checksum`` and ``version`` are
``"md5:<hex>"``: the cache key changes with the content, and downloads are verified against it.
See also ``docs/index-format.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wdsfs.errors import IndexFormatError
from wdsfs.shard import Shard
from wdsfs.tar import BinaryFile, count_samples

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "VERSION",
    "IndexEntry",
    "ShardStats",
    "dumps_index",
    "loads_index",
    "parse_index",
    "scan_shard",
]

#: File name of the index, in the dataset directory.
INDEX_NAME = "index.wds"
#: Value of the ``format`` field.
FORMAT = "wdsfs-index"
#: Major version written, and the newest one read.
VERSION = 1

_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One shard as listed in ``index.wds``.

    Attributes:
        path: Relative to the index's directory (``train/shard-000000.tar``) or a full URL.
        size: Bytes of the object as stored.
        num_samples: Samples in the shard.
        md5: Lower-case hex MD5 of the object's bytes.
    """

    path: str
    size: int
    num_samples: int
    md5: str


@dataclass(frozen=True, slots=True)
class ShardStats:
    """What :func:`scan_shard` measures of one shard (an :class:`IndexEntry` without path)."""

    size: int
    num_samples: int
    md5: str


def parse_index(data: bytes, *, base_url: str) -> list[Shard]:
    """Read an ``index.wds`` into shards with absolute URLs.

    Args:
        data: The file's bytes.
        base_url: URL of the directory holding ``index.wds`` (``s3://bucket/ds``); relative
            paths are resolved against it.

    Returns:
        The shards in index order, with size, sample count, and ``"md5:<hex>"`` as both
        checksum and version.

    Raises:
        IndexFormatError: The data is not a valid index of a supported version; names the
            index URL and what is wrong.
    """
    base = base_url.rstrip("/")
    entries = loads_index(data, url=f"{base}/{INDEX_NAME}")
    shards = []
    for entry in entries:
        url = entry.path if "://" in entry.path else f"{base}/{entry.path}"
        digest = f"md5:{entry.md5}"
        shards.append(
            Shard(
                url=url,
                size=entry.size,
                version=digest,
                checksum=digest,
                num_samples=entry.num_samples,
            )
        )
    return shards


def loads_index(data: bytes, *, url: str) -> list[IndexEntry]:
    """Read an ``index.wds`` into its entries, paths as written.

    Args:
        data: The file's bytes.
        url: The index's URL, named in errors.

    Returns:
        The entries in index order.

    Raises:
        IndexFormatError: Malformed JSON, a missing or wrong field, a duplicate path, or a
            newer major version.
    """
    try:
        doc = json.loads(bytes(data).decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{url}: not UTF-8 text ({exc})", url=url) from None
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"{url}: not valid JSON: {exc}", url=url) from None
    if not isinstance(doc, dict):
        raise IndexFormatError(f"{url}: expected a JSON object, got {_kind(doc)}", url=url)
    if doc.get("format") != FORMAT:
        raise IndexFormatError(
            f"{url}: not a wdsfs index (format is {doc.get('format')!r}, expected {FORMAT!r})",
            url=url,
        )
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IndexFormatError(
            f"{url}: 'version' must be a positive integer, got {version!r}", url=url
        )
    if version > VERSION:
        raise IndexFormatError(
            f"{url}: index version {version} is newer than this wdsfs reads "
            f"(up to {VERSION}): upgrade wdsfs, or rebuild the index with this version",
            url=url,
        )
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise IndexFormatError(f"{url}: 'shards' must be a list, got {_kind(shards)}", url=url)
    entries = []
    seen: set[str] = set()
    for number, item in enumerate(shards):
        try:
            entry = _entry(item)
        except ValueError as exc:
            raise IndexFormatError(f"{url}: shards[{number}]: {exc}", url=url) from None
        if entry.path in seen:
            raise IndexFormatError(
                f"{url}: shards[{number}]: path {entry.path!r} is listed twice", url=url
            )
        seen.add(entry.path)
        entries.append(entry)
    return entries


def dumps_index(
    entries: Sequence[IndexEntry], *, created: str | None = None, tool: str | None = None
) -> bytes:
    """Write entries as ``index.wds`` bytes (UTF-8 JSON, one shard per line).

    Args:
        entries: The shards, in dataset order.
        created: Optional creation time (ISO 8601) to record.
        tool: Optional name and version of the writer to record.

    Returns:
        The file's bytes; :func:`loads_index` reads them back to equal entries.

    Raises:
        ValueError: An entry :func:`loads_index` would reject (bad path, negative size,
            malformed md5) or a duplicate path.
    """
    lines = []
    seen: set[str] = set()
    for number, entry in enumerate(entries):
        record = {
            "path": entry.path,
            "size": entry.size,
            "num_samples": entry.num_samples,
            "md5": entry.md5,
        }
        try:
            checked = _entry(record)
        except ValueError as exc:
            raise ValueError(f"entry {number}: {exc}") from None
        if checked.path in seen:
            raise ValueError(f"entry {number}: path {checked.path!r} is listed twice")
        seen.add(checked.path)
        record["md5"] = checked.md5
        lines.append(" " + json.dumps(record, ensure_ascii=False))
    head: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if created is not None:
        head["created"] = created
    if tool is not None:
        head["tool"] = tool
    text = json.dumps(head, ensure_ascii=False)[:-1] + ',\n "shards": [\n'
    text += ",\n".join(lines) + ("\n ]}\n" if lines else " ]}\n")
    return text.encode("utf-8")


def scan_shard(fileobj: BinaryFile, *, url: str, compression: str | None = None) -> ShardStats:
    """Measure one shard for the index, reading its stream exactly once.

    The raw bytes are hashed as they are read, while the tar reader counts samples in them
    (decompressing ``.tar.gz`` and the like on the way), so nothing is read twice.

    Args:
        fileobj: The shard opened for binary reading, at its start; read to its end.
        url: The shard's URL: its suffix selects the compression; named in errors.
        compression: As for :func:`wdsfs.tar.read_samples`.

    Returns:
        Size, sample count and MD5 of the shard.

    Raises:
        CorruptShardError: The shard cannot be read as a tar.
    """
    hashing = _HashingReader(fileobj)
    num_samples = count_samples(hashing, url=url, compression=compression)
    hashing.drain()
    return ShardStats(size=hashing.size, num_samples=num_samples, md5=hashing.hexdigest())


class _HashingReader(io.RawIOBase):
    """A non-seekable view of ``fileobj`` that hashes and counts every byte read."""

    def __init__(self, fileobj: BinaryFile) -> None:
        super().__init__()
        self._fp = fileobj
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._fp.read(len(view))
        n = len(data)
        view[:n] = data
        self._md5.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: end padding, compression trailers."""
        while data := self._fp.read(_CHUNK):
            self._md5.update(data)
            self.size += len(data)

    def hexdigest(self) -> str:
        return self._md5.hexdigest()


def _entry(item: object) -> IndexEntry:
    """Check one shard record; ValueError says what is wrong."""
    if not isinstance(item, Mapping):
        raise ValueError(f"expected an object, got {_kind(item)}")
    missing = [key for key in ("path", "size", "num_samples", "md5") if key not in item]
    if missing:
        raise ValueError(f"missing {', '.join(map(repr, missing))}")
    path, size, num_samples, md5 = item["path"], item["size"], item["num_samples"], item["md5"]
    if not isinstance(path, str) or not path:
        raise ValueError(f"'path' must be a non-empty string, got {path!r}")
    if "://" not in path:
        parts = path.split("/")
        if path.startswith("/") or ".." in parts or "" in parts or "\\" in path:
            raise ValueError(
                f"'path' {path!r} must be relative to the index ('train/shard-000000.tar', "
                "no '..', no leading or doubled '/') or a full URL"
            )
    for name, value in (("size", size), ("num_samples", num_samples)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name!r} must be a non-negative integer, got {value!r}")
    if not isinstance(md5, str) or not _MD5.fullmatch(md5):
        raise ValueError(f"'md5' must be 32 hex digits, got {md5!r}")
    return IndexEntry(path=path, size=size, num_samples=num_samples, md5=md5.lower())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
