"""fsspec helpers shared by the source lister and the fetcher (not public API).

Filesystems are made lazily in the process that uses them, from the recipe (URL +
storage_options): fsspec caches instances per process and drops its cache after a fork, so a
forked DataLoader worker never touches its parent's async event loop (see
:func:`_forget_parent_sessions` for the finalizers it would otherwise run).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import weakref
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.registry import known_implementations
from fsspec.spec import AbstractFileSystem

from wdsfs._botocore import share_service_models
from wdsfs.errors import (
    DownloadError,
    ShardNotFoundError,
    StorageAccessError,
    StorageConfigError,
    WdsfsError,
)

_EXTRAS = {
    "s3": "s3fs: pip install wdsfs[s3]",
    "s3a": "s3fs: pip install wdsfs[s3]",
    "gs": "gcsfs: pip install wdsfs[gcs]",
    "gcs": "gcsfs: pip install wdsfs[gcs]",
    "az": "adlfs: pip install wdsfs[azure]",
    "abfs": "adlfs: pip install wdsfs[azure]",
    "abfss": "adlfs: pip install wdsfs[azure]",
    "http": "aiohttp: pip install wdsfs[http]",
    "https": "aiohttp: pip install wdsfs[http]",
}

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_ONE_SLASH = re.compile(r"^([a-z][a-z0-9+.-]+):/([^/].*)$", re.DOTALL)
_ROOTS_ALLOWED = {"file", "local", "memory"}  # a whole local or in-memory tree can be a dataset


def checked_url(url: str) -> str:
    """``url`` with its scheme in lowercase (schemes are case-insensitive, fsspec's are not).

    Raises:
        ValueError: The URL names a storage but no bucket or path in it (``s3://``), or it
            misses a slash after a known protocol (``s3:/bucket``: a local path otherwise).
    """
    match = _SCHEME.match(url)
    if match is not None:
        scheme, rest = match.group(1).lower(), match.group(2)
        if not rest.strip("/") and scheme not in _ROOTS_ALLOWED:
            raise ValueError(f"{url!r}: no bucket or path after {scheme}://")
        return f"{scheme}://{rest}"
    typo = _ONE_SLASH.match(url)
    if typo is not None and typo.group(1) in known_implementations and not os.path.exists(url):
        raise ValueError(
            f"{url!r} is a local path: did you mean {typo.group(1)}://{typo.group(2)}?"
        )
    return url


def url_to_fs(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for ``url``.

    Raises:
        ImportError: The backend package for the URL's protocol is not installed, with the
            ``pip install`` line that fixes it.
        ValueError: The protocol is unknown to fsspec.
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        hint = _EXTRAS.get(protocol, f"the fsspec backend for {protocol}://")
        raise ImportError(f"reading {protocol}:// needs {hint}") from exc
    except TypeError as exc:  # an unknown storage option
        raise TypeError(f"{url}: bad storage_options for {protocol}://: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from exc
    if protocol in {"s3", "s3a"}:
        share_service_models(fs)
    return fs, path


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL (with protocol) of ``path`` in ``fs``."""
    if "://" in path:
        return path
    url: str = fs.unstrip_protocol(path)
    return url


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local disk, where shards are read in place instead of cached."""
    return "file" in _protocols(fs)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: SlowDown / throttling
    errno.EREMOTEIO,  # s3fs: HTTP 500
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
}


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The connection error behind ``exc``, if any.

    fsspec's HTTP filesystem reports a refused or failed connection during ``info`` as
    ``FileNotFoundError`` raised from the aiohttp error: that is no missing object.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionError | TimeoutError) or type(cause).__name__ in {
            "ClientConnectorError",
            "ClientOSError",
            "ServerDisconnectedError",
            "ServerTimeoutError",
        }:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def describe(exc: BaseException) -> str:
    """``exc`` for a log line; for fsspec http's FileNotFoundError, the connection error behind it
    (its own text is just the URL)."""
    connection = _connection_failure(exc) if isinstance(exc, FileNotFoundError) else None
    if connection is not None:
        return f"{type(connection).__name__}: {connection}"
    return str(exc) or repr(exc)


# botocore's errors for a profile or config file that does not exist or cannot be read
_CONFIG_ERRORS = frozenset({"ProfileNotFound", "ConfigNotFound", "ConfigParseError"})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may succeed (throttling, resets, timeouts, 5xx, short reads)."""
    if isinstance(exc, FileNotFoundError) and _connection_failure(exc) is not None:
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | WdsfsError):
        return False
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionError):
        return True
    status = _http_status(exc)
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS or exc.errno is None
    name = type(exc).__module__ + "." + type(exc).__name__
    # aiohttp client errors, botocore/aiobotocore connection and read errors, fsspec FileExpired
    return any(
        part in name
        for part in (
            "aiohttp.",
            "botocore.exceptions",
            "ClientPayloadError",
            "IncompleteRead",
            "ProtocolError",
            "FileExpired",
        )
    )


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of an aiohttp response error (fsspec http raises those), else None."""
    status = getattr(exc, "status", None)
    return (
        status if isinstance(status, int) and type(exc).__module__.startswith("aiohttp") else None
    )


def translate_error(exc: BaseException, url: str, doing: str) -> WdsfsError:
    """Turn a backend exception into the wdsfs error a user can act on, naming ``url``."""
    if isinstance(exc, WdsfsError):
        return exc
    detail = str(exc) or type(exc).__name__
    connection = _connection_failure(exc) if isinstance(exc, FileNotFoundError) else None
    if connection is not None:
        return DownloadError(f"{url}: cannot connect while {doing} ({connection})", url=url)
    if isinstance(exc, TypeError) or type(exc).__name__ in _CONFIG_ERRORS:
        # s3fs/gcsfs build their client on first use: bad options surface only then
        return StorageConfigError(
            f"{url}: the storage rejected its configuration while {doing}; check "
            f"storage_options/profile ({detail})",
            url=url,
        )
    if isinstance(exc, FileNotFoundError):
        return ShardNotFoundError(f"{url}: not found while {doing} ({detail})", url=url)
    name = type(exc).__name__
    if (
        _http_status(exc) in (401, 403)
        or isinstance(exc, PermissionError)
        or name
        in {
            "NoCredentialsError",
            "PartialCredentialsError",
            "ClientError",
            "InvalidAccessKeyId",
        }
    ):
        return StorageAccessError(
            f"{url}: access denied while {doing}; check credentials/storage_options ({detail})",
            url=url,
        )
    return DownloadError(f"{url}: {doing} failed: {detail}", url=url)


def parse_size(value: int | str) -> int:
    """Bytes in ``value``: an int, or a string such as ``"500MB"``, ``"10GB"``, ``"2GiB"``."""
    if isinstance(value, bool):
        raise TypeError(f"size must be an int or a string like '10GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"size must be an int or a string like '10GB', got {value!r}")
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("BKMGTI")
    unit = text[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"cannot read a size from {value!r}; use e.g. '500MB' or '10GB'") from None
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit in {value!r}; use B, KB, MB, GB, TB or KiB..TiB")
    size = int(amount * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def _forget_parent_sessions() -> None:
    """In a forked child: drop the finalizers of the parent's fsspec sessions, unrun.

    s3fs, gcsfs, adlfs and fsspec's HTTP filesystem register a ``weakref.finalize`` per instance
    that closes its session on the parent's event loop. That loop does not run in a child, and
    each finalizer waits for it (~1 s measured with s3fs) when the child collects the parent's
    instances: a DataLoader worker of a second epoch lost ~1 s before its first sample, for
    the filesystems its parent had used (the listing's, the head start's...). And closing a
    session's connections in a child would unregister their sockets from the epoll instance it
    shares with the parent.

    The child never uses those sessions; they are kept referenced (aiohttp would complain about
    each unclosed one it collects) and their sockets' copies close when the child exits.
    """
    registry = getattr(weakref.finalize, "_registry", None)  # CPython's, stable since 3.4
    if not isinstance(registry, dict):
        return
    for finalizer, info in list(registry.items()):
        if any(isinstance(arg, asyncio.AbstractEventLoop) for arg in getattr(info, "args", ())):
            _PARENT_SESSIONS.append(finalizer.detach())


_PARENT_SESSIONS: list[object] = []  # in a forked child: what the parent's finalizers held


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_parent_sessions)
