"""What one reader reads in an epoch: planned from the epoch's start, or resumed from a loaded
state_dict (see :meth:`~wdsfs.loader.StreamingDataLoader.load_state_dict`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wdsfs.plan import ReaderId, WorkItem, plan_epoch, redistribute
from wdsfs.stream import ReaderState

if TYPE_CHECKING:
    from wdsfs.dataset import StreamingWebDataset


@dataclass(frozen=True)
class ReaderWork:
    """What one reader reads this epoch: its items, and where to resume inside them."""

    reader: ReaderId
    items: list[WorkItem]
    state: ReaderState | None = None
    quota: int | None = None
    planned: bool = True  # items are plan_epoch's (else they must be saved with the state)


@dataclass
class Resume:
    """A loaded state_dict, applied by each reader on its next iteration (once)."""

    token: str
    epoch: int
    work_for: Callable[[ReaderId, StreamingWebDataset], ReaderWork]
    worker_offset: int = 0
    used_by: set[int] = field(default_factory=set)


class ResumedWork:
    """Each reader's work in a resumed epoch (picklable: travels to DataLoader workers)."""

    def __init__(
        self,
        states: dict[int, ReaderState],
        saved_items: dict[int, list[WorkItem]],
        old_count: int,
        same: bool,
    ) -> None:
        self.states = states
        self.saved_items = saved_items
        self.old_count = old_count
        self.same = same

    def _old_items(self, dataset: StreamingWebDataset) -> list[list[WorkItem]]:
        planned = plan_epoch(
            dataset.num_shards,
            self.old_count,
            seed=dataset.seed,
            epoch=dataset.epoch,
            shuffle=dataset.shuffle,
        )
        return [self.saved_items.get(r, planned[r]) for r in range(self.old_count)]

    def __call__(self, reader: ReaderId, dataset: StreamingWebDataset) -> ReaderWork:
        old_items = self._old_items(dataset)
        if self.same:
            planned = reader.index not in self.saved_items
            quota = dataset.quota(old_items, reader)
            state = self.states.get(reader.index)
            return ReaderWork(reader, old_items[reader.index], state, quota, planned)
        counts = [shard.num_samples for shard in dataset.shards()]
        known = None if any(c is None for c in counts) else [int(c or 0) for c in counts]
        states = [self.states.get(r) for r in range(self.old_count)]
        dealt = redistribute(old_items, states, reader.count, num_samples=known)
        return ReaderWork(reader, dealt[reader.index], None, dataset.quota(dealt, reader), False)
