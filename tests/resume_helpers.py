"""One generic check that a stateful stream resumes exactly, for every stateful component.

``assert_resumes(make_stream, stops)`` runs the stream once without interruption, then again as a
chain of runs: take samples up to the first stop, take the state, build a new stream from that
state (after an optional serialisation round trip), take samples up to the next stop, and so on,
and finally run the last stream to its end. The concatenated output must equal the uninterrupted
output, sample for sample, in order.

It works for anything iterable with a way to read its state: ``ReaderStream`` (``.state()``),
the dataset or the loader (``get_state=lambda loader: loader.state_dict()``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["assert_resumes", "json_roundtrip"]

S = TypeVar("S")
T = TypeVar("T")


def json_roundtrip(to_json: Callable[[S], Any], from_json: Callable[[Any], S]) -> Callable[[S], S]:
    """A ``roundtrip`` for :func:`assert_resumes` through ``json.dumps``/``json.loads``."""

    def roundtrip(state: S) -> S:
        return from_json(json.loads(json.dumps(to_json(state))))

    return roundtrip


def _default_state(stream: Any) -> Any:
    return stream.state()


def assert_resumes(
    make_stream: Callable[[S | None], Iterable[T]],
    stops: int | Sequence[int],
    *,
    get_state: Callable[[Any], S] = _default_state,
    roundtrip: Callable[[S], S] | None = None,
    expected: Sequence[T] | None = None,
) -> list[T]:
    """Check that stopping after ``stops`` samples and resuming gives the uninterrupted output.

    Args:
        make_stream: Builds a fresh stream from a state (None = from the beginning).
        stops: Sample counts (from the beginning) after which to stop and resume; one int or
            several (sorted and deduplicated here). Each must be in ``0..len(expected)``.
        get_state: Reads the state of a stream after the samples taken (default ``.state()``).
        roundtrip: Applied to every state before resuming (e.g. :func:`json_roundtrip`).
        expected: The uninterrupted output, when already known (else computed here).

    Returns:
        The uninterrupted output.

    Raises:
        AssertionError: If the resumed output differs, naming the first differing position.
    """
    full = list(make_stream(None)) if expected is None else list(expected)
    points = sorted({stops} if isinstance(stops, int) else set(stops))
    if points and not 0 <= points[0] <= points[-1] <= len(full):
        raise ValueError(f"stops {points} outside 0..{len(full)}")
    got: list[T] = []
    state: S | None = None
    for point in points:
        stream = make_stream(state)
        it = iter(stream)
        while len(got) < point:
            try:
                got.append(next(it))
            except StopIteration:
                raise AssertionError(
                    f"resumed stream ended after {len(got)} samples, expected {len(full)}"
                ) from None
        state = get_state(stream)
        close = getattr(it, "close", None)
        if close is not None:
            close()
        if roundtrip is not None:
            state = roundtrip(state)
    got.extend(make_stream(state))
    if got != full:
        where = next(
            (i for i, (a, b) in enumerate(zip(got, full, strict=False)) if a != b),
            min(len(got), len(full)),
        )
        raise AssertionError(
            f"resuming at {points} diverges at sample {where} "
            f"(got {len(got)} samples, expected {len(full)}): "
            f"{got[where : where + 3]!r:.300} != {full[where : where + 3]!r:.300}"
        )
    return full
