"""WorkItem: the samples of one shard a reader reads, as an arithmetic progression of indices.

Not public API: :mod:`wdsfs.plan` re-exports these names and describes the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wdsfs.errors import StateMismatchError

__all__ = ["WorkItem", "count_samples"]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """The samples ``i`` of a shard: ``start <= i``, ``(i - start) % step == 0``, ``i < stop``.

    Attributes:
        shard: Shard number in the source's order.
        start: First in-shard sample index.
        step: Stride between indices (1 = every sample from ``start``).
        stop: Exclusive end, or None for "to the end of the shard".

    Raises:
        ValueError: If a field is negative, ``step < 1`` or ``stop < start``.
    """

    shard: int
    start: int = 0
    step: int = 1
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.shard < 0 or self.start < 0 or self.step < 1:
            raise ValueError(f"invalid {self!r}: need shard >= 0, start >= 0, step >= 1")
        if self.stop is not None and self.stop < self.start:
            raise ValueError(f"invalid {self!r}: stop < start")

    def contains(self, index: int) -> bool:
        """Tell whether in-shard sample ``index`` belongs to this item."""
        return (
            index >= self.start
            and (self.stop is None or index < self.stop)
            and (index - self.start) % self.step == 0
        )

    def count(self, num_samples: int) -> int:
        """Number of samples of this item in a shard of ``num_samples`` samples.

        Raises:
            ValueError: If ``num_samples`` is negative.
        """
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        end = num_samples if self.stop is None else min(num_samples, self.stop)
        return max(0, -(-(end - self.start) // self.step))

    def first_after(self, index: int) -> WorkItem | None:
        """The part of this item after in-shard index ``index``, or None if nothing is left.

        ``first_after(-1)`` is the item itself; with ``stop=None`` the tail may still be empty
        in a short shard (this cannot be known without the count).
        """
        if index < self.start:
            return self
        start = self.start + ((index - self.start) // self.step + 1) * self.step
        if self.stop is not None and start >= self.stop:
            return None
        return WorkItem(self.shard, start, self.step, self.stop)

    def to_json(self) -> list[int | None]:
        """``[shard, start, step, stop]``."""
        return [self.shard, self.start, self.step, self.stop]

    @classmethod
    def from_json(cls, data: object) -> WorkItem:
        """Rebuild an item from :meth:`to_json` output.

        Raises:
            StateMismatchError: If ``data`` is not a valid item.
        """
        if not isinstance(data, (list, tuple)) or len(data) != 4:
            raise StateMismatchError(f"a work item is [shard, start, step, stop], got {data!r}")
        shard, start, step, stop = data
        if not (_is_int(shard) and _is_int(start) and _is_int(step)) or not (
            stop is None or _is_int(stop)
        ):
            raise StateMismatchError(f"a work item holds integers, got {data!r}")
        try:
            return cls(shard, start, step, stop)
        except ValueError as exc:
            raise StateMismatchError(str(exc)) from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def count_samples(items: Sequence[WorkItem], num_samples: Sequence[int]) -> int:
    """Total samples of ``items`` given the sample count of every shard."""
    return sum(item.count(num_samples[item.shard]) for item in items)
