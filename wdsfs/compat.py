"""streaming-wds names on wdsfs: ``ShardDownloader``, ``DownloadCancelled``, ``count_shards``.

A thin adapter for code written against ``streaming_wds.core.downloader``: the same methods
and queue/event protocol, with fsspec in place of boto3 (any storage, ``storage_options`` in
place of a boto3 ``Session``) and the shared, verified :class:`~wdsfs.cache.ShardCache`.
Every constructor argument but ``remote`` has a default, so
``ShardDownloader("s3://bucket/ds", storage_options=...)`` works on its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.errors import DownloadCancelled
from wdsfs.plan import plan_epoch
from wdsfs.shard import Shard
from wdsfs.source import Source, count_shards, is_shard_name, session_storage_options

__all__ = ["DownloadCancelled", "ShardDownloader", "count_shards"]

logger = logging.getLogger(__name__)

# URL schemes whose first path component is a bucket or container: keys are relative to it
_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


class ShardDownloader:
    """Downloads the shards of a dataset into the shared cache and feeds a worker's queue.

    Args:
        remote: Dataset URL (any fsspec URL, local path, brace pattern or list).
        session: Optional boto3 Session (streaming-wds compatibility), turned into s3fs
            credentials; prefer ``storage_options``.
        split: Optional sub-prefix of ``remote``.
        storage_options: fsspec options (credentials, ``endpoint_url``, ``anon``...).
        profile: AWS profile for ``s3://``.
        input_queue: Queue of shard URLs to download (filled by :meth:`run`).
        output_queue: Queue receiving ``(shard_index, local_path)`` for each ready shard.
        stop_event: Set it to cancel every transfer; a cancelled transfer raises
            :class:`DownloadCancelled` inside and leaves nothing in the cache.
        finish_event: Set by :meth:`run` when it is done.
        cache: The shard cache; default: a :class:`ShardCache` built from ``cache_dir`` and
            ``cache_limit``.
        max_attempts: Tries per transfer for transient errors.
        max_pool_connections: Concurrent connections.
    """

    def __init__(
        self,
        remote: str | Sequence[str],
        session: Any = None,
        input_queue: queue.Queue[Any] | None = None,
        output_queue: queue.Queue[Any] | None = None,
        stop_event: threading.Event | None = None,
        finish_event: threading.Event | None = None,
        cache: ShardCache | None = None,
        max_attempts: int = 10,
        max_pool_connections: int = 10,
        *,
        split: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        profile: str | None = None,
        cache_dir: str | None = None,
        cache_limit: int | str | None = None,
    ) -> None:
        options = dict(storage_options or {})
        if session is not None:
            options = {**session_storage_options(session), **options}
        self.source = Source(remote, split=split, storage_options=options, profile=profile)
        if cache is None:
            cache = (
                ShardCache(cache_dir)
                if cache_limit is None
                else ShardCache(cache_dir, cache_limit=cache_limit)
            )
        self.cache = cache
        self.input_queue: queue.Queue[Any] = (
            input_queue if input_queue is not None else queue.Queue()
        )
        self.output_queue: queue.Queue[Any] = (
            output_queue if output_queue is not None else queue.Queue()
        )
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.finish_event = finish_event if finish_event is not None else threading.Event()
        self.max_pool_connections = max_pool_connections
        self.fetcher = Fetcher(
            cache,
            storage_options=self.source.storage_options,
            max_workers=max_pool_connections,
            max_attempts=max_attempts,
            stop_event=self.stop_event,
        )
        self.shards: list[str] | None = None

    def __enter__(self) -> ShardDownloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Join the download threads."""
        self.fetcher.close()

    def set_queues(self, input_queue: queue.Queue[Any], output_queue: queue.Queue[Any]) -> None:
        """Replace the input and output queues."""
        self.input_queue = input_queue
        self.output_queue = output_queue

    def find_shards(self) -> list[str]:
        """The shard URLs of the dataset, in order.

        Raises:
            NoShardsError: No tar shards at the location.
            ShardNotFoundError: The bucket or prefix does not exist.
        """
        self.shards = [shard.url for shard in self.source.shards()]
        return list(self.shards)

    def num_shards(self) -> int:
        """The number of shards."""
        return len(self.shards if self.shards is not None else self.find_shards())

    def _shard(self, key: str) -> Shard:
        """The listed shard ``key`` names (its URL, or a path ending it), else its URL.

        A key that is no URL is what streaming-wds calls a key: an object key in the dataset's
        bucket (``s3://``, ``gs://``, ``az://``...), else a path relative to the dataset.

        Raises:
            ValueError: ``key`` ends the URLs of several listed shards.
        """
        suffix = "/" + key.lstrip("/")
        found = [s for s in self.source.shards() if s.url == key or s.url.endswith(suffix)]
        if len(found) > 1:
            names = ", ".join(s.url for s in found[:3])
            raise ValueError(f"{key!r} names several shards ({names}...): give the whole URL")
        if found:
            return found[0]
        if "://" in key:
            return Shard(url=key)
        base = self.source.remotes[0]
        scheme, has_scheme, rest = base.partition("://")
        if not has_scheme:  # a local dataset: relative to its directory
            return Shard(
                url=os.path.join(os.path.dirname(base) if is_shard_name(base) else base, key)
            )
        if scheme in _BUCKET_SCHEMES:
            return Shard(url=f"{scheme}://{rest.split('/', 1)[0]}/{key.lstrip('/')}")
        return Shard(url=base.rstrip("/") + suffix)

    def download_cancel_helper(self, _: int = 0) -> None:
        """Raise :class:`DownloadCancelled` if the stop event is set (a transfer callback).

        Raises:
            DownloadCancelled: The stop event is set.
        """
        if self.stop_event.is_set():
            raise DownloadCancelled(f"{self.source.url}: download cancelled", url=self.source.url)

    def cancellable_download(self, key: str, output_path: str) -> bool:
        """Download one shard to ``output_path`` (verified, atomic), outside the cache.

        Returns:
            True when the file is complete, False when the stop event cancelled it (nothing is
            left at ``output_path``).

        Raises:
            WdsfsError: Any other failure, naming the URL.
        """
        try:
            self.fetcher.download_to(self._shard(key), output_path)
        except DownloadCancelled:
            logger.debug("download of %s cancelled", key)
            return False
        return True

    def get_shard(self, key: str) -> str:
        """The local path of a shard: from the cache, or downloaded into it first.

        Args:
            key: A shard URL from :meth:`find_shards` (or its path relative to the bucket).

        Returns:
            The path of the cached file (valid until the cache evicts it).
        """
        with self.fetcher.fetch(self._shard(key)) as fetched:
            return fetched.path

    def prefetch_shards(self, keys: Sequence[str]) -> list[str]:
        """Download many shards concurrently; returns their local paths in the same order.

        The downloads bypass the page cache (direct I/O where available): prefetched shards
        are read later, if at all, so their pages would only push out others.
        """
        workers = max(1, min(len(keys), self.max_pool_connections))

        def prefetch(key: str) -> str:
            with self.fetcher.fetch(self._shard(key), direct_io=True) as fetched:
                return fetched.path

        with concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="wdsfs-prefetch"
        ) as pool:
            return list(pool.map(prefetch, keys))

    def run(
        self, rank: int, worker_infos: Sequence[Any], epoch: int = 0, shuffle: bool = False
    ) -> None:
        """Download the shards of reader ``rank`` in order, feeding ``output_queue``.

        The reader's shards follow wdsfs' plan for ``len(worker_infos)`` readers (see
        :func:`wdsfs.plan.plan_epoch`); they are put on ``input_queue``, then downloaded with a
        read-ahead window and put on ``output_queue`` as ``(shard_index, local_path)``. A
        ``worker_infos[rank]`` with ``resume=True`` and ``idx=n`` skips the reader's first ``n``
        shards (streaming-wds' shard-level resumption). Stops early when the stop event is
        set; sets ``finish_event`` when done, also on error.
        """
        if not 0 <= rank < len(worker_infos):
            self.finish_event.set()
            raise ValueError(f"rank {rank} is out of range for {len(worker_infos)} worker_infos")
        try:
            shards = self.source.shards()
            items = plan_epoch(
                len(shards), len(worker_infos), seed=0, epoch=epoch, shuffle=shuffle
            )[rank]
            order = list(dict.fromkeys(item.shard for item in items))
            info = worker_infos[rank]
            if getattr(info, "resume", False):
                order = order[int(getattr(info, "idx", 0)) :]
            for index in order:
                self.input_queue.put(index)
            wanted = []
            while not self.input_queue.empty():
                wanted.append(self.input_queue.get_nowait())
                self.input_queue.task_done()
            fetched_iter = self.fetcher.fetch_ahead((shards[i] for i in wanted), window=2)
            try:
                for index, fetched in zip(wanted, fetched_iter, strict=False):
                    with fetched:
                        self.output_queue.put((index, fetched.path))
                    if self.stop_event.is_set():
                        break
            except DownloadCancelled:
                logger.debug("run(%d) cancelled", rank)
            finally:
                fetched_iter.close()
        finally:
            self.finish_event.set()
