"""The main process keeps freed heap memory for the workers' next batches (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from wdsfs import _malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

_PROBE = """
import ctypes, resource
from wdsfs._malloc import keep_freed_memory
print(keep_freed_memory(), keep_freed_memory())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # batches of 32 samples of 100 KB, allocated together, then freed
    batch = [bytes(100_000) for _ in range(32)]
    del batch
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return out[0], int(out[1])


def test_freed_batches_stay_mapped_for_the_next_ones():
    applied, faults = probe()
    assert applied == "True True"
    assert faults < 2_000  # the first batch's pages only (~800), not 200 batches' (~160,000)


def test_the_users_own_malloc_tuning_is_left_alone():
    applied, _ = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False False"


def test_once_per_process(monkeypatch):
    monkeypatch.setattr(_malloc, "_applied_in", os.getpid())
    assert _malloc.keep_freed_memory()
