"""The ``wdsfs`` command: its subcommands and progress bars over the library.

Subcommands: ``ls`` (the shards of a dataset), ``index`` (write ``index.wds``), ``prefetch``
(fill the shared shard cache), ``cache info`` / ``cache clear``, and ``bench`` (read speed).
Every dataset command takes ``--storage-option KEY=VALUE`` (repeatable), ``--endpoint-url``
and ``--profile``. Errors print one line, ``wdsfs: error: <message>``, and exit 1 (usage
errors exit 2, Ctrl-C exits 130); ``-v`` adds tracebacks and the library's INFO logs, ``-vv``
DEBUG. Run ``wdsfs COMMAND --help`` for examples.

The parser and help texts are in :mod:`wdsfs._cli_args`, the timing behind ``bench`` in
:mod:`wdsfs._bench`; this module runs the commands and is the only one that prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fsspec.callbacks import Callback

from wdsfs._bench import BenchConfig, EpochStats, bench_epochs
from wdsfs._cli_args import parse_args
from wdsfs._fs import is_local
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.errors import WdsfsError
from wdsfs.index import INDEX_NAME
from wdsfs.indexer import (
    build_index,
    check_writable,
    index_location,
    render_index,
    write_index,
)
from wdsfs.shard import Shard
from wdsfs.source import Source

__all__ = ["main"]

logger = logging.getLogger(__name__)

_EXIT_ERROR = 1
_EXIT_INTERRUPTED = 130
_PREFETCH_WINDOW = 2
_ERRORS = (WdsfsError, OSError, ValueError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``wdsfs`` command.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0, 1 for an error, 130 when interrupted. Usage errors exit with 2
        (argparse raises ``SystemExit``).
    """
    args = parse_args(argv)
    verbose: int = args.verbose
    with _logging(verbose):
        try:
            status = _HANDLERS[args.handler](args)
            sys.stdout.flush()  # a closed pipe (`wdsfs ls ... | head`) shows here, not at exit
            return status
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
            return _EXIT_ERROR
        except KeyboardInterrupt:
            print("wdsfs: interrupted", file=sys.stderr)
            return _EXIT_INTERRUPTED
        except _ERRORS as exc:
            if verbose:
                traceback.print_exc()
            print(f"wdsfs: error: {_one_line(exc, getattr(args, 'url', None))}", file=sys.stderr)
            return _EXIT_ERROR


# ------------------------------------------------------------------------- ls


def _cmd_ls(args: argparse.Namespace) -> int:
    source = Source(args.url, split=args.split, storage_options=args.options)
    shards = source.shards()
    base = source.url.rstrip("/")
    rows = [
        {
            "path": s.url[len(base) + 1 :] if s.url.startswith(base + "/") else s.url,
            "url": s.url,
            "size": s.size,
            "num_samples": s.num_samples,
        }
        for s in shards
    ]
    totals = _totals(shards)
    if args.json:
        print(json.dumps({"url": source.url, "shards": rows, "total": totals}, indent=2))
        return 0
    with_samples = totals["num_samples"] is not None
    print(f"{'size':>12}  {'samples':>8}  path" if with_samples else f"{'size':>12}  path")
    for row in rows:
        size = "?" if row["size"] is None else str(row["size"])
        samples = f"{row['num_samples']:>8}  " if with_samples else ""
        print(f"{size:>12}  {samples}{row['path']}")
    print(_summary(totals))
    return 0


def _totals(shards: Sequence[Shard]) -> dict[str, Any]:
    sizes = [s.size for s in shards]
    counts = [s.num_samples for s in shards]
    return {
        "shards": len(shards),
        "num_samples": None if None in counts else sum(c or 0 for c in counts),
        "bytes": None if None in sizes else sum(s or 0 for s in sizes),
    }


def _summary(totals: dict[str, Any]) -> str:
    parts = [f"{totals['shards']} shards"]
    if totals["num_samples"] is not None:
        parts.append(f"{totals['num_samples']} samples")
    size = totals["bytes"]
    parts.append("size unknown" if size is None else f"{_human(size)} ({size} bytes)")
    return ", ".join(parts)


# ------------------------------------------------------------------------- index


def _cmd_index(args: argparse.Namespace) -> int:
    if not args.dry_run and args.output is None:
        check_writable(args.url, split=args.split)  # fail before reading every shard
    with _ByteBar("indexing") as bar:
        entries = build_index(
            args.url,
            split=args.split,
            storage_options=args.options,
            max_workers=args.workers,
            progress=bar,
        )
    samples = sum(e.num_samples for e in entries)
    size = sum(e.size for e in entries)
    where = index_location(args.url, split=args.split)
    print(f"{where}: {len(entries)} shards, {samples} samples, {_human(size)} ({size} bytes)")
    if args.dry_run:
        print(f"dry run: {INDEX_NAME} not written")
    elif args.output is not None:
        Path(args.output).write_bytes(render_index(entries))
        print(f"wrote {args.output} (put it at {where}/{INDEX_NAME})")
    else:
        url = write_index(args.url, entries, split=args.split, storage_options=args.options)
        print(f"wrote {url}")
    return 0


# ------------------------------------------------------------------------- prefetch


def _cmd_prefetch(args: argparse.Namespace) -> int:
    source = Source(args.url, split=args.split, storage_options=args.options)
    shards = source.shards()
    if is_local(source.fs):
        print(f"{source.url}: local shards are read in place; nothing to prefetch")
        return 0
    total = sum(s.size or 0 for s in shards)
    stop = threading.Event()
    hits = downloads = 0
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(ShardCache(args.cache_dir, cache_limit=args.cache_limit))
        if total > cache.cache_limit:
            logger.warning(
                "%s: %s of shards exceed the cache limit %s: the first ones will be evicted",
                source.url,
                _human(total),
                _human(cache.cache_limit),
            )
        bar = stack.enter_context(_ByteBar("prefetch", total=total))
        fetcher = stack.enter_context(
            Fetcher(
                cache,
                storage_options=args.options,
                max_workers=args.workers,
                stop_event=stop,
                progress=bar,
                direct_io=True,  # filled for later: not through the page cache
            )
        )
        # a generator: closing it cancels the transfers in flight
        ahead = fetcher.fetch_ahead(shards, window=_PREFETCH_WINDOW)
        stack.enter_context(contextlib.closing(ahead))
        stack.callback(stop.set)  # on the way out (Ctrl-C too), first cancel every transfer
        for fetched in ahead:
            with fetched:
                if fetched.from_cache:
                    hits += 1
                    bar.relative_update(fetched.shard.size or 0)
                else:
                    downloads += 1
    elapsed = time.monotonic() - started
    downloaded = int(fetcher.metrics.snapshot()["bytes_downloaded"] or 0)
    print(
        f"{len(shards)} shards in {cache.directory}: {hits} already cached, {downloads} "
        f"downloaded ({_human(downloaded)} in {elapsed:.1f} s, "
        f"{_human(downloaded / elapsed if elapsed else 0)}/s)"
    )
    return 0


# ------------------------------------------------------------------------- cache


def _cmd_cache_info(args: argparse.Namespace) -> int:
    cache = ShardCache(args.cache_dir, cache_limit=args.cache_limit)
    entries = used = 0
    if cache.exists():  # do not create a cache just to describe it
        with cache:
            entries, used = len(cache), cache.volume()
    info = {
        "directory": cache.directory,
        "limit": cache.cache_limit,
        "entries": entries,
        "bytes_used": used,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"directory:  {cache.directory}")
    print(f"limit:      {_human(cache.cache_limit)} ({cache.cache_limit} bytes)")
    print(f"entries:    {entries}")
    print(f"bytes used: {_human(used)} ({used} bytes)")
    return 0


def _cmd_cache_clear(args: argparse.Namespace) -> int:
    cache = ShardCache(args.cache_dir)
    if not cache.exists():
        print(f"{cache.directory}: no cache here; nothing to clear")
        return 0
    with cache:
        entries, used = len(cache), cache.volume()
        if not args.yes and not _confirm(
            f"remove {entries} cached shards ({_human(used)}) from {cache.directory}?"
        ):
            print("nothing removed")
            return _EXIT_ERROR
        removed = cache.clear()
    print(f"{cache.directory}: removed {removed} shards ({_human(used)})")
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ValueError(f"{question} Pass --yes to confirm when not at a terminal")
    return input(f"{question} [y/N] ").strip().lower() in {"y", "yes"}


# ------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="wdsfs-bench-")
        )
        print(f"{args.url}: cache {cache_dir}" + ("" if args.cache_dir else " (fresh, removed)"))
        config = BenchConfig(
            remote=args.url,
            split=args.split,
            storage_options=args.options,
            cache_dir=cache_dir,
            cache_limit=args.cache_limit,
            max_workers=args.workers,
            num_workers=args.num_workers,
            epochs=args.epochs,
            max_samples=args.max_samples,
            decode=dict(args.decode or []),
            direct_io=args.direct_io,
        )
        for number, epoch in enumerate(bench_epochs(config), start=1):
            print(_epoch_line(number, epoch))
    return 0


def _epoch_line(number: int, epoch: EpochStats) -> str:
    rate = epoch.samples / epoch.seconds if epoch.seconds else 0.0
    speed = epoch.nbytes / epoch.seconds if epoch.seconds else 0.0
    first = "n/a" if epoch.first_sample is None else f"{epoch.first_sample:.3f} s"
    line = (
        f"epoch {number}: {epoch.samples} samples, {_human(epoch.nbytes)} in "
        f"{epoch.seconds:.3f} s: {rate:.1f} samples/s, {speed / 1e6:.2f} MB/s, "
        f"first sample after {first}"
    )
    if epoch.downloads or epoch.hits:
        kind = "cold" if epoch.downloads else "warm"
        line += f" ({kind}: {epoch.downloads} shards downloaded, {epoch.hits} from cache)"
    elif epoch.downloads is not None:
        line += " (local shards, read in place)"
    return line


# ------------------------------------------------------------------------- shared pieces


class _ByteBar(Callback):  # type: ignore[misc]
    """fsspec Callback drawing a tqdm bar of bytes; safe to update from many threads.

    The bar draws only on a terminal (tqdm's ``disable=None``).
    """

    def __init__(self, desc: str, *, total: int | None = None) -> None:
        from tqdm import tqdm

        super().__init__(size=total)
        self._lock = threading.Lock()
        self._bar = tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, disable=None, leave=False
        )

    def set_size(self, size: int) -> None:
        with self._lock:
            self.size = size
            self._bar.total = size
            self._bar.refresh()

    def relative_update(self, inc: int = 1) -> None:
        with self._lock:
            self.value += inc
            self._bar.update(inc)

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def _logging(verbosity: int) -> Iterator[None]:
    """Show the library's logs on stderr (WARNING; -v INFO; -vv DEBUG) while the command runs."""
    root = logging.getLogger("wdsfs")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("wdsfs: %(levelname)s: %(name)s: %(message)s"))
    level = (logging.WARNING, logging.INFO)[verbosity] if verbosity < 2 else logging.DEBUG
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _one_line(exc: BaseException, url: str | None) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in str(exc):
        # a DataLoader worker's error, re-raised with its traceback: keep the original message
        last = lines[-1]
        lines = [last.split(": ", 1)[1] if ": " in last else last]
    text = " ".join(lines)
    text = text or type(exc).__name__
    if url and url.rstrip("/") not in text:
        text = f"{url}: {text}"
    return text


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ls": _cmd_ls,
    "index": _cmd_index,
    "prefetch": _cmd_prefetch,
    "cache-info": _cmd_cache_info,
    "cache-clear": _cmd_cache_clear,
    "bench": _cmd_bench,
}

if __name__ == "__main__":
    sys.exit(main())
