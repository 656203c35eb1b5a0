"""ReaderStream: order, shuffle, exact resumption, elastic resumption, quotas, memory bound."""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.resume_helpers import assert_resumes, json_roundtrip
from wdsfs.errors import StateMismatchError
from wdsfs.plan import WorkItem, plan_epoch, plan_resume, redistribute
from wdsfs.stream import ReaderState, ReaderStream, reader_seed

FAST = settings(deadline=None, max_examples=400)

Sample = dict[str, object]


def key(sample: Sample) -> tuple[int, int]:
    shard, index = str(sample["__key__"]).split("/")
    return int(shard), int(index)


def size_of(shard: int, index: int) -> int:
    return (shard * 31 + index * 17) % 40


class MemoryShards:
    """A ReadFn over generated shards that records its calls and checks its contract."""

    def __init__(self, counts: Sequence[int], *, fail_at: tuple[int, int] | None = None) -> None:
        self.counts = list(counts)
        self.fail_at = fail_at
        self.calls: list[tuple[int, int, int | None]] = []
        self.open = 0

    def __call__(
        self,
        shard: int,
        *,
        select: Callable[[int], bool] | None,
        start: int,
        stop: int | None,
    ) -> Iterator[tuple[int, Sample]]:
        self.calls.append((shard, start, stop))
        return self._read(shard, select, start, stop)

    def _read(
        self, shard: int, select: Callable[[int], bool] | None, start: int, stop: int | None
    ) -> Iterator[tuple[int, Sample]]:
        self.open += 1
        try:
            end = self.counts[shard] if stop is None else min(stop, self.counts[shard])
            for i in range(start, end):
                if (shard, i) == self.fail_at:
                    raise OSError(f"shard {shard}: read failed at {i}")
                if select is None or select(i):
                    yield i, {"__key__": f"{shard}/{i}", "data": b"x" * size_of(shard, i)}
        finally:
            self.open -= 1

    def all_keys(self, items: Sequence[WorkItem]) -> list[tuple[int, int]]:
        return [
            (it.shard, i) for it in items for i in range(self.counts[it.shard]) if it.contains(i)
        ]


@st.composite
def reader_work(draw: st.DrawFn) -> tuple[list[int], list[WorkItem]]:
    """Shard counts and one reader's disjoint items: a plan's share, or hand-made items
    (whole shards, strided, bounded) over distinct shards."""
    counts = draw(st.lists(st.integers(0, 12), min_size=1, max_size=6))
    if draw(st.booleans()):
        readers = draw(st.integers(1, 8))
        plan = plan_epoch(len(counts), readers, seed=draw(st.integers(0, 9)), shuffle=True)
        return counts, plan[draw(st.integers(0, readers - 1))]
    shards = draw(st.permutations(range(len(counts))))
    items = []
    for shard in shards[: draw(st.integers(0, len(shards)))]:
        start = draw(st.integers(0, 4))
        stop = draw(st.none() | st.integers(start, 14))
        items.append(WorkItem(shard, start, draw(st.integers(1, 3)), stop))
    return counts, items


state_roundtrip = json_roundtrip(ReaderState.to_json, ReaderState.from_json)


def keys_of(stream: ReaderStream) -> list[tuple[int, int]]:
    return [key(s) for s in stream]


# ------------------------------------------------------------------------ order, shuffle


@FAST
@given(reader_work(), st.sampled_from([0, 1]))
def test_without_shuffle_order_is_item_order(
    work: tuple[list[int], list[WorkItem]], size: int
) -> None:
    counts, items = work
    shards = MemoryShards(counts)
    assert keys_of(ReaderStream(items, shards, buffer_size=size)) == shards.all_keys(items)
    assert shards.open == 0


@FAST
@given(reader_work(), st.integers(2, 10), st.integers(0, 2**64))
def test_shuffle_is_a_deterministic_permutation(
    work: tuple[list[int], list[WorkItem]], size: int, seed: int
) -> None:
    counts, items = work
    shards = MemoryShards(counts)
    got = keys_of(ReaderStream(items, shards, buffer_size=size, seed=seed))
    assert sorted(got) == sorted(shards.all_keys(items))
    assert got == keys_of(ReaderStream(items, shards, buffer_size=size, seed=seed))


def test_shuffle_differs_per_seed_and_mixes() -> None:
    shards = MemoryShards([50, 50])
    items = [WorkItem(0), WorkItem(1)]
    orders = {tuple(keys_of(ReaderStream(items, shards, buffer_size=20, seed=s))) for s in range(5)}
    assert len(orders) == 5
    order = keys_of(ReaderStream(items, shards, buffer_size=20, seed=0))
    assert order != shards.all_keys(items)
    assert any(k[0] == 1 for k in order[:40])  # the buffer spans the shard boundary


def test_reader_seed_is_pinned() -> None:
    assert reader_seed(0, 0, 0) == 905430731276639789
    assert reader_seed(7, 2, 5) == 7348819997115413603
    assert len({reader_seed(0, e, r) for e in range(10) for r in range(10)}) == 100


# ------------------------------------------------------------------------------- resume


@st.composite
def stream_config(draw: st.DrawFn) -> dict[str, Any]:
    counts, items = draw(reader_work())
    return {
        "counts": counts,
        "items": items,
        "buffer_size": draw(st.integers(0, 8)),
        "seed": draw(st.integers(0, 3)),
        "max_buffer_bytes": draw(st.none() | st.integers(0, 120)),
    }


def maker(config: dict[str, Any], **extra: Any) -> Callable[[ReaderState | None], ReaderStream]:
    shards = MemoryShards(config["counts"])
    kwargs = {k: v for k, v in config.items() if k not in ("counts", "items")}

    def make(state: ReaderState | None) -> ReaderStream:
        return ReaderStream(config["items"], shards, state=state, **kwargs, **extra)

    return make


@FAST
@given(stream_config(), st.data())
def test_resume_at_any_point_is_exact(config: dict[str, Any], data: st.DataObject) -> None:
    make = maker(config)
    full = list(make(None))
    for _ in range(3):
        stops = data.draw(st.lists(st.integers(0, len(full)), min_size=1, max_size=4))
        assert_resumes(make, stops, roundtrip=state_roundtrip, expected=full)


@FAST
@given(stream_config())
def test_resume_at_every_point(config: dict[str, Any]) -> None:
    make = maker(config)
    full = list(make(None))
    assert_resumes(make, range(len(full) + 1), roundtrip=state_roundtrip, expected=full)


def test_restore_reads_each_buffered_shard_once() -> None:
    shards = MemoryShards([30, 30, 30])
    items = [WorkItem(0), WorkItem(1), WorkItem(2)]
    stream = ReaderStream(items, shards, buffer_size=16, seed=1)
    it = iter(stream)
    for _ in range(25):
        next(it)
    state = state_roundtrip(stream.state())
    involved = sorted({s for s, _ in state.buffer})
    assert len(involved) == 2  # the buffer spans shards 0 and 1
    shards.calls.clear()
    next(iter(ReaderStream(items, shards, buffer_size=16, seed=1, state=state)))
    assert shards.calls == [
        *[
            (
                s,
                min(i for t, i in state.buffer if t == s),
                1 + max(i for t, i in state.buffer if t == s),
            )
            for s in involved
        ],
        (items[state.item].shard, state.next_index, None),
    ]


def test_state_is_small_json() -> None:
    shards = MemoryShards([100])
    stream = ReaderStream([WorkItem(0)], shards, buffer_size=10, seed=3)
    it = iter(stream)
    assert stream.state() == ReaderState()
    for _ in range(20):
        next(it)
    text = json.dumps(stream.state().to_json())
    assert len(text) < 250
    state = ReaderState.from_json(json.loads(text))
    assert state == stream.state()
    # at a yield the sample read last waits outside the buffer for the slot just freed
    assert state.delivered == 20 and len(state.buffer) == 9 and state.next_index == 29


# ------------------------------------------------------------------------------ elastic


@FAST
@given(
    st.lists(st.integers(0, 10), min_size=1, max_size=8),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(0, 6),
    st.booleans(),
    st.data(),
)
def test_elastic_resume_delivers_every_sample_exactly_once(
    counts: list[int],
    old: int,
    new: int,
    buffer_size: int,
    known: bool,
    data: st.DataObject,
) -> None:
    shards = MemoryShards(counts)
    plan = plan_epoch(len(counts), old, seed=7, shuffle=True)
    before: list[tuple[int, int]] = []
    states: list[ReaderState | None] = []
    for r, items in enumerate(plan):
        stream = ReaderStream(items, shards, buffer_size=buffer_size, seed=reader_seed(7, 0, r))
        total = len(shards.all_keys(items))
        k = data.draw(st.integers(0, total))
        it = iter(stream)
        before += [key(next(it)) for _ in range(k)]
        states.append(state_roundtrip(stream.state()) if k or data.draw(st.booleans()) else None)
        it.close()
    dealt = redistribute(plan, states, new, num_samples=counts if known else None)
    after = [
        key(sample)
        for r, items in enumerate(dealt)
        for sample in ReaderStream(
            items, shards, buffer_size=buffer_size, seed=reader_seed(7, 1, r)
        )
    ]
    everything = [(s, i) for s, n in enumerate(counts) for i in range(n)]
    assert sorted(before + after) == everything
    assert shards.open == 0
    # and with as many readers as before, every reader continues exactly
    resumed = plan_resume(plan, states, old)
    again = [
        key(sample)
        for r, (items, state) in enumerate(resumed)
        for sample in ReaderStream(
            items, shards, buffer_size=buffer_size, seed=reader_seed(7, 0, r), state=state
        )
    ]
    assert sorted(before + again) == everything


@FAST
@given(
    st.lists(st.integers(0, 8), min_size=1, max_size=6),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(0, 4),
    st.sampled_from(["drop", "repeat"]),
    st.data(),
)
def test_elastic_resume_with_quotas_never_delivers_a_sample_twice_in_a_pass(
    counts: list[int],
    old: int,
    new: int,
    buffer_size: int,
    policy: str,
    data: st.DataObject,
) -> None:
    """Old readers stopped anywhere, also past their quota or in a repeat pass: the new readers
    deliver exactly what the old ones had not delivered in their first pass."""
    shards = MemoryShards(counts)
    plan = plan_epoch(len(counts), old)
    first_pass: list[tuple[int, int]] = []
    states: list[ReaderState | None] = []
    for r, items in enumerate(plan):
        total = len(shards.all_keys(items))
        quota = data.draw(st.integers(0, 2 * total)) if total or policy == "drop" else 0
        stream = ReaderStream(
            items,
            shards,
            buffer_size=buffer_size,
            seed=r,
            quota=quota,
            policy=policy,  # type: ignore[arg-type]
        )
        got = [key(s) for s in itertools.islice(stream, data.draw(st.integers(0, quota)))]
        first_pass += got[:total]
        states.append(stream.state())
    after = [
        key(s)
        for items in redistribute(plan, states, new)
        for s in ReaderStream(items, shards, buffer_size=buffer_size)
    ]
    everything = [(s, i) for s, n in enumerate(counts) for i in range(n)]
    assert sorted(first_pass + after) == everything


# ------------------------------------------------------------------------------- quotas


@FAST
@given(stream_config(), st.integers(0, 40))
def test_drop_quota_is_a_prefix(config: dict[str, Any], quota: int) -> None:
    full = list(maker(config)(None))
    make = maker(config, quota=quota)
    got = list(make(None))
    assert got == full[:quota]
    assert_resumes(make, range(len(got) + 1), roundtrip=state_roundtrip, expected=got)


@FAST
@given(stream_config(), st.integers(0, 40), st.data())
def test_repeat_quota_repeats_whole_passes(
    config: dict[str, Any], quota: int, data: st.DataObject
) -> None:
    full = list(maker(config)(None))
    make = maker(config, quota=quota, policy="repeat")
    if not full and quota:
        with pytest.raises(ValueError, match="quota"):
            list(make(None))
        return
    got = list(make(None))
    assert len(got) == quota
    assert got[: len(full)] == full[:quota]
    for p in range(
        0, quota, max(len(full), 1)
    ):  # every pass is a permutation of the items' samples
        chunk = [key(s) for s in got[p : p + len(full)]]
        assert len(set(chunk)) == len(chunk) and set(chunk) <= {key(s) for s in full}
    stops = data.draw(st.lists(st.integers(0, quota), max_size=4))
    assert_resumes(make, stops, roundtrip=state_roundtrip, expected=got)
    assert_resumes(make, range(0, quota + 1, 3), roundtrip=state_roundtrip, expected=got)


def test_repeat_quota_needs_items() -> None:
    with pytest.raises(ValueError, match="without work items"):
        ReaderStream([], MemoryShards([3]), quota=2, policy="repeat")


def test_repeat_passes_are_shuffled_differently() -> None:
    shards = MemoryShards([30])
    got = keys_of(ReaderStream([WorkItem(0)], shards, buffer_size=8, quota=90, policy="repeat"))
    passes = [got[0:30], got[30:60], got[60:90]]
    assert all(sorted(p) == [(0, i) for i in range(30)] for p in passes)
    assert len({tuple(p) for p in passes}) == 3


# ------------------------------------------------------------------------------ memory


@FAST
@given(stream_config(), st.integers(0, 100))
def test_max_buffer_bytes_bounds_the_buffer(config: dict[str, Any], limit: int) -> None:
    config = {**config, "max_buffer_bytes": limit, "buffer_size": 50}
    stream = maker(config)(None)
    seen = []
    for sample in stream:
        seen.append(key(sample))
        buffered = stream.state().buffer
        assert len(buffered) <= 1 or sum(size_of(*k) for k in buffered) <= limit
    assert sorted(seen) == sorted(MemoryShards(config["counts"]).all_keys(config["items"]))


# ------------------------------------------------------------------------------- errors


def test_read_errors_propagate_unchanged() -> None:
    shards = MemoryShards([5, 5], fail_at=(1, 2))
    with pytest.raises(OSError, match="shard 1: read failed at 2") as info:
        list(ReaderStream([WorkItem(0), WorkItem(1)], shards, buffer_size=3))
    assert type(info.value) is OSError
    assert shards.open == 0


def test_stopping_early_closes_the_read() -> None:
    shards = MemoryShards([50])
    it = iter(ReaderStream([WorkItem(0)], shards, buffer_size=4))
    next(it)
    assert shards.open == 1
    it.close()  # what `break` does, through the generator's finaliser
    assert shards.open == 0


def test_iterates_once() -> None:
    stream = ReaderStream([WorkItem(0)], MemoryShards([3]))
    list(stream)
    with pytest.raises(RuntimeError):
        iter(stream)


@pytest.mark.parametrize(
    "state",
    [
        ReaderState(item=3),
        ReaderState(buffer=[(1, 0)]),
        ReaderState(buffer=[(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]),
        ReaderState(buffer=[(0, 1), (0, 1)]),
    ],
)
def test_foreign_states_are_rejected(state: ReaderState) -> None:
    with pytest.raises(StateMismatchError):
        ReaderStream([WorkItem(0)], MemoryShards([10, 10]), buffer_size=4, state=state)


def test_buffered_sample_that_cannot_be_read_again() -> None:
    state = ReaderState(item=0, next_index=9, buffer=[(0, 8), (0, 3)], rng=5, delivered=6)
    stream = ReaderStream([WorkItem(0)], MemoryShards([5]), buffer_size=4, state=state)
    with pytest.raises(StateMismatchError, match=r"\(0, 8\)"):
        next(iter(stream))


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"v": 2},
        {"v": 1, "item": 0, "next_index": 0, "rng": 0, "delivered": 0, "passes": 0},
        {"v": 1, "item": -1, "next_index": 0, "rng": 0, "delivered": 0, "passes": 0, "buffer": []},
        {
            "v": 1,
            "item": 0,
            "next_index": 0,
            "rng": 0,
            "delivered": 0,
            "passes": 0,
            "buffer": [[1]],
        },
        {
            "v": 1,
            "item": True,
            "next_index": 0,
            "rng": 0,
            "delivered": 0,
            "passes": 0,
            "buffer": [],
        },
    ],
)
def test_malformed_json_states(data: object) -> None:
    with pytest.raises(StateMismatchError):
        ReaderState.from_json(data)


def test_counts_by_key() -> None:
    """The in-memory reader itself: selection and bounds."""
    shards = MemoryShards([6])
    got = [i for i, _ in shards(0, select=lambda i: i % 2 == 0, start=1, stop=5)]
    assert got == [2, 4]
    assert collections.Counter(shards.all_keys([WorkItem(0, 1, 2)])) == {
        (0, 1): 1,
        (0, 3): 1,
        (0, 5): 1,
    }


@FAST
@given(stream_config(), st.data())
def test_state_after_a_read_error_resumes_exactly(
    config: dict[str, Any], data: st.DataObject
) -> None:
    """A read that fails anywhere leaves a state from which a retry continues exactly."""
    full = [key(s) for s in maker(config)(None)]
    keys = MemoryShards(config["counts"]).all_keys(config["items"])
    if not keys:
        return
    fail_at = data.draw(st.sampled_from(keys))
    kwargs = {k: v for k, v in config.items() if k not in ("counts", "items")}
    failing = MemoryShards(config["counts"], fail_at=fail_at)
    stream = ReaderStream(config["items"], failing, **kwargs)
    got = []
    with pytest.raises(OSError, match="read failed"):
        for sample in stream:
            got.append(key(sample))
    state = state_roundtrip(stream.state())
    healthy = MemoryShards(config["counts"])
    rest = [key(s) for s in ReaderStream(config["items"], healthy, state=state, **kwargs)]
    assert got + rest == full
