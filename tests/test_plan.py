"""Properties of the epoch plan, elastic redistribution and quota equalisation (wdsfs.plan)."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdsfs.errors import StateMismatchError
from wdsfs.plan import (
    ReaderId,
    WorkItem,
    count_samples,
    deal_work,
    equalize_quotas,
    plan_epoch,
    plan_resume,
    redistribute,
    remaining_work,
    shard_order,
)

FAST = settings(deadline=None, max_examples=500)

counts_st = st.lists(st.integers(0, 20), min_size=1, max_size=40)
readers_st = st.integers(1, 12)
seeds_st = st.integers(0, 2**64)


def covered(items: list[WorkItem], counts: list[int]) -> list[tuple[int, int]]:
    """Every (shard, index) of ``items``, brute force."""
    return [(it.shard, i) for it in items for i in range(counts[it.shard]) if it.contains(i)]


# ------------------------------------------------------------------------------ WorkItem


items_st = st.builds(
    lambda shard, start, step, length: WorkItem(
        shard, start, step, None if length is None else start + length
    ),
    st.integers(0, 5),
    st.integers(0, 15),
    st.integers(1, 5),
    st.none() | st.integers(0, 15),
)


@FAST
@given(items_st, st.integers(0, 30))
def test_count_matches_contains(item: WorkItem, n: int) -> None:
    assert item.count(n) == sum(item.contains(i) for i in range(n))


@FAST
@given(items_st, st.integers(-2, 30))
def test_first_after_is_the_tail(item: WorkItem, index: int) -> None:
    tail = item.first_after(index)
    expected = [i for i in range(40) if item.contains(i) and i > index]
    if tail is None:
        assert expected == []
    else:
        assert [i for i in range(40) if tail.contains(i)] == expected
        assert tail.shard == item.shard and tail.step == item.step


@FAST
@given(items_st)
def test_work_item_json_round_trip(item: WorkItem) -> None:
    assert WorkItem.from_json(item.to_json()) == item


@pytest.mark.parametrize(
    "data", [None, [1, 2, 3], [1, 0, 0, None], [1, -1, 1, None], ["1", 0, 1, None], [1, 5, 1, 2]]
)
def test_work_item_from_bad_json(data: object) -> None:
    with pytest.raises(StateMismatchError):
        WorkItem.from_json(data)


@pytest.mark.parametrize(
    "kwargs", [{"shard": -1}, {"start": -1}, {"step": 0}, {"start": 3, "stop": 2}]
)
def test_work_item_rejects_bad_fields(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        WorkItem(**{"shard": 0, **kwargs})


# ------------------------------------------------------------------------------ ReaderId


@given(st.integers(1, 5), st.integers(0, 5))
def test_reader_ids_are_a_bijection(world_size: int, num_workers: int) -> None:
    ids = [
        ReaderId(rank, world_size, worker, num_workers)
        for rank in range(world_size)
        for worker in range(max(num_workers, 1))
    ]
    assert [r.index for r in ids] == list(range(len(ids)))
    assert {r.count for r in ids} == {len(ids)}


@pytest.mark.parametrize(
    "args", [(1, 1, 0, 2), (-1, 1, 0, 2), (0, 0, 0, 1), (0, 1, 1, 0), (0, 1, 0, -1)]
)
def test_reader_id_rejects_out_of_range(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        ReaderId(*args)


# ---------------------------------------------------------------------------- shard order


@FAST
@given(st.integers(0, 60), seeds_st, st.integers(0, 1000), st.booleans())
def test_shard_order_is_a_deterministic_permutation(
    n: int, seed: int, epoch: int, shuffle: bool
) -> None:
    order = shard_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    assert sorted(order) == list(range(n))
    assert order == shard_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    if not shuffle:
        assert order == list(range(n))


def test_shard_order_changes_every_epoch() -> None:
    orders = [tuple(shard_order(10, seed=0, epoch=e, shuffle=True)) for e in range(20)]
    assert len(set(orders)) == 20
    assert orders[0] != tuple(range(10))
    assert shard_order(10, seed=1, epoch=0, shuffle=True) != list(orders[0])


def test_shard_order_is_pinned() -> None:
    """The arithmetic is ours (no ``random``, no ``hash()``): these values never change."""
    assert shard_order(10, seed=0, epoch=0, shuffle=True) == [8, 9, 5, 3, 6, 4, 2, 0, 1, 7]
    assert shard_order(10, seed=42, epoch=3, shuffle=True) == [7, 1, 5, 6, 2, 3, 4, 9, 0, 8]


# ------------------------------------------------------------------------------ plan_epoch


@FAST
@given(counts_st, readers_st, seeds_st, st.integers(0, 5), st.booleans())
def test_every_sample_exactly_once(
    counts: list[int], readers: int, seed: int, epoch: int, shuffle: bool
) -> None:
    plan = plan_epoch(len(counts), readers, seed=seed, epoch=epoch, shuffle=shuffle)
    assert len(plan) == readers
    got = [sample for items in plan for sample in covered(items, counts)]
    assert sorted(got) == [(s, i) for s, n in enumerate(counts) for i in range(n)]


@FAST
@given(counts_st, readers_st, seeds_st, st.booleans())
def test_no_reader_is_idle(counts: list[int], readers: int, seed: int, shuffle: bool) -> None:
    """Guarantee: every reader gets >= 1 item, item counts differ by <= 1, and a reader has
    samples whenever every shard holds at least ``parts`` samples (``parts = ceil(R / S)``,
    1 when S >= R)."""
    plan = plan_epoch(len(counts), readers, seed=seed, shuffle=shuffle)
    sizes = [len(items) for items in plan]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    parts = -(-readers // len(counts))
    if min(counts) >= parts:
        assert all(count_samples(items, counts) > 0 for items in plan)


def test_fewer_shards_than_readers_splits_by_stride() -> None:
    plan = plan_epoch(2, 3)
    assert plan == [
        [WorkItem(0, 0, 2), WorkItem(1, 1, 2)],
        [WorkItem(0, 1, 2)],
        [WorkItem(1, 0, 2)],
    ]


@FAST
@given(st.integers(1, 40), readers_st, seeds_st, st.integers(0, 5))
def test_plan_is_deterministic(shards: int, readers: int, seed: int, epoch: int) -> None:
    a = plan_epoch(shards, readers, seed=seed, epoch=epoch, shuffle=True)
    assert a == plan_epoch(shards, readers, seed=seed, epoch=epoch, shuffle=True)


@pytest.mark.parametrize("shards, readers", [(0, 1), (1, 0), (-1, 2)])
def test_plan_rejects_empty(shards: int, readers: int) -> None:
    with pytest.raises(ValueError):
        plan_epoch(shards, readers)


# ----------------------------------------------------------------------- elastic resume


@dataclass(frozen=True)
class Progress:
    item: int = 0
    next_index: int = 0
    buffer: list[tuple[int, int]] = field(default_factory=list)
    passes: int = 0


@st.composite
def interrupted_epoch(draw: st.DrawFn) -> tuple[list[int], list[list[WorkItem]], list[Progress]]:
    """A plan and, per reader, a plausible progress: a cursor and some of the samples
    before it still buffered (what a shuffle buffer leaves)."""
    counts = draw(st.lists(st.integers(0, 12), min_size=1, max_size=10))
    plan = plan_epoch(len(counts), draw(st.integers(1, 6)), seed=draw(seeds_st), shuffle=True)
    states = []
    for items in plan:
        samples = covered(items, counts)
        cut = draw(st.integers(0, len(samples)))
        before = samples[:cut]
        buffered = draw(st.lists(st.sampled_from(before), unique=True) if before else st.just([]))
        if cut < len(samples):
            shard, index = samples[cut]
            item = next(k for k, it in enumerate(items) if it.shard == shard and it.contains(index))
        else:
            item, index = len(items), 0
        states.append(Progress(item, index, draw(st.permutations(buffered))))
    return counts, plan, states


def delivered_before(
    items: list[WorkItem], state: Progress, counts: list[int]
) -> list[tuple[int, int]]:
    samples = covered(items, counts)
    done = [
        (s, i)
        for k, it in enumerate(items)
        for s, i in covered([it], counts)
        if k < state.item or (k == state.item and i < state.next_index)
    ]
    assert set(done) <= set(samples)
    return [x for x in done if x not in set(state.buffer)]


@FAST
@given(interrupted_epoch(), st.integers(1, 8), st.booleans())
def test_redistribute_leaves_nothing_out_and_nothing_twice(
    epoch: tuple[list[int], list[list[WorkItem]], list[Progress]], new: int, known: bool
) -> None:
    counts, plan, states = epoch
    dealt = redistribute(plan, states, new, num_samples=counts if known else None)
    assert len(dealt) == new
    before = [
        x for items, s in zip(plan, states, strict=True) for x in delivered_before(items, s, counts)
    ]
    after = [x for items in dealt for x in covered(items, counts)]
    assert sorted(before + after) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
    assert dealt == redistribute(plan, states, new, num_samples=counts if known else None)


@FAST
@given(st.integers(0, 5), st.lists(st.integers(0, 40), unique=True, max_size=15))
def test_buffered_samples_become_exact_compact_items(shard: int, indices: list[int]) -> None:
    items = [WorkItem(shard)]
    left = remaining_work([items], [Progress(1, 0, [(shard, i) for i in indices])])
    assert sorted(i for it in left for i in range(50) if it.contains(i)) == sorted(indices)
    assert all(it.stop is not None for it in left)
    assert len(left) <= max(1, -(-len(indices) // 2))


def test_consecutive_buffered_samples_are_one_item() -> None:
    left = remaining_work([[WorkItem(3)]], [Progress(0, 9, [(3, 7), (3, 5), (3, 6), (3, 8)])])
    assert left == [WorkItem(3, 5, 1, 9), WorkItem(3, 9)]


def test_repeat_passes_and_missing_states() -> None:
    plan = [[WorkItem(0), WorkItem(1)], [WorkItem(2)]]
    assert remaining_work(plan, [Progress(1, 3, passes=1), None]) == [WorkItem(2)]


@pytest.mark.parametrize(
    "state",
    [
        Progress(item=3),
        Progress(buffer=[(5, 0)]),
        Progress(buffer=[(0, 1), (0, 1)]),
    ],
)
def test_remaining_work_rejects_foreign_states(state: Progress) -> None:
    with pytest.raises(StateMismatchError):
        remaining_work([[WorkItem(0), WorkItem(1)]], [state])


def test_remaining_work_needs_one_state_per_reader() -> None:
    with pytest.raises(StateMismatchError):
        remaining_work([[WorkItem(0)], [WorkItem(1)]], [None])


@FAST
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30)), max_size=30), st.integers(1, 7))
def test_deal_work_without_counts_is_round_robin_by_unit(
    shard_starts: list[tuple[int, int]], readers: int
) -> None:
    """Units are runs of consecutive items of one shard; unit u goes to reader u % R."""
    items = [WorkItem(s, start) for s, start in shard_starts]
    units = [list(g) for _, g in itertools.groupby(items, key=lambda it: it.shard)]
    expected = [[it for unit in units[r::readers] for it in unit] for r in range(readers)]
    assert deal_work(items, readers) == expected


@FAST
@given(st.lists(st.integers(0, 30), min_size=1, max_size=30), st.integers(1, 7))
def test_deal_work_with_counts_is_balanced(counts: list[int], readers: int) -> None:
    items = [WorkItem(s) for s in range(len(counts))]
    dealt = deal_work(items, readers, num_samples=counts)
    assert sorted(x.shard for d in dealt for x in d) == [s for s, n in enumerate(counts) if n]
    loads = [count_samples(d, counts) for d in dealt]
    # list scheduling bound: no reader above the average by more than one unit
    assert max(loads) <= sum(counts) / readers + max(counts)
    for d in dealt:
        assert [x.shard for x in d] == sorted(x.shard for x in d)  # original order kept


def test_plan_resume_gives_states_back_with_same_reader_count() -> None:
    plan = plan_epoch(5, 2)
    states = [Progress(1, 2, [(plan[0][0].shard, 0)]), None]
    assert plan_resume(plan, states, 2) == [(plan[0], states[0]), (plan[1], None)]
    elastic = plan_resume(plan, states, 3)
    assert [s for _, s in elastic] == [None, None, None]
    assert [i for i, _ in elastic] == redistribute(plan, states, 3)


# ---------------------------------------------------------------------------- quotas


@st.composite
def quota_args(draw: st.DrawFn) -> tuple[list[int], int, int, int]:
    world_size = draw(st.integers(1, 4))
    num_workers = draw(st.integers(0, 4))
    counts = draw(
        st.lists(
            st.integers(0, 50),
            min_size=world_size * max(num_workers, 1),
            max_size=world_size * max(num_workers, 1),
        )
    )
    return counts, world_size, num_workers, draw(st.integers(1, 5))


def rank_totals(quotas: list[int], world_size: int, num_workers: int) -> list[int]:
    w = max(num_workers, 1)
    return [sum(quotas[k * w : (k + 1) * w]) for k in range(world_size)]


@FAST
@given(quota_args())
def test_drop_quotas(args: tuple[list[int], int, int, int]) -> None:
    counts, world_size, num_workers, batch = args
    quotas = equalize_quotas(
        counts, world_size=world_size, num_workers=num_workers, policy="drop", batch_size=batch
    )
    totals = rank_totals(quotas, world_size, num_workers)
    full = rank_totals([c // batch * batch for c in counts], world_size, num_workers)
    assert set(totals) == {min(full)}
    assert all(0 <= q <= c and q % batch == 0 for q, c in zip(quotas, counts, strict=True))
    # proportional: each reader keeps at least its share of its rank's cut, rounded down
    w = max(num_workers, 1)
    for r, (q, c) in enumerate(zip(quotas, counts, strict=True)):
        rank_full = full[r // w]
        if rank_full:
            assert q >= (min(full) // batch) * (c // batch) // (rank_full // batch) * batch
    assert quotas == equalize_quotas(
        counts, world_size=world_size, num_workers=num_workers, policy="drop", batch_size=batch
    )


@FAST
@given(quota_args())
def test_repeat_quotas(args: tuple[list[int], int, int, int]) -> None:
    counts, world_size, num_workers, batch = args
    w = max(num_workers, 1)
    needed = rank_totals([-(-c // batch) * batch for c in counts], world_size, num_workers)
    empty_rank = any(not any(counts[k * w : (k + 1) * w]) for k in range(world_size))
    if empty_rank and max(needed) > 0:
        with pytest.raises(ValueError, match="no samples to repeat"):
            equalize_quotas(
                counts,
                world_size=world_size,
                num_workers=num_workers,
                policy="repeat",
                batch_size=batch,
            )
        return
    quotas = equalize_quotas(
        counts, world_size=world_size, num_workers=num_workers, policy="repeat", batch_size=batch
    )
    assert set(rank_totals(quotas, world_size, num_workers)) == {max(needed)}
    assert all(q % batch == 0 for q in quotas)
    assert all(q >= c if c else q == 0 for q, c in zip(quotas, counts, strict=True))


def test_quotas_example() -> None:
    # rank 0 holds 12 samples, rank 1 holds 3
    counts = [5, 7, 3, 0]
    assert equalize_quotas(counts, world_size=2, num_workers=2, policy="drop") == [1, 2, 3, 0]
    assert equalize_quotas(counts, world_size=2, num_workers=2, policy="repeat") == [5, 7, 12, 0]
    assert equalize_quotas(
        [5, 7, 3, 1], world_size=2, num_workers=2, policy="repeat", batch_size=2
    ) == [6, 8, 10, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"counts": [1, 2], "world_size": 1, "num_workers": 1},
        {"counts": [1, -2], "world_size": 2, "num_workers": 0},
        {"counts": [1], "world_size": 0, "num_workers": 0},
        {"counts": [1], "world_size": 1, "num_workers": 0, "batch_size": 0},
        {"counts": [1], "world_size": 1, "num_workers": 0, "policy": "pad"},
    ],
)
def test_quotas_reject_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        equalize_quotas(**{"policy": "drop", **kwargs})


def test_combinatorial_exactly_once_small() -> None:
    """Every (S, R) up to 12 x 12 with uneven shard sizes, exhaustively."""
    for shards, readers in itertools.product(range(1, 13), range(1, 13)):
        counts = [(7 * s) % 11 for s in range(shards)]
        plan = plan_epoch(shards, readers, shuffle=True, seed=shards * readers)
        got = collections.Counter(x for items in plan for x in covered(items, counts))
        assert set(got.values()) <= {1} and sum(got.values()) == sum(counts)
