"""Server fixtures, the parametrised ``remote`` fixture and the fault-proxy factory.

Servers are session fixtures that start lazily: only when the first test that needs one runs
(``-m "not gcs"`` never starts fake-gcs-server). They are stopped at the end of the session
by the PID they were started with. Tests get a fresh bucket / prefix each rather than a reset
server, so session-wide data other fixtures keep on a server survives.

The machine's cloud configuration is removed from the environment at import time (see
``isolate_environment``): this also sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, which
gcsfs reads when it is imported and which must therefore be set before any test module
imports it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import pytest

from tests.proxy import FaultProxy
from tests.remotes import Remote, bucket_remote, file_remote, http_remote, memory_remote
from tests.servers import (
    AzuriteServer,
    FakeGCSServer,
    LocalHTTPServer,
    MotoS3Server,
    SeaweedFSServer,
    isolate_environment,
)

isolate_environment(os.environ)

# Tests that need torch run in the tox environment that installs it (py311-torch, where
# WDSFS_TESTS_TORCH=required makes a missing torch an error); the core environments prove that
# wdsfs works without torch and do not collect them.
_TORCH_MODULES = ["test_dataset.py", "test_loader.py", "test_workers.py"]
if importlib.util.find_spec("torch") is None:
    if os.environ.get("WDSFS_TESTS_TORCH") == "required":
        raise RuntimeError("WDSFS_TESTS_TORCH=required but torch is not installed")
    collect_ignore = _TORCH_MODULES

# Warnings raised by server clients' own code, not ours (pyproject turns warnings into errors).
# Each is justified here; they could move to pyproject's filterwarnings as they are.
CLIENT_WARNING_FILTERS = [
    # gcsfs uploads hand aiohttp the whole body as bytes; aiohttp warns from 1 MiB on.
    "ignore:Sending a large body directly with raw bytes:ResourceWarning:aiohttp.payload",
    # google-api-core (imported by gcsfs) warns at import on Python 3.10 that it is near EOL.
    "ignore:You are using a non-supported Python version:FutureWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    for line in CLIENT_WARNING_FILTERS:
        config.addinivalue_line("filterwarnings", line)


# --------------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    """moto's S3 server in its own process (``endpoint_url``, ``storage_options``, ``reset``)."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[SeaweedFSServer]:
    """SeaweedFS ``weed mini`` with its S3 gateway (signatures checked with the test keys)."""
    with SeaweedFSServer() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCSServer]:
    """fake-gcs-server (``endpoint_url``, ``storage_options`` for gcsfs, ``make_bucket``)."""
    with FakeGCSServer() as server:
        yield server


@pytest.fixture(scope="session")
def http_server() -> Iterator[LocalHTTPServer]:
    """A directory (``root``) served at ``url`` with Range requests and index pages."""
    with LocalHTTPServer() as server:
        yield server


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[AzuriteServer]:
    """Azurite's blob service; installs Azurite with npm into ``.cache/azurite`` on first use.

    Raises ``ServerStartError`` (the test errors) when node/npm is missing or the install fails.
    """
    with AzuriteServer() as server:
        yield server


# --------------------------------------------------------------------------------- locations


@pytest.fixture
def s3_bucket(moto_server: MotoS3Server) -> Iterator[Remote]:
    """A fresh, empty bucket on the moto server, as a ``Remote`` whose ``url`` is ``s3://<bucket>``."""
    with bucket_remote(moto_server, protocol="s3", scheme="s3", prefix="") as remote:
        yield remote


def _open_remote(request: pytest.FixtureRequest, tmp_path: Path) -> AbstractContextManager[Remote]:
    kind: str = request.param
    if kind == "file":
        return file_remote(tmp_path)
    if kind == "memory":
        return memory_remote()
    if kind == "s3":
        server = request.getfixturevalue("moto_server")
        return bucket_remote(server, protocol="s3", scheme="s3")
    if kind == "gcs":
        server = request.getfixturevalue("gcs_server")
        return bucket_remote(server, protocol="gcs", scheme="gs")
    if kind == "http":
        return http_remote(request.getfixturevalue("http_server"))
    if kind == "seaweedfs":
        server = request.getfixturevalue("seaweedfs_server")
        return bucket_remote(server, protocol="seaweedfs", scheme="s3")
    if kind == "azure":
        server = request.getfixturevalue("azurite_server")
        return bucket_remote(server, protocol="azure", scheme="az")
    raise ValueError(f"unknown remote kind {kind!r}")


REMOTE_PARAMS = [
    pytest.param("file", id="file"),
    pytest.param("memory", id="memory"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
    pytest.param("gcs", id="gcs", marks=pytest.mark.gcs),
    pytest.param("http", id="http", marks=pytest.mark.http),
    pytest.param("seaweedfs", id="seaweedfs", marks=pytest.mark.seaweedfs),
    pytest.param("azure", id="azure", marks=pytest.mark.azure),
]


@pytest.fixture(params=REMOTE_PARAMS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """A fresh, empty dataset prefix on each backend in turn (file, memory, s3, gcs, http,
    seaweedfs, azure).

    Only the server of the current param is started (lazily, once per session).
    """
    with _open_remote(request, tmp_path) as location:
        yield location


# --------------------------------------------------------------------------------- faults


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """Factory: ``fault_proxy(upstream_endpoint_url) -> FaultProxy``, all closed at test end."""
    with ExitStack() as stack:

        def make(upstream_endpoint_url: str) -> FaultProxy:
            return stack.enter_context(FaultProxy(upstream_endpoint_url))

        yield make


# --------------------------------------------------------------------------------- markers

_SERVER_MARKERS = {
    "moto_server": "s3",
    "seaweedfs_server": "seaweedfs",
    "gcs_server": "gcs",
    "http_server": "http",
    "azurite_server": "azure",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the backend markers of the server fixtures it uses.

    Runs before ``-m`` deselection. Fixtures that depend on a server (``s3_bucket``) pull it
    into ``fixturenames``; the ``remote`` params carry their marker themselves.
    """
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, marker in _SERVER_MARKERS.items():
            if fixture in names:
                item.add_marker(getattr(pytest.mark, marker))
