"""Who is reading: rank and world size, DataLoader worker and worker count (not public API)."""

from __future__ import annotations

import os


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` from torch.distributed when initialised, else RANK/WORLD_SIZE.

    The environment variables are the ones torchrun sets; without either, ``(0, 1)``.

    Raises:
        ValueError: RANK/WORLD_SIZE are set but inconsistent.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        dist = None  # type: ignore[assignment]
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent RANK={rank} WORLD_SIZE={world_size} in the environment")
    return rank, world_size


def worker_and_count() -> tuple[int, int]:
    """``(worker id, num_workers)`` inside a DataLoader worker, else ``(0, 1)``."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:
        return 0, 1
    info = get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)
