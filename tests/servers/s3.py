"""S3-compatible servers: moto and SeaweedFS, on one ``S3Server`` base."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from tests.servers._environment import TEST_KEY, TEST_REGION, TEST_SECRET
from tests.servers._process import (
    ProcessServer,
    ServerStartError,
    find_executable,
    free_port,
    http_request,
    http_status,
)

SEAWEEDFS_SPARE_BYTES = 2 * 1024**3
"""Free disk SeaweedFS needs beyond the 1% it keeps (the benchmarks upload ~1.2 GB)."""


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
