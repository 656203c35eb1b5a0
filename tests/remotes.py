"""``Remote``: a fresh, empty dataset location on one backend, as the tests see it.

A test that is not about a particular backend takes the parametrised ``remote`` fixture and
uses only this interface, so a new backend is a new factory here and a new param in conftest,
not new tests::

    def test_reads_back(remote: Remote) -> None:
        remote.put("train/shard-000000.tar", tar_bytes)
        ds = StreamingWebDataset(remote.url, storage_options=remote.storage_options)

Each factory is a context manager that creates the location and removes what the test wrote.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import fsspec

from tests.servers import LocalHTTPServer


@dataclass(frozen=True)
class Remote:
    """A dataset prefix on one backend.

    Attributes:
        protocol: ``"file"``, ``"memory"``, ``"s3"``, ``"gcs"``, ``"http"``, ...
            (the ``remote`` fixture's param; the URL scheme may differ: ``gs://`` for gcs).
        url: base URL of the prefix, without a trailing slash (``s3://test-1a2b/ds``).
        storage_options: what the code under test passes to fsspec for this URL.
        fs: an fsspec filesystem for verifying from the test (made with ``storage_options``).
        endpoint_url: the server's ``http://127.0.0.1:<port>`` for network backends (what a
            ``FaultProxy`` goes in front of), ``None`` for ``file`` and ``memory``.
    """

    protocol: str
    url: str
    storage_options: dict[str, Any]
    fs: fsspec.AbstractFileSystem = field(repr=False)
    _write: Callable[[str, bytes], None] = field(repr=False)
    endpoint_url: str | None = None
    _options_for: Callable[[str], dict[str, Any]] | None = field(default=None, repr=False)

    def join(self, relpath: str) -> str:
        """URL of ``relpath`` under the prefix."""
        relpath = relpath.lstrip("/")
        return f"{self.url}/{relpath}" if relpath else self.url

    def put(self, relpath: str, data: bytes) -> str:
        """Write an object at ``relpath`` under the prefix; return its URL."""
        self._write(relpath.lstrip("/"), data)
        return self.join(relpath)

    def options_for(self, endpoint_url: str) -> dict[str, Any]:
        """``storage_options`` that reach this location through ``endpoint_url`` (a proxy).

        For http the endpoint is in the URL, not the options: use ``via`` instead.

        Raises:
            ValueError: for backends without a network endpoint (``file``, ``memory``).
        """
        if self._options_for is None:
            raise ValueError(f"a {self.protocol} remote has no endpoint in its storage options")
        return self._options_for(endpoint_url)

    def via(self, endpoint_url: str) -> Remote:
        """This location reached through ``endpoint_url`` (e.g. a ``FaultProxy``).

        The returned ``Remote`` has its ``url`` (http) or ``storage_options`` (s3, gcs, ...)
        aimed at ``endpoint_url`` and that ``endpoint_url``; ``put`` and ``fs`` still go
        directly to the server.

        Raises:
            ValueError: for ``file`` and ``memory``.
        """
        if self.endpoint_url is None:
            raise ValueError(f"a {self.protocol} remote has no network endpoint to proxy")
        endpoint_url = endpoint_url.rstrip("/")
        if self._options_for is None:  # the endpoint is part of the URL
            url = endpoint_url + self.url[len(self.endpoint_url) :]
            return replace(self, url=url, endpoint_url=endpoint_url)
        return replace(
            self, storage_options=self._options_for(endpoint_url), endpoint_url=endpoint_url
        )


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextmanager
def file_remote(directory: Path) -> Iterator[Remote]:
    """A ``file://`` prefix at ``directory / "ds"`` (``directory`` is the test's ``tmp_path``)."""
    root = directory / "ds"
    root.mkdir(parents=True)

    def write(relpath: str, data: bytes) -> None:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    yield Remote("file", root.as_uri(), {}, fsspec.filesystem("file"), write)


@contextmanager
def memory_remote() -> Iterator[Remote]:
    """A ``memory://`` prefix, removed afterwards.

    fsspec's memory store is per process: forked DataLoader workers see a copy of what existed
    at fork time, spawned ones see nothing.
    """
    fs = fsspec.filesystem("memory")
    url = f"memory://{_unique('wdsfs-test')}/ds"

    def write(relpath: str, data: bytes) -> None:
        fs.pipe_file(f"{url}/{relpath}", data)

    try:
        yield Remote("memory", url, {}, fs, write)
    finally:
        root = fs._strip_protocol(url).rsplit("/", 1)[0]
        if fs.exists(root):
            fs.rm(root, recursive=True)


class BucketServer(Protocol):
    """What ``bucket_remote`` needs from a server (S3, GCS and Azure servers all have it)."""

    @property
    def endpoint_url(self) -> str: ...

    @property
    def storage_options(self) -> dict[str, Any]: ...

    def options_for(self, endpoint_url: str) -> dict[str, Any]: ...

    def filesystem(self) -> Any: ...

    def make_bucket(self, name: str) -> None: ...


@contextmanager
def bucket_remote(
    server: BucketServer, *, protocol: str, scheme: str, prefix: str = "ds"
) -> Iterator[Remote]:
    """``<scheme>://<fresh bucket>/<prefix>`` on ``server``; the bucket is deleted afterwards.

    A bucket per test rather than a server reset: a reset would also wipe what
    session-scoped fixtures (datasets built once per session) keep on the same server.
    """
    bucket = _unique("test")
    server.make_bucket(bucket)
    fs = server.filesystem()
    url = f"{scheme}://{bucket}/{prefix}" if prefix else f"{scheme}://{bucket}"

    def write(relpath: str, data: bytes) -> None:
        fs.pipe_file(f"{url}/{relpath}", data)

    try:
        yield Remote(
            protocol,
            url,
            server.storage_options,
            fs,
            write,
            server.endpoint_url,
            server.options_for,
        )
    finally:
        fs.rm(bucket, recursive=True)


@contextmanager
def http_remote(server: LocalHTTPServer, *, prefix: str = "ds") -> Iterator[Remote]:
    """``http://127.0.0.1:<port>/<fresh dir>/<prefix>`` served from ``server.root``.

    ``put`` writes files into the served directory; the directory is removed afterwards.
    """
    top = _unique("test")
    relroot = f"{top}/{prefix}" if prefix else top
    root = server.root / relroot
    root.mkdir(parents=True)

    def write(relpath: str, data: bytes) -> None:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    fs = fsspec.filesystem("http")
    remote = Remote("http", f"{server.url}/{relroot}", {}, fs, write, server.url)
    try:
        yield remote
    finally:
        shutil.rmtree(server.root / top)
