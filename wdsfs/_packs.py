"""Packs: the samples a DataLoader worker sends to the main process at once (not public API).

With ``batch_size=None`` torch's DataLoader moves every sample from a worker to the main
process on its own: a pickle, a queue message, an index sent back, ~100 us of the main process
each (at 10k samples/s, a whole core). :class:`~wdsfs.StreamingDataLoader` has its workers
send them in packs instead, and hands them out one by one again. A pack carries the reader's
stream state after each of its samples, so a state_dict taken after any sample is exact.

A reader's pack ends whenever the count of samples it has delivered this epoch reaches a
multiple of the pack size, a count its stream state carries: a reader resumed in the middle of
a pack ends its first pack where the interrupted one would have ended, and the round robin of
the resumed workers then goes on exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from wdsfs.stream import ReaderState

__all__ = ["Pack", "packed"]


@dataclass
class Pack:
    """Consecutive samples of one reader, each with the stream state just after it."""

    samples: list[Any] = field(default_factory=list)
    states: list[ReaderState] = field(default_factory=list)


def packed(
    samples: Iterator[Any], state: Callable[[], ReaderState], size: int
) -> Generator[Pack, None, None]:
    """Group ``samples`` into packs that end where the reader's delivered count is a multiple
    of ``size`` (the last one where the samples end); ``state()`` is the stream's state."""
    pack = Pack()
    try:
        for sample in samples:
            after = state()
            pack.samples.append(sample)
            pack.states.append(after)
            if after.delivered % size == 0:
                yield pack
                pack = Pack()
        if pack.samples:
            yield pack
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
