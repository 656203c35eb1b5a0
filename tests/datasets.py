"""Tiny WebDataset shards built in memory for tests (stdlib tarfile, deterministic bytes)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence


def sample_key(shard: int, index: int) -> str:
    return f"s{shard:04d}-{index:05d}"


def make_shard(shard: int, num_samples: int, payload: int = 100, compress: bool = False) -> bytes:
    """A tar shard of ``num_samples`` samples with fields ``txt``, ``cls`` and ``bin``.

    ``bin`` holds ``payload`` deterministic bytes so sizes are controllable.
    """
    buffer = io.BytesIO()
    mode = "w:gz" if compress else "w"
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.USTAR_FORMAT) as tar:
        for index in range(num_samples):
            key = sample_key(shard, index)
            fields = {
                "txt": f"sample {key}".encode(),
                "cls": str(index % 7).encode(),
                "json": json.dumps({"shard": shard, "index": index}).encode(),
                "bin": bytes((shard * 31 + index + i) % 251 for i in range(payload)),
            }
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_dataset(put, counts: Sequence[int], *, prefix: str = "", payload: int = 100) -> list[str]:
    """Write shards with ``counts[i]`` samples each via ``put(relpath, data)``; return relpaths."""
    names = []
    for shard, count in enumerate(counts):
        name = f"{prefix}shard-{shard:06d}.tar"
        put(name, make_shard(shard, count, payload))
        names.append(name)
    return names


def write_indexed(root, counts, claimed=None):
    """Shards of ``counts`` samples and an index.wds that says ``claimed`` (default: the truth)."""
    entries = []
    for shard, n in enumerate(counts):
        data = make_shard(shard, n)
        (root / f"shard-{shard:06d}.tar").write_bytes(data)
        entries.append(
            {
                "path": f"shard-{shard:06d}.tar",
                "size": len(data),
                "num_samples": (claimed or counts)[shard],
                "md5": hashlib.md5(data).hexdigest(),
            }
        )
    (root / "index.wds").write_text(
        json.dumps({"format": "wdsfs-index", "version": 1, "shards": entries})
    )
