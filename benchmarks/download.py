"""How fast, and in how much memory, does wdsfs download a dataset, against raw s3fs reads?

Starts a SeaweedFS S3 server on loopback (``weed mini``, its own process, stopped by PID at the
end), uploads ~``--size-gb`` of WebDataset shards of ``--shard-mb`` MB (~100 KB samples), then,
each measurement in a fresh child process (so its peak RSS is its own):

- ``raw ranged``: 8 threads of 8 MiB ranged ``fs.cat_file`` GETs over every object, bytes
  discarded: the ceiling the server and client allow on this machine;
- ``raw whole``: 8 threads, one whole-object ``fs.cat_file`` each (for reference);
- ``raw ranged + write``: the ranged reads written at their offsets into local files: a disk
  cache built the plain way (each range a new ``bytes`` written with ``pwrite``), for
  comparison (not a target, and not a ceiling: wdsfs's downloads have run faster);
- ``prefetch_shards cold``: ``ShardDownloader(max_pool_connections=8).prefetch_shards(keys)``
  (the streaming-wds API) into an empty cache directory;
- ``prefetch_shards warm``: the same again, every shard already in the cache;
- ``fetch_ahead cold`` / ``warm``: ``Fetcher(max_workers=8).fetch_ahead(shards, window=2)``,
  the read-ahead the dataset uses, each yielded shard closed at once.

For each it prints MB/s (best of ``--repeat``), the ratio to the best raw read, and the growth of
peak RSS during the measured call (``VmHWM`` after minus RSS before, peak reset through
``/proc/self/clear_refs`` just before; worst of the repeats). Targets: cold download >= 0.9x
raw; peak RSS growth < 100 MB while downloading ~1 GB. Nothing is asserted: figures and ratios
come from one run on a shared machine.

Run from the repository root, after ``pip install -e .[test,torch]``::

    python benchmarks/download.py                 # ~1 GB, 100 MB and 20 MB shards, 2 repeats
    python benchmarks/download.py --quick         # ~1 minute
    python benchmarks/download.py --size-gb 2 --shard-mb 50 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    BUCKET,
    MB,
    PeakGrowth,
    child_main,
    machine_note,
    make_dataset,
    page_cache_note,
    raw_ranged_read,
    raw_whole_read,
    run_child,
    s3_filesystem,
    seaweedfs,
    table,
    verdict,
)

SCRIPT = os.path.abspath(__file__)
WORKERS = 8


# ---------------------------------------------------------------------------------------------
# Child processes: one measurement each


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    fs = s3_filesystem(spec["storage_options"])
    fs.info(spec["urls"][0].split("://", 1)[1])  # session and connection set up before timing
    with PeakGrowth() as mem:
        begun = time.perf_counter()
        if spec["kind"] == "raw_whole":
            nbytes = raw_whole_read(fs, spec["urls"], threads=WORKERS)
        else:
            write_to = spec["cache_dir"] if spec["kind"] == "raw_write" else None
            nbytes = raw_ranged_read(
                fs, spec["urls"], spec["sizes"], threads=WORKERS, write_to=write_to
            )
        seconds = time.perf_counter() - begun
    return {
        "seconds": seconds,
        "bytes": nbytes,
        "rss_growth": mem.growth,
        "exact": mem.exact,
        "cpu": mem.cpu,
    }


def child_prefetch(spec: dict[str, Any]) -> dict[str, Any]:
    from wdsfs import ShardDownloader

    downloader = ShardDownloader(
        spec["remote"],
        storage_options=spec["storage_options"],
        max_pool_connections=WORKERS,
        cache_dir=spec["cache_dir"],
        cache_limit=spec["cache_limit"],
    )
    keys = downloader.find_shards()  # the listing is not part of the transfer
    with downloader, PeakGrowth() as mem:
        begun = time.perf_counter()
        paths = downloader.prefetch_shards(keys)
        seconds = time.perf_counter() - begun
    nbytes = sum(os.path.getsize(p) for p in paths)
    metrics = downloader.fetcher.metrics.snapshot()
    return {
        "seconds": seconds,
        "bytes": nbytes,
        "rss_growth": mem.growth,
        "exact": mem.exact,
        "cpu": mem.cpu,
        "downloaded": metrics["bytes_downloaded"],
        "hits": metrics["hits"],
    }


def child_fetch_ahead(spec: dict[str, Any]) -> dict[str, Any]:
    from wdsfs import Fetcher, ShardCache, list_shards

    shards = list_shards(spec["remote"], storage_options=spec["storage_options"])
    cache = ShardCache(spec["cache_dir"], cache_limit=spec["cache_limit"])
    nbytes = 0
    with Fetcher(cache, storage_options=spec["storage_options"], max_workers=WORKERS) as fetcher:
        with PeakGrowth() as mem:
            begun = time.perf_counter()
            for fetched in fetcher.fetch_ahead(shards, window=spec["window"]):
                with fetched:
                    nbytes += os.fstat(fetched.file.fileno()).st_size
            seconds = time.perf_counter() - begun
        metrics = fetcher.metrics.snapshot()
    return {
        "seconds": seconds,
        "bytes": nbytes,
        "rss_growth": mem.growth,
        "exact": mem.exact,
        "cpu": mem.cpu,
        "downloaded": metrics["bytes_downloaded"],
        "hits": metrics["hits"],
    }


HANDLERS = {
    "raw_ranged": child_raw,
    "raw_whole": child_raw,
    "raw_write": child_raw,
    "prefetch": child_prefetch,
    "fetch_ahead": child_fetch_ahead,
}


# ---------------------------------------------------------------------------------------------
# The parent: server, data, measurements, table


def measure_case(
    server: Any, fs: Any, workdir: Path, size_gb: float, shard_mb: float, repeat: int, window: int
) -> list[dict[str, Any]]:
    prefix = f"{BUCKET}/dl-{int(shard_mb)}mb"
    begun = time.perf_counter()
    data = make_dataset(
        fs, prefix, workdir / "local", total_bytes=size_gb * 1e9, shard_bytes_target=shard_mb * MB
    )
    print(
        f"\n## {len(data.urls)} shards of ~{shard_mb:g} MB, {data.total_bytes / MB:.0f} MB total "
        f"({data.samples} samples; generated and uploaded in {time.perf_counter() - begun:.1f} s)",
        flush=True,
    )
    common = {
        "storage_options": server.storage_options,
        "urls": data.urls,
        "sizes": data.sizes,
        "remote": f"s3://{prefix}",
        "cache_limit": int(data.total_bytes * 2 + 1e9),
        "window": window,
    }
    run_child(SCRIPT, {**common, "kind": "raw_ranged"})  # warm-up: server page cache, not counted
    results: dict[str, list[dict[str, Any]]] = {}
    for rep in range(repeat):
        for kind, label in (("prefetch", "prefetch_shards"), ("fetch_ahead", "fetch_ahead")):
            with tempfile.TemporaryDirectory(prefix="wdsfs-bench-cache-", dir=workdir) as cache:
                spec = {**common, "kind": kind, "cache_dir": cache}
                results.setdefault("raw ranged", []).append(
                    run_child(SCRIPT, {**common, "kind": "raw_ranged"})
                )
                results.setdefault(f"{label} cold", []).append(run_child(SCRIPT, spec))
                results.setdefault(f"{label} warm", []).append(run_child(SCRIPT, spec))
        results.setdefault("raw whole", []).append(
            run_child(SCRIPT, {**common, "kind": "raw_whole"})
        )
        with tempfile.TemporaryDirectory(prefix="wdsfs-bench-raw-", dir=workdir) as out:
            spec = {**common, "kind": "raw_write", "cache_dir": out}
            results.setdefault("raw ranged + write", []).append(run_child(SCRIPT, spec))
        print(f"  repeat {rep + 1}/{repeat} done", flush=True)
    fs.rm(prefix, recursive=True)
    for path in data.local:
        path.unlink()

    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return min(rows, key=lambda r: r["seconds"])

    raw = max(r["bytes"] / r["seconds"] for r in results["raw ranged"] + results["raw whole"])
    rows = []
    for label, runs in results.items():
        top = best(runs)
        rate = top["bytes"] / top["seconds"]
        rows.append(
            {
                "shards": f"{len(data.urls)} x {shard_mb:g} MB",
                "what": label,
                "MB/s": rate / MB,
                "all MB/s": " ".join(f"{r['bytes'] / r['seconds'] / MB:.0f}" for r in runs),
                "x raw": rate / raw,
                "seconds": top["seconds"],
                "client CPU s/GB": min(r["cpu"] / r["bytes"] * 1e9 for r in runs),
                "peak RSS growth MB": max(r["rss_growth"] for r in runs),
                "downloaded MB": (
                    top["downloaded"] / MB if "downloaded" in top else top["bytes"] / MB
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="dataset size per case")
    parser.add_argument(
        "--shard-mb", type=float, nargs="+", default=[100, 20], help="shard sizes (one case each)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="repeats (best MB/s is shown)")
    parser.add_argument("--window", type=int, default=2, help="fetch_ahead window")
    parser.add_argument("--quick", action="store_true", help="~1 minute: 0.5 GB, 100 MB shards")
    args = parser.parse_args()
    if args.quick:
        args.size_gb, args.shard_mb, args.repeat = 0.5, [100], 1
    print(machine_note())
    print(
        f"{WORKERS} connections everywhere; ranged reads of 8 MiB; each figure from a fresh "
        "process; MB = 10^6 bytes"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wdsfs-bench-") as tmp, seaweedfs() as server:
        print(page_cache_note(tmp))
        fs = s3_filesystem(server.storage_options)
        for shard_mb in args.shard_mb:
            rows += measure_case(
                server, fs, Path(tmp), args.size_gb, shard_mb, args.repeat, args.window
            )
    headers = list(rows[0])
    print()
    print(table(headers, [[row[h] for h in headers] for row in rows]))
    print("\nTargets (ratios and sizes from this run):")
    for row in rows:
        if row["what"].endswith("cold"):
            print(
                f"- {row['shards']}, {row['what']}: {row['x raw']:.2f}x raw (target >= 0.90): "
                f"{verdict(row['x raw'] >= 0.9)}; "
                f"peak RSS growth {row['peak RSS growth MB']:.0f} MB "
                f"(target < 100): {verdict(row['peak RSS growth MB'] < 100)}"
            )
        elif row["what"].endswith("warm"):
            print(
                f"- {row['shards']}, {row['what']}: peak RSS growth "
                f"{row['peak RSS growth MB']:.0f} MB (target < 100): "
                f"{verdict(row['peak RSS growth MB'] < 100)}"
            )


if __name__ == "__main__":
    if not child_main(HANDLERS):
        main()
