"""Who reads what: pure functions from (shards, seed, epoch, readers, resume state) to work.

The model
---------
A dataset has ``S`` shards, numbered ``0..S-1`` in the source's order. Training runs ``R`` readers:
``world_size`` ranks times ``max(num_workers, 1)`` DataLoader workers, reader ``r = rank *
max(num_workers, 1) + worker`` (:class:`ReaderId`). Each reader gets a list of :class:`WorkItem`:
a shard and an arithmetic progression of in-shard sample indices (``start``, ``step``, optional
``stop``). Sample counts per shard may be unknown, so an item never needs them to be exact.

:func:`plan_epoch` shuffles the shard order with a seed-and-epoch permutation (:func:`shard_order`)
and deals it round robin. With fewer shards than readers each shard is split by stride into
``ceil(R / S)`` items so that every reader gets work. Every sample of every shard belongs to
exactly one item of exactly one reader: this is the exactly-once guarantee, proven by property
tests for every ``S``, ``R`` and sample count.

A reader's progress (``ReaderState`` in :mod:`wdsfs.stream`, seen here as
:class:`ReaderProgress`) is the index of its current item, the next sample index of that item,
and the samples still pending in its shuffle buffer. :func:`plan_resume` turns the progress of an
interrupted epoch into the work of the resumed one: with the same number of readers every reader
gets its own items and state back and continues exactly; with a different number,
:func:`redistribute` lists what was not yet delivered (:func:`remaining_work`: the buffered samples
as small bounded items, the tail of the current item, the later items) and deals it to the new
readers (:func:`deal_work`), who start with empty buffers. Either way the samples delivered before
plus those delivered after are every sample exactly once.

:func:`equalize_quotas` turns known per-reader counts into per-reader quotas with equal totals per
rank, so that no DDP rank runs out of batches before the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from wdsfs._quotas import equalize_quotas
from wdsfs._resume_plan import ReaderProgress, deal_work, plan_resume, redistribute, remaining_work
from wdsfs._work_item import WorkItem, count_samples
from wdsfs.shuffle import CounterRNG, derive_seed

__all__ = [
    "ReaderId",
    "ReaderProgress",
    "WorkItem",
    "count_samples",
    "deal_work",
    "equalize_quotas",
    "plan_epoch",
    "plan_resume",
    "redistribute",
    "remaining_work",
    "shard_order",
]


@dataclass(frozen=True, slots=True)
class ReaderId:
    """One reader of a training run: a DataLoader worker of a rank.

    Attributes:
        rank: Rank of the process, ``0 <= rank < world_size``.
        world_size: Number of ranks, ``>= 1``.
        worker: DataLoader worker id, ``0 <= worker < max(num_workers, 1)``.
        num_workers: DataLoader ``num_workers``; 0 means one reader per rank (the main process).

    Raises:
        ValueError: If a field is out of range.
    """

    rank: int
    world_size: int
    worker: int
    num_workers: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {self!r}")
        if self.num_workers < 0 or not 0 <= self.worker < max(self.num_workers, 1):
            raise ValueError(f"need 0 <= worker < max(num_workers, 1), got {self!r}")

    @property
    def index(self) -> int:
        """Global reader index ``rank * max(num_workers, 1) + worker``."""
        return self.rank * max(self.num_workers, 1) + self.worker

    @property
    def count(self) -> int:
        """Number of readers ``world_size * max(num_workers, 1)``."""
        return self.world_size * max(self.num_workers, 1)


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order in which shards are dealt in an epoch.

    Without ``shuffle`` this is ``0..num_shards-1``. With it, a Fisher-Yates permutation driven by
    ``CounterRNG(derive_seed("order", seed, epoch))``: the same for the same ``(seed, epoch)`` in
    every process and Python version, different (with overwhelming probability) across epochs.

    Raises:
        ValueError: If ``num_shards`` is negative.
    """
    if num_shards < 0:
        raise ValueError(f"num_shards must be >= 0, got {num_shards}")
    order = list(range(num_shards))
    if shuffle:
        rng = CounterRNG(derive_seed("order", seed, epoch))
        for i in range(num_shards - 1, 0, -1):
            j = rng.below(i + 1)
            order[i], order[j] = order[j], order[i]
    return order


def plan_epoch(
    num_shards: int, num_readers: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = False
) -> list[list[WorkItem]]:
    """Deal the shards of an epoch to readers.

    If ``num_shards >= num_readers``, whole shards in :func:`shard_order` are dealt round robin.
    Otherwise each shard is split into ``parts = ceil(num_readers / num_shards)`` strided items
    ``WorkItem(s, start=j, step=parts)``, ``j < parts``, dealt round robin in shard order.

    Guarantees: every sample of every shard is in exactly one item of one reader; every reader
    gets at least one item (so a reader is idle only if its items' shards are too short:
    with ``parts`` items per shard, never when every shard holds at least ``parts`` samples);
    reader item counts differ by at most one.

    Args:
        num_shards: Number of shards ``S >= 1``.
        num_readers: Number of readers ``R >= 1``.
        seed: Seed of the shard order.
        epoch: Epoch number (the order changes every epoch when shuffling).
        shuffle: Whether to shuffle the shard order.

    Returns:
        ``R`` lists of items; list ``r`` is reader ``r``'s work, in reading order.

    Raises:
        ValueError: If ``num_shards < 1`` or ``num_readers < 1``.
    """
    if num_shards < 1:
        raise ValueError(f"a plan needs at least one shard, got num_shards={num_shards}")
    if num_readers < 1:
        raise ValueError(f"num_readers must be >= 1, got {num_readers}")
    order = shard_order(num_shards, seed=seed, epoch=epoch, shuffle=shuffle)
    if num_shards >= num_readers:
        units = [WorkItem(s) for s in order]
    else:
        parts = -(-num_readers // num_shards)
        units = [WorkItem(s, start=j, step=parts) for s in order for j in range(parts)]
    return [units[r::num_readers] for r in range(num_readers)]
