"""``FaultProxy``: a real HTTP/1.1 proxy that counts traffic and injects faults on request.

It sits between a client (s3fs, gcsfs, fsspec's http) and a test server::

    with FaultProxy(moto_server.endpoint_url) as proxy:
        fs = s3fs.S3FileSystem(**moto_server.options_for(proxy.endpoint_url))
        proxy.fail_next(2, only_get=True)     # two 503 SlowDown answers
        proxy.truncate_next(1)                # then a body cut in half
        fs.cat_file("bucket/key")

What it does, and why this way:

- One thread per client connection, speaking keep-alive HTTP/1.1 (botocore and aiohttp reuse
  connections; a proxy that closed them would hide connection-reuse bugs). Each client
  connection has its own upstream connection, opened lazily and reopened if the server closed
  it between requests.
- Requests are forwarded as they came: same target, same headers (``Host`` included, so SigV4
  signatures still verify), body read by ``Content-Length`` or de-chunked. ``Expect:
  100-continue`` is answered by the proxy itself.
- Responses are parsed by ``http.client`` (status, headers, body by length or chunked, no body
  for HEAD/204/304) and sent on in 256 KiB pieces with ``Content-Length`` kept, so the proxy
  is not the bottleneck (~1.4 GB/s through it on loopback, against ~2.6 GB/s direct; moto
  itself serves ~200 MB/s).
- Faults apply to the next *n* requests that match (``only_get``, ``path_contains``), first
  armed first used, one fault per request; ``injected`` counts those applied.
- Throttling paces each response body separately (a per-connection link speed, like S3's
  per-connection limit), in pieces of ~20 ms so cancellation is observable mid-body.

Counters are updated under a lock; read them any time. Not a general proxy: plain HTTP only,
no CONNECT, no pipelining (clients do not pipeline).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Literal, cast
from urllib.parse import urlsplit

PIECE = 256 * 1024
"""Bytes forwarded per read/write."""

MAX_LINE = 65536
UPSTREAM_TIMEOUT = 60.0

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>FAULTPROXY</HostId></Error>"
)
"""The body S3 sends with a 503 when throttling."""

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}

FaultKind = Literal["fail", "reset", "truncate", "flip"]


@dataclass
class _Fault:
    kind: FaultKind
    remaining: int
    only_get: bool
    path_contains: str | None
    status: int = 503
    body: bytes = b""

    def matches(self, method: str, path: str) -> bool:
        if self.only_get and method != "GET":
            return False
        if self.kind != "fail" and method == "HEAD":
            return False  # body faults need a body
        return self.path_contains is None or self.path_contains in path


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def wants_close(self) -> bool:
        connection = (self.header("Connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" not in connection
        return "close" in connection


class _ClientGone(Exception):
    """The client closed its connection (or sent garbage): end this connection quietly."""


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Args:
        upstream: endpoint URL of the server to forward to.
        piece_size: bytes read and forwarded at a time.
    """

    def __init__(self, upstream: str, *, piece_size: int = PIECE) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"FaultProxy forwards to http://host:port, not {upstream!r}")
        self.upstream = upstream
        self._upstream_addr = (parts.hostname, parts.port or 80)
        self._piece = piece_size
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._rate: float | None = None
        self._bytes_to_client = 0
        self._requests: list[tuple[str, str]] = []
        self._injected = 0
        self._accepted = 0
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._connections: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._serial = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``: point the client here instead of at the server."""
        if self._listener is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> FaultProxy:
        """Listen on an ephemeral port and accept connections on a background thread."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="fault-proxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, cut every open connection and join the threads."""
        if self._listener is None or self._closed.is_set():
            return
        self._closed.set()
        # Wake the blocking accept() with a connection of our own; it sees _closed and exits.
        with contextlib.suppress(OSError):
            socket.create_connection(self._listener.getsockname(), timeout=1).close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            sockets = list(self._connections.values())
            threads = list(self._threads)
        for sock in sockets:
            _shutdown(sock)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ counters

    @property
    def bytes_to_client(self) -> int:
        """Response body bytes sent to clients so far.

        Counted just before each piece is sent, so it is never behind what a client has
        received (it may be ahead by one piece when a client hangs up mid-body)."""
        with self._lock:
            return self._bytes_to_client

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, target)`` of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def methods(self) -> Counter[str]:
        """Number of requests per HTTP method."""
        with self._lock:
            return Counter(method for method, _ in self._requests)

    @property
    def connections(self) -> int:
        """Number of client connections accepted so far (keep-alive reuse keeps this low)."""
        with self._lock:
            return self._accepted

    @property
    def injected(self) -> int:
        """Number of faults applied so far."""
        with self._lock:
            return self._injected

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """Number of requests with this method and/or a target containing ``path_contains``."""
        with self._lock:
            return sum(
                1
                for m, p in self._requests
                if (method is None or m == method) and (path_contains is None or path_contains in p)
            )

    def reset_counters(self) -> None:
        """Zero ``bytes_to_client``, ``requests``, ``connections`` and ``injected``."""
        with self._lock:
            self._bytes_to_client = 0
            self._requests.clear()
            self._injected = 0
            self._accepted = 0

    # ------------------------------------------------------------------ faults

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 503,
        body: bytes = SLOW_DOWN,
        only_get: bool = False,
        path_contains: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` and ``body`` (S3 SlowDown by
        default) without forwarding them. The connection stays open."""
        self._arm(_Fault("fail", n, only_get, path_contains, status, body))

    def reset_next(
        self, n: int = 1, *, only_get: bool = False, path_contains: str | None = None
    ) -> None:
        """Forward the next ``n`` matching requests, send the headers and half of the body, then
        reset the connection (RST)."""
        self._arm(_Fault("reset", n, only_get, path_contains))

    def truncate_next(
        self, n: int = 1, *, only_get: bool = False, path_contains: str | None = None
    ) -> None:
        """Forward the next ``n`` matching requests, send the headers (full ``Content-Length``)
        and half of the body, then close the connection normally (FIN)."""
        self._arm(_Fault("truncate", n, only_get, path_contains))

    def flip_next(
        self, n: int = 1, *, only_get: bool = False, path_contains: str | None = None
    ) -> None:
        """Forward the next ``n`` matching requests with the middle byte of each body inverted
        (same length, same headers, ETag included). Bodiless responses are sent unchanged."""
        self._arm(_Fault("flip", n, only_get, path_contains))

    def clear_faults(self) -> None:
        """Disarm every pending fault."""
        with self._lock:
            self._faults.clear()

    def throttle(self, bytes_per_second: float | None) -> None:
        """Pace every response body at ``bytes_per_second`` (per connection); ``None`` to stop."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive (or None)")
        with self._lock:
            self._rate = bytes_per_second

    def delay(self, seconds_per_mb: float) -> None:
        """Throttle to one MB (10**6 bytes) per ``seconds_per_mb`` seconds; 0 to stop."""
        self.throttle(1e6 / seconds_per_mb if seconds_per_mb > 0 else None)

    def _arm(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("n must be at least 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, target: str) -> _Fault | None:
        with self._lock:
            self._requests.append((method, target))
            for fault in self._faults:
                if fault.matches(method, target):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    self._injected += 1
                    return fault
            return None

    # ------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed.is_set():
                client.close()
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._serial += 1
                self._accepted += 1
                serial = self._serial
                self._connections[serial] = client
                thread = threading.Thread(
                    target=self._serve,
                    args=(serial, client),
                    name=f"fault-proxy-conn-{serial}",
                    daemon=True,
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, serial: int, client: socket.socket) -> None:
        reader = cast(io.BufferedReader, client.makefile("rb", buffering=self._piece))
        upstream: http.client.HTTPConnection | None = None
        abort = False
        try:
            while not self._closed.is_set():
                request = _read_request(reader, client)
                if request is None:
                    break
                fault = self._take_fault(request.method, request.target)
                if fault is not None and fault.kind == "fail":
                    self._send_failure(client, request, fault)
                    if request.wants_close:
                        break
                    continue
                upstream, response = self._forward(upstream, request)
                completed = self._relay(client, request, response, fault)
                if response.will_close or not completed:
                    upstream.close()
                    upstream = None
                if not completed:
                    abort = fault is not None and fault.kind == "reset"
                    break
                if request.wants_close:
                    break
        except (_ClientGone, OSError, http.client.HTTPException):
            pass  # the client or server went away; the client sees its side of it
        finally:
            if upstream is not None:
                upstream.close()
            if abort:
                # Linger 0: close() sends RST instead of FIN (do not shutdown() first: FIN).
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                _shutdown(client)
            reader.close()  # the makefile holds the descriptor open until it is closed too
            client.close()
            with self._lock:
                self._connections.pop(serial, None)

    def _forward(
        self, upstream: http.client.HTTPConnection | None, request: _Request
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send ``request`` upstream; retry once on a fresh connection if a reused one was
        closed by the server while idle."""
        for attempt in (1, 2):
            fresh = upstream is None
            if upstream is None:
                upstream = http.client.HTTPConnection(
                    *self._upstream_addr, timeout=UPSTREAM_TIMEOUT
                )
                upstream.connect()
                assert upstream.sock is not None
                upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                upstream.putrequest(
                    request.method, request.target, skip_host=True, skip_accept_encoding=True
                )
                for name, value in request.headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        upstream.putheader(name, value)
                if request.body or request.header("Content-Length") is not None:
                    upstream.putheader("Content-Length", str(len(request.body)))
                upstream.endheaders(request.body or None)
                return upstream, upstream.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError):
                upstream.close()
                upstream = None
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _send_failure(self, client: socket.socket, request: _Request, fault: _Fault) -> None:
        phrase = _phrase(fault.status)
        head = [
            f"HTTP/1.1 {fault.status} {phrase}",
            "Content-Type: application/xml",
            f"Content-Length: {len(fault.body)}",
            "x-amz-request-id: FAULTPROXY",
        ]
        if request.wants_close:
            head.append("Connection: close")
        client.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if request.method != "HEAD" and fault.body:
            self._count_body(len(fault.body))
            client.sendall(fault.body)

    def _relay(
        self,
        client: socket.socket,
        request: _Request,
        response: http.client.HTTPResponse,
        fault: _Fault | None,
    ) -> bool:
        """Send ``response`` to the client, applying ``fault``; return ``False`` if the body was
        cut short (the connection must then end)."""
        has_body = not (
            request.method == "HEAD" or response.status in (204, 304) or response.status < 200
        )
        length = response.length if has_body else None
        prefetched: bytes | None = None
        if has_body and length is None and fault is not None:
            # A body fault needs the full length up front: read the (chunked) body first.
            prefetched = response.read()
            length = len(prefetched)
        chunked = has_body and length is None

        head = [f"HTTP/1.1 {response.status} {response.reason or _phrase(response.status)}"]
        for name, value in response.getheaders():
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (lowered == "content-length" and has_body):
                continue
            head.append(f"{name}: {value}")
        if has_body:
            head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
        cut_short = fault is not None and fault.kind in ("reset", "truncate") and has_body
        if request.wants_close:
            head.append("Connection: close")
        client.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not has_body:
            response.read()  # marks the response done so the upstream connection is reusable
            return True

        limit = length // 2 if cut_short and length is not None else None
        flip_at = length // 2 if fault is not None and fault.kind == "flip" and length else None
        self._send_body(client, response, prefetched, chunked, limit, flip_at)
        if cut_short:
            return False
        response.read()  # b"": marks the response done (http.client skips this for length 0)
        return True

    def _send_body(
        self,
        client: socket.socket,
        response: http.client.HTTPResponse,
        prefetched: bytes | None,
        chunked: bool,
        limit: int | None,
        flip_at: int | None,
    ) -> None:
        """Forward the body piece by piece: up to ``limit`` bytes, byte ``flip_at`` inverted,
        re-chunked if ``chunked``, paced by the throttle."""
        buffer = bytearray(self._piece)
        view = memoryview(buffer)
        sent = 0
        pacing_rate: float | None = None
        pacing_start = 0.0
        pacing_sent = 0
        while limit is None or sent < limit:
            with self._lock:
                rate = self._rate
            if rate != pacing_rate:
                pacing_rate, pacing_start, pacing_sent = rate, time.monotonic(), 0
            want = self._piece if rate is None else max(4096, min(self._piece, int(rate / 50)))
            if limit is not None:
                want = min(want, limit - sent)
            if prefetched is not None:
                n = min(want, len(prefetched) - sent)
                view[:n] = prefetched[sent : sent + n]
            else:
                n = response.readinto(view[:want])
            if n == 0:
                break
            if flip_at is not None and sent <= flip_at < sent + n:
                buffer[flip_at - sent] ^= 0xFF
            self._count_body(n)  # before sending: a client never has more than is counted
            if chunked:
                client.sendall(b"%x\r\n" % n)
                client.sendall(view[:n])
                client.sendall(b"\r\n")
            else:
                client.sendall(view[:n])
            sent += n
            if pacing_rate is not None:
                pacing_sent += n
                wait = pacing_start + pacing_sent / pacing_rate - time.monotonic()
                if wait > 0 and self._closed.wait(wait):
                    raise _ClientGone("proxy closed")
        if chunked and limit is None:
            client.sendall(b"0\r\n\r\n")

    def _count_body(self, n: int) -> None:
        with self._lock:
            self._bytes_to_client += n


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _read_line(reader: io.BufferedReader) -> bytes:
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise _ClientGone("line too long")
    return line


def _read_request(reader: io.BufferedReader, client: socket.socket) -> _Request | None:
    """Read one request from the client; ``None`` when it closed the connection cleanly."""
    line = _read_line(reader)
    while line in (b"\r\n", b"\n"):  # tolerated stray CRLF between requests (RFC 9112 2.2)
        line = _read_line(reader)
    if not line:
        return None
    try:
        method, target, version = line.decode("latin-1").split()
    except ValueError as exc:
        raise _ClientGone(f"bad request line {line!r}") from exc
    headers: list[tuple[str, str]] = []
    while True:
        raw = _read_line(reader)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    request = _Request(method, target, version, headers, b"")
    if (request.header("Expect") or "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in (request.header("Transfer-Encoding") or "").lower():
        request.body = _read_chunked(reader)
    elif (length := request.header("Content-Length")) is not None:
        request.body = _read_exactly(reader, int(length))
    return request


def _read_exactly(reader: io.BufferedReader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise _ClientGone("request body cut short")
    return data


def _read_chunked(reader: io.BufferedReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int(_read_line(reader).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while _read_line(reader) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        parts.append(_read_exactly(reader, size))
        _read_line(reader)
