"""Ranged GETs read straight into the caller's buffer over keep-alive connections (not public API).

:class:`RangeGetter` sends ``GET`` with a ``Range`` header over a pooled ``http.client``
connection and reads the body with ``readinto`` into a page-aligned buffer, one slice at a
time, handing each slice to the caller (which hashes it and writes it to disk). No bytes
object is made per network read, no event loop or thread hand-off is involved, and the slices
can go to ``O_DIRECT`` writes as they are. :meth:`RangeGetter.head` sends a ``HEAD`` over the
same connections. On loopback against SeaweedFS this reads at
~0.3 CPU-s/GB (0.42-0.5 with hashing and direct writes) where s3fs's ``get_object`` through
aiohttp needs 0.6-0.8 for the read alone (docs/benchmarks-results.md): on a machine whose cores
the storage client shares with the training job, that is the throughput.

Cancellation: between slices the transfer is checked; while a read blocks (a server that
accepted the request and went quiet), a watch thread polling every 50 ms shuts the socket down
once the transfer is cancelled, so the read returns at once and
:class:`~wdsfs.errors.DownloadCancelled` is raised. The connection is then dropped, as after
any error; a connection is reused only after a body was read to its end.

Errors carry what the server said: 404 is :class:`FileNotFoundError`, 3xx/400/401/403
:class:`RequestRefused`, 429/5xx an ``OSError`` with ``EBUSY``/``EREMOTEIO`` (transient, as
s3fs raises them); other statuses are a :class:`~wdsfs.errors.DownloadError`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import http.client
import itertools
import os
import re
import socket
import ssl
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import NoReturn
from urllib.parse import urlsplit

from wdsfs._ranged import Cancellable
from wdsfs.errors import DownloadError

__all__ = ["RangeGetter", "RequestRefused"]

_WATCH_SECONDS = 0.05
_ERROR_BODY_BYTES = 64 * 1024
_S3_ERROR_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")

Consume = Callable[[memoryview], None]
_Address = tuple[str, str, int]  # scheme, host, port


class RequestRefused(DownloadError):
    """The server refused the request as it was sent (HTTP 3xx, 400, 401, 403).

    A presigned URL can be refused where the client's own request would not be (a bucket in
    another region, a server without presigned URLs), so the caller may try its other way,
    which then gives the real error if there is one.
    """


class RangeGetter:
    """Ranged GETs of plain (or presigned) HTTP(S) URLs, on keep-alive connections.

    Args:
        timeout: Seconds a connect or a read may wait before it fails (transient).
        ssl_context: Makes the TLS context of ``https://`` URLs, once, when first needed
            (default: the system's trust store).
        max_idle: Connections kept open per host between requests.

    Safe to use from several threads; connections are never shared by two requests, nor
    used in a process other than the one that opened them (a forked child opens its own).
    Connections live as long as the getter (one per filesystem, as s3fs keeps its session).
    """

    def __init__(
        self,
        *,
        timeout: float,
        ssl_context: Callable[[], ssl.SSLContext] = ssl.create_default_context,
        max_idle: int = 8,
    ) -> None:
        self.timeout = timeout
        self._make_ssl_context = ssl_context
        self._ssl_context: ssl.SSLContext | None = None  # made on first use (~15 ms)
        self.max_idle = max_idle
        self._idle: dict[_Address, list[http.client.HTTPConnection]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._watch = _Watch()
        _GETTERS.add(self)

    def _after_fork_in_child(self) -> None:
        """Start afresh: the parent's sockets are not ours to use, its locks may be held."""
        inherited, self._idle = self._idle, collections.defaultdict(list)
        for connection in itertools.chain.from_iterable(inherited.values()):
            connection.close()  # our copy of the descriptor only: no shutdown
        self._lock = threading.Lock()
        self._watch = _Watch()

    def get(
        self,
        url: str,
        start: int,
        end: int,
        buffer: memoryview,
        consume: Consume,
        transfer: Cancellable,
    ) -> int:
        """Read bytes ``[start, end)`` of ``url``; give them to ``consume`` slice by slice.

        Each slice is ``buffer`` filled from its start: as long as the buffer, but the last
        one. Returns the body length the server announced; when that is not ``end - start``
        nothing is consumed (the caller retries or reports the object changed).
        """
        headers = {"Range": f"bytes={start}-{end - 1}"}
        with self._exchange(url, "GET", headers, transfer) as response:
            length = self._check(response, url, start)
            if length != end - start:
                return length
            received = 0
            while received < length:
                transfer.check()
                take = min(len(buffer), length - received)
                got = response.readinto(buffer[:take])
                transfer.check()  # a shutdown by the watch ends the read early
                if got != take:
                    raise http.client.IncompleteRead(b"", length - received - got)
                consume(buffer[:take])
                received += take
        return length

    def head(
        self, url: str, headers: dict[str, str], transfer: Cancellable
    ) -> http.client.HTTPMessage:
        """The response headers of a ``HEAD`` of ``url`` (status 200), sent with ``headers``."""
        with self._exchange(url, "HEAD", headers, transfer) as response:
            response.read()  # nothing: the answer to a HEAD has no body
            if response.status != 200:
                _raise_for(response.status, f"HTTP {response.status} {response.reason}", url)
        return response.headers

    @contextlib.contextmanager
    def _exchange(
        self, url: str, method: str, headers: dict[str, str], transfer: Cancellable
    ) -> Iterator[http.client.HTTPResponse]:
        """Send one request on a pooled connection and yield the response, watched for
        cancellation.

        The connection goes back to the pool only if the response was read to its end; after
        an error, or a body left unread, it is closed.
        """
        parts = urlsplit(url)
        address = (parts.scheme, parts.hostname or "", parts.port or _default_port(parts.scheme))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection, reused = self._take(address)
        response: http.client.HTTPResponse | None = None
        try:
            with self._watch.watching(connection, transfer):
                try:
                    response = _send(connection, target, headers, self._watch, method)
                except ConnectionError:
                    if not reused:
                        raise
                    # the server closed the idle connection: once more on a new one, as
                    # urllib3 does (not a transient error of the storage)
                    connection.close()
                    response = _send(connection, target, headers, self._watch, method)
                yield response
        except BaseException:
            _drop(connection, response)
            transfer.check()  # a read the watch cut short is a cancellation, not a failure
            raise
        if response.isclosed() and not response.will_close:
            self._give(address, connection)
        else:
            _drop(connection, response)

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, collections.defaultdict(list)
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _take(self, address: _Address) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection to ``address`` (and True), else a new one (and False)."""
        scheme, host, port = address
        with self._lock:
            idle = self._idle[address]
            if idle:
                return idle.pop(), True
            if scheme == "https" and self._ssl_context is None:
                self._ssl_context = self._make_ssl_context()
            context = self._ssl_context
        if scheme == "https":
            connection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=context
            )
            return connection, False
        return http.client.HTTPConnection(host, port, timeout=self.timeout), False

    def _give(self, address: _Address, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle[address]
            if len(idle) < self.max_idle:
                idle.append(connection)
                return
        connection.close()

    @staticmethod
    def _check(response: http.client.HTTPResponse, url: str, start: int) -> int:
        """The body length of a good answer; else raise what the status means."""
        status = response.status
        if status in (200, 206):
            if status == 200 and start > 0:
                raise DownloadError(
                    f"{url}: the server ignored the Range header (HTTP 200)", url=_shown(url)
                )
            if response.chunked or response.length is None:
                raise DownloadError(
                    f"{_shown(url)}: the server sent no Content-Length for a ranged GET",
                    url=_shown(url),
                )
            return response.length
        if status == 416:  # the object is shorter than the range: it changed
            response.read()
            return 0
        said = _server_says(response.read(_ERROR_BODY_BYTES), status, response.reason)
        _raise_for(status, said, url)


def _raise_for(status: int, said: str, url: str) -> NoReturn:
    """Raise what an HTTP error status means (``said``: the status and the server's words)."""
    if status == 404:
        raise FileNotFoundError(errno.ENOENT, said, _shown(url))
    if 300 <= status < 400 or status in (400, 401, 403):
        raise RequestRefused(f"{_shown(url)}: {said}", url=_shown(url))
    if status == 429 or status == 503:
        raise OSError(errno.EBUSY, said, _shown(url))
    if status >= 500:
        raise OSError(errno.EREMOTEIO, said, _shown(url))
    raise DownloadError(f"{_shown(url)}: {said}", url=_shown(url))


def _send(
    connection: http.client.HTTPConnection,
    target: str,
    headers: dict[str, str],
    watch: _Watch,
    method: str,
) -> http.client.HTTPResponse:
    connection.request(method, target, headers=headers)
    watch.sent(connection)
    return connection.getresponse()


def _drop(
    connection: http.client.HTTPConnection, response: http.client.HTTPResponse | None
) -> None:
    """Close a connection not to be reused, and the response that may own its socket.

    With ``Connection: close`` (an HTTP/1.0 server, or an error answer) http.client hands the
    socket to the response; closing only the connection would then leave it open until the
    garbage collector finds it.
    """
    if response is not None:
        response.close()
    connection.close()


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _shown(url: str) -> str:
    """``url`` without its query (a presigned URL's signature stays out of messages)."""
    return url.split("?", 1)[0]


def _server_says(body: bytes, status: int, reason: str) -> str:
    """``HTTP 404 Not Found (NoSuchKey: The specified key does not exist.)`` from an answer."""
    fields = dict(_S3_ERROR_FIELD.findall(body))
    detail = ": ".join(
        part.decode(errors="replace")
        for part in (fields.get(b"Code"), fields.get(b"Message"))
        if part
    )
    return f"HTTP {status} {reason}" + (f" ({detail})" if detail else "")


class _Watch:
    """Shuts down the sockets of cancelled transfers whose reads block (one thread, on demand).

    The thread runs only while a transfer is watched: the last transfer to end stops it and
    waits for it, so no thread of ours outlives the transfers.
    """

    def __init__(self) -> None:
        self._active: dict[int, tuple[http.client.HTTPConnection, Cancellable]] = {}
        self._sockets: dict[int, socket.socket | None] = {}  # the socket each request went on
        self._changed = threading.Condition()
        self._thread: tuple[threading.Thread, threading.Event] | None = None

    @contextlib.contextmanager
    def watching(
        self, connection: http.client.HTTPConnection, transfer: Cancellable
    ) -> Iterator[None]:
        with self._changed:
            self._active[id(connection)] = (connection, transfer)
            if self._thread is None:
                done = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(done,), name="wdsfs-cancel-watch", daemon=True
                )
                thread.start()
                self._thread = (thread, done)
        try:
            yield
        finally:
            ending = None
            with self._changed:
                del self._active[id(connection)]
                self._sockets.pop(id(connection), None)
                if not self._active and self._thread is not None:
                    ending, self._thread = self._thread, None
                    ending[1].set()
                    self._changed.notify_all()
            if ending is not None:
                ending[0].join()

    def sent(self, connection: http.client.HTTPConnection) -> None:
        """Remember the socket ``connection``'s request went on (a response may take it)."""
        self._sockets[id(connection)] = connection.sock

    def _run(self, done: threading.Event) -> None:
        with self._changed:
            while not done.is_set():
                for key, (connection, transfer) in self._active.items():
                    # with "Connection: close" http.client hands the socket to the response
                    # and forgets it: the one the request was sent on is the one to shut
                    sock = connection.sock or self._sockets.get(key)
                    if sock is not None and transfer.cancelled():
                        with contextlib.suppress(OSError):  # already closed
                            sock.shutdown(socket.SHUT_RDWR)
                self._changed.wait(_WATCH_SECONDS)


_GETTERS: weakref.WeakSet[RangeGetter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for getter in list(_GETTERS):
        getter._after_fork_in_child()


def _close_all() -> None:
    for getter in list(_GETTERS):
        getter.close()


atexit.register(_close_all)  # idle connections are closed, not left to the garbage collector
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
