"""Azurite, the Azure Blob Storage server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tests.servers._process import (
    READY_TIMEOUT,
    ProcessServer,
    ServerStartError,
    find_executable,
    free_port,
    http_status,
)

AZURITE_VERSION = "3.35.0"
AZURITE_ACCOUNT = "devstoreaccount1"
# The documented, public development key every Azurite instance accepts.
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


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
        self.install_dir = install_dir or Path(__file__).resolve().parents[2] / ".cache/azurite"
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
