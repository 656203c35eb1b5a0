"""Resumption: the progress of an interrupted epoch's readers -> the work of the resumed one.

Not public API: :mod:`wdsfs.plan` re-exports these names and describes the model.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol, TypeVar

from wdsfs._work_item import WorkItem, count_samples
from wdsfs.errors import StateMismatchError

__all__ = ["ReaderProgress", "deal_work", "plan_resume", "redistribute", "remaining_work"]


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
