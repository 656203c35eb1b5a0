"""The main process downloads each DataLoader worker's first shard while the workers start.

Starting a worker (fork, torch's worker loop, a storage client of its own) takes tens of
milliseconds, hundreds with ``spawn``; the main process already has a connected client, so it
fetches the shard every worker reads first into the shared cache meanwhile. A worker asking for
that shard waits on the cache's per-shard lock and is then served from the cache; one that is
faster simply downloads it itself, under the same lock. So nothing is downloaded twice, and a
worker's own download, retries and errors behave as without a head start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from wdsfs.download import Fetcher
from wdsfs.errors import DownloadCancelled, WdsfsError
from wdsfs.shard import Shard

logger = logging.getLogger(__name__)


class HeadStart:
    """Fetch ``shards`` (the workers' first, in worker order) on one background thread.

    Use as a context manager: leaving it cancels what is still downloading and joins the thread.
    """

    def __init__(self, fetcher: Fetcher, shards: Sequence[Shard]) -> None:
        self.fetcher = fetcher
        self.shards = list(shards)
        self._thread = threading.Thread(target=self._run, name="wdsfs-head-start", daemon=True)

    def __enter__(self) -> HeadStart:
        if self.shards:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fetcher.stop_event.set()
        if self._thread.is_alive():
            self._thread.join()
        self.fetcher.close()

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
