"""What one reader reads in an epoch: planned from the epoch's start, or resumed from a loaded
state_dict (see :meth:`~wdsfs.loader.StreamingDataLoader.load_state_dict`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wdsfs.plan import ReaderId, WorkItem
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
