"""fsspec filesystems in forked children (wdsfs._fs)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time

import pytest

from wdsfs._fs import url_to_fs

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method")

SESSIONS = 30


def _child(storage_options, queue):
    begun, cpu = time.perf_counter(), time.process_time()
    # the parent's instances are collected, and the child's first filesystem makes fsspec drop
    # whichever remain
    gc.collect()
    fs, _ = url_to_fs("s3://fork-sessions/a", {**storage_options, "default_block_size": 2**20})
    gc.collect()
    # time spent waiting, not computing: a loaded machine slows the collections, not this
    waited = (time.perf_counter() - begun) - (time.process_time() - cpu)
    queue.put((waited, fs.cat_file("fork-sessions/a")))


def _parent_filesystems(moto_server):
    """Filesystems with open sessions, held only by fsspec's instance cache (as after listing and
    fetching in a process that then starts DataLoader workers)."""
    for n in range(SESSIONS):
        options = {**moto_server.storage_options, "max_concurrency": n + 1}
        yield url_to_fs("s3://fork-sessions/a", options)[0]


def test_a_forked_child_neither_waits_on_nor_closes_the_parents_sessions(moto_server, capfd):
    moto_server.make_bucket("fork-sessions")
    for fs in _parent_filesystems(moto_server):
        fs.pipe("fork-sessions/a", b"payload")
    del fs
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(moto_server.storage_options, queue))
    child.start()
    waited, data = queue.get(timeout=60)
    child.join(timeout=60)

    assert child.exitcode == 0 and data == b"payload"
    # s3fs's finalizers would wait at least 0.1 s each on the parent's loop, which does not run
    # in the child: 3 s in all; collecting the inherited heap is CPU time, not counted
    assert waited < SESSIONS * 0.1 / 2
    assert "Unclosed" not in capfd.readouterr().err
    # the parent's connections still work: the child unregistered none of their sockets
    for fs in _parent_filesystems(moto_server):
        assert fs.cat_file("fork-sessions/a") == b"payload"
