"""One reader's resumable sample stream: work items -> shuffle buffer -> samples.

The model
---------
A :class:`ReaderStream` reads its :class:`~wdsfs.plan.WorkItem` list in order through an injected
:class:`ReadFn` and passes every sample through a seeded :class:`~wdsfs.shuffle.ShuffleBuffer`
by the rule "make room, then add": the sample just read waits while the buffer pops (and the
stream yields) as many samples as needed to make room for it, then it is added. When the items
are exhausted the buffer is drained. With a ``quota`` the stream stops after ``quota`` samples
(``"drop"``), or starts again from the first item until it has yielded ``quota`` (``"repeat"``).

At every yield, and after a failed ``read`` too, the stream's position is fully described by a
small :class:`ReaderState`: the current item, the next sample index to read from it (at a yield,
the sample waiting for the slot just freed), the keys ``(shard, index)`` of the buffered samples
in slot order, the buffer's RNG counter, the samples yielded and the completed passes. Restoring
re-reads the buffered samples (one ``read`` call per shard, selecting exactly those indices), puts
them back in their slots, sets the RNG counter and reads on from ``(item, next_index)``. Since every
decision of the buffer depends only on its slots, its counter and the samples read next, **a
stream resumed from the state taken after any number of samples yields exactly the rest of the
uninterrupted stream, in the same order** (given the same items, seed, buffer size and byte bound,
and shards that read the same). Work items must be disjoint (plans always are).
Taking a state costs O(buffer size) and it serialises to a small JSON object.

Measured on CPython 3.11, x86-64, in-memory reads of 200,000 samples: the stream adds ~0.5 us per
sample without shuffling, ~1.1 us with a 1,000-sample buffer, ~1.8 us with ``max_buffer_bytes``
too (sizing every sample). With 1,000 samples buffered, :meth:`ReaderStream.state` takes ~8 us,
``to_json`` ~40 us.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal, Protocol

from wdsfs.errors import StateMismatchError
from wdsfs.plan import WorkItem
from wdsfs.shuffle import ShuffleBuffer, derive_seed, sample_nbytes

__all__ = ["ReadFn", "ReaderState", "ReaderStream", "SampleId", "reader_seed"]

SampleId = tuple[int, int]
"""``(shard, index in shard)``."""

Sample = dict[str, object]

_STATE_VERSION = 1


class ReadFn(Protocol):
    """Reads samples of one shard.

    Must yield ``(index, sample)`` for every index ``i`` with ``start <= i < stop`` (no upper
    bound when ``stop`` is None) and ``select(i)`` (every ``i`` when ``select`` is None), in
    increasing order, and the same samples every time it is called. It may read the whole shard.
    """

    def __call__(
        self,
        shard: int,
        *,
        select: Callable[[int], bool] | None,
        start: int,
        stop: int | None,
    ) -> Iterator[tuple[int, Sample]]:
        """Yield the selected samples of ``shard`` with their in-shard indices."""
        ...


def reader_seed(seed: int, epoch: int, reader_index: int) -> int:
    """The shuffle seed of one reader in one epoch, the same in every process.

    Args:
        seed: The run's seed.
        epoch: Epoch number.
        reader_index: Global reader index (:attr:`wdsfs.plan.ReaderId.index`).
    """
    return derive_seed("reader", seed, epoch, reader_index)


@dataclass(frozen=True, slots=True)
class ReaderState:
    """Where a :class:`ReaderStream` stands after its last yielded sample.

    Attributes:
        item: Index of the current item (``len(items)`` once draining the buffer).
        next_index: In-shard index of the next sample to read from the current item.
        buffer: Keys of the samples in the shuffle buffer, in slot order.
        rng: The buffer's RNG counter (draws made so far this epoch).
        delivered: Samples yielded so far this epoch, all passes included.
        passes: Completed passes over the items (only ``"repeat"`` quotas make more than 0).
    """

    item: int = 0
    next_index: int = 0
    buffer: list[SampleId] = field(default_factory=list)
    rng: int = 0
    delivered: int = 0
    passes: int = 0

    def __reduce__(self) -> tuple[type[ReaderState], tuple[object, ...]]:
        # positional: ~3x faster both ways than a dataclass's field-by-field state (a state
        # travels with every sample a DataLoader worker sends)
        fields = (self.item, self.next_index, self.buffer, self.rng, self.delivered, self.passes)
        return ReaderState, fields

    def to_json(self) -> dict[str, object]:
        """A JSON-serialisable dict (``json.dumps`` works on it as is).

        The buffer is one flat list ``[shard0, index0, shard1, index1, ...]``: with thousands of
        buffered samples this is several times faster to build and encode than nested pairs.
        """
        return {
            "v": _STATE_VERSION,
            "item": self.item,
            "next_index": self.next_index,
            "buffer": list(chain.from_iterable(self.buffer)),
            "rng": self.rng,
            "delivered": self.delivered,
            "passes": self.passes,
        }

    @classmethod
    def from_json(cls, data: object) -> ReaderState:
        """Rebuild a state from :meth:`to_json` output (after a JSON round trip).

        Raises:
            StateMismatchError: If ``data`` is not a valid reader state.
        """
        if not isinstance(data, dict) or data.get("v") != _STATE_VERSION:
            raise StateMismatchError(f"not a version {_STATE_VERSION} reader state: {data!r:.200}")
        counters = {}
        for name in ("item", "next_index", "rng", "delivered", "passes"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StateMismatchError(f"reader state: {name} must be an int >= 0, got {value!r}")
            counters[name] = value
        raw = data.get("buffer")
        if (
            not isinstance(raw, list)
            or len(raw) % 2
            or not all(type(x) is int and x >= 0 for x in raw)
        ):
            raise StateMismatchError(
                f"reader state: buffer must be a flat list of shard, index ints, got {raw!r:.200}"
            )
        buffer: list[SampleId] = list(zip(raw[::2], raw[1::2], strict=True))
        return cls(buffer=buffer, **counters)


class ReaderStream:
    """One reader's samples for one epoch, shuffled and resumable at every sample.

    Args:
        items: This reader's work, in order.
        read: Reads the samples of a shard (see :class:`ReadFn`).
        buffer_size: Shuffle buffer size; 0 or 1 = no shuffling (item order).
        seed: Shuffle seed, e.g. :func:`reader_seed`.
        max_buffer_bytes: Bound on the bytes of buffered samples (see
            :func:`~wdsfs.shuffle.sample_nbytes`); the buffer holds fewer samples rather than more.
        state: A state from :meth:`state` of a stream built with the same arguments, to continue
            from; None to start at the beginning.
        quota: Number of samples to yield, or None for "all the items hold".
        policy: With a quota, ``"drop"`` stops at ``quota`` (fewer if the items hold fewer);
            ``"repeat"`` reads the items again, as often as needed, until ``quota``.

    Raises:
        ValueError: On bad arguments, e.g. a ``"repeat"`` quota with no items.
        StateMismatchError: If ``state`` cannot belong to these items and buffer size.
    """

    def __init__(
        self,
        items: Sequence[WorkItem],
        read: ReadFn,
        *,
        buffer_size: int = 0,
        seed: int = 0,
        max_buffer_bytes: int | None = None,
        state: ReaderState | None = None,
        quota: int | None = None,
        policy: Literal["drop", "repeat"] = "drop",
    ) -> None:
        if quota is not None and quota < 0:
            raise ValueError(f"quota must be >= 0 or None, got {quota}")
        if policy not in ("drop", "repeat"):
            raise ValueError(f"policy must be 'drop' or 'repeat', got {policy!r}")
        if policy == "repeat" and quota and not items:
            raise ValueError(f"cannot repeat to a quota of {quota} samples without work items")
        self._items = tuple(items)
        self._read = read
        self._buffer: ShuffleBuffer[SampleId, Sample] = ShuffleBuffer(
            buffer_size, seed=seed, max_bytes=max_buffer_bytes
        )
        self._quota = quota
        self._repeat = policy == "repeat"
        state = state if state is not None else ReaderState()
        self._check(state)
        self._initial: ReaderState | None = state  # set to None once restored
        self._item = state.item
        self._next_index = state.next_index
        self._delivered = state.delivered
        self._passes = state.passes
        self._started = False

    def _check(self, state: ReaderState) -> None:
        if state.item > len(self._items):
            raise StateMismatchError(
                f"reader state at item {state.item} but the reader has {len(self._items)} items"
            )
        if len(state.buffer) > self._buffer.capacity:
            raise StateMismatchError(
                f"reader state holds {len(state.buffer)} buffered samples but the buffer has "
                f"{self._buffer.capacity} slots"
            )
        if len(set(state.buffer)) != len(state.buffer):
            raise StateMismatchError("reader state holds a buffered sample twice")
        by_shard: dict[int, list[WorkItem]] = {}
        for it in self._items:
            by_shard.setdefault(it.shard, []).append(it)
        for shard, index in state.buffer:
            if not any(it.contains(index) for it in by_shard.get(shard, ())):
                raise StateMismatchError(
                    f"buffered sample (shard {shard}, index {index}) is not in this reader's items"
                )

    def state(self) -> ReaderState:
        """The state after the last yielded sample (O(buffer size)).

        Pass it to a new stream with the same arguments to continue exactly from here. The state
        is also valid after ``read`` raised: it then includes the samples read since the last
        yield (in the buffer), and resuming from it continues exactly as if nothing had failed.
        """
        if self._initial is not None:
            return self._initial
        return ReaderState(
            item=self._item,
            next_index=self._next_index,
            buffer=self._buffer.keys(),
            rng=self._buffer.draws,
            delivered=self._delivered,
            passes=self._passes,
        )

    def __iter__(self) -> Generator[Sample, None, None]:
        """Yield the samples (unchanged, as ``read`` made them). A stream iterates once.

        Closing the generator (``break``, ``close()``) closes the shard being read.

        Raises:
            RuntimeError: If iterated a second time.
            StateMismatchError: If a buffered sample of the state cannot be read again.
        """
        if self._started:
            raise RuntimeError("a ReaderStream can be iterated only once")
        self._started = True
        return self._run()

    def _restore(self, state: ReaderState) -> None:
        wanted: dict[int, set[int]] = {}
        for shard, index in state.buffer:
            wanted.setdefault(shard, set()).add(index)
        found: dict[SampleId, Sample] = {}
        for shard in sorted(wanted):
            indices = wanted[shard]
            for index, sample in self._read(
                shard, select=indices.__contains__, start=min(indices), stop=max(indices) + 1
            ):
                if index in indices:
                    found[(shard, index)] = sample
        missing = [key for key in state.buffer if key not in found]
        if missing:
            raise StateMismatchError(
                f"buffered samples {missing[:5]} of the reader state could not be read again "
                "(shard changed or shorter?)"
            )
        self._buffer.restore([(key, found[key]) for key in state.buffer], state.rng)

    def _run(self) -> Generator[Sample, None, None]:
        quota = self._quota
        if quota is not None and self._delivered >= quota:
            return
        buf = self._buffer
        initial = self._initial
        if initial is not None:
            if initial.buffer:
                self._restore(initial)
            else:
                buf.restore([], initial.rng)
            self._initial = None
        items = self._items
        # a one-slot buffer passes samples through in order whatever their sizes
        sizeof = sample_nbytes if buf.max_bytes is not None and buf.capacity > 1 else None
        pass_start = self._delivered if self._item == 0 and self._next_index == 0 else None
        if len(buf):
            pass_start = None
        while True:
            while self._item < len(items):
                tail = items[self._item].first_after(self._next_index - 1)
                if tail is not None:
                    shard = tail.shard
                    samples = self._read(
                        shard,
                        select=None if tail.step == 1 else tail.contains,
                        start=tail.start,
                        stop=tail.stop,
                    )
                    try:
                        for index, sample in samples:
                            self._next_index = index
                            nbytes = sizeof(sample) if sizeof is not None else 0
                            while not buf.has_room(nbytes):
                                out = buf.pop()[1]
                                self._delivered += 1
                                yield out
                                if self._delivered == quota:
                                    return
                            buf.add((shard, index), sample, nbytes)
                            self._next_index = index + 1  # state() is valid between yields too
                    finally:
                        close = getattr(samples, "close", None)
                        if close is not None:
                            close()
                self._item += 1
                self._next_index = 0
            while len(buf):
                out = buf.pop()[1]
                self._delivered += 1
                yield out
                if self._delivered == quota:
                    return
            if not self._repeat or quota is None or self._delivered >= quota:
                return
            if pass_start == self._delivered:
                raise ValueError(
                    f"cannot repeat to a quota of {quota} samples: a whole pass over this "
                    f"reader's {len(items)} work items yielded no sample"
                )
            self._passes += 1
            self._item = 0
            self._next_index = 0
            pass_start = self._delivered
