"""S3 objects read over plain HTTP: presigned GET URLs from s3fs's own client (not public API).

s3fs's ``get_object`` streams a body through aiobotocore and aiohttp at ~0.7 CPU-s/GB. The same
request as a presigned URL (signed by the filesystem's own botocore client: its credentials,
region, endpoint and addressing style, the version when the path has one) read by
:class:`~wdsfs._http_get.RangeGetter` costs ~0.3. The ``HeadObject`` that asks for a shard's
stored CRC (``x-amz-checksum-mode``, a signed header) is presigned too: ~0.2 ms of CPU instead
of ~2 ms, per shard. Listings and everything else still go through s3fs.

Used only where the presigned request is exactly what s3fs would send: not with
``requester_pays``, ``s3_additional_kwargs`` (SSE-C keys, ...), proxies (botocore ``Config`` or
``HTTP(S)_PROXY``), client certificates or client options other than the endpoint, region,
TLS verification and keys. ``WDSFS_S3_TRANSPORT=fsspec`` in the environment turns it off. A
presigned GET or HEAD the storage refuses (a bucket in another region, a server without
presigned URLs) is sent again through s3fs, and so is every later one of that filesystem.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import ssl
import threading
import urllib.request
import weakref
from dataclasses import dataclass
from typing import Any, cast

from fsspec.spec import AbstractFileSystem

from wdsfs._botocore import share_service_models
from wdsfs._http_get import RangeGetter
from wdsfs._ranged import Cancellable, call

__all__ = ["TRANSPORT_VARIABLE", "S3Gets", "refused", "s3_gets"]

TRANSPORT_VARIABLE = "WDSFS_S3_TRANSPORT"
_EXPIRES_SECONDS = 3600
_HEAD_FIELDS = {  # botocore's name of a HeadObject field -> its response header
    "ETag": "ETag",
    "VersionId": "x-amz-version-id",
    "ChecksumCRC32C": "x-amz-checksum-crc32c",
    "ChecksumCRC32": "x-amz-checksum-crc32",
    "ChecksumType": "x-amz-checksum-type",
}
_CLIENT_KWARGS = frozenset(
    {
        "endpoint_url",
        "region_name",
        "verify",
        "use_ssl",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)
_CONFIG_KWARGS_NOT_SIGNED = frozenset({"proxies", "proxies_config", "client_cert"})
_BOTOCORE_TIMEOUT = 60.0
_GETS: weakref.WeakKeyDictionary[AbstractFileSystem, S3Gets] = weakref.WeakKeyDictionary()
_REFUSED: weakref.WeakSet[AbstractFileSystem] = weakref.WeakSet()
_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # the twins' clients belong to the parent (s3fs instances are not fork-safe); fsspec
    # forgets its instances in a child too
    global _GETS, _LOCK
    _GETS, _LOCK = weakref.WeakKeyDictionary(), threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class S3Gets:
    """Presigned GETs of one s3fs filesystem's objects, and the getter that reads them.

    The signer's client (~5 ms to make) is made on fsspec's event loop from the start, while
    the first download still looks up its shard and opens the cache.
    """

    getter: RangeGetter
    signer: AbstractFileSystem  # the filesystem, or its twin that signs with SigV4
    ready: concurrent.futures.Future[Any]  # the signer's client made

    def url(self, path: str, transfer: Cancellable) -> str:
        """A GET URL for ``path`` (``bucket/key``, with ``?versionId=`` if version-aware)."""
        self.ready.result()  # raises what making the client raised
        url: str = call(self.signer, "url", path, _EXPIRES_SECONDS, transfer=transfer)
        return url

    def head(self, path: str, transfer: Cancellable) -> dict[str, Any]:
        """``HeadObject`` of ``path`` with ``ChecksumMode=ENABLED``, as a presigned ``HEAD``.

        Returns the fields botocore's ``head_object`` would (those of the object's size,
        version and checksums): a tenth of its CPU (~0.2 ms instead of ~2 ms).
        """
        self.ready.result()
        url: str = call(
            self.signer,
            "url",
            path,
            _EXPIRES_SECONDS,
            client_method="head_object",
            ChecksumMode="ENABLED",
            transfer=transfer,
        )
        # the header is signed (X-Amz-SignedHeaders=host;x-amz-checksum-mode): it must be sent
        headers = self.getter.head(url, {"x-amz-checksum-mode": "ENABLED"}, transfer)
        fields = {name: headers.get(header) for name, header in _HEAD_FIELDS.items()}
        length = headers.get("Content-Length")
        return {
            "ContentLength": int(length) if length is not None and length.isdigit() else None,
            **{name: value for name, value in fields.items() if value is not None},
        }


def s3_gets(fs: AbstractFileSystem, max_idle: int) -> S3Gets | None:
    """Presigned GETs for ``fs`` (an s3fs filesystem), or None where they do not apply.

    One per filesystem and process, kept as long as the filesystem (fsspec keeps those), so
    every fetcher of the process reuses its open connections; ``max_idle`` only grows.
    """
    if type(fs).__module__.split(".")[0] != "s3fs" or not _plain_request_suffices(fs):
        return None
    with _LOCK:
        if fs in _REFUSED:
            return None
        gets = _GETS.get(fs)
        if gets is None:
            gets = _GETS[fs] = _make(fs)
        gets.getter.max_idle = max(gets.getter.max_idle, max_idle)
        return gets


def refused(fs: AbstractFileSystem) -> None:
    """The storage refused a presigned GET of ``fs``: use s3fs for it from now on (this process)."""
    with _LOCK:
        _REFUSED.add(fs)


def _make(fs: Any) -> S3Gets:
    client_kwargs: dict[str, Any] = fs.client_kwargs
    config_kwargs: dict[str, Any] = fs.config_kwargs
    timeout = max(
        float(config_kwargs.get("connect_timeout", _BOTOCORE_TIMEOUT)),
        float(config_kwargs.get("read_timeout", _BOTOCORE_TIMEOUT)),
    )
    verify = client_kwargs.get("verify")
    getter = RangeGetter(timeout=timeout, ssl_context=functools.partial(_ssl_context, verify))
    signer: Any = _sigv4_signer(fs)
    ready = asyncio.run_coroutine_threadsafe(signer.set_session(), signer.loop)
    return S3Gets(getter, signer, ready)


def _sigv4_signer(fs: Any) -> AbstractFileSystem:
    """``fs``, or a twin of it configured for SigV4 where botocore would presign with SigV2.

    botocore presigns S3 URLs with SigV2 in the older regions unless a signature version is
    configured, and buckets created since 2020 refuse SigV2. The twin has the same options
    (credentials, endpoint, region) plus ``signature_version="s3v4"``, as its requests have.
    """
    if fs.anon or "signature_version" in fs.config_kwargs:
        return fs  # unsigned URLs, or the version the user chose
    options = dict(fs.storage_options)
    options["config_kwargs"] = {**fs.config_kwargs, "signature_version": "s3v4"}
    twin: Any = type(fs)(**options)
    if twin.session is None and fs.session is not None:
        twin.session = fs.session  # the same credentials, resolved once (a session is ~5 ms)
    share_service_models(twin)
    return cast(AbstractFileSystem, twin)


def _plain_request_suffices(fs: Any) -> bool:
    if os.environ.get(TRANSPORT_VARIABLE, "").lower() == "fsspec":
        return False
    if fs.requester_pays or fs.s3_additional_kwargs or not set(fs.client_kwargs) <= _CLIENT_KWARGS:
        return False
    if _CONFIG_KWARGS_NOT_SIGNED & set(fs.config_kwargs):
        return False
    proxies = urllib.request.getproxies()
    return not any(scheme in proxies for scheme in ("http", "https", "all"))


def _ssl_context(verify: bool | str | None) -> ssl.SSLContext:
    """TLS as botocore sets it up: ``verify``, ``AWS_CA_BUNDLE``, or botocore's CA bundle."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    from botocore.httpsession import get_cert_path

    cafile = verify if isinstance(verify, str) else os.environ.get("AWS_CA_BUNDLE")
    return ssl.create_default_context(cafile=cafile or get_cert_path(True))
