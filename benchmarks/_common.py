"""Shared helpers of the storage benchmarks (``download.py``, ``throughput.py``).

- the repository root goes on ``sys.path`` so ``tests.servers`` and ``wdsfs`` import when a
  script runs as ``python benchmarks/<name>.py`` from a checkout;
- synthetic WebDataset shards (~100 KB samples: a ``.jpg`` of random bytes, ``.cls``, ``.json``)
  uploaded to a SeaweedFS S3 server on loopback (started here, stopped by its PID) and written
  to a local directory too (for the ``tarfile`` comparison);
- the raw ceiling: 8 threads of 8 MiB ranged ``cat_file`` GETs with s3fs, bytes discarded;
- measurement in fresh child processes (``run_child``): every figure is taken in a process that
  did nothing before, so its peak RSS (``VmHWM``, reset with ``/proc/self/clear_refs`` just before
  the measured part) belongs to the measured code only;
- a plain-text table printer.

Nothing here asserts timings: the machine is shared and noisy; the scripts print figures and
ratios measured in one run.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.servers import SeaweedFSServer, isolate_environment  # noqa: E402

MB = 1e6
MiB = 1 << 20
RANGE_SIZE = 8 * MiB
RAW_THREADS = 8
BUCKET = "bench"
RESULT_PREFIX = "BENCH-RESULT "


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    return _status_kib("VmRSS") * 1024 / MB


def peak_rss_mb() -> float:
    """Peak resident set size (``VmHWM``) of this process since start or the last reset, MB."""
    return _status_kib("VmHWM") * 1024 / MB


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakGrowth:
    """Peak RSS growth and CPU time of this process over a block.

    ``growth`` is ``VmHWM`` after minus RSS before (the peak is reset first); where the peak
    cannot be reset it is ``VmHWM`` after minus ``VmHWM`` before (a lower bound) and ``exact``
    is False. ``cpu`` is user + system seconds of all the process's threads.
    """

    def __enter__(self) -> PeakGrowth:
        self.exact = reset_peak_rss()
        self.before = rss_mb() if self.exact else peak_rss_mb()
        self._cpu = _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = _cpu_seconds() - self._cpu
        self.peak = peak_rss_mb()
        self.growth = self.peak - self.before


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (e.g. the server)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any terminated (and waited for) child process, MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Dataset:
    """Shards on the server (``urls``) and the same bytes on local disk (``local``)."""

    urls: list[str]
    local: list[Path]
    sizes: list[int]
    samples: int
    sample_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def shard_bytes(
    index: int, shard_bytes_target: int, sample_kb: float, noise: bytes
) -> tuple[bytes, int]:
    """A tar shard of ~``shard_bytes_target`` bytes; returns (bytes, number of samples)."""
    sample_size = int(sample_kb * 1000)
    count = max(1, round(shard_bytes_target / (sample_size + 2048)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(count):
            offset = (index * 7919 + i * 104729) % (len(noise) - sample_size)
            key = f"s{index:05d}-{i:06d}"
            fields = {
                "jpg": noise[offset : offset + sample_size],
                "cls": str(i % 1000).encode(),
                "json": b'{"shard": %d, "index": %d, "caption": "a sample"}' % (index, i),
            }
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), count


def make_dataset(
    fs: Any,
    prefix: str,
    local_dir: Path,
    *,
    total_bytes: float,
    shard_bytes_target: float,
    sample_kb: float = 100,
) -> Dataset:
    """Write ~``total_bytes`` of shards to ``s3://<prefix>/`` and ``local_dir`` (in parallel)."""
    num_shards = max(1, round(total_bytes / shard_bytes_target))
    noise = os.urandom(4 * MiB)
    local_dir.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> tuple[str, Path, int, int]:
        data, count = shard_bytes(index, int(shard_bytes_target), sample_kb, noise)
        name = f"shard-{index:06d}.tar"
        path = local_dir / name
        path.write_bytes(data)
        fs.pipe_file(f"{prefix}/{name}", data)
        return f"s3://{prefix}/{name}", path, len(data), count

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(one, range(num_shards)))
    return Dataset(
        urls=[r[0] for r in rows],
        local=[r[1] for r in rows],
        sizes=[r[2] for r in rows],
        samples=sum(r[3] for r in rows),
        sample_bytes=int(sample_kb * 1000),
    )


# ---------------------------------------------------------------------------------------------
# Server


@contextmanager
def seaweedfs() -> Iterator[SeaweedFSServer]:
    """A SeaweedFS S3 server on loopback with the bucket ``bench``; stopped by PID on exit."""
    isolate_environment(os.environ)
    server = SeaweedFSServer()
    server.start()
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def s3_filesystem(storage_options: dict[str, Any]) -> Any:
    """A fresh s3fs filesystem (no instance or listings cache)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **storage_options)


# ---------------------------------------------------------------------------------------------
# Raw reads (the ceiling)


def raw_ranged_read(
    fs: Any,
    urls: Sequence[str],
    sizes: Sequence[int],
    *,
    threads: int = RAW_THREADS,
    write_to: str | None = None,
) -> int:
    """Read every object as ``RANGE_SIZE`` ranged GETs on ``threads`` threads.

    The bytes are discarded, or with ``write_to`` (a directory) written at their offsets into
    one file per object there: a disk cache built the plain way (each range a new ``bytes``
    from ``cat_file``, written with ``pwrite``). Not a ceiling: wdsfs's downloads read into
    reused buffers and have run faster than this on the same machine.
    """
    fds: dict[str, int] = {}
    if write_to is not None:
        for url in urls:
            name = os.path.join(write_to, url.rsplit("/", 1)[1])
            fds[url] = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def get(url: str, start: int, end: int) -> int:
        data = fs.cat_file(url.split("://", 1)[1], start=start, end=end)
        if write_to is not None:
            os.pwrite(fds[url], data, start)
        return len(data)

    jobs = [
        (url, start, min(start + RANGE_SIZE, size))
        for url, size in zip(urls, sizes, strict=True)
        for start in range(0, size, RANGE_SIZE)
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(lambda job: get(*job), jobs))
    finally:
        for fd in fds.values():
            os.close(fd)


def raw_whole_read(fs: Any, urls: Sequence[str], *, threads: int = RAW_THREADS) -> int:
    """Read every object with one whole-object ``cat_file`` on ``threads`` threads."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda url: len(fs.cat_file(url.split("://", 1)[1])), urls))


# ---------------------------------------------------------------------------------------------
# Child processes


def run_child(script: str, spec: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
    """Run ``python <script> --child '<json spec>'`` and return the JSON it reports."""
    command = [sys.executable, script, "--child", json.dumps(spec)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            report: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return report
    raise RuntimeError(
        f"child {spec.get('kind')} failed (exit {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


def report(result: dict[str, Any]) -> None:
    """Print a child's result for the parent (one line)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def child_main(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """If this process is a child (``--child SPEC``), run the handler, report, return True."""
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        report(handlers[spec["kind"]](spec))
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Output


def machine_note() -> str:
    """One line about the machine the figures were measured on."""
    import fsspec
    import s3fs

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    weed = "?"
    try:
        from tests.servers import find_executable

        out = subprocess.run(
            [find_executable("weed"), "version"], capture_output=True, text=True, timeout=10
        ).stdout
        weed = out.split()[2] if len(out.split()) > 2 else out.strip()
    except Exception:
        pass
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
        f"Python {platform.python_version()}, fsspec {fsspec.__version__}, "
        f"s3fs {s3fs.__version__}, "
        f"SeaweedFS {weed} (weed mini on loopback, same machine)"
    )


_REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")
_PROBE_BYTES = 256 * MiB


def page_cache_note(directory: str | os.PathLike[str]) -> str:
    """One line on what a new page-cache page costs here, the hour's main variable.

    Writes and deletes ``_PROBE_BYTES`` of new data through the page cache in ``directory``
    (where the caches go) and reports its system CPU per GB, and whether the kernel hands freed
    memory back to a hypervisor (free page reporting: each new page is then faulted in again).
    """
    path = Path(directory, "page-cost-probe")
    block = b"\1" * MiB
    before = os.times()
    with open(path, "wb") as f:
        for _ in range(_PROBE_BYTES // MiB):
            f.write(block)
    after = os.times()
    path.unlink()
    per_gb = (after.system - before.system) * 1e9 / _PROBE_BYTES
    try:
        reported = (
            "the kernel returns freed memory to the host (free page reporting, "
            f"{int(_REPORTED_KIB.read_text()) / 2**20:.0f} GiB so far)"
        )
    except (OSError, ValueError):
        reported = "no free page reporting to a host"
    return (
        f"page cache: a buffered write of new data costs {per_gb:.2f} s of system CPU per GB "
        f"now; {reported}{_damon_pageout()}"
    )


_DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def _damon_pageout() -> str:
    """Whether DAMON pages out memory left unused for a while (page cache of the shard cache
    included: a 'warm' epoch then reads such shards from the disk)."""
    ages = []
    for scheme in _DAMON.glob("*/contexts/*/schemes/*/"):  # directories only
        context = scheme.parent.parent
        try:
            if (context.parent.parent / "state").read_text().strip() != "on":
                continue
            if (scheme / "action").read_text().strip() == "pageout":
                aggregation_us = int((context / "monitoring_attrs/intervals/aggr_us").read_text())
                min_age = int((scheme / "access_pattern/age/min").read_text())
                ages.append(min_age * aggregation_us / 1e6)
        except (OSError, ValueError):
            continue
    if not ages:
        return ""
    return f"; DAMON pages out memory unused for {min(ages):.0f} s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``."""
    begun = time.perf_counter()
    out = fn()
    return time.perf_counter() - begun, out
