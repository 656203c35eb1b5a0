"""The machinery every child-process server shares: ``ProcessServer`` and its helpers."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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

_ServerT = TypeVar("_ServerT", bound="ProcessServer")


class ServerStartError(RuntimeError):
    """A test server could not be started (or a tool it needs is missing)."""


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
