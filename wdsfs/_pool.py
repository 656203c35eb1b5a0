"""A thread pool that runs queued tasks by priority (not public API).

The fetcher queues chunk transfers of several shards at once; the shard the reader needs next
must get the connections first. ``concurrent.futures.ThreadPoolExecutor`` is first-come,
first-served, so each submitted task here is only a token: the thread that picks it up runs
whichever queued task has the lowest ``(priority, submission order)`` at that moment. Threads
start lazily and are joined by :meth:`PriorityPool.shutdown`.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Entry = tuple[Any, int, "concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class PriorityPool:
    """``submit(priority, fn, *args)``: lower priorities run first, ties in submission order."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix=thread_name_prefix
        )
        self._heap: list[
            tuple[Any, int, concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]
        ] = []
        self._lock = threading.Lock()
        self._order = itertools.count()

    def submit(
        self, priority: Any, fn: Callable[..., T], *args: Any
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)``; its future resolves with the result or the exception."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            heapq.heappush(self._heap, (priority, next(self._order), future, fn, args))
        self._executor.submit(self._run_next)
        return future

    def _run_next(self) -> None:
        with self._lock:
            if not self._heap:
                return
            _, _, future, fn, args = heapq.heappop(self._heap)
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def shutdown(self) -> None:
        """Cancel what is still queued and join the threads (running tasks finish)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left, self._heap = self._heap, []
        for entry in left:
            entry[2].cancel()
