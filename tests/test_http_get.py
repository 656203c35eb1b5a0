"""Plain ranged GETs (RangeGetter) and S3 downloads over presigned URLs."""

from __future__ import annotations

import errno
import gc
import http.server
import mmap
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.datasets import make_shard
from wdsfs._fs import url_to_fs
from wdsfs._http_get import RangeGetter, RequestRefused
from wdsfs._presign import TRANSPORT_VARIABLE, S3Gets, s3_gets
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher, TransferCallback
from wdsfs.errors import DownloadCancelled, DownloadError, ShardNotFoundError
from wdsfs.source import list_shards

MiB = 1024 * 1024
DATA = bytes(range(256)) * 40_000  # 10 MB, every offset recognisable


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``DATA`` with ranges; the test's ``behaviour`` may answer otherwise."""

    protocol_version = "HTTP/1.1"
    behaviour: Callable[[_Handler], bool] = staticmethod(lambda handler: False)
    connections: list[int] = []

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_GET(self) -> None:
        if type(self).behaviour(self):
            return
        first, last = self.headers["Range"].removeprefix("bytes=").split("-")
        body = DATA[int(first) : int(last) + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        if type(self).behaviour(self):
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.send_header("x-amz-checksum-crc32", self.headers.get("x-amz-checksum-mode", "-"))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _answer(
    status: int, body: bytes, *, length: int | None = None, hang_up: bool = False
) -> Callable[[_Handler], bool]:
    """A behaviour: answer ``status`` with ``body`` (announced as ``length`` bytes)."""

    def reply(handler: _Handler) -> bool:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = hang_up
        return True

    return reply


@contextmanager
def _server(behaviour: Callable[[_Handler], bool] | None = None) -> Iterator[tuple[str, type]]:
    handler = type("Handler", (_Handler,), {"connections": []})
    if behaviour is not None:
        handler.behaviour = staticmethod(behaviour)
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/bucket/key?X-Amz-Signature=s", handler
    finally:
        server.shutdown()
        server.server_close()


class _Transfer:
    def __init__(self) -> None:
        self.stop = threading.Event()

    def cancelled(self) -> bool:
        return self.stop.is_set()

    def check(self) -> None:
        if self.stop.is_set():
            raise DownloadCancelled("cancelled")


def _get(getter: RangeGetter, url: str, start: int, end: int, transfer: Any = None) -> bytes:
    buffer = mmap.mmap(-1, MiB)
    view = memoryview(buffer)
    pieces: list[bytes] = []
    try:
        length = getter.get(
            url, start, end, view, lambda p: pieces.append(bytes(p)), transfer or _Transfer()
        )
    finally:
        view.release()
        buffer.close()
    assert length == end - start or not pieces
    return b"".join(pieces)


def test_ranges_are_read_in_buffer_slices_over_one_kept_alive_connection() -> None:
    getter = RangeGetter(timeout=10)
    with _server() as (url, handler):
        assert _get(getter, url, 0, 3 * MiB + 5) == DATA[: 3 * MiB + 5]
        assert _get(getter, url, 4096, 8192) == DATA[4096:8192]
        assert len(handler.connections) == 1
    getter.close()


def test_error_statuses_say_what_the_server_said() -> None:
    getter = RangeGetter(timeout=10)
    cases: list[tuple[int, str, type[BaseException], int | None]] = [
        (404, "NoSuchKey", FileNotFoundError, errno.ENOENT),
        (403, "AccessDenied", RequestRefused, None),
        (400, "AuthorizationHeaderMalformed", RequestRefused, None),
        (301, "PermanentRedirect", RequestRefused, None),
        (503, "SlowDown", OSError, errno.EBUSY),
        (500, "InternalError", OSError, errno.EREMOTEIO),
        (409, "OperationAborted", DownloadError, None),
    ]
    for status, code, kind, number in cases:
        body = f"<Error><Code>{code}</Code><Message>told so</Message></Error>".encode()
        with _server(_answer(status, body)) as (url, _), pytest.raises(kind) as info:
            _get(getter, url, 0, 100)
        assert f"HTTP {status}" in str(info.value) and f"{code}: told so" in str(info.value)
        assert "X-Amz-Signature" not in str(info.value)  # a signature stays out of messages
        if number is not None:
            assert info.value.errno == number
    getter.close()


def test_a_body_of_another_length_is_reported_not_consumed() -> None:
    getter = RangeGetter(timeout=10)
    buffer = bytearray(MiB)
    with _server(_answer(206, DATA[:10])) as (url, handler):
        seen: list[int] = []
        for _ in range(2):
            length = getter.get(
                url, 0, 100, memoryview(buffer), lambda p: seen.append(len(p)), _Transfer()
            )
            assert length == 10 and seen == []
        assert len(handler.connections) == 2  # a body left unread: its connection is not reused
    getter.close()


def test_a_cut_body_is_an_incomplete_read() -> None:
    import http.client

    cut = _answer(206, DATA[:5000], length=100_000, hang_up=True)
    getter = RangeGetter(timeout=10)
    with _server(cut) as (url, _), pytest.raises(http.client.IncompleteRead):
        _get(getter, url, 0, 100_000)
    getter.close()


def test_a_range_ignored_past_the_start_is_an_error() -> None:
    whole = _answer(200, DATA[:100])
    getter = RangeGetter(timeout=10)
    with _server(whole) as (url, _), pytest.raises(DownloadError, match="ignored the Range"):
        _get(getter, url, 50, 150)
    getter.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_silently() -> None:
    def closing(handler: _Handler) -> bool:
        handler.close_connection = True  # answer, then hang up (no Connection: close header)
        return False

    getter = RangeGetter(timeout=10)
    with _server(closing) as (url, handler):
        for _ in range(3):
            assert _get(getter, url, 0, 1000) == DATA[:1000]
    assert len(handler.connections) == 3
    getter.close()


def test_a_forked_process_never_reuses_the_parents_connections() -> None:
    import os

    getter = RangeGetter(timeout=10)
    with _server() as (url, handler):
        _get(getter, url, 0, 10)  # leaves an idle connection
        pid = os.fork()
        if pid == 0:  # the child: its own connection, the same bytes
            os._exit(0 if _get(getter, url, 0, 10) == DATA[:10] else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(handler.connections) == 2
        _get(getter, url, 0, 10)  # the parent's connection still works
        assert len(handler.connections) == 2
    getter.close()


@pytest.mark.parametrize("stall", ["before the headers", "mid-body", "mid-body, closing"])
def test_a_read_that_blocks_is_cancelled_promptly(stall: str) -> None:
    release = threading.Event()

    def silent(handler: _Handler) -> bool:
        if stall.startswith("mid-body"):
            handler.send_response(206)
            handler.send_header("Content-Length", str(4 * MiB))
            if stall.endswith("closing"):  # http.client hands the socket to the response
                handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(DATA[: MiB + 10])
            handler.wfile.flush()
        release.wait(30)  # a server that went quiet
        return True

    getter = RangeGetter(timeout=60)
    transfer = _Transfer()
    errors: list[BaseException] = []

    def read(url: str) -> None:
        try:
            _get(getter, url, 0, 4 * MiB, transfer)
        except BaseException as exc:
            errors.append(exc)

    with _server(silent) as (url, _):
        thread = threading.Thread(target=read, args=(url,))
        thread.start()
        time.sleep(0.3)
        transfer.stop.set()
        begun = time.monotonic()
        thread.join(10)
        latency = time.monotonic() - begun
        release.set()
    getter.close()
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert latency < 1.0, latency
    assert not [t for t in threading.enumerate() if t.name == "wdsfs-cancel-watch"]  # ended
    gc.collect()  # a socket left open would be an unclosed-socket warning here: an error


def _head_status(status: int) -> Callable[[_Handler], bool]:
    def reply(handler: _Handler) -> bool:
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return True

    return reply


def test_a_head_sends_its_headers_and_returns_the_answers_over_a_kept_connection() -> None:
    getter = RangeGetter(timeout=10)
    with _server() as (url, handler):
        for _ in range(2):
            headers = getter.head(url, {"x-amz-checksum-mode": "ENABLED"}, _Transfer())
            assert headers["Content-Length"] == str(len(DATA))
            assert headers["x-amz-checksum-crc32"] == "ENABLED"
        assert _get(getter, url, 0, 10) == DATA[:10]  # the same connection still serves GETs
        assert len(handler.connections) == 1
    getter.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, FileNotFoundError), (403, RequestRefused), (503, OSError), (418, DownloadError)],
)
def test_a_head_answered_with_an_error_raises_what_it_means(status, error) -> None:
    getter = RangeGetter(timeout=10)
    with _server(_head_status(status)) as (url, _), pytest.raises(error) as caught:
        getter.head(url, {}, _Transfer())
    assert f"HTTP {status}" in str(caught.value) and "Signature" not in str(caught.value)
    getter.close()


# -- S3 over presigned URLs ----------------------------------------------------------------


@pytest.mark.s3
def test_s3_chunks_are_presigned_gets_and_the_variable_turns_them_off(
    s3_bucket, fault_proxy, tmp_path, monkeypatch
):
    data = make_shard(0, 20, payload=20_000)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)
    for variable, presigned in ((None, True), ("fsspec", False)):
        if variable is not None:
            monkeypatch.setenv(TRANSPORT_VARIABLE, variable)
        proxy.reset_counters()
        with Fetcher(ShardCache(tmp_path / str(variable)), storage_options=options) as fetcher:
            with fetcher.fetch(shard) as fetched:
                assert fetched.file.read() == data
        gets = [target for method, target in proxy.requests if method == "GET"]
        assert gets and all(("X-Amz-Signature=" in target) == presigned for target in gets)
        if presigned:  # SigV4 (botocore would presign with SigV2, which new buckets refuse)
            assert all("X-Amz-Algorithm=AWS4-HMAC-SHA256" in target for target in gets)


@pytest.mark.s3
def test_s3_checksum_lookup_is_a_presigned_head_with_its_header_signed(
    s3_bucket, fault_proxy, tmp_path, monkeypatch
):
    import zlib

    data = make_shard(0, 5)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)
    fs, path = url_to_fs(shard.url, options)
    crc = f"crc32:{zlib.crc32(data):08x}"
    for variable, presigned in ((None, True), ("fsspec", False)):
        if variable is not None:
            monkeypatch.setenv(TRANSPORT_VARIABLE, variable)
        proxy.reset_counters()
        with Fetcher(ShardCache(tmp_path / str(variable)), storage_options=options) as fetcher:
            found = fetcher.downloader.with_store_checksum(
                fs, path, shard, TransferCallback(shard.url)
            )
        assert found.checksum == crc
        heads = [target for method, target in proxy.requests if method == "HEAD"]
        assert len(heads) == 1 and ("X-Amz-Signature=" in heads[0]) == presigned
        if presigned:
            assert "X-Amz-SignedHeaders=host%3Bx-amz-checksum-mode" in heads[0]
    s3_bucket.put("shard-000000.tar", make_shard(0, 6))  # replaced after the listing
    monkeypatch.delenv(TRANSPORT_VARIABLE)
    with Fetcher(ShardCache(tmp_path / "replaced"), storage_options=options) as fetcher:
        found = fetcher.downloader.with_store_checksum(fs, path, shard, TransferCallback(shard.url))
    assert found.checksum == shard.checksum  # not the new version's CRC


@pytest.mark.s3
def test_s3_options_a_presigned_get_cannot_carry_use_s3fs(s3_bucket, monkeypatch):
    options = s3_bucket.storage_options

    def getter(**extra: Any) -> S3Gets | None:
        fs, _ = url_to_fs(s3_bucket.url, {**options, **extra, "skip_instance_cache": True})
        return s3_gets(fs, max_idle=8)

    assert getter() is not None
    assert getter(requester_pays=True) is None
    assert getter(s3_additional_kwargs={"SSECustomerAlgorithm": "AES256"}) is None
    assert getter(config_kwargs={"proxies": {"http": "http://proxy:3128"}}) is None
    assert getter(client_kwargs={**options["client_kwargs"], "config": object()}) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert getter() is None


@pytest.mark.s3
def test_s3_object_deleted_after_listing_is_a_missing_shard(s3_bucket, tmp_path):
    s3_bucket.put("shard-000000.tar", make_shard(0, 5))
    (shard,) = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    with Fetcher(
        ShardCache(tmp_path / "c"), storage_options=s3_bucket.storage_options, verify=False
    ) as fetcher:
        fs, path = url_to_fs(shard.url, s3_bucket.storage_options)
        remote = fetcher.downloader.remote(fs, path, shard.url, TransferCallback(shard.url))
        assert remote.getter is not None
        fs.rm_file(path)
        with pytest.raises(ShardNotFoundError, match=r"shard-000000\.tar.*NoSuchKey"):
            fetcher.fetch(shard)  # listed with size and version: no HEAD, the GET finds out


@pytest.mark.s3
def test_a_forked_child_signs_and_reads_with_its_own_clients(s3_bucket, tmp_path):
    import os

    shards = {i: make_shard(i, 5) for i in range(2)}
    for i, data in shards.items():
        s3_bucket.put(f"shard-{i:06d}.tar", data)
    listed = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    options = s3_bucket.storage_options
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=options) as fetcher:
        with fetcher.fetch(listed[0]) as fetched:  # the parent signs and reads first
            assert fetched.file.read() == shards[0]
        pid = os.fork()
        if pid == 0:  # as a DataLoader worker started after the parent's downloads
            code = 1
            try:
                with Fetcher(ShardCache(tmp_path / "child"), storage_options=options) as child:
                    with child.fetch(listed[1]) as fetched:
                        code = 0 if fetched.file.read() == shards[1] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with fetcher.fetch(listed[1]) as fetched:  # and the parent goes on
            assert fetched.file.read() == shards[1]


@pytest.mark.s3
def test_a_refused_presigned_get_is_sent_through_s3fs_from_then_on(
    s3_bucket, fault_proxy, tmp_path, monkeypatch, caplog
):
    data = make_shard(0, 20, payload=20_000)
    for i in range(2):
        s3_bucket.put(f"shard-{i:06d}.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)  # this test's own filesystem
    shards = list_shards(s3_bucket.url, storage_options=options)
    refusals: list[str] = []

    def refuse(self: RangeGetter, url: str, *args: Any) -> int:  # as a region mismatch would
        refusals.append(url)
        raise RequestRefused(f"{url}: HTTP 400 Bad Request (AuthorizationHeaderMalformed)")

    monkeypatch.setattr(RangeGetter, "get", refuse)
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=options) as fetcher:
        for shard in shards:
            with fetcher.fetch(shard) as fetched:
                assert fetched.file.read() == data
    gets = [target for method, target in proxy.requests if method == "GET"]
    assert refusals and len(gets) >= 2 and not any("X-Amz-Signature=" in t for t in gets)
    assert fetcher.metrics.retries == 0  # not a transient error: no backoff
    assert any("refused a presigned GET" in r.getMessage() for r in caplog.records)
    # the second shard was not tried as a presigned GET at all
    assert all("shard-000000" in url for url in refusals)


@pytest.mark.s3
def test_a_refused_presigned_head_is_sent_through_s3fs_and_so_is_all_after(
    s3_bucket, fault_proxy, tmp_path, monkeypatch, caplog
):
    data = make_shard(0, 20, payload=20_000)
    s3_bucket.put("shard-000000.tar", data)
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    (shard,) = list_shards(s3_bucket.url, storage_options=options)

    def refuse(self: RangeGetter, url: str, *args: Any) -> Any:
        raise RequestRefused(f"{url}: HTTP 403 Forbidden (SignatureDoesNotMatch)")

    monkeypatch.setattr(RangeGetter, "head", refuse)
    with Fetcher(ShardCache(tmp_path / "c"), storage_options=options) as fetcher:
        with fetcher.fetch(shard) as fetched:
            assert fetched.file.read() == data
    assert any("refused a presigned HEAD" in r.getMessage() for r in caplog.records)
    signed = [
        t for method, t in proxy.requests if method in ("HEAD", "GET") and "X-Amz-Signature=" in t
    ]
    assert not signed  # the HEAD again through s3fs, and the GETs too
    assert fetcher.metrics.retries == 0
