"""Small values that describe shards."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Shard"]


@dataclass(frozen=True, slots=True)
class Shard:
    """One tar shard of a dataset.

    Attributes:
        url: Full fsspec URL of the object (``s3://bucket/ds/shard-000000.tar``).
        size: Size in bytes, when known.
        version: What identifies this content of the object: an ETag, a GCS generation, or
            ``size-mtime``; part of the cache key so a replaced object is fetched again.
        checksum: ``"<algorithm>:<hex>"`` (``crc32c``, ``crc32`` or ``md5``, see
            :mod:`wdsfs.checksum`) when the storage (GCS CRC32C, S3 CRC32/CRC32C or single-part
            ETag, Azure MD5) or the index gives one that applies to the whole object.
        num_samples: Number of samples, when an index gave it.
    """

    url: str
    size: int | None = None
    version: str | None = None
    checksum: str | None = None
    num_samples: int | None = None

    @property
    def name(self) -> str:
        """The last component of the URL (``shard-000000.tar``)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]
