"""PriorityPool: queued tasks run by priority; threads are joined on shutdown."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from wdsfs._pool import PriorityPool


def test_queued_tasks_run_lowest_priority_first():
    pool = PriorityPool(1, thread_name_prefix="wdsfs-test-pool")
    gate = threading.Event()
    order: list[tuple[int, int]] = []
    blocker = pool.submit((0, 0), gate.wait, 10)
    futures = [
        pool.submit(priority, order.append, priority)
        for priority in [(3, 0), (1, 5), (2, 0), (1, 0), (3, 1)]
    ]
    gate.set()
    concurrent.futures.wait([blocker, *futures])
    assert order == [(1, 0), (1, 5), (2, 0), (3, 0), (3, 1)]
    pool.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("wdsfs-test-pool")]


def test_exceptions_reach_the_future_and_shutdown_cancels_the_queue():
    pool = PriorityPool(1, thread_name_prefix="wdsfs-test-pool")
    gate = threading.Event()

    def fail() -> None:
        raise ValueError("boom")

    busy = pool.submit(0, gate.wait, 10)
    failing = pool.submit(1, fail)
    queued = pool.submit(2, lambda: "never")
    gate.set()
    with pytest.raises(ValueError, match="boom"):
        failing.result(timeout=10)
    assert busy.result(timeout=10) is True
    pool.shutdown()
    assert queued.done()
