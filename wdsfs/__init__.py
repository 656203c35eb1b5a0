"""wdsfs: stream WebDataset shards from any fsspec storage into PyTorch.

``import wdsfs`` does not import torch: the torch-based names (``StreamingWebDataset``,
``StreamingDataLoader``, ``gather_state_dict``) load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wdsfs.cache import ShardCache
from wdsfs.compat import ShardDownloader
from wdsfs.decode import Decoder
from wdsfs.download import FetchedShard, Fetcher, TransferCallback
from wdsfs.errors import (
    CacheError,
    CorruptShardError,
    DownloadCancelled,
    DownloadError,
    IndexFormatError,
    IntegrityError,
    NoShardsError,
    ShardNotFoundError,
    StateMismatchError,
    StorageAccessError,
    StorageConfigError,
    WdsfsError,
)
from wdsfs.indexer import build_index, write_index
from wdsfs.shard import Shard
from wdsfs.source import Source, count_shards, list_shards
from wdsfs.tar import read_samples

if TYPE_CHECKING:
    from wdsfs.dataset import StreamingWebDataset
    from wdsfs.loader import StreamingDataLoader, gather_state_dict

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CorruptShardError",
    "Decoder",
    "DownloadCancelled",
    "DownloadError",
    "FetchedShard",
    "Fetcher",
    "IndexFormatError",
    "IntegrityError",
    "NoShardsError",
    "Shard",
    "ShardCache",
    "ShardDownloader",
    "ShardNotFoundError",
    "Source",
    "StateMismatchError",
    "StorageAccessError",
    "StorageConfigError",
    "StreamingDataLoader",
    "StreamingWebDataset",
    "TransferCallback",
    "WdsfsError",
    "build_index",
    "count_shards",
    "gather_state_dict",
    "list_shards",
    "read_samples",
    "write_index",
]

_TORCH_NAMES = {
    "StreamingWebDataset": "wdsfs.dataset",
    "StreamingDataLoader": "wdsfs.loader",
    "gather_state_dict": "wdsfs.loader",
}


def __getattr__(name: str) -> Any:
    module_name = _TORCH_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'wdsfs' has no attribute {name!r}")
    try:
        import importlib

        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == "torch" or "torch" in str(exc):
            raise ImportError(f"wdsfs.{name} needs torch: pip install wdsfs[torch]") from exc
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
