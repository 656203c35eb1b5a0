"""Cheaper DataLoader worker processes: forked without copying the parent's heap, and sending
their results through a wider pipe (see :class:`~wdsfs.loader.StreamingDataLoader`)."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_RESULT_PIPE_BYTES = 1024 * 1024


def widen_result_pipe(iterator: Any) -> None:
    """Let the workers' result pipe hold up to 1 MiB instead of Linux's 64 KiB.

    A sample of ~100 KB then crosses in one write instead of several, each a context switch
    between a worker and the main process (measured: ~1.5x the bytes per second on 2 cores).
    Best effort: only where ``F_SETPIPE_SZ`` exists and the system limit allows it.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return
    queue = getattr(iterator, "_worker_result_queue", None)
    reader = getattr(queue, "_reader", None)
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if reader is None or set_size is None:
        return
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = min(_RESULT_PIPE_BYTES, int(f.read()))
        fcntl.fcntl(reader.fileno(), set_size, size)
    except (OSError, ValueError):
        logger.debug("cannot widen the DataLoader result pipe", exc_info=True)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep this process's objects out of the garbage collections of the workers it forks.

    A forked worker's first full collection otherwise walks every object it inherited and
    writes to each one's header: a copy of every page of the parent's heap, ~150 ms before the
    first sample of a second epoch's workers (measured with torch imported). ``gc.freeze``
    moves the objects to a generation no collection visits, for the fork only; a process
    that froze objects itself is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
