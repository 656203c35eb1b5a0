"""Loaders of test datasets whose batches are sample keys, and running their epochs."""

from __future__ import annotations

from pathlib import Path

from tests.datasets import sample_key, write_dataset
from wdsfs import StreamingDataLoader, StreamingWebDataset


def keys_collate(samples):
    """A custom collate_fn: the batch is the list of keys."""
    return [s["__key__"] for s in samples]


def key_of(sample):
    """A collate_fn for ``batch_size=None``: the sample's key."""
    return sample["__key__"]


def make_loader(
    root, cache, *, num_workers, batch_size, shuffle=True, seed=7, buffer_size=5, pack_size=32
):
    """Batches of keys; with ``batch_size=None``, keys one by one (workers send packs)."""
    ds = StreamingWebDataset(
        str(root), shuffle=shuffle, seed=seed, buffer_size=buffer_size, cache_dir=str(cache)
    )
    return StreamingDataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        pack_size=pack_size,
        collate_fn=keys_collate if batch_size is not None else key_of,
    )


def run_epoch(loader, stop_after=None):
    batches = []
    if stop_after == 0:
        return batches
    iterator = iter(loader)
    for batch in iterator:
        batches.append(batch)
        if stop_after is not None and len(batches) == stop_after:
            break
    return batches


def flat(batches):
    return [key for batch in batches for key in batch]


def write(root: Path, counts):
    root.mkdir(parents=True, exist_ok=True)
    write_dataset(lambda name, data: (root / name).write_bytes(data), counts)
    return {sample_key(s, i) for s, n in enumerate(counts) for i in range(n)}


def make_sample_loader(root, cache, *, num_workers, pack_size, shuffle=True):
    return make_loader(
        root, cache, num_workers=num_workers, batch_size=None, pack_size=pack_size, shuffle=shuffle
    )
