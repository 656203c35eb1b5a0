"""The main process downloads each DataLoader worker's first shard while the workers start.

Starting a worker (fork, torch's worker loop, a storage client of its own) takes tens of
milliseconds, hundreds with ``spawn``; the main process already has a connected client, so it
fetches the shard every worker reads first into the shared cache meanwhile. It claims those
shards' cache locks before the workers fork (:meth:`HeadStart.claim`): a worker asking for its
first shard waits on that lock and is then served from the cache, instead of downloading it
with a storage client that is still cold. Each claim is released as soon as its shard is
fetched, or when the head start stops: a worker then downloads the shard itself, under the
same lock. So nothing is downloaded twice, and a worker's own download, retries and errors
behave as without a head start. The rest of a worker's read-ahead it fetches itself, in
parallel with the other workers (over many more connections than the main process's).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.errors import DownloadCancelled, WdsfsError
from wdsfs.shard import Shard

logger = logging.getLogger(__name__)


class HeadStart:
    """Fetch ``shards`` (the workers' first, in worker order) on one background thread.

    Call :meth:`claim` before forking the workers, then use it as a context manager: leaving it
    cancels what is still downloading, joins the thread and releases the claims left.
    """

    def __init__(self, fetcher: Fetcher, shards: Sequence[Shard]) -> None:
        self.fetcher = fetcher
        self.shards = list(shards)
        self._thread = threading.Thread(target=self._run, name="wdsfs-head-start", daemon=True)
        self._claimed: list[str] = []

    def claim(self) -> None:
        """Claim the shards' cache locks (those listed with a size and version)."""
        cache = self.fetcher.cache
        for shard in self.shards:
            key = ShardCache.key(shard)
            if shard.size is not None and shard.version is not None and cache.claim(key):
                self._claimed.append(key)

    def __enter__(self) -> HeadStart:
        if self.shards:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fetcher.stop_event.set()
        if self._thread.is_alive():
            self._thread.join()
        self._release(self._claimed)
        self.fetcher.close()

    def _release(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.fetcher.cache.release_claim(key)

    def _run(self) -> None:
        with self.fetcher.cache.session():
            for shard in self.shards:
                try:
                    self.fetcher.fetch(shard).close()
                except DownloadCancelled:
                    return
                except WdsfsError as exc:
                    # the worker that reads this shard fetches it again, and reports the error
                    logger.debug("head start stopped at %s: %s", shard.url, exc)
                    return
                finally:  # served from the cache, local, or failed: no lock() took it over
                    self._release([ShardCache.key(shard)])
