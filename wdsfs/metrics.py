"""Counters of what the fetcher did: cache hits and misses, bytes, retries, time to first shard."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields

__all__ = ["FetchMetrics"]


@dataclass
class FetchMetrics:
    """Thread-safe counters, read with :meth:`snapshot`."""

    hits: int = 0
    misses: int = 0
    bytes_downloaded: int = 0
    bytes_from_cache: int = 0
    retries: int = 0
    integrity_failures: int = 0
    first_shard_seconds: float | None = None
    _started: float = field(default_factory=time.monotonic, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add to counters by name (``add(hits=1, bytes_from_cache=n)``)."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def shard_ready(self) -> None:
        """Record the time to the first ready shard (once)."""
        with self._lock:
            if self.first_shard_seconds is None:
                self.first_shard_seconds = time.monotonic() - self._started

    def snapshot(self) -> dict[str, float | int | None]:
        """The counters as a plain dict."""
        with self._lock:
            return {
                f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")
            }
