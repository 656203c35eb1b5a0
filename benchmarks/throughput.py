"""How fast does StreamingWebDataset deliver samples from S3, cold and warm, against the ceiling?

Starts a SeaweedFS S3 server on loopback (``weed mini``, its own process, stopped by PID at the
end) and, for each shard size (``--shard-mb``, default ~20 MB and ~100 MB), uploads ~``--size-gb``
of WebDataset shards of ~100 KB samples (``.jpg`` of random bytes, ``.cls``, ``.json``) and writes
the same shards to a local directory. Then, each measurement in a fresh child process that has
imported torch (so its peak RSS is that of a training process's main process):

- ``raw``: 8 threads of 8 MiB ranged ``fs.cat_file`` GETs over every shard, bytes discarded:
  the ceiling of this server and client on this machine;
- ``raw one shard``: the same for the first shard only, the first such read in a fresh process
  (after one ``fs.info``, as the dataset lists before reading): what time to first sample (TTFS)
  is compared with; the table shows the same read repeated on open connections too;
- ``wdsfs cold`` / ``warm``, ``num_workers`` 0 and 2: ``StreamingDataLoader(
  StreamingWebDataset("s3://..."), batch_size=None)`` and ``batch_size=32`` (``--batch-size``)
  with torch's default collate (a dict of lists), an empty cache directory (cold), then the same
  directory again (warm, every shard from the cache);
- ``wdsfs cold`` / ``warm, direct I/O``: the same with ``direct_io=True`` (downloads written
  and every shard read with ``O_DIRECT``, see docs/concepts/cache.md), in another directory:
  its warm epochs read the disk, not the page cache;
- ``tarfile local``: stdlib ``tarfile`` iterating the local copies (page cache warm),
  ``extractfile(m).read()`` for every member, grouped into sample dicts;
- ``webdataset fsspec``: ``webdataset.WebDataset(urls, shardshuffle=False)`` over ``s3://`` URLs
  through a ``gopen_schemes["s3"]`` handler that opens them with ``fsspec.open`` (s3fs defaults),
  in a torch ``DataLoader`` with the same batch sizes and ``num_workers`` 0 and 2.

Two references, for comparison:

- ``raw ranged + write``: the raw read writing its bytes at their offsets into local files: a
  disk cache built the plain way (each range a new ``bytes`` written with ``pwrite``; this VM
  charges 0.2-5 CPU-s per GB of new page-cache pages, by the hour). Not a ceiling: wdsfs's
  cold epochs, which read into reused buffers, have run faster than it;
- ``DataLoader alone, 2 workers``: a torch ``DataLoader`` with 2 workers whose dataset yields
  sample dicts of the same sizes made in memory (no I/O, no parsing): what torch's worker ->
  main process transport delivers for ``bytes`` samples (wdsfs's workers send theirs through
  shared memory, and unbatched ones in packs of 32: see docs/concepts/workers.md).

Warm epochs and tarfile passes run 3 times in their process and the fastest is kept (a warm epoch
of 0.6 GB lasts ~0.3 s: a single pass is at the mercy of the machine's noise); the TTFS shown for
them is the first pass's.

It prints samples/s, MB/s (shard bytes per second), TTFS, the main process's peak RSS and the
DataLoader workers' peak RSS, and ratios: cold to raw (target >= 0.85), warm to tarfile (target
>= 2), TTFS to the raw one-shard fetch (target <= 1.5), main-process peak RSS (target <= 300 MB).
Figures are the best of ``--repeat`` runs (RSS: the worst); nothing is asserted.

Run from the repository root, after ``pip install -e .[test,torch]``::

    python benchmarks/throughput.py                 # 0.6 GB per shard size, 2 repeats: ~6 min
    python benchmarks/throughput.py --quick         # ~1 minute
    python benchmarks/throughput.py --size-gb 1 --shard-mb 20 100 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    BUCKET,
    MB,
    RAW_THREADS,
    child_main,
    children_peak_rss_mb,
    machine_note,
    make_dataset,
    page_cache_note,
    peak_rss_mb,
    raw_ranged_read,
    run_child,
    s3_filesystem,
    seaweedfs,
    table,
    verdict,
)

SCRIPT = os.path.abspath(__file__)
WARM_PASSES = 3  # warm epochs and tarfile passes per process: the fastest is kept


# ---------------------------------------------------------------------------------------------
# Child processes: one measurement each, torch imported first


def collate_list(samples: list[Any]) -> list[Any]:
    """The trivial collate: a batch is the list of its sample dicts."""
    return samples


def _consume(make_iter: Any, passes: int = 1) -> dict[str, Any]:
    """Iterate ``passes`` times, counting samples and payload bytes.

    Returns the fastest pass's time and counts, and the first pass's time to first sample.
    """
    results = []
    for _ in range(passes):
        samples = payload = 0
        first: float | None = None
        begun = time.perf_counter()
        for item in make_iter():
            if first is None:
                first = time.perf_counter() - begun
            if isinstance(item, dict) and isinstance(item["__key__"], list):  # default_collate
                samples += len(item["__key__"])
                payload += sum(
                    len(v) for values in item.values() for v in values if isinstance(v, bytes)
                )
                continue
            for sample in item if isinstance(item, list) else (item,):
                samples += 1
                payload += sum(len(v) for v in sample.values() if isinstance(v, bytes | bytearray))
        results.append((time.perf_counter() - begun, first, samples, payload))
    seconds, _, samples, payload = min(results)
    return {
        "seconds": seconds,
        "ttfs": results[0][1],
        "samples": samples,
        "payload": payload,
        "main_rss": peak_rss_mb(),
        "workers_rss": children_peak_rss_mb() or None,
    }


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401 - same process shape as the others

    fs = s3_filesystem(spec["storage_options"])
    fs.info(spec["urls"][0].split("://", 1)[1])  # client session set up, as after a listing
    if spec["kind"] == "raw_one":
        # the first fetch in this process (new connections, as for the dataset), then again
        times = []
        for _ in range(4):
            begun = time.perf_counter()
            raw_ranged_read(fs, spec["urls"][:1], spec["sizes"][:1], threads=RAW_THREADS)
            times.append(time.perf_counter() - begun)
        return {"seconds": times[0], "again": statistics.median(times[1:])}
    begun = time.perf_counter()
    if spec["kind"] == "raw_write":
        with tempfile.TemporaryDirectory(dir=spec["workdir"]) as out:
            nbytes = raw_ranged_read(
                fs, spec["urls"], spec["sizes"], threads=RAW_THREADS, write_to=out
            )
            seconds = time.perf_counter() - begun
        return {"seconds": seconds, "bytes": nbytes, "main_rss": peak_rss_mb()}
    nbytes = raw_ranged_read(fs, spec["urls"], spec["sizes"], threads=RAW_THREADS)
    return {"seconds": time.perf_counter() - begun, "bytes": nbytes, "main_rss": peak_rss_mb()}


class _MemorySamples:
    """Sample dicts like the shards' (a ~100 KB ``jpg``, ``cls``, ``json``), made in memory."""

    def __init__(self, samples: int, sample_bytes: int) -> None:
        self.samples = samples
        self.payload = bytes(sample_bytes + 64)

    def __iter__(self) -> Iterable[dict[str, Any]]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, self.samples, workers):
            yield {
                "__key__": f"{index:08d}",
                "jpg": self.payload[index % 64 :],  # a new bytes object for every sample
                "cls": b"1",
                "json": b'{"label": 1}',
            }


def child_loader_alone(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    class Samples(_MemorySamples, torch.utils.data.IterableDataset):  # type: ignore[misc]
        pass

    batch_size = spec.get("batch_size")
    loader = torch.utils.data.DataLoader(
        Samples(spec["samples"], spec["sample_bytes"]),
        batch_size=batch_size,
        num_workers=2,
        collate_fn=collate_list if batch_size else None,
    )
    return _consume(lambda: loader, spec.get("passes", 1))


def child_wdsfs(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401

    from wdsfs import StreamingDataLoader, StreamingWebDataset

    dataset = StreamingWebDataset(
        spec["remote"],
        storage_options=spec["storage_options"],
        cache_dir=spec["cache_dir"],
        cache_limit=spec["cache_limit"],
        direct_io=spec["direct_io"],
    )
    loader = StreamingDataLoader(
        dataset, batch_size=spec.get("batch_size"), num_workers=spec["num_workers"]
    )
    return _consume(lambda: loader, spec.get("passes", 1))


def child_tarfile(spec: dict[str, Any]) -> dict[str, Any]:
    import tarfile

    import torch  # noqa: F401

    def samples() -> Iterable[dict[str, Any]]:
        # grouped by key as webdataset does, so "samples" means the same everywhere
        for path in spec["local"]:
            with tarfile.open(path) as tf:
                current: dict[str, Any] = {}
                for member in tf:
                    if not member.isreg():
                        continue
                    key, _, ext = member.name.partition(".")
                    if current and current["__key__"] != key:
                        yield current
                        current = {}
                    extracted = tf.extractfile(member)
                    assert extracted is not None
                    current.setdefault("__key__", key)
                    current[ext] = extracted.read()
                if current:
                    yield current

    return _consume(samples, spec.get("passes", 1))


def child_webdataset(spec: dict[str, Any]) -> dict[str, Any]:
    import fsspec
    import torch
    import webdataset as wds

    options = spec["storage_options"]

    def fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode, **options).open()

    wds.gopen_schemes["s3"] = fsspec_gopen  # inherited by forked DataLoader workers
    dataset = wds.WebDataset(spec["urls"], shardshuffle=False, empty_check=False)
    batch_size = spec.get("batch_size")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=spec["num_workers"],
        collate_fn=collate_list if batch_size else None,
    )
    return _consume(lambda: loader)


HANDLERS = {
    "raw": child_raw,
    "raw_one": child_raw,
    "raw_write": child_raw,
    "loader_alone": child_loader_alone,
    "wdsfs": child_wdsfs,
    "tarfile": child_tarfile,
    "webdataset": child_webdataset,
}


# ---------------------------------------------------------------------------------------------
# The parent


def _batch(batch_size: int | None) -> str:
    return f", batch {batch_size}" if batch_size else ""


def measure_case(
    server: Any,
    fs: Any,
    workdir: Path,
    size_gb: float,
    shard_mb: float,
    repeat: int,
    batch_sizes: list[int | None],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    prefix = f"{BUCKET}/tp-{int(shard_mb)}mb"
    begun = time.perf_counter()
    local_dir = workdir / f"local-{int(shard_mb)}mb"
    data = make_dataset(
        fs, prefix, local_dir, total_bytes=size_gb * 1e9, shard_bytes_target=shard_mb * MB
    )
    case = f"{len(data.urls)} x {data.total_bytes / len(data.urls) / MB:.0f} MB"
    print(
        f"\n## {case}: {data.total_bytes / MB:.0f} MB, {data.samples} samples of "
        f"~{data.sample_bytes / 1000:.0f} KB (generated and uploaded in "
        f"{time.perf_counter() - begun:.1f} s)",
        flush=True,
    )
    common = {
        "storage_options": server.storage_options,
        "urls": data.urls,
        "sizes": data.sizes,
        "local": [str(p) for p in data.local],
        "remote": f"s3://{prefix}",
        "cache_limit": int(data.total_bytes * 3 + 1e9),
    }
    run_child(SCRIPT, {**common, "kind": "raw"})  # warm-up (server page cache), not counted
    runs: dict[str, list[dict[str, Any]]] = {}

    def add(label: str, spec: dict[str, Any]) -> dict[str, Any]:
        result = run_child(SCRIPT, {**common, **spec})
        runs.setdefault(label, []).append(result)
        return result

    for rep in range(repeat):
        add("raw", {"kind": "raw"})
        add("raw one shard", {"kind": "raw_one"})
        add("raw ranged + write", {"kind": "raw_write", "workdir": str(workdir)})
        for batch in batch_sizes:
            add(
                f"DataLoader alone, 2 workers{_batch(batch)}",
                {
                    "kind": "loader_alone",
                    "samples": data.samples,
                    "sample_bytes": data.sample_bytes,
                    "batch_size": batch,
                    "passes": WARM_PASSES,
                },
            )
        for batch, workers, mode in (
            (b, w, m) for b in batch_sizes for w in (0, 2) for m in ("", "direct I/O, ")
        ):
            with tempfile.TemporaryDirectory(prefix="wdsfs-cache-", dir=workdir) as cache:
                spec = {
                    "kind": "wdsfs",
                    "cache_dir": cache,
                    "num_workers": workers,
                    "batch_size": batch,
                    "direct_io": bool(mode),
                }
                add(f"wdsfs cold, {mode}{workers} workers{_batch(batch)}", spec)
                warm = {**spec, "passes": WARM_PASSES}
                add(f"wdsfs warm, {mode}{workers} workers{_batch(batch)}", warm)
        add("tarfile local, 0 workers", {"kind": "tarfile", "passes": WARM_PASSES})
        for batch in batch_sizes:
            for workers in (0, 2):
                add(
                    f"webdataset fsspec, {workers} workers{_batch(batch)}",
                    {"kind": "webdataset", "num_workers": workers, "batch_size": batch},
                )
        print(f"  repeat {rep + 1}/{repeat} done", flush=True)
    fs.rm(prefix, recursive=True)
    for path in data.local:
        path.unlink()

    raw_rate = max(r["bytes"] / r["seconds"] for r in runs["raw"])
    one_shard = min(r["seconds"] for r in runs["raw one shard"])
    tar_rate = max(r["samples"] / r["seconds"] for r in runs["tarfile local, 0 workers"])
    rows = [
        {
            "case": case,
            "what": "raw (8 x 8 MiB ranged GETs)",
            "samples/s": data.samples * raw_rate / data.total_bytes,
            "MB/s": raw_rate / MB,
            "x raw": 1.0,
            "TTFS s": None,
            "TTFS / raw 1 shard": None,
            "main peak RSS MB": max(r["main_rss"] for r in runs["raw"]),
            "worker peak RSS MB": None,
        },
        {
            "case": case,
            "what": "raw one shard (first read in a process)",
            "samples/s": None,
            "MB/s": data.sizes[0] / one_shard / MB,
            "x raw": None,
            "TTFS s": one_shard,
            "TTFS / raw 1 shard": 1.0,
            "main peak RSS MB": None,
            "worker peak RSS MB": None,
        },
        {
            "case": case,
            "what": "raw one shard (open connections)",
            "samples/s": None,
            "MB/s": data.sizes[0] / min(r["again"] for r in runs["raw one shard"]) / MB,
            "x raw": None,
            "TTFS s": min(r["again"] for r in runs["raw one shard"]),
            "TTFS / raw 1 shard": min(r["again"] for r in runs["raw one shard"]) / one_shard,
            "main peak RSS MB": None,
            "worker peak RSS MB": None,
        },
    ]
    write_rate = max(r["bytes"] / r["seconds"] for r in runs["raw ranged + write"])
    rows.append(
        {
            "case": case,
            "what": "raw ranged + write (a plain disk cache)",
            "samples/s": data.samples * write_rate / data.total_bytes,
            "MB/s": write_rate / MB,
            "x raw": write_rate / raw_rate,
            "TTFS s": None,
            "TTFS / raw 1 shard": None,
            "main peak RSS MB": max(r["main_rss"] for r in runs["raw ranged + write"]),
            "worker peak RSS MB": None,
        }
    )
    for label, results in runs.items():
        if label.startswith("raw"):
            continue
        for r in results:
            if r["samples"] != data.samples:
                raise RuntimeError(f"{label}: {r['samples']} samples, expected {data.samples}")
        best = min(results, key=lambda r: r["seconds"])
        rate = data.total_bytes / best["seconds"]
        ttfs = min(r["ttfs"] for r in results)
        workers_rss = [r["workers_rss"] for r in results if r["workers_rss"]]
        rows.append(
            {
                "case": case,
                "what": label,
                "samples/s": best["samples"] / best["seconds"],
                "MB/s": rate / MB,
                "x raw": rate / raw_rate,
                "TTFS s": ttfs,
                "TTFS / raw 1 shard": ttfs / one_shard,
                "main peak RSS MB": max(r["main_rss"] for r in results),
                "worker peak RSS MB": max(workers_rss) if workers_rss else None,
            }
        )
    return rows, {"raw": raw_rate, "one_shard": one_shard, "tarfile": tar_rate}


def targets(
    rows: list[dict[str, Any]], refs: dict[str, float], batch_sizes: list[int | None]
) -> list[str]:
    by_what = {row["what"]: row for row in rows}
    tar = by_what["tarfile local, 0 workers"]["samples/s"]
    write = by_what["raw ranged + write (a plain disk cache)"]["x raw"]
    lines = [f"- {rows[0]['case']}: for reference, raw ranged + write reaches {write:.2f}x raw"]
    for batch in batch_sizes:
        alone = by_what[f"DataLoader alone, 2 workers{_batch(batch)}"]["samples/s"]
        lines.append(
            f"- {rows[0]['case']}{_batch(batch)}: for reference, a DataLoader with 2 workers and "
            f"no I/O delivers {alone:.0f} samples/s = {alone / tar:.2f}x tarfile"
        )
    for batch, workers in ((b, w) for b in batch_sizes for w in (0, 2)):
        case = f"{rows[0]['case']}{_batch(batch)}"
        cold = by_what[f"wdsfs cold, {workers} workers{_batch(batch)}"]
        direct = by_what[f"wdsfs cold, direct I/O, {workers} workers{_batch(batch)}"]
        warm = by_what[f"wdsfs warm, {workers} workers{_batch(batch)}"]
        ratio = warm["samples/s"] / tar
        lines += [
            f"- {case}, {workers} workers: cold {cold['x raw']:.2f}x raw (target >= 0.85): "
            f"{verdict(cold['x raw'] >= 0.85)}",
            f"- {case}, {workers} workers: cold with direct_io=True {direct['x raw']:.2f}x raw "
            f"(target >= 0.85): {verdict(direct['x raw'] >= 0.85)}",
            f"- {case}, {workers} workers: warm {ratio:.2f}x tarfile (target >= 2): "
            f"{verdict(ratio >= 2)}",
            f"- {case}, {workers} workers: cold TTFS {cold['TTFS s']:.2f} s = "
            f"{cold['TTFS / raw 1 shard']:.2f}x raw one-shard fetch {refs['one_shard']:.2f} s "
            f"(target <= 1.5): {verdict(cold['TTFS / raw 1 shard'] <= 1.5)}",
            f"- {case}, {workers} workers: main peak RSS cold {cold['main peak RSS MB']:.0f} MB, "
            f"warm {warm['main peak RSS MB']:.0f} MB (target <= 300): "
            f"{verdict(max(cold['main peak RSS MB'], warm['main peak RSS MB']) <= 300)}",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=0.6, help="dataset size per shard size")
    parser.add_argument(
        "--shard-mb", type=float, nargs="+", default=[20, 100], help="shard sizes (one case each)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="repeats (best is shown)")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[0, 32],
        help="loader batch sizes, 0 for batch_size=None (batches are lists: trivial collate)",
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute: 0.2 GB per case, once")
    args = parser.parse_args()
    if args.quick:
        args.size_gb, args.repeat = 0.2, 1
    batch_sizes: list[int | None] = [b or None for b in args.batch_size]
    print(machine_note())
    print(
        "each figure from a fresh process with torch imported; best of "
        f"{args.repeat}; MB = 10^6 bytes of shard data; batch sizes "
        f"{', '.join(str(b) for b in batch_sizes)} (wdsfs batches: torch's default collate; "
        "the others': lists of sample dicts)"
    )
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wdsfs-bench-") as tmp, seaweedfs() as server:
        print(page_cache_note(tmp))
        fs = s3_filesystem(server.storage_options)
        for shard_mb in args.shard_mb:
            case_rows, refs = measure_case(
                server, fs, Path(tmp), args.size_gb, shard_mb, args.repeat, batch_sizes
            )
            rows += case_rows
            lines += targets(case_rows, refs, batch_sizes)
    headers = list(rows[0])
    print()
    print(table(headers, [[row[h] for h in headers] for row in rows]))
    print("\nTargets (ratios from this run):")
    print("\n".join(lines))


if __name__ == "__main__":
    if not child_main(HANDLERS):
        main()
