"""StreamingDataLoader's ``state_dict``: its format, validation, and every rank's merged into one
(re-exported by :mod:`wdsfs.loader`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wdsfs.errors import StateMismatchError

if TYPE_CHECKING:
    from wdsfs.dataset import StreamingWebDataset
    from wdsfs.loader import StreamingDataLoader

FORMAT = "wdsfs-loader-state"
VERSION = 1


def dataset_fingerprint(dataset: StreamingWebDataset) -> str:
    """A digest of the shard list (URLs and sizes): a state only loads onto the same data."""
    digest = hashlib.sha256()
    for shard in dataset.shards():
        digest.update(f"{shard.url}\0{shard.size}\n".encode())
    return digest.hexdigest()[:32]


def validated(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    try:
        sd: dict[str, Any] = json.loads(json.dumps(dict(state_dict)))
        if sd.get("format") != FORMAT:
            raise StateMismatchError(
                f"not a StreamingDataLoader state_dict (format={sd.get('format')!r})"
            )
        if sd.get("version") != VERSION:
            raise StateMismatchError(f"unsupported state_dict version {sd.get('version')!r}")
        missing = [
            key
            for key in ("fingerprint", "epoch", "finished", "config", "ranks", "readers", "items")
            if key not in sd
        ]
        if missing:
            raise StateMismatchError(f"malformed state_dict: missing {missing}")
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, StateMismatchError):
            raise
        raise StateMismatchError(f"malformed state_dict: {exc}") from exc
    return sd


def merge_state_dicts(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state_dict from every rank's (what :func:`gather_state_dict` returns).

    Raises:
        StateMismatchError: The states are of different datasets, epochs or configurations.
    """
    if not state_dicts:
        raise ValueError("no state_dicts to merge")
    merged = validated(state_dicts[0])
    for other in map(validated, state_dicts[1:]):
        for key in ("fingerprint", "epoch", "config"):
            if other[key] != merged[key]:
                raise StateMismatchError(f"cannot merge state_dicts with different {key}")
        merged["finished"] = merged["finished"] and other["finished"]
        merged["ranks"].update(other["ranks"])
        merged["readers"].update(other["readers"])
        merged["items"].update(other["items"])
    return merged


def gather_state_dict(loader: StreamingDataLoader) -> dict[str, Any]:
    """Every rank's loader state merged into one (a collective: call it on every rank).

    Save the result once (rank 0); load it on every rank of the resumed job, whatever its world
    size: ``loader.load_state_dict(state)``.
    """
    import torch.distributed as dist

    own = loader.state_dict()
    if not (dist.is_available() and dist.is_initialized()):
        return own
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return merge_state_dicts(gathered)
