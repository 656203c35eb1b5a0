"""Retrying the fetcher's requests: backoff with full jitter, and the error given up with
(not public API).

Transient errors (throttling, resets, timeouts: see :func:`wdsfs._fs.is_transient`) are retried
up to ``max_attempts`` times, sleeping ``uniform(0, backoff * 2 ** (attempt - 1))`` seconds in
between, and each retry is logged at WARNING on ``wdsfs.download`` and counted in the metrics.
Anything else, or the last attempt's error, is raised as the :class:`WdsfsError` it means.
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from wdsfs._callback import AnyEvent, TransferCallback
from wdsfs._fs import describe, is_transient, translate_error
from wdsfs.errors import CacheError, DownloadError, IntegrityError, WdsfsError
from wdsfs.metrics import FetchMetrics

__all__ = ["Retries"]

logger = logging.getLogger("wdsfs.download")  # the fetcher's documented logger

_T = TypeVar("_T")
_LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@dataclass(frozen=True)
class Retries:
    """The retry policy of one fetcher.

    Args:
        max_attempts: Tries per request.
        backoff: Base seconds of the exponential backoff.
        metrics: Counts the retries.
        cache_directory: Where downloads are written, named when the local disk fails.
    """

    max_attempts: int
    backoff: float
    metrics: FetchMetrics
    cache_directory: str

    def lookup(
        self, request: Callable[[], _T], url: str, doing: str, callback: TransferCallback
    ) -> _T:
        """``request()`` (a HEAD or similar), with transient errors retried as chunks are."""
        for attempt in range(1, self.max_attempts + 1):
            callback.check()
            try:
                return request()
            except Exception as exc:
                if not is_transient(exc) or attempt == self.max_attempts:
                    raise self.final_error(exc, url, attempt, doing) from exc
                self.wait(exc, url, attempt, callback)
        raise AssertionError("unreachable")  # pragma: no cover

    def final_error(
        self, exc: BaseException, url: str, attempt: int, doing: str = "downloading"
    ) -> WdsfsError:
        """The error to raise for ``exc``, after ``attempt`` tries."""
        if isinstance(exc, OSError) and exc.errno in _LOCAL_DISK_ERRNOS:
            # only the local disk fails so (the cache's file being written), not the storage
            return CacheError(
                f"{url}: cannot write the download into {self.cache_directory}: {exc}", url=url
            )
        if "checksum" in str(exc).lower():  # e.g. botocore's response checksum validation
            return IntegrityError(f"{url}: checksum mismatch while {doing}: {exc}", url=url)
        error = translate_error(exc, url, doing)
        if attempt > 1 and type(error) is DownloadError:
            return DownloadError(f"{error} (gave up after {attempt} attempts)", url=url)
        return error

    def wait(self, exc: BaseException, url: str, attempt: int, callback: TransferCallback) -> None:
        """Sleep before retry ``attempt`` (raises :class:`DownloadCancelled` if cancelled)."""
        delay = random.uniform(0, self.backoff * 2 ** (attempt - 1))
        self.metrics.add(retries=1)
        logger.warning(
            "%s: transient error (%s), retry %d/%d in %.2fs",
            url,
            describe(exc),
            attempt,
            self.max_attempts - 1,
            delay,
        )
        if AnyEvent(callback.stop_events).wait(delay):
            callback.check()
