"""The collate of StreamingDataLoader: the user's batch, plus the state of the reader after it.

Each batch is collated in its DataLoader worker together with that worker's stream state *after*
the batch (a few integers plus the ids of the samples waiting in the shuffle buffer), as a
:class:`Tracked`; the main process unwraps it (see :class:`~wdsfs.loader.StreamingDataLoader`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import (
    collate,
    default_collate,
    default_collate_fn_map,
    default_convert,
)
from torch.utils.data._utils.pin_memory import pin_memory

from wdsfs._file_slices import FileSlice
from wdsfs._packs import Pack
from wdsfs._shared_rings import BatchRings
from wdsfs.dataset import StreamingWebDataset
from wdsfs.stream import ReaderState


class Tracked:
    """A user batch travelling with the state of the reader that produced it.

    Or a pack (``batch_size=None`` with workers): ``batch`` is then the list of the pack's
    samples, and ``states`` the reader's state after each of them.
    """

    __slots__ = ("batch", "items", "reader", "rings", "samples", "state", "states", "worker")

    def __init__(
        self,
        batch: Any,
        reader: int,
        state: ReaderState,
        items: list[list[int | None]] | None,
        samples: int,
        states: list[ReaderState] | None = None,
        rings: BatchRings | None = None,
        worker: int = 0,
    ) -> None:
        self.batch = batch
        self.reader = reader
        self.state = state
        self.items = items
        self.samples = samples
        self.states = states
        self.rings = rings  # in a worker: the rings its batch travels through
        self.worker = worker

    def __reduce__(self) -> Any:
        rest = (self.reader, self.state, self.items, self.samples, self.states)
        if self.rings is None:
            return Tracked, (self.batch, *rest)
        return self.rings.reduce(self.worker, Tracked, self.batch, *rest)

    def pin_memory(self) -> Tracked:
        pinned = pin_memory(self.batch)  # type: ignore[no-untyped-call]
        return Tracked(pinned, self.reader, self.state, self.items, self.samples, self.states)


# a file slice (see wdsfs._file_slices) is bytes once the main process has read it
_PLAIN_TYPES = frozenset({bytes, str, int, float, bool, type(None), FileSlice})


def _slices_as_bytes(batch: list[FileSlice], *, collate_fn_map: Any = None) -> list[FileSlice]:
    return batch  # as default_collate leaves a batch of bytes: a list


_COLLATE_FN_MAP = {**default_collate_fn_map, FileSlice: _slices_as_bytes}


def _default_collate(batch: Any) -> Any:
    """``default_collate``, which also leaves file slices as it leaves bytes: in a list."""
    return collate(batch, collate_fn_map=_COLLATE_FN_MAP)


def convert_sample(sample: Any) -> Any:
    """``default_convert`` (the collate of ``batch_size=None``), without its recursion for the
    common sample, a dict of bytes/str/numbers, that it would return unchanged."""
    if type(sample) is dict and all(type(value) in _PLAIN_TYPES for value in sample.values()):
        return sample
    return default_convert(sample)  # type: ignore[no-untyped-call]


class TrackingCollate:
    """Wraps the user's collate_fn: same batch, plus the producing reader's state."""

    def __init__(self, collate_fn: Callable[[Any], Any], dataset: StreamingWebDataset) -> None:
        self.default = collate_fn in (default_collate, convert_sample)
        """The collate is torch's (or ours for batch_size=None), which does not read bytes: the
        workers may leave fields of samples unread (file slices)."""
        self.collate_fn = _default_collate if collate_fn is default_collate else collate_fn
        self.dataset: StreamingWebDataset | None = dataset
        self.rings: BatchRings | None = None  # set while forking workers

    def __getstate__(self) -> dict[str, Any]:
        # workers use their own copy of the dataset (get_worker_info().dataset); spawned ones
        # cannot map the rings
        return {**self.__dict__, "dataset": None, "rings": None}

    def __call__(self, samples: Any) -> Tracked:
        info = get_worker_info()
        dataset = info.dataset if info is not None else self.dataset
        assert isinstance(dataset, StreamingWebDataset)
        current = dataset.loader_state()
        if current is None:
            raise RuntimeError("StreamingDataLoader: the dataset is not iterating")
        work, state = current
        # items that plan_epoch cannot recompute (after an elastic resume) travel with the state
        items = None if work.planned else [item.to_json() for item in work.items]
        states = None
        if isinstance(samples, Pack):  # batch_size=None: samples collated one by one
            batch: Any = [self.collate_fn(sample) for sample in samples.samples]
            states, count = samples.states, len(samples.samples)
        else:
            count = len(samples) if isinstance(samples, list) else 1
            batch = self.collate_fn(samples)
        tracked = Tracked(batch, work.reader.index, state, items, count, states)
        if info is not None:
            tracked.rings, tracked.worker = self.rings, info.id
        return tracked
