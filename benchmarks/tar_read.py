"""How fast does wdsfs.tar read a warm local shard, against raw reads, tarfile and webdataset?

Builds shards in a temporary directory (default: ~100 MB and ~20 MB of ~100 KB samples, each
sample a ``.jpg`` of random bytes plus a small ``.cls`` and ``.json``), reads each once to warm the
page cache, then reports the best of ``--repeat`` runs of:

- ``raw read``: ``f.read(8 MiB)`` until EOF (the ceiling);
- ``tarfile``: ``tarfile.open(path)`` iteration, ``extractfile(m).read()`` for every member;
- ``webdataset``: ``tariterators.tar_file_expander`` + ``group_by_keys`` on the open file;
- ``wdsfs``: ``wdsfs.tar.read_samples`` (every member's bytes materialised);
- ``wdsfs count``: ``wdsfs.tar.count_samples`` (headers only, data seeked over).

With ``--gzip`` it also compares ``gzip.open(...).read`` with ``read_samples`` on a ``.tar.gz``.

Run (with wdsfs installed, or ``PYTHONPATH=.``):
``python benchmarks/tar_read.py [--size-mb 100 20] [--sample-kb 100] [--repeat 5] [--gzip]``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wdsfs.tar import count_samples, read_samples

MiB = 1 << 20


def build_shard(path: Path, size_mb: float, sample_kb: float) -> int:
    """Write a shard of about ``size_mb`` MB; return its number of samples."""
    sample_bytes = int(sample_kb * 1000)
    count = max(1, int(size_mb * 1e6 / (sample_bytes + 1536)))
    noise = os.urandom(sample_bytes + 4096)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(count):
            fields = {
                "jpg": noise[i % 4096 : i % 4096 + sample_bytes],
                "cls": str(i % 1000).encode(),
                "json": b'{"index": %d, "caption": "a sample"}' % i,
            }
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"shard/sample{i:07d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return count


def raw_read(path: Path) -> tuple[int, int]:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * MiB):
            total += len(chunk)
    return total, 0


def tarfile_read(path: Path) -> tuple[int, int]:
    total = members = 0
    with tarfile.open(path) as tf:
        for member in tf:
            if member.isreg():
                extracted = tf.extractfile(member)
                assert extracted is not None
                total += len(extracted.read())
                members += 1
    return total, members


def webdataset_read(path: Path) -> tuple[int, int]:
    from webdataset import tariterators

    total = samples = 0
    with open(path, "rb") as f:
        files = tariterators.tar_file_expander([{"url": str(path), "stream": f}])
        for sample in tariterators.group_by_keys(files):
            samples += 1
            total += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    return total, samples


def wdsfs_read(path: Path) -> tuple[int, int]:
    total = samples = 0
    with open(path, "rb") as f:
        for _, sample in read_samples(f, url=str(path)):
            samples += 1
            for key, value in sample.items():
                if not key.startswith("__"):
                    total += len(value)  # type: ignore[arg-type]
    return total, samples


def wdsfs_count(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        return 0, count_samples(f, url=str(path))


def gzip_read(path: Path) -> tuple[int, int]:
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            total += len(chunk)
    return total, 0


def best_time(fn: Callable[[Path], tuple[int, int]], path: Path, repeat: int) -> float:
    fn(path)  # warm up (page cache, imports)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(path)
        best = min(best, time.perf_counter() - start)
    return best


def report(
    path: Path, samples: int, repeat: int, methods: dict[str, Callable[..., object]]
) -> None:
    size = path.stat().st_size
    print(f"\n{path.name}: {size / 1e6:.1f} MB, {samples} samples, best of {repeat}")
    print(f"  {'method':<14}{'MB/s':>9}{'samples/s':>12}{'seconds':>10}")
    times: dict[str, float] = {}
    for name, fn in methods.items():
        seconds = best_time(fn, path, repeat)  # type: ignore[arg-type]
        times[name] = seconds
        print(f"  {name:<14}{size / seconds / 1e6:>9.0f}{samples / seconds:>12.0f}{seconds:>10.4f}")
    ours = times.get("wdsfs")
    if ours is not None:
        for other in ("tarfile", "webdataset", "raw read", "gzip.read"):
            if other in times:
                print(f"  speed wdsfs / {other}: {times[other] / ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, nargs="+", default=[100.0, 20.0])
    parser.add_argument("--sample-kb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gzip", action="store_true", help="also compare a .tar.gz")
    parser.add_argument("--no-webdataset", action="store_true")
    args = parser.parse_args()
    methods: dict[str, Callable[..., object]] = {
        "raw read": raw_read,
        "tarfile": tarfile_read,
        "webdataset": webdataset_read,
        "wdsfs": wdsfs_read,
        "wdsfs count": wdsfs_count,
    }
    if args.no_webdataset:
        del methods["webdataset"]
    else:
        try:
            import webdataset  # noqa: F401
        except ImportError:
            del methods["webdataset"]
    with tempfile.TemporaryDirectory(prefix="wdsfs-bench-") as tmp:
        for size_mb in args.size_mb:
            path = Path(tmp) / f"shard-{size_mb:g}mb.tar"
            samples = build_shard(path, size_mb, args.sample_kb)
            report(path, samples, args.repeat, methods)
            if args.gzip:
                gz = path.with_suffix(".tar.gz")
                with open(path, "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
                    while chunk := src.read(8 * MiB):
                        dst.write(chunk)
                report(gz, samples, args.repeat, {"gzip.read": gzip_read, "wdsfs": wdsfs_read})
            path.unlink()


if __name__ == "__main__":
    main()
