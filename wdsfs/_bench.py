"""Read-speed measurement behind ``wdsfs bench``: timed passes over a dataset's samples.

Two paths over the same stages. The core path reads in the calling process
(``Fetcher.fetch_ahead`` -> ``read_samples`` -> ``Decoder``) and needs no torch; the torch path
reads through :class:`~wdsfs.dataset.StreamingWebDataset` and a ``DataLoader`` with worker
processes. Each pass reports samples, the bytes of their fields before decoding, seconds, the
time to the first sample and, on the core path, how many shards were downloaded or came from
the cache. Printing is the CLI's job; this module only measures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from wdsfs.cache import ShardCache
from wdsfs.decode import Decoder
from wdsfs.download import Fetcher
from wdsfs.shard import Shard
from wdsfs.source import Source
from wdsfs.tar import read_samples

__all__ = ["BenchConfig", "EpochStats", "bench_epochs"]

_WINDOW = 2
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class EpochStats:
    """What one pass over the dataset measured.

    Attributes:
        samples: Samples read.
        nbytes: Bytes of their fields before decoding (``__key__`` and the like excluded).
        seconds: Wall time of the pass.
        first_sample: Seconds to the first sample, None if there was none.
        downloads: Shards downloaded during the pass (core path only).
        hits: Shards served from the cache (core path only; local shards count in neither).
    """

    samples: int
    nbytes: int
    seconds: float
    first_sample: float | None
    downloads: int | None = None
    hits: int | None = None


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """How to read the dataset: the ``wdsfs bench`` options."""

    remote: str
    split: str | None
    storage_options: Mapping[str, Any]
    cache_dir: str
    cache_limit: int
    max_workers: int
    num_workers: int
    epochs: int
    max_samples: int | None
    decode: Mapping[str, str]
    direct_io: bool = False


class _Measured:
    """Decode a sample; return ``(bytes of its fields before decoding, decoded sample)``.

    A top-level class so it pickles to DataLoader workers as the dataset's transform.
    """

    def __init__(self, spec: Mapping[str, str]) -> None:
        self.decoder = Decoder(dict(spec))

    def __call__(self, sample: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        size = sum(len(v) for k, v in sample.items() if isinstance(v, bytes) and k[:2] != "__")
        return size, self.decoder(sample)


def bench_epochs(config: BenchConfig) -> Iterator[EpochStats]:
    """Read the dataset ``config.epochs`` times, yielding each pass's figures as it ends.

    Uses the core path when ``config.num_workers`` is 0, else a torch DataLoader.

    Raises:
        ImportError: ``num_workers`` > 0 and torch is not installed.
        WdsfsError: As the stages raise them (missing shards, corrupt tars...).
    """
    if config.num_workers > 0:
        return _torch_epochs(config)
    return _core_epochs(config)


def _core_epochs(config: BenchConfig) -> Iterator[EpochStats]:
    measured = _Measured(config.decode)
    source = Source(config.remote, split=config.split, storage_options=config.storage_options)
    shards = source.shards()
    cache = ShardCache(config.cache_dir, cache_limit=config.cache_limit)
    options = config.storage_options
    with (
        cache,
        Fetcher(
            cache,
            storage_options=options,
            max_workers=config.max_workers,
            direct_io=config.direct_io,
        ) as fetcher,
    ):
        for _ in range(config.epochs):
            before = fetcher.metrics.snapshot()
            epoch = _timed(_core_samples(fetcher, shards), measured, config.max_samples)
            after = fetcher.metrics.snapshot()
            yield EpochStats(
                epoch.samples,
                epoch.nbytes,
                epoch.seconds,
                epoch.first_sample,
                downloads=int(after["misses"] or 0) - int(before["misses"] or 0),
                hits=int(after["hits"] or 0) - int(before["hits"] or 0),
            )


def _core_samples(fetcher: Fetcher, shards: Sequence[Shard]) -> Iterator[dict[str, Any]]:
    with _closing(fetcher.fetch_ahead(shards, window=_WINDOW)) as ahead:
        for fetched in ahead:
            with fetched:
                for _, sample in read_samples(fetched.file, url=fetched.shard.url):
                    yield sample


def _torch_epochs(config: BenchConfig) -> Iterator[EpochStats]:
    try:
        from torch.utils.data import DataLoader

        from wdsfs.dataset import StreamingWebDataset
    except ImportError as exc:
        raise ImportError("bench --num-workers needs torch: pip install wdsfs[torch]") from exc
    dataset = StreamingWebDataset(
        config.remote,
        config.split,
        storage_options=config.storage_options,
        transform=_Measured(config.decode),  # samples arrive as (bytes, decoded sample)
        cache_dir=config.cache_dir,
        cache_limit=config.cache_limit,
        max_workers=config.max_workers,
        direct_io=config.direct_io,
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=config.num_workers)
    for epoch in range(config.epochs):
        dataset.set_epoch(epoch)
        yield _timed(iter(loader), None, config.max_samples)


def _timed(
    samples: Iterator[Any], measured: Callable[[Any], tuple[int, Any]] | None, limit: int | None
) -> EpochStats:
    """Consume ``samples`` (up to ``limit``) and time them; ``measured`` None: already measured."""
    started = time.monotonic()
    first: float | None = None
    count = nbytes = 0
    with _closing(samples):
        for item in samples:
            size, _ = measured(item) if measured is not None else item
            if first is None:
                first = time.monotonic() - started
            count += 1
            nbytes += size
            if limit is not None and count >= limit:
                break
    return EpochStats(count, nbytes, time.monotonic() - started, first)


@contextlib.contextmanager
def _closing(iterator: Iterator[_T]) -> Iterator[Iterator[_T]]:
    """Close a generator (or anything with ``close``) on the way out, even on Ctrl-C."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
