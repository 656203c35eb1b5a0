"""ShuffleBuffer and CounterRNG (wdsfs.shuffle): permutation, bounds, exact restore, pinned RNG."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdsfs.shuffle import CounterRNG, ShuffleBuffer, derive_seed, sample_nbytes

FAST = settings(deadline=None, max_examples=300)

sizes_st = st.lists(st.integers(0, 50), max_size=60)


def run(buf: ShuffleBuffer[int, int], values: list[int]) -> list[int]:
    out = [k for v in values for k, _ in buf.push(v, v)]
    return out + [k for k, _ in buf.drain()]


@FAST
@given(st.integers(0, 20), st.integers(0, 60), st.integers(0, 2**70))
def test_output_is_a_permutation_and_push_emits_one_when_full(size: int, n: int, seed: int) -> None:
    buf: ShuffleBuffer[int, int] = ShuffleBuffer(size, seed=seed)
    out = []
    for v in range(n):
        emitted = buf.push(v, v)
        assert len(emitted) == (1 if v >= max(size, 1) else 0)
        out += [k for k, _ in emitted]
        assert len(buf) == min(v + 1, max(size, 1))
    out += [k for k, _ in buf.drain()]
    assert sorted(out) == list(range(n)) and len(buf) == 0


@pytest.mark.parametrize("size", [0, 1])
def test_size_zero_and_one_are_fifo(size: int) -> None:
    buf: ShuffleBuffer[int, int] = ShuffleBuffer(size, seed=5)
    assert run(buf, list(range(10))) == list(range(10))
    assert buf.draws == 0


def test_same_seed_same_order_other_seed_other_order() -> None:
    def order(seed: int) -> list[int]:
        return run(ShuffleBuffer(10, seed=seed), list(range(100)))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != list(range(100))


@FAST
@given(sizes_st, st.integers(0, 80), st.integers(1, 10))
def test_max_bytes_bounds_the_buffer(sizes: list[int], limit: int, size: int) -> None:
    buf: ShuffleBuffer[int, list[int]] = ShuffleBuffer(
        size, seed=0, max_bytes=limit, sizeof=lambda item: item[0]
    )
    out = []
    for k, nbytes in enumerate(sizes):
        out += [key for key, _ in buf.push(k, [nbytes])]
        assert buf.nbytes <= limit or len(buf) == 1
        assert buf.nbytes == sum(sizes[key] for key in list(buf.keys()))
    out += [key for key, _ in buf.drain()]
    assert sorted(out) == list(range(len(sizes)))


@FAST
@given(st.integers(0, 12), st.integers(0, 40), st.integers(0, 40), st.none() | st.integers(0, 60))
def test_restore_continues_exactly(size: int, n: int, cut: int, limit: int | None) -> None:
    """Taking (keys in slot order, draws) at any point and restoring them continues identically."""
    values = list(range(n))

    def sizeof(v: int) -> int:
        return v % 7

    def make() -> ShuffleBuffer[int, int]:
        return ShuffleBuffer(size, seed=9, max_bytes=limit, sizeof=sizeof)

    full = run(make(), values)
    buf = make()
    cut = min(cut, n)
    head = [k for v in values[:cut] for k, _ in buf.push(v, v)]
    keys, draws = buf.keys(), buf.draws
    resumed = make()
    resumed.restore([(k, k) for k in keys], draws)
    assert resumed.nbytes == buf.nbytes
    assert head + run(resumed, values[cut:]) == full


def test_counter_rng_is_pinned_and_restartable() -> None:
    rng = CounterRNG(0)
    first = [rng.next64() for _ in range(3)]
    assert first == [
        CounterRNG(0, draws=0).next64(),
        CounterRNG(0, draws=1).next64(),
        CounterRNG(0, draws=2).next64(),
    ]
    assert first == [15620868487259654693, 4087046105483994727, 9967956053676210318]
    assert derive_seed("reader", 0, 0, 0) == 905430731276639789


def test_counter_rng_is_splitmix64() -> None:
    """With key 0 the outputs are SplitMix64's reference sequence for seed 0."""
    rng = CounterRNG(0)
    rng._key = 0
    assert [rng.next64() for _ in range(3)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


def test_counter_rng_is_uniform_enough() -> None:
    """Chi-square over 10 bins, fixed seed (deterministic, not a flaky statistical test)."""
    rng = CounterRNG(123)
    counts = collections.Counter(rng.below(10) for _ in range(20000))
    chi2 = sum((c - 2000) ** 2 / 2000 for c in counts.values())
    assert set(counts) == set(range(10))
    assert chi2 < 27.9  # p = 0.001 for 9 degrees of freedom


@given(st.integers(1, 2**40), st.integers(-(2**80), 2**80))
def test_below_is_in_range(n: int, seed: int) -> None:
    rng = CounterRNG(seed)
    assert all(0 <= rng.below(n) < n for _ in range(5))


def test_sample_nbytes() -> None:
    class Array:
        nbytes = 12

    sample = {"__key__": "abc", "jpg": b"12345", "cls": bytearray(2), "img": Array(), "n": 3}
    assert sample_nbytes(sample) == 3 + 5 + 2 + 12
    assert sample_nbytes(b"not a mapping") == 0


def test_errors() -> None:
    with pytest.raises(ValueError):
        ShuffleBuffer(-1)
    with pytest.raises(ValueError):
        ShuffleBuffer(2, max_bytes=-1)
    with pytest.raises(ValueError):
        CounterRNG(0, draws=-1)
    buf: ShuffleBuffer[int, int] = ShuffleBuffer(2)
    with pytest.raises(IndexError):
        buf.pop()
    with pytest.raises(ValueError):
        buf.restore([(1, 1), (2, 2), (3, 3)], 0)
    with pytest.raises(ValueError):
        buf.restore([], -1)
