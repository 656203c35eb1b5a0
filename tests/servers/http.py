"""An HTTP server with Range support, in this process."""

from __future__ import annotations

import email.utils
import mimetypes
import os
import re
import tempfile
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

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
