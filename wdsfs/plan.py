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

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from wdsfs.errors import StateMismatchError
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
class WorkItem:
    """The samples ``i`` of a shard: ``start <= i``, ``(i - start) % step == 0``, ``i < stop``.

    Attributes:
        shard: Shard number in the source's order.
        start: First in-shard sample index.
        step: Stride between indices (1 = every sample from ``start``).
        stop: Exclusive end, or None for "to the end of the shard".

    Raises:
        ValueError: If a field is negative, ``step < 1`` or ``stop < start``.
    """

    shard: int
    start: int = 0
    step: int = 1
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.shard < 0 or self.start < 0 or self.step < 1:
            raise ValueError(f"invalid {self!r}: need shard >= 0, start >= 0, step >= 1")
        if self.stop is not None and self.stop < self.start:
            raise ValueError(f"invalid {self!r}: stop < start")

    def contains(self, index: int) -> bool:
        """Tell whether in-shard sample ``index`` belongs to this item."""
        return (
            index >= self.start
            and (self.stop is None or index < self.stop)
            and (index - self.start) % self.step == 0
        )

    def count(self, num_samples: int) -> int:
        """Number of samples of this item in a shard of ``num_samples`` samples.

        Raises:
            ValueError: If ``num_samples`` is negative.
        """
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        end = num_samples if self.stop is None else min(num_samples, self.stop)
        return max(0, -(-(end - self.start) // self.step))

    def first_after(self, index: int) -> WorkItem | None:
        """The part of this item after in-shard index ``index``, or None if nothing is left.

        ``first_after(-1)`` is the item itself; with ``stop=None`` the tail may still be empty
        in a short shard (this cannot be known without the count).
        """
        if index < self.start:
            return self
        start = self.start + ((index - self.start) // self.step + 1) * self.step
        if self.stop is not None and start >= self.stop:
            return None
        return WorkItem(self.shard, start, self.step, self.stop)

    def to_json(self) -> list[int | None]:
        """``[shard, start, step, stop]``."""
        return [self.shard, self.start, self.step, self.stop]

    @classmethod
    def from_json(cls, data: object) -> WorkItem:
        """Rebuild an item from :meth:`to_json` output.

        Raises:
            StateMismatchError: If ``data`` is not a valid item.
        """
        if not isinstance(data, (list, tuple)) or len(data) != 4:
            raise StateMismatchError(f"a work item is [shard, start, step, stop], got {data!r}")
        shard, start, step, stop = data
        if not (_is_int(shard) and _is_int(start) and _is_int(step)) or not (
            stop is None or _is_int(stop)
        ):
            raise StateMismatchError(f"a work item holds integers, got {data!r}")
        try:
            return cls(shard, start, step, stop)
        except ValueError as exc:
            raise StateMismatchError(str(exc)) from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def count_samples(items: Sequence[WorkItem], num_samples: Sequence[int]) -> int:
    """Total samples of ``items`` given the sample count of every shard."""
    return sum(item.count(num_samples[item.shard]) for item in items)


class ReaderProgress(Protocol):
    """What planning needs of a reader's state (``wdsfs.stream.ReaderState`` provides it)."""

    @property
    def item(self) -> int:
        """Index of the current item in the reader's item list."""
        ...

    @property
    def next_index(self) -> int:
        """Next in-shard sample index to pull from the current item."""
        ...

    @property
    def buffer(self) -> Sequence[tuple[int, int]]:
        """``(shard, index)`` of the samples pending in the shuffle buffer."""
        ...

    @property
    def passes(self) -> int:
        """Completed passes over the items (more than 0 only when repeating for a quota)."""
        ...


P = TypeVar("P", bound=ReaderProgress)


def remaining_work(
    items: Sequence[Sequence[WorkItem]], states: Sequence[ReaderProgress | None]
) -> list[WorkItem]:
    """Everything the readers of an interrupted epoch had not yet delivered.

    For each reader in order: its buffered samples (per shard, in ascending index order, as
    bounded items covering exactly those indices: runs with a constant stride become one item),
    the tail of its current item from ``next_index``, then its later items. A reader with no
    state has delivered nothing; a reader past its first pass (repeating to fill a quota) has
    delivered all its items already and contributes nothing.

    Args:
        items: Each old reader's items, as it was given them.
        states: Each old reader's last state (None = nothing delivered).

    Returns:
        The remaining items, for :func:`deal_work`.

    Raises:
        StateMismatchError: If the states do not fit the items.
    """
    if len(states) != len(items):
        raise StateMismatchError(f"{len(states)} reader states for {len(items)} readers")
    left: list[WorkItem] = []
    for r, (reader_items, state) in enumerate(zip(items, states, strict=True)):
        if state is None:
            left.extend(reader_items)
            continue
        if state.passes > 0:
            continue
        if not 0 <= state.item <= len(reader_items) or state.next_index < 0:
            raise StateMismatchError(
                f"reader {r}: item {state.item} / next_index {state.next_index} does not fit "
                f"its {len(reader_items)} work items"
            )
        left.extend(_buffered_items(r, reader_items, state.buffer))
        if state.item < len(reader_items):
            tail = reader_items[state.item].first_after(state.next_index - 1)
            if tail is not None:
                left.append(tail)
            left.extend(reader_items[state.item + 1 :])
    return left


def _buffered_items(
    reader: int, items: Sequence[WorkItem], buffer: Sequence[tuple[int, int]]
) -> list[WorkItem]:
    by_shard: dict[int, list[WorkItem]] = {}
    for it in items:
        by_shard.setdefault(it.shard, []).append(it)
    per_shard: dict[int, list[int]] = {}
    for shard, index in buffer:
        if not any(it.contains(index) for it in by_shard.get(shard, ())):
            raise StateMismatchError(
                f"reader {reader}: buffered sample (shard {shard}, index {index}) is not in "
                "its work items"
            )
        per_shard.setdefault(shard, []).append(index)
    out: list[WorkItem] = []
    for shard in sorted(per_shard):
        indices = sorted(set(per_shard[shard]))
        if len(indices) != len(per_shard[shard]):
            raise StateMismatchError(f"reader {reader}: a sample of shard {shard} buffered twice")
        k = 0
        while k < len(indices):
            start = indices[k]
            step = indices[k + 1] - start if k + 1 < len(indices) else 1
            end = k + 1
            while end < len(indices) and indices[end] - indices[end - 1] == step:
                end += 1
            out.append(WorkItem(shard, start, step, indices[end - 1] + 1))
            k = end
    return out


def deal_work(
    remaining: Sequence[WorkItem],
    num_readers: int,
    *,
    num_samples: Sequence[int] | None = None,
) -> list[list[WorkItem]]:
    """Deal items to a number of readers, deterministically and balanced.

    Consecutive items of the same shard form one unit (a reader's buffered samples and the tail
    of its current shard stay together, so the shard is read by one reader). Without sample
    counts, units are dealt round robin (item counts per reader differ by at most one unit).
    With counts, empty units are dropped and units go largest first to the least loaded reader
    (ties to the lowest index), which keeps the largest load within 4/3 of the optimum. Each
    reader's items keep their order in ``remaining``.

    Args:
        remaining: Items to deal, e.g. from :func:`remaining_work`.
        num_readers: Number of new readers, ``>= 1``.
        num_samples: Sample count of every shard, when known.

    Returns:
        ``num_readers`` item lists.

    Raises:
        ValueError: If ``num_readers < 1``.
    """
    if num_readers < 1:
        raise ValueError(f"num_readers must be >= 1, got {num_readers}")
    units: list[list[WorkItem]] = []
    for item in remaining:
        if units and units[-1][-1].shard == item.shard:
            units[-1].append(item)
        else:
            units.append([item])
    assigned: list[list[int]] = [[] for _ in range(num_readers)]
    if num_samples is None:
        for u in range(len(units)):
            assigned[u % num_readers].append(u)
    else:
        weights = [count_samples(unit, num_samples) for unit in units]
        heap = [(0, r) for r in range(num_readers)]
        for u in sorted(range(len(units)), key=lambda u: (-weights[u], u)):
            if weights[u] == 0:
                break
            load, r = heapq.heappop(heap)
            assigned[r].append(u)
            heapq.heappush(heap, (load + weights[u], r))
    return [[item for u in sorted(us) for item in units[u]] for us in assigned]


def redistribute(
    items: Sequence[Sequence[WorkItem]],
    states: Sequence[ReaderProgress | None],
    num_readers: int,
    *,
    num_samples: Sequence[int] | None = None,
) -> list[list[WorkItem]]:
    """Deal what the readers of an interrupted epoch left to a new number of readers.

    ``deal_work(remaining_work(items, states), num_readers, num_samples=num_samples)``: the new
    readers start with empty buffers and fresh states; the samples the old readers delivered
    plus everything the new readers deliver are every sample of ``items`` exactly once.

    Args:
        items: Each old reader's items, as it was given them.
        states: Each old reader's last state (None = nothing delivered).
        num_readers: Number of new readers, ``>= 1``.
        num_samples: Sample count of every shard, when known (balances by samples).

    Returns:
        ``num_readers`` item lists.

    Raises:
        StateMismatchError: If the states do not fit the items.
        ValueError: If ``num_readers < 1``.
    """
    return deal_work(remaining_work(items, states), num_readers, num_samples=num_samples)


def plan_resume(
    items: Sequence[Sequence[WorkItem]],
    states: Sequence[P | None],
    num_readers: int,
    *,
    num_samples: Sequence[int] | None = None,
) -> list[tuple[list[WorkItem], P | None]]:
    """Work for the readers of a resumed epoch.

    With as many readers as before, every reader gets its own items and state back, and continues
    exactly where it stopped (same order, buffer included; the caller must also keep the seed and
    buffer size). Otherwise the remaining work is redistributed and every reader starts fresh.

    Args:
        items: Each old reader's items.
        states: Each old reader's last state (None = nothing delivered).
        num_readers: Number of readers now.
        num_samples: Sample count of every shard, when known (for balancing).

    Returns:
        For each new reader, its items and the state to start from (None = from the start).

    Raises:
        StateMismatchError: If the states do not fit the items.
        ValueError: If ``num_readers < 1``.
    """
    if len(states) != len(items):
        raise StateMismatchError(f"{len(states)} reader states for {len(items)} readers")
    if num_readers == len(items):
        return [(list(its), state) for its, state in zip(items, states, strict=True)]
    work = redistribute(items, states, num_readers, num_samples=num_samples)
    return [(its, None) for its in work]


def equalize_quotas(
    counts: Sequence[int],
    *,
    world_size: int,
    num_workers: int,
    policy: Literal["drop", "repeat"],
    batch_size: int = 1,
) -> list[int]:
    """Per-reader sample quotas that give every rank the same number of samples and batches.

    Quotas are whole batches (multiples of ``batch_size``: a worker's batches are then all full,
    so equal sample totals mean equal batch counts per rank, which is what DDP needs).

    - ``"drop"``: every rank delivers what the poorest rank can, in whole batches:
      ``T = min over ranks of sum(floor(count / batch_size)) * batch_size``. Each rank's cut is
      apportioned to its readers in proportion to their counts (largest remainder, ties to the
      lowest reader), so every reader drops about the same fraction, and ``quota <= count``.
    - ``"repeat"``: every reader delivers all its samples, its last batch completed by repeats,
      and ranks below the richest one add whole batches of repeats, apportioned in proportion
      to the readers' counts (so no sample is repeated much more than others). Readers with 0
      samples get quota 0 and are never asked to repeat.

    Args:
        counts: Known sample count of each reader ``r = rank * max(num_workers, 1) + worker``.
        world_size: Number of ranks.
        num_workers: DataLoader workers per rank (0 = one reader per rank).
        policy: ``"drop"`` or ``"repeat"``.
        batch_size: Samples per batch (1 = equalize samples only).

    Returns:
        The quota of every reader.

    Raises:
        ValueError: On inconsistent arguments, or with ``"repeat"`` when a rank has no samples at
            all while another has some.
    """
    per_rank = max(num_workers, 1)
    if world_size < 1 or num_workers < 0 or batch_size < 1:
        raise ValueError("need world_size >= 1, num_workers >= 0, batch_size >= 1")
    if len(counts) != world_size * per_rank:
        raise ValueError(f"{len(counts)} counts for {world_size} x {per_rank} readers")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    if policy not in ("drop", "repeat"):
        raise ValueError(f"policy must be 'drop' or 'repeat', got {policy!r}")
    ranks = [list(counts[k * per_rank : (k + 1) * per_rank]) for k in range(world_size)]
    quotas: list[int] = []
    if policy == "drop":
        full = [[c // batch_size for c in rank] for rank in ranks]
        target = min(sum(f) for f in full)
        for f in full:
            quotas.extend(q * batch_size for q in _apportion(f, target))
    else:
        base = [[-(-c // batch_size) for c in rank] for rank in ranks]
        target = max(sum(b) for b in base)
        for k, (rank, b) in enumerate(zip(ranks, base, strict=True)):
            deficit = target - sum(b)
            if deficit and not any(rank):
                raise ValueError(
                    f"rank {k} has no samples to repeat while others have {target * batch_size}:"
                    " use policy='drop' or fewer readers"
                )
            extra = _apportion(rank, deficit) if deficit else [0] * len(rank)
            quotas.extend((x + e) * batch_size for x, e in zip(b, extra, strict=True))
    return quotas


def _apportion(weights: Sequence[int], total: int) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, ties to the lowest index).

    With ``total <= sum(weights)`` every share is ``<= `` its weight. Needs ``sum(weights) > 0``
    unless ``total == 0``.
    """
    whole = sum(weights)
    if total == 0:
        return [0] * len(weights)
    shares = [total * w // whole for w in weights]
    rest = total - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[:rest]:
        shares[i] += 1
    return shares
