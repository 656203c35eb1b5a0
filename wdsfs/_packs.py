"""Packs: the samples a DataLoader worker sends to the main process at once (not public API).

With ``batch_size=None`` torch's DataLoader moves every sample from a worker to the main
process on its own: a pickle, a queue message, an index sent back, ~100 us of the main process
each (at 10k samples/s, a whole core). :class:`~wdsfs.StreamingDataLoader` has its workers
send them in packs instead, and hands them out one by one again. A pack carries the reader's
stream state after each of its samples, so a state_dict taken after any sample is exact.

A reader's pack ends where the count of samples it has delivered this epoch (a count its stream
state carries) is a power of two below the pack size or a multiple of it: with a pack size of
32, packs of 1, 1, 2, 4, 8 and 16 samples, then 32. The first sample leaves the worker as soon
as it is ready, not 31 samples (and their decoding and transform) later, and the packs grow to
their size within the first pack's worth. A reader resumed in the middle of a pack ends its
first pack where the interrupted one would have ended, and the round robin of the resumed
workers then goes on exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from wdsfs.stream import ReaderState

__all__ = ["Pack", "ends_pack", "packed"]


@dataclass
class Pack:
    """Consecutive samples of one reader, each with the stream state just after it."""

    samples: list[Any] = field(default_factory=list)
    states: list[ReaderState] = field(default_factory=list)


def ends_pack(delivered: int, size: int) -> bool:
    """Whether a pack of at most ``size`` samples ends after the reader's ``delivered``-th."""
    return delivered % size == 0 or (delivered < size and delivered & (delivered - 1) == 0)


def packed(
    samples: Iterator[Any], state: Callable[[], ReaderState], size: int
) -> Generator[Pack, None, None]:
    """Group ``samples`` into packs that end where :func:`ends_pack` says (the last one where
    the samples end); ``state()`` is the stream's state."""
    pack = Pack()
    try:
        for sample in samples:
            after = state()
            pack.samples.append(sample)
            pack.states.append(after)
            if ends_pack(after.delivered, size):
                yield pack
                pack = Pack()
        if pack.samples:
            yield pack
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
