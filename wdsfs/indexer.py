"""Build and write ``index.wds``: list a dataset prefix, scan every shard once, write the index.

:mod:`wdsfs.index` is the file format; this module does the I/O around it::

    entries = build_index("s3://bucket/ds", split="train", max_workers=16)
    write_index("s3://bucket/ds", entries, split="train")   # s3://bucket/ds/train/index.wds

:func:`build_index` lists the tar shards under the prefix (always a real listing: an
``index.wds`` already there is ignored, since it is what is being rebuilt), then streams each
shard once, ``max_workers`` at a time, through :func:`wdsfs.index.scan_shard`, which counts its
samples and hashes its bytes in the same pass. Shards are read as sequential ranged reads of
8 MiB (the fetcher's cancellable range read; ``fs.open`` when the size is unknown), so memory
stays bounded whatever the shard size. Each scan is checked against the listing (size, and MD5
where the storage gives one), so an object replaced while it was read is reported rather than
indexed.

Progress is reported in bytes to an optional fsspec ``Callback``. Setting ``stop_event``, or a
``KeyboardInterrupt`` in the calling thread, cancels every scan (within ~50 ms on async
backends, else at the next block) and joins the threads; nothing is written until
:func:`write_index`.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import io
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fsspec.callbacks import Callback
from fsspec.spec import AbstractFileSystem

from wdsfs._fs import is_local, translate_error, url_to_fs
from wdsfs._ranged import read_range
from wdsfs.download import TransferCallback
from wdsfs.errors import IntegrityError, WdsfsError
from wdsfs.index import INDEX_NAME, IndexEntry, ShardStats, dumps_index, scan_shard
from wdsfs.shard import Shard
from wdsfs.source import Source, is_shard_name, shard_from_info

__all__ = ["build_index", "check_writable", "index_location", "render_index", "write_index"]

logger = logging.getLogger(__name__)

_BLOCK_SIZE = 8 * 1024 * 1024
_READ_ONLY_PROTOCOLS = {"http", "https"}


def index_location(remote: str, *, split: str | None = None) -> str:
    """The URL of the dataset directory that holds (or will hold) ``index.wds``.

    Args:
        remote: Dataset prefix URL or local path (``s3://bucket/ds``).
        split: Optional sub-prefix (``"train"``); the index then sits in that folder.

    Returns:
        ``remote`` joined with ``split``, without a trailing slash.

    Raises:
        ValueError: ``remote`` is not a prefix (a shard URL or a brace pattern).
    """
    if not isinstance(remote, str) or not remote.strip():
        raise ValueError(f"remote must be a dataset prefix URL or path, got {remote!r}")
    base = remote.strip().rstrip("/")
    if "{" in base or is_shard_name(base):
        raise ValueError(
            f"{remote}: an index describes a dataset prefix (a directory of shards), "
            "not a shard or a brace pattern"
        )
    return f"{base}/{split.strip('/')}" if split and split.strip("/") else base


def build_index(
    remote: str,
    *,
    split: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_workers: int = 8,
    progress: Callback | None = None,
    stop_event: threading.Event | None = None,
) -> list[IndexEntry]:
    """List the shards under a prefix and measure each one for ``index.wds``.

    Args:
        remote: Dataset prefix URL or local path (``s3://bucket/ds``).
        split: Optional sub-prefix (``"train"``): index only that folder.
        storage_options: fsspec options (credentials, ``endpoint_url``...).
        max_workers: Shards read at the same time.
        progress: fsspec Callback receiving the total (``set_size``) and every byte read.
        stop_event: Setting it cancels the scans.

    Returns:
        One entry per shard, in dataset (URL) order, paths relative to the prefix.

    Raises:
        ValueError: ``remote`` is not a prefix, or ``max_workers`` < 1.
        NoShardsError: The prefix holds no tar shards.
        ShardNotFoundError: The bucket or prefix does not exist.
        StorageAccessError: Access was denied.
        CorruptShardError: A shard is not a readable tar (names its URL and offset).
        IntegrityError: A shard changed while it was read.
        DownloadCancelled: ``stop_event`` was set.
        DownloadError: Reading a shard failed.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    base = index_location(remote, split=split)
    fs, root = url_to_fs(base, storage_options)
    root = root.rstrip("/")
    listed = _list_ignoring_index(fs, root, base, storage_options)
    shards = [shard for _, shard in listed]
    if progress is not None:
        progress.set_size(sum(shard.size or 0 for shard in shards))
    started = time.monotonic()
    stats = _scan_all(fs, listed, max_workers, progress, stop_event)
    entries = [
        IndexEntry(
            path=_relative(shard.url, base),
            size=stat.size,
            num_samples=stat.num_samples,
            md5=stat.md5,
        )
        for shard, stat in zip(shards, stats, strict=True)
    ]
    logger.info(
        "%s: indexed %d shards (%d samples, %d bytes) in %.1fs",
        base,
        len(entries),
        sum(entry.num_samples for entry in entries),
        sum(entry.size for entry in entries),
        time.monotonic() - started,
    )
    return entries


def write_index(
    remote: str,
    entries: Sequence[IndexEntry],
    *,
    split: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``index.wds`` beside the shards.

    On a local disk the file is written under a temporary name and renamed into place, so a
    reader never sees half an index; on object stores it is a single PUT, which replaces the
    object atomically.

    Args:
        remote: Dataset prefix URL or local path, as given to :func:`build_index`.
        entries: What :func:`build_index` returned.
        split: The same ``split`` as given to :func:`build_index`.
        storage_options: fsspec options; they must allow writing.

    Returns:
        The URL of the written ``index.wds``.

    Raises:
        ValueError: The location cannot be written (HTTP), ``remote`` is not a prefix, or an
            entry is invalid.
        StorageAccessError: Writing was denied.
        DownloadError: Writing failed.
    """
    url = check_writable(remote, split=split)
    data = render_index(entries)
    fs, path = url_to_fs(url, storage_options)
    try:
        if is_local(fs):
            _replace_local(fs, path, data)
        else:
            fs.pipe_file(path, data)
    except Exception as exc:
        raise translate_error(exc, url, "writing the index") from exc
    logger.info("%s: wrote %d shards", url, len(entries))
    return url


def render_index(entries: Sequence[IndexEntry]) -> bytes:
    """The bytes of ``index.wds`` for ``entries``, stamped with the time and the wdsfs version.

    Raises:
        ValueError: An invalid entry or a duplicate path.
    """
    from wdsfs import __version__

    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return dumps_index(entries, created=created, tool=f"wdsfs {__version__}")


def check_writable(remote: str, *, split: str | None = None) -> str:
    """The URL ``index.wds`` would be written to, checked before any work is done.

    Args:
        remote: Dataset prefix URL or local path.
        split: Optional sub-prefix.

    Returns:
        The index URL (``<prefix>/index.wds``).

    Raises:
        ValueError: ``remote`` is not a prefix, or its storage is read-only for fsspec
            (plain HTTP(S)); the message names the URL and what to do instead.
    """
    url = f"{index_location(remote, split=split)}/{INDEX_NAME}"
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    if protocol in _READ_ONLY_PROTOCOLS:
        raise ValueError(
            f"{url}: cannot write {INDEX_NAME} over {protocol.upper()}, which is read-only; "
            "build it where the files are stored (a local path or a bucket), or save it to a "
            "local file and upload it beside the shards"
        )
    return url


def _list_ignoring_index(
    fs: AbstractFileSystem, root: str, base: str, storage_options: Mapping[str, Any] | None
) -> list[tuple[str, Shard]]:
    """``(path in fs, shard)`` for each shard under ``base``, by a real listing, in URL order.

    An ``index.wds`` already there is what is being rebuilt, so it is not read; listings
    cached by the filesystem instance are dropped first.
    """
    fs.invalidate_cache(root)
    source = Source(base, storage_options=storage_options, use_index=False)
    return [
        (root + shard.url[len(base) :] if shard.url.startswith(base + "/") else shard.url, shard)
        for shard in source.shards()
    ]


def _relative(url: str, base: str) -> str:
    return url[len(base) + 1 :] if url.startswith(base + "/") else url


def _scan_all(
    fs: AbstractFileSystem,
    listed: Sequence[tuple[str, Shard]],
    max_workers: int,
    progress: Callback | None,
    stop_event: threading.Event | None,
) -> list[ShardStats]:
    """Scan every shard on a bounded pool; the first error (or an interrupt) cancels the rest."""
    stop = threading.Event()
    events = (stop,) if stop_event is None else (stop, stop_event)
    with concurrent.futures.ThreadPoolExecutor(
        max_workers, thread_name_prefix="wdsfs-index"
    ) as pool:
        futures = [
            pool.submit(_scan, fs, path, shard, TransferCallback(shard.url, events, progress))
            for path, shard in listed
        ]
        try:
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            for future in futures:
                if future.done() and future.exception() is not None:
                    future.result()  # raises the worker's error here, in the caller
            return [future.result() for future in futures]
        finally:
            stop.set()
            for future in futures:
                future.cancel()


def _scan(
    fs: AbstractFileSystem, path: str, shard: Shard, callback: TransferCallback
) -> ShardStats:
    """Stream one shard once: size, sample count and MD5, checked against the listing."""
    callback.check()
    try:
        if shard.size is None:  # some HTTP servers: no size, read sequentially to the end
            with fs.open(path, "rb", block_size=_BLOCK_SIZE) as remote:
                stats = scan_shard(
                    _BlockReader(lambda: remote.read(_BLOCK_SIZE), callback), url=shard.url
                )
        else:
            blocks = _ranges(fs, path, shard.url, shard.size, callback)
            stats = scan_shard(_BlockReader(blocks, callback), url=shard.url)
    except (WdsfsError, ImportError):
        raise
    except Exception as exc:
        raise translate_error(exc, shard.url, "indexing") from exc
    if shard.size is not None and stats.size != shard.size:
        raise IntegrityError(
            f"{shard.url}: read {stats.size} bytes, listed as {shard.size} "
            "(object changed while indexing); index again",
            url=shard.url,
        )
    _check_unchanged(fs, path, shard, stats)
    logger.debug("%s: %d samples, %d bytes", shard.url, stats.num_samples, stats.size)
    return stats


def _check_unchanged(fs: AbstractFileSystem, path: str, shard: Shard, stats: ShardStats) -> None:
    """Raise IntegrityError if the bytes scanned are not the object that was listed.

    The storage's MD5 settles it where there is one; else the object's version (ETag,
    generation, size and mtime) is looked up again, as the fetcher does after a download.
    """
    if shard.checksum and shard.checksum.startswith("md5:"):
        if shard.checksum[4:] != stats.md5:
            raise IntegrityError(
                f"{shard.url}: md5 {stats.md5}, storage says {shard.checksum[4:]} "
                "(object changed while indexing, or a corrupted read); index again",
                url=shard.url,
            )
        return
    if shard.version is None:
        return
    try:
        now = shard_from_info(fs, fs.info(path)).version
    except Exception as exc:
        raise translate_error(exc, shard.url, "checking the version") from exc
    if now != shard.version:
        raise IntegrityError(
            f"{shard.url}: object changed while indexing (version {shard.version} -> {now}); "
            "index again",
            url=shard.url,
        )


def _ranges(
    fs: AbstractFileSystem, path: str, url: str, size: int, callback: TransferCallback
) -> Callable[[], bytes]:
    """A function returning the object's next block of bytes (``b""`` at its end).

    Ranged reads, cancelled within ~50 ms of a stop on async filesystems (the fetcher's).
    """
    position = 0

    def next_block() -> bytes:
        nonlocal position
        start, end = position, min(position + _BLOCK_SIZE, size)
        if start >= end:
            return b""
        data = read_range(fs, path, start, end, callback)
        if len(data) != end - start:
            raise IntegrityError(
                f"{url}: range {start}-{end} returned {len(data)} bytes, expected "
                f"{end - start} (object changed while indexing); index again",
                url=url,
            )
        position = end
        return data

    return next_block


class _BlockReader(io.RawIOBase):
    """A non-seekable stream over blocks, reporting each block to a TransferCallback.

    The callback forwards byte counts to the progress bar and raises DownloadCancelled once a
    stop event is set, so a scan stops at its next block.
    """

    def __init__(self, next_block: Callable[[], bytes], callback: TransferCallback) -> None:
        super().__init__()
        self._next_block = next_block
        self._callback = callback
        self._block = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._block:
            self._callback.check()
            data = self._next_block()
            if not data:
                return 0
            self._callback.relative_update(len(data))
            self._block = memoryview(data)
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._block))
        view[:n] = self._block[:n]
        self._block = self._block[n:]
        return n


def _replace_local(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` beside ``path`` under a temporary name, then rename it into place."""
    parent, _, name = path.rpartition("/")
    temp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temp, data)
    try:
        fs.mv(temp, path)
    except BaseException:
        fs.rm_file(temp)
        raise
