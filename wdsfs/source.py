"""Source: which shards make a dataset.

``remote`` may be an fsspec URL of a prefix (``s3://bucket/ds``), a plain local path, one shard
URL, a brace pattern (``s3://b/ds/shard-{000000..000099}.tar``) or a list of any of those.
A prefix is resolved from its ``index.wds`` when there is one (no listing needed, sample counts
known), else by listing it recursively for tar shards, sorted by URL so every process sees the
same order. A :class:`Source` pickles as its recipe and makes its filesystem lazily, so it can
travel to DataLoader workers (fork or spawn).
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any

import fsspec.asyn
from braceexpand import braceexpand
from fsspec.spec import AbstractFileSystem

from wdsfs._fs import checked_url, full_url, is_local, translate_error, url_to_fs
from wdsfs.checksum import Checksum, best
from wdsfs.errors import NoShardsError, ShardNotFoundError
from wdsfs.shard import Shard

__all__ = ["Source", "count_shards", "is_shard_name", "list_shards", "shard_from_info"]

logger = logging.getLogger(__name__)

_HTTP_HINT = (
    "no shards found: this HTTP server gives no directory index to list; put an index.wds "
    "beside the shards (`wdsfs index`), or pass a brace pattern or a list of shard URLs"
)


def _tar_suffixes() -> tuple[str, ...]:
    from wdsfs.tar import TAR_SUFFIXES

    return tuple(TAR_SUFFIXES)


def is_shard_name(path: str) -> bool:
    """Whether ``path`` names a tar shard (by suffix: .tar, .tar.gz, .tgz, ...)."""
    return path.lower().endswith(_tar_suffixes())


class Source:
    """The shards of a dataset and the filesystem that holds them.

    Args:
        remote: Prefix URL, local path, shard URL, brace pattern, or a list of those.
        split: Optional sub-prefix (``"train"``) appended to a prefix ``remote``.
        storage_options: Passed to fsspec (``{"anon": True}``, ``{"endpoint_url": ...}``...).
        profile: AWS profile name for ``s3://`` (streaming-wds' ``profile=``); same as
            ``storage_options={"profile": ...}``.
        use_index: Read ``index.wds`` when present (``False``: always list, as ``wdsfs index``
            does to build one).

    Raises:
        ValueError: ``remote`` is empty or names no bucket (``s3://``), a URL misses a slash
            (``s3:/bucket``), or ``split`` is given with a list or pattern.
    """

    def __init__(
        self,
        remote: str | Sequence[str],
        *,
        split: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        profile: str | None = None,
        use_index: bool = True,
    ) -> None:
        remotes = [remote] if isinstance(remote, str) else list(remote)
        if not remotes or any(not isinstance(r, str) or not r.strip() for r in remotes):
            raise ValueError(f"remote must be a non-empty URL, path or list of them: {remote!r}")
        options = dict(storage_options or {})
        if profile is not None:
            options["profile"] = profile
        self.remotes = [checked_url(r.strip()) for r in remotes]
        self.is_list = not isinstance(remote, str)
        self.use_index = use_index
        self.split = split.strip("/") if split else None
        self.storage_options = options
        self._shards: list[Shard] | None = None
        self._fs: AbstractFileSystem | None = None

    def __repr__(self) -> str:
        remote = self.remotes[0] if len(self.remotes) == 1 else self.remotes
        return f"Source({remote!r}, split={self.split!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Travel as a recipe: never ship a live filesystem (event loops, sockets) to a worker.
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    @property
    def url(self) -> str:
        """The dataset location as given (with the split), for messages."""
        if len(self.remotes) == 1 and self.split:
            return f"{self.remotes[0].rstrip('/')}/{self.split}"
        return (
            self.remotes[0]
            if len(self.remotes) == 1
            else f"{self.remotes[0]} (+{len(self.remotes) - 1})"
        )

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem of the dataset, made on first use in this process."""
        if self._fs is None:
            self._fs, _ = url_to_fs(self.remotes[0], self.storage_options)
        return self._fs

    def shards(self) -> list[Shard]:
        """The dataset's shards in their deterministic order (listed once, then remembered).

        Raises:
            NoShardsError: The location holds no tar shards.
            ShardNotFoundError: The bucket, prefix or a listed shard does not exist.
            StorageAccessError: Access was denied.
        """
        if self._shards is None:
            self._shards = self._resolve()
            logger.info("%s: %d shards", self.url, len(self._shards))
        return list(self._shards)

    def _resolve(self) -> list[Shard]:
        is_list = self.is_list
        if self.split and (is_list or "{" in self.remotes[0]):
            raise ValueError("split= applies to a prefix remote, not to a list or brace pattern")
        shards: list[Shard] = []
        for remote in self.remotes:
            expanded = list(braceexpand(remote)) if "{" in remote else [remote]
            if len(expanded) > 1 or is_list or is_shard_name(remote):
                shards.extend(self._explicit(url) for url in expanded)
            else:
                shards.extend(self._resolve_prefix(remote))
        if not shards:
            raise NoShardsError(f"{self.url}: no tar shards found", url=self.url)
        return shards

    def _explicit(self, url: str) -> Shard:
        if not is_shard_name(url):
            raise ValueError(f"{url}: not a tar shard name (expected one of {_tar_suffixes()})")
        url_to_fs(url, self.storage_options)  # a clear error now for an unknown protocol
        return Shard(url=url)

    def _resolve_prefix(self, remote: str) -> list[Shard]:
        """index.wds of the split, else the split's part of the dataset's index, else a listing."""
        base = remote.rstrip("/")
        prefix = f"{base}/{self.split}" if self.split else base
        if self.use_index:
            indexed = self._read_index(prefix)
            if indexed is None and self.split:
                whole = self._read_index(base)
                if whole is not None:
                    indexed = [s for s in whole if s.url.startswith(prefix + "/")]
                    if not indexed:
                        raise NoShardsError(
                            f"{base}/index.wds lists no shard under {self.split}/", url=prefix
                        )
            if indexed is not None:
                return indexed
        return self._list_prefix(prefix)

    def _read_index(self, prefix: str) -> list[Shard] | None:
        """The shards listed by ``prefix/index.wds``, or None when there is none."""
        from wdsfs.index import INDEX_NAME, parse_index

        fs, path = url_to_fs(prefix, self.storage_options)
        index_url = f"{prefix}/{INDEX_NAME}"
        try:
            data = fs.cat_file(f"{path.rstrip('/')}/{INDEX_NAME}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            # fsspec's sync() keeps the exception in a cycle with its frame, and so with every
            # caller's frame and what they hold (a dataset's iterator, and with it its threads)
            # until the garbage collector runs: cut it here
            exc.__traceback__ = None
            return None
        except Exception as exc:  # translated, never swallowed
            raise translate_error(exc, prefix, f"looking for {INDEX_NAME}") from exc
        logger.info("%s: using %s", prefix, index_url)
        shards: list[Shard] = parse_index(data, base_url=prefix)
        return shards

    def _list_prefix(self, prefix: str) -> list[Shard]:
        fs, path = url_to_fs(prefix, self.storage_options)
        base = prefix.rstrip("/")  # URLs keep the spelling the user gave
        is_http = _protocol_of(fs) in {"http", "https"}
        try:
            found = fs.find(path, detail=True)
        except Exception as exc:
            if is_http and not isinstance(exc, FileNotFoundError):
                raise NoShardsError(f"{prefix}: {_HTTP_HINT} ({exc})", url=prefix) from exc
            raise translate_error(exc, prefix, "listing") from exc
        if not found:
            self._check_location(fs, path, prefix)
            if is_http:
                raise NoShardsError(f"{prefix}: {_HTTP_HINT}", url=prefix)
        infos = sorted(
            (
                info
                for name, info in found.items()
                if is_shard_name(name) and info.get("type") != "directory"
            ),
            key=lambda info: str(info["name"]),
        )
        root = path.rstrip("/")
        return [
            replace(shard, url=base + str(info["name"])[len(root) :])
            if str(info["name"]).startswith(root + "/")
            else shard
            for info in infos
            for shard in (shard_from_info(fs, info),)
        ]

    @staticmethod
    def _check_location(fs: AbstractFileSystem, path: str, prefix: str) -> None:
        """Tell a missing bucket or prefix from an empty one (find() returns [] for both)."""
        if is_local(fs) or _protocol_of(fs) == "memory":
            checks = [(path, "directory")]
        else:
            checks = [(path, "prefix")]
            if "://" not in path and "/" in path.strip("/"):
                checks.insert(0, (path.strip("/").split("/", 1)[0], "bucket/container"))
        for candidate, what in checks:
            try:
                exists = fs.exists(candidate)
            except Exception as exc:
                raise translate_error(exc, prefix, "checking the location") from exc
            if not exists:
                raise ShardNotFoundError(
                    f"{prefix}: {what} {candidate!r} does not exist", url=prefix
                )


def shard_from_info(fs: AbstractFileSystem, info: Mapping[str, Any]) -> Shard:
    """A :class:`Shard` from an fsspec ``info()``/``find(detail=True)`` entry.

    The version is the most specific identity the backend gives (S3 VersionId or ETag, GCS
    generation, Azure etag, else size and modification time); the checksum is the cheapest one
    that applies to the whole object (GCS crc32c, else GCS/Azure MD5 or an S3 single-part ETag).
    """
    name = str(info["name"])
    size = info.get("size")
    size = int(size) if size is not None else None
    etag = info.get("ETag") or info.get("etag")
    etag = str(etag).strip('"') if etag else None
    md5_b64 = info.get("md5Hash")
    content_md5 = (
        (info.get("content_settings") or {}).get("content_md5")
        if isinstance(info.get("content_settings"), Mapping)
        else None
    )
    candidates = [_checksum_b64("crc32c", info.get("crc32c"))]  # GCS
    if md5_b64:
        candidates.append(_checksum_b64("md5", md5_b64))
    elif content_md5:
        candidates.append(Checksum.from_bytes("md5", bytes(content_md5)))
    elif (
        etag
        and len(etag) == 32
        and "-" not in etag
        and _is_hex(etag)
        and _protocol_of(fs) in {"s3", "s3a"}
    ):
        candidates.append(Checksum("md5", etag.lower()))
    chosen = best(candidates)
    checksum = str(chosen) if chosen else None
    version = (
        info.get("VersionId")
        or info.get("generation")
        or etag
        or info.get("mtime")
        or info.get("LastModified")
        or info.get("Last-Modified")
        or info.get("last_modified")
        or info.get("created")
    )
    if isinstance(
        version, datetime.datetime
    ):  # memory:// gives floats in find(), datetimes in info()
        version = version.timestamp()
    version_text = (
        f"{size}-{version}" if version is not None else (str(size) if size is not None else None)
    )
    return Shard(url=full_url(fs, name), size=size, version=version_text, checksum=checksum)


def s3_store_checksum(
    fs: AbstractFileSystem,
    path: str,
    shard: Shard,
    run: Callable[[Coroutine[Any, Any, Any]], Any] | None = None,
) -> Checksum | None:
    """The CRC32C or CRC32 S3 keeps for the whole object (``HEAD`` with ``ChecksumMode``).

    S3 and the SDKs' default uploads store one (``fs.info`` does not show it). None for other
    stores, composite (per-part) checksums, or when the object is no longer the listed
    version (the download's own checks then report the change). ``run`` runs the request's
    coroutine (default: fsspec's blocking ``sync`` on the filesystem's loop).
    """
    if _protocol_of(fs) not in {"s3", "s3a"} or not hasattr(fs, "_call_s3"):
        return None
    bucket, key, version_id = fs.split_path(path)
    request = fs._call_s3(
        "head_object",
        Bucket=bucket,
        Key=key,
        ChecksumMode="ENABLED",
        **({"VersionId": version_id} if version_id else {}),
    )
    head = run(request) if run is not None else fsspec.asyn.sync(fs.loop, lambda: request)
    return checksum_of_head(head, shard)


def checksum_of_head(head: Mapping[str, Any], shard: Shard) -> Checksum | None:
    """The whole-object CRC32C or CRC32 in a ``HeadObject`` answer (botocore's field names),
    if the answer is of the shard's listed version."""
    identities = {head.get("VersionId"), str(head.get("ETag", "")).strip('"')}
    if shard.version not in {f"{head.get('ContentLength')}-{i}" for i in identities if i}:
        return None
    if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    return best(
        [
            _checksum_b64("crc32c", head.get("ChecksumCRC32C")),
            _checksum_b64("crc32", head.get("ChecksumCRC32")),
        ]
    )


def _checksum_b64(algorithm: str, value: object) -> Checksum | None:
    """A checksum sent base64-encoded (S3, GCS); None if absent or composite (``...-3``)."""
    if not isinstance(value, str) or not value or "-" in value:
        return None
    try:
        return Checksum.from_bytes(algorithm, base64.b64decode(value, validate=True))
    except ValueError:
        return None


def _protocol_of(fs: AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def list_shards(
    remote: str | Sequence[str],
    *,
    split: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    profile: str | None = None,
) -> list[Shard]:
    """The shards of a dataset, in order. See :class:`Source` for the arguments."""
    return Source(remote, split=split, storage_options=storage_options, profile=profile).shards()


def count_shards(
    remote: str | Sequence[str],
    storage_options: Mapping[str, Any] | Any = None,
    *,
    split: str | None = None,
    profile: str | None = None,
) -> int:
    """The number of shards of a dataset (streaming-wds' ``count_shards``).

    Args:
        remote: As for :class:`Source`.
        storage_options: fsspec options, or a boto3 ``Session`` (streaming-wds' second
            argument), whose credentials and region are used for ``s3://``.
        split: As for :class:`Source`.
        profile: As for :class:`Source`.

    Raises:
        NoShardsError: The location holds no tar shards.
        ShardNotFoundError: The bucket or prefix does not exist.
        TypeError: ``storage_options`` is neither a mapping nor a boto3 Session.
    """
    if storage_options is not None and not isinstance(storage_options, Mapping):
        if not hasattr(storage_options, "get_credentials"):
            raise TypeError(
                "storage_options must be a mapping of fsspec options or a boto3 Session, "
                f"not {type(storage_options).__name__}"
            )
        storage_options = session_storage_options(storage_options)
    return len(list_shards(remote, split=split, storage_options=storage_options, profile=profile))


def session_storage_options(session: Any) -> dict[str, Any]:
    """storage_options for s3fs from a boto3 Session (streaming-wds' ``session=``)."""
    options: dict[str, Any] = {}
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        options.update(key=frozen.access_key, secret=frozen.secret_key)
        if frozen.token:
            options["token"] = frozen.token
    if session.region_name:
        options["client_kwargs"] = {"region_name": session.region_name}
    return options
