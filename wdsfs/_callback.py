"""The fsspec Callback of one transfer, and waiting on several stop events (not public API).

Every transfer of the fetcher (a HEAD, a chunk, a whole shard) reports to a
:class:`TransferCallback`: it counts bytes for progress and verification, forwards them to an
outer progress callback (a tqdm bar), and raises :class:`DownloadCancelled` once any of its stop
events is set. The public name is :class:`wdsfs.TransferCallback`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from fsspec.callbacks import Callback

from wdsfs.errors import DownloadCancelled

__all__ = ["AnyEvent", "TransferCallback"]


class TransferCallback(Callback):  # type: ignore[misc]
    """fsspec Callback of one transfer: counts bytes, forwards progress, raises on cancel.

    Args:
        url: The shard URL, for the cancellation message.
        stop_events: Any of these set cancels the transfer.
        progress: An optional outer Callback (a tqdm bar) that receives every byte count.
    """

    def __init__(
        self,
        url: str,
        stop_events: Iterable[threading.Event] = (),
        progress: Callback | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.stop_events = tuple(stop_events)
        self.progress = progress
        self._lock = threading.Lock()

    def cancelled(self) -> bool:
        """Whether any stop event is set."""
        return any(event.is_set() for event in self.stop_events)

    def check(self) -> None:
        """Raise :class:`DownloadCancelled` if the transfer must stop."""
        if self.cancelled():
            raise DownloadCancelled(f"{self.url}: download cancelled", url=self.url)

    def relative_update(self, inc: int = 1) -> None:
        with self._lock:
            self.value += inc
        if self.progress is not None:
            self.progress.relative_update(inc)
        self.call()

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.check()


class AnyEvent:
    """Wait on several events (the fetcher's and a caller's) as if they were one."""

    def __init__(self, events: Iterable[threading.Event]) -> None:
        self.events = tuple(events)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)

    def wait(self, timeout: float) -> bool:
        # Sleep on the first event; re-check all of them (cancellation granularity: timeout).
        deadline_step = min(timeout, 0.1) if len(self.events) > 1 else timeout
        waited = 0.0
        while waited < timeout:
            if self.events[0].wait(min(deadline_step, timeout - waited)) or self.is_set():
                return True
            waited += deadline_step
        return self.is_set()
