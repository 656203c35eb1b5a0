"""Every exception wdsfs raises.

The hierarchy::

    WdsfsError
     ├── ShardNotFoundError (also FileNotFoundError)   no such object, bucket or prefix
     ├── NoShardsError (also FileNotFoundError)        a dataset location with no shards in it
     ├── StorageAccessError (also PermissionError)     credentials missing, wrong or denied
     ├── StorageConfigError (also ValueError)          options or profile the backend rejects
     ├── DownloadError (also OSError)                  a transfer failed after its retries
     │    └── IntegrityError                           wrong size or checksum, never served
     ├── CacheError (also OSError)                     the local cache cannot hold a shard
     ├── CorruptShardError (also ValueError)           a tar that cannot be read
     ├── IndexFormatError (also ValueError)            an index.wds that cannot be read
     ├── StateMismatchError (also ValueError)          a state_dict from another dataset or plan
     └── DownloadCancelled                             the stop event was set during a transfer

Every exception is built from one message and keyword-only context (``url=`` ...), so it
round-trips through pickle and through DataLoader's ``type(exc)(message)`` re-raise.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CacheError",
    "CorruptShardError",
    "DownloadCancelled",
    "DownloadError",
    "IndexFormatError",
    "IntegrityError",
    "NoShardsError",
    "ShardNotFoundError",
    "StateMismatchError",
    "StorageAccessError",
    "StorageConfigError",
    "WdsfsError",
]


class WdsfsError(Exception):
    """Base class of every wdsfs error.

    Args:
        message: What went wrong, naming the URL (and member/offset for tar errors).
        url: The shard or dataset URL concerned, when known.
    """

    def __init__(self, message: str = "", *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.__dict__.copy()))


def _rebuild(cls: type[WdsfsError], message: str, attrs: dict[str, Any]) -> WdsfsError:
    exc = cls(message)
    exc.__dict__.update(attrs)
    return exc


class ShardNotFoundError(WdsfsError, FileNotFoundError):
    """The object, bucket or prefix does not exist."""


class NoShardsError(WdsfsError, FileNotFoundError):
    """The dataset location exists (or may) but holds no tar shards."""


class StorageAccessError(WdsfsError, PermissionError):
    """The storage refused access: missing, wrong or insufficient credentials."""


class StorageConfigError(WdsfsError, ValueError):
    """The storage backend rejected its configuration: an unknown option, a missing profile."""


class DownloadError(WdsfsError, OSError):
    """A transfer failed for good (after retries where the failure was transient)."""


class IntegrityError(DownloadError):
    """Downloaded bytes do not match the expected size or checksum."""


class CacheError(WdsfsError, OSError):
    """The local shard cache cannot store or serve a shard (too large, disk full...)."""


class CorruptShardError(WdsfsError, ValueError):
    """A shard is not a readable tar, is truncated, or breaks WebDataset grouping rules."""


class IndexFormatError(WdsfsError, ValueError):
    """An ``index.wds`` file is malformed or of an unsupported version."""


class StateMismatchError(WdsfsError, ValueError):
    """A loader state_dict does not belong to this dataset or plan."""


class DownloadCancelled(WdsfsError):
    """A transfer was stopped because its stop event was set."""
