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

from tests.servers._environment import isolate_environment
from tests.servers._process import ServerStartError, find_executable, free_port, http_status
from tests.servers.azure import AzuriteServer
from tests.servers.gcs import FakeGCSServer
from tests.servers.http import LocalHTTPServer
from tests.servers.s3 import MotoS3Server, SeaweedFSServer

__all__ = [
    "AzuriteServer",
    "FakeGCSServer",
    "LocalHTTPServer",
    "MotoS3Server",
    "SeaweedFSServer",
    "ServerStartError",
    "find_executable",
    "free_port",
    "http_status",
    "isolate_environment",
]
