"""Equal quotas: per-reader sample quotas that give every DDP rank the same number of batches.

Not public API: :mod:`wdsfs.plan` re-exports :func:`equalize_quotas`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["equalize_quotas"]


def equalize_quotas(
    counts: Sequence[int],
    *,
    world_size: int,
    num_workers: int,
    policy: Literal["drop", "repeat"],
    batch_size: int = 1,
) -> list[int]:
    """Per-reader sample quotas that give every rank the same number of samples and batches.

    Quotas are whole batches (multiples of ``batch_size``: a worker's batches are then all full,
    so equal sample totals mean equal batch counts per rank, which is what DDP needs).

    - ``"drop"``: every rank delivers what the poorest rank can, in whole batches:
      ``T = min over ranks of sum(floor(count / batch_size)) * batch_size``. Each rank's cut is
      apportioned to its readers in proportion to their counts (largest remainder, ties to the
      lowest reader), so every reader drops about the same fraction, and ``quota <= count``.
    - ``"repeat"``: every reader delivers all its samples, its last batch completed by repeats,
      and ranks below the richest one add whole batches of repeats, apportioned in proportion
      to the readers' counts (so no sample is repeated much more than others). Readers with 0
      samples get quota 0 and are never asked to repeat.

    Args:
        counts: Known sample count of each reader ``r = rank * max(num_workers, 1) + worker``.
        world_size: Number of ranks.
        num_workers: DataLoader workers per rank (0 = one reader per rank).
        policy: ``"drop"`` or ``"repeat"``.
        batch_size: Samples per batch (1 = equalize samples only).

    Returns:
        The quota of every reader.

    Raises:
        ValueError: On inconsistent arguments, or with ``"repeat"`` when a rank has no samples at
            all while another has some.
    """
    per_rank = max(num_workers, 1)
    if world_size < 1 or num_workers < 0 or batch_size < 1:
        raise ValueError("need world_size >= 1, num_workers >= 0, batch_size >= 1")
    if len(counts) != world_size * per_rank:
        raise ValueError(f"{len(counts)} counts for {world_size} x {per_rank} readers")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    if policy not in ("drop", "repeat"):
        raise ValueError(f"policy must be 'drop' or 'repeat', got {policy!r}")
    ranks = [list(counts[k * per_rank : (k + 1) * per_rank]) for k in range(world_size)]
    quotas: list[int] = []
    if policy == "drop":
        full = [[c // batch_size for c in rank] for rank in ranks]
        target = min(sum(f) for f in full)
        for f in full:
            quotas.extend(q * batch_size for q in _apportion(f, target))
    else:
        base = [[-(-c // batch_size) for c in rank] for rank in ranks]
        target = max(sum(b) for b in base)
        for k, (rank, b) in enumerate(zip(ranks, base, strict=True)):
            deficit = target - sum(b)
            if deficit and not any(rank):
                raise ValueError(
                    f"rank {k} has no samples to repeat while others have {target * batch_size}:"
                    " use policy='drop' or fewer readers"
                )
            extra = _apportion(rank, deficit) if deficit else [0] * len(rank)
            quotas.extend((x + e) * batch_size for x, e in zip(b, extra, strict=True))
    return quotas


def _apportion(weights: Sequence[int], total: int) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, ties to the lowest index).

    With ``total <= sum(weights)`` every share is ``<= `` its weight. Needs ``sum(weights) > 0``
    unless ``total == 0``.
    """
    whole = sum(weights)
    if total == 0:
        return [0] * len(weights)
    shares = [total * w // whole for w in weights]
    rest = total - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[:rest]:
        shares[i] += 1
    return shares
