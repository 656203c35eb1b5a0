"""The test servers and the fault proxy do what the other tests rely on them doing."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fsspec
import pytest

from tests.proxy import FaultProxy
from tests.remotes import Remote, bucket_remote
from tests.servers import (
    AzuriteServer,
    FakeGCSServer,
    LocalHTTPServer,
    MotoS3Server,
    SeaweedFSServer,
    ServerStartError,
    http_status,
)

MiB = 2**20
ProxyFactory = Callable[[str], FaultProxy]


def _round_trip(fs: Any, root: str) -> None:
    """put, ls, cat and ranged cat on ``root`` (``bucket`` or ``bucket/prefix``)."""
    data = os.urandom(100_000)
    fs.pipe_file(f"{root}/ds/a.bin", data)
    fs.pipe_file(f"{root}/ds/sub/b.bin", b"bee")
    listed = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/ds", detail=False))
    assert listed == ["a.bin", "sub"]
    assert fs.info(f"{root}/ds/a.bin")["size"] == len(data)
    assert fs.cat_file(f"{root}/ds/a.bin") == data
    assert fs.cat_file(f"{root}/ds/a.bin", start=1000, end=2000) == data[1000:2000]
    assert fs.cat_file(f"{root}/ds/sub/b.bin") == b"bee"


# ------------------------------------------------------------------------------------ servers


def test_moto_answers_s3fs_and_resets(moto_server: MotoS3Server) -> None:
    moto_server.make_bucket("roundtrip")
    fs = moto_server.filesystem()
    _round_trip(fs, "roundtrip")
    moto_server.reset()
    assert moto_server.filesystem().ls("") == []


def test_s3_options_reach_nothing_but_the_endpoint(moto_server: MotoS3Server) -> None:
    options = moto_server.storage_options
    assert options["key"] == options["secret"] == "testing"
    assert options["client_kwargs"] == {
        "endpoint_url": moto_server.endpoint_url,
        "region_name": "us-east-1",
    }
    assert os.environ["AWS_CONFIG_FILE"] == os.devnull
    assert "AWS_PROFILE" not in os.environ


def test_seaweedfs_answers_s3fs_and_checks_signatures(seaweedfs_server: SeaweedFSServer) -> None:
    seaweedfs_server.make_bucket("roundtrip")
    _round_trip(seaweedfs_server.filesystem(), "roundtrip")
    options = dict(seaweedfs_server.storage_options, secret="wrong")
    wrong = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    with pytest.raises(PermissionError):
        wrong.ls("roundtrip")


def test_seaweedfs_refuses_to_start_on_a_nearly_full_disk(monkeypatch: Any) -> None:
    import shutil

    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - usage.total // 200, usage.total // 200)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    server = SeaweedFSServer()
    with pytest.raises(ServerStartError, match=r"GB free on the disk of .*free some space"):
        server.start()
    assert server.pid is None  # nothing was started


def test_fake_gcs_answers_gcsfs(gcs_server: FakeGCSServer) -> None:
    gcs_server.make_bucket("roundtrip")
    fs = gcs_server.filesystem()
    _round_trip(fs, "roundtrip")
    assert fs.info("roundtrip/ds/a.bin")["generation"]


def test_azurite_answers_adlfs(azurite_server: AzuriteServer) -> None:
    azurite_server.make_bucket("roundtrip")
    _round_trip(azurite_server.filesystem(), "roundtrip")


@pytest.mark.s3
def test_server_process_is_stopped_by_pid() -> None:
    server = MotoS3Server().start()
    pid, endpoint = server.pid, server.endpoint_url
    assert pid is not None
    server.stop()
    assert server.pid is None
    assert http_status(endpoint) is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ------------------------------------------------------------------------------------ http


@contextmanager
def _get(
    url: str, path: str, headers: dict[str, str] | None = None
) -> Iterator[http.client.HTTPResponse]:
    """One GET on a connection of its own, closed afterwards."""
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        with conn.getresponse() as response:
            yield response
    finally:
        conn.close()


def test_http_server_answers_ranges(http_server: LocalHTTPServer) -> None:
    data = bytes(range(256)) * 40
    (http_server.root / "ranges.bin").write_bytes(data)
    with _get(http_server.url, "/ranges.bin") as whole:
        assert (whole.status, whole.read()) == (200, data)
        assert whole.getheader("Accept-Ranges") == "bytes"
        assert whole.getheader("ETag")
    ranges = [("100-199", 100, 199), ("10000-", 10000, 10239), ("-5", 10235, 10239)]
    for spec, first, last in ranges:
        with _get(http_server.url, "/ranges.bin", {"Range": f"bytes={spec}"}) as part:
            assert part.status == 206
            assert part.getheader("Content-Range") == f"bytes {first}-{last}/{len(data)}"
            assert part.read() == data[first : last + 1]
    with _get(http_server.url, "/ranges.bin", {"Range": "bytes=20000-"}) as beyond:
        assert beyond.status == 416
        assert beyond.getheader("Content-Range") == f"bytes */{len(data)}"


def test_http_server_keeps_connections_alive(http_server: LocalHTTPServer) -> None:
    (http_server.root / "alive.bin").write_bytes(b"x" * 1000)
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/alive.bin", headers={"Range": "bytes=0-9"})
        response = conn.getresponse()
        assert response.read() == b"x" * 10
    assert conn.sock is not None  # still the same, open connection
    conn.close()


def test_http_server_lists_directories_for_fsspec(http_server: LocalHTTPServer) -> None:
    (http_server.root / "listing/sub").mkdir(parents=True)
    (http_server.root / "listing/a.tar").write_bytes(b"a" * 10)
    (http_server.root / "listing/sub/b.tar").write_bytes(b"b" * 20)
    fs = fsspec.filesystem("http")
    base = f"{http_server.url}/listing/"
    assert sorted(fs.ls(base, detail=False)) == [base + "a.tar", base + "sub/"]
    assert fs.cat_file(base + "sub/b.tar", start=5, end=8) == b"bbb"
    assert fs.info(base + "a.tar")["size"] == 10


@pytest.mark.http
def test_http_directory_listing_can_be_off(tmp_path: Any) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f.bin").write_bytes(b"f")
    with LocalHTTPServer(tmp_path, directory_listing=False) as server:
        assert http_status(f"{server.url}/d/") == 403
        assert http_status(f"{server.url}/d/f.bin") == 200
        assert http_status(f"{server.url}/d/missing") == 404


# ------------------------------------------------------------------------------------ remote


def test_remote_is_fresh_and_round_trips(remote: Remote) -> None:
    assert not remote.url.endswith("/")
    url = remote.put("sub/x.bin", b"payload")
    assert url == remote.join("sub/x.bin") == f"{remote.url}/sub/x.bin"
    with fsspec.open(url, "rb", **remote.storage_options) as f:
        assert f.read() == b"payload"
    fs, path = fsspec.core.url_to_fs(remote.join("sub/x.bin"), **remote.storage_options)
    assert fs.cat_file(path, start=1, end=4) == b"ayl"
    assert [p.rsplit("/", 1)[-1] for p in remote.fs.ls(remote.join("sub"), detail=False)] == [
        "x.bin"
    ]


def test_remote_via_proxy(remote: Remote, fault_proxy: ProxyFactory) -> None:
    if remote.endpoint_url is None:
        with pytest.raises(ValueError):
            remote.via("http://127.0.0.1:9")
        return
    remote.put("x.bin", b"through the proxy")
    proxy = fault_proxy(remote.endpoint_url)
    proxied = remote.via(proxy.endpoint_url)
    with fsspec.open(proxied.join("x.bin"), "rb", **proxied.storage_options) as f:
        assert f.read() == b"through the proxy"
    assert proxy.count("GET") >= 1


# ------------------------------------------------------------------------------------ proxy


@pytest.fixture
def s3_object(s3_bucket: Remote) -> tuple[Remote, bytes]:
    data = os.urandom(3 * MiB)
    s3_bucket.put("obj.bin", data)
    return s3_bucket, data


def _proxied_s3(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> tuple[FaultProxy, Any, str, bytes]:
    bucket, data = s3_object
    assert bucket.endpoint_url is not None
    proxy = fault_proxy(bucket.endpoint_url)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **bucket.options_for(proxy.endpoint_url))
    return proxy, fs, bucket.join("obj.bin"), data


def test_proxy_forwards_and_counts(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    assert fs.cat_file(url) == data
    assert proxy.count("GET", path_contains="obj.bin") == 1
    assert proxy.bytes_to_client == len(data)  # HEAD has no body
    assert proxy.methods["HEAD"] >= 1
    proxy.reset_counters()
    assert fs.cat_file(url, start=10, end=20) == data[10:20]
    assert proxy.bytes_to_client == 10
    assert proxy.requests == [("GET", proxy.requests[0][1])]


def test_proxy_keeps_client_connections_alive(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    for _ in range(5):
        assert fs.cat_file(url, start=0, end=100) == data[:100]
    assert proxy.connections == 1


def test_proxy_forwards_request_bodies(s3_bucket: Remote, fault_proxy: ProxyFactory) -> None:
    assert s3_bucket.endpoint_url is not None
    proxy = fault_proxy(s3_bucket.endpoint_url)
    options = s3_bucket.options_for(proxy.endpoint_url)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    data = os.urandom(MiB)
    fs.pipe_file(s3_bucket.join("put.bin"), data)
    assert s3_bucket.fs.cat_file(s3_bucket.join("put.bin")) == data
    assert proxy.count("PUT") == 1


def test_fail_next_is_retried_by_s3fs(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    proxy.fail_next(1, only_get=True)
    assert fs.cat_file(url) == data
    assert proxy.injected == 1
    assert proxy.count("GET") == 2


def test_fail_next_with_403_surfaces(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, _ = _proxied_s3(s3_object, fault_proxy)
    proxy.fail_next(1, status=403, body=b"<Error><Code>AccessDenied</Code></Error>")
    with pytest.raises(PermissionError):
        fs.cat_file(url)
    assert proxy.injected == 1


def test_faults_match_only_what_they_target(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    proxy.fail_next(5, only_get=True, path_contains="some-other-key")
    proxy.truncate_next(5, only_get=True, path_contains="some-other-key")
    assert fs.cat_file(url) == data
    assert proxy.injected == 0
    proxy.clear_faults()


def test_truncate_next_sends_half_the_body_then_closes(
    http_server: LocalHTTPServer, fault_proxy: ProxyFactory
) -> None:
    data = os.urandom(MiB)
    (http_server.root / "truncate.bin").write_bytes(data)
    proxy = fault_proxy(http_server.url)
    proxy.truncate_next(1)
    with _get(proxy.endpoint_url, "/truncate.bin") as response:
        assert response.getheader("Content-Length") == str(len(data))
        with pytest.raises(http.client.IncompleteRead) as caught:
            response.read()
    assert caught.value.partial == data[: len(data) // 2]
    with _get(proxy.endpoint_url, "/truncate.bin") as response:  # the next one is whole
        assert response.read() == data


def test_truncated_s3_body_is_retried_by_s3fs(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    proxy.truncate_next(1, only_get=True)
    assert fs.cat_file(url) == data
    assert (proxy.injected, proxy.count("GET")) == (1, 2)


def test_reset_next_resets_the_connection(
    http_server: LocalHTTPServer, fault_proxy: ProxyFactory
) -> None:
    data = os.urandom(MiB)
    (http_server.root / "reset.bin").write_bytes(data)
    proxy = fault_proxy(http_server.url)
    proxy.reset_next(1)
    received = 0
    with _get(proxy.endpoint_url, "/reset.bin") as response, pytest.raises(ConnectionResetError):
        assert response.getheader("Content-Length") == str(len(data))
        while piece := response.read(64 * 1024):
            received += len(piece)
            time.sleep(0.01)  # let the RST arrive while data is still expected
    assert received <= len(data) // 2


def test_reset_s3_body_is_retried_by_s3fs(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    proxy.reset_next(1, only_get=True)
    assert fs.cat_file(url) == data
    assert proxy.injected == 1


def test_flip_next_changes_one_byte(
    http_server: LocalHTTPServer, fault_proxy: ProxyFactory
) -> None:
    data = os.urandom(MiB)
    (http_server.root / "flip.bin").write_bytes(data)
    proxy = fault_proxy(http_server.url)
    proxy.flip_next(1, only_get=True)
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    flipped = fs.cat_file(f"{proxy.endpoint_url}/flip.bin")
    assert len(flipped) == len(data)
    assert [i for i in range(len(data)) if flipped[i] != data[i]] == [len(data) // 2]
    assert fs.cat_file(f"{proxy.endpoint_url}/flip.bin") == data


def test_flipped_s3_body_fails_botocore_checksum(
    s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory
) -> None:
    """Objects written by recent botocore carry a CRC that s3fs reads verify; a flipped byte
    is an error there (not silently different bytes)."""
    from botocore.exceptions import FlexibleChecksumError

    proxy, fs, url, _ = _proxied_s3(s3_object, fault_proxy)
    proxy.flip_next(1, only_get=True)
    with pytest.raises(FlexibleChecksumError):
        fs.cat_file(url)


def test_throttle_paces_bodies(s3_object: tuple[Remote, bytes], fault_proxy: ProxyFactory) -> None:
    proxy, fs, url, data = _proxied_s3(s3_object, fault_proxy)
    proxy.throttle(20 * MiB)  # 3 MiB: at least 0.15 s
    began = time.monotonic()
    assert fs.cat_file(url) == data
    assert time.monotonic() - began >= 0.14
    proxy.throttle(None)


def test_proxy_in_front_of_gcs(gcs_server: FakeGCSServer, fault_proxy: ProxyFactory) -> None:
    with bucket_remote(gcs_server, protocol="gcs", scheme="gs") as bucket:
        data = os.urandom(MiB)
        bucket.put("obj.bin", data)
        proxy = fault_proxy(gcs_server.endpoint_url)
        proxied = bucket.via(proxy.endpoint_url)
        fs = fsspec.filesystem("gs", skip_instance_cache=True, **proxied.storage_options)
        assert fs.cat_file(proxied.join("obj.bin")) == data
        assert fs.ls(proxied.url, detail=False) == [proxied.join("obj.bin").split("://")[1]]
        proxy.fail_next(1, only_get=True)
        assert fs.cat_file(proxied.join("obj.bin"), start=0, end=10) == data[:10]
        assert proxy.injected == 1
        assert proxy.bytes_to_client > len(data)


def test_proxy_close_is_prompt_with_idle_clients(
    http_server: LocalHTTPServer,
) -> None:
    (http_server.root / "idle.bin").write_bytes(b"idle")
    proxy = FaultProxy(http_server.url).start()
    port = int(proxy.endpoint_url.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/idle.bin")
    assert conn.getresponse().read() == b"idle"
    began = time.monotonic()
    proxy.close()
    assert time.monotonic() - began < 2
    idle.close()
    conn.close()


class _ChunkedEchoHandler(BaseHTTPRequestHandler):
    """Echoes a POST body back with ``Transfer-Encoding: chunked`` (no server above does)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        assert "Transfer-Encoding" not in self.headers  # the proxy de-chunked the request
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_proxy_handles_chunked_requests_and_responses(fault_proxy: ProxyFactory) -> None:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedEchoHandler)
    serving = threading.Thread(
        target=upstream.serve_forever, kwargs={"poll_interval": 0.1}, name="chunked-echo"
    )
    serving.start()
    try:
        proxy = fault_proxy(f"http://127.0.0.1:{upstream.server_address[1]}")
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint_url.rsplit(":", 1)[1]))
        body = os.urandom(10_000)
        for flip in (False, True):
            if flip:
                proxy.flip_next(1)
            pieces = (body[i : i + 3000] for i in range(0, len(body), 3000))
            conn.request("POST", "/echo", body=pieces, encode_chunked=True)
            with conn.getresponse() as response:
                echoed = response.read()
            expected = bytearray(body)
            if flip:
                expected[len(body) // 2] ^= 0xFF
            assert echoed == expected
        conn.close()
        assert proxy.connections == 1
        assert proxy.bytes_to_client == 2 * len(body)
    finally:
        upstream.shutdown()
        upstream.server_close()
        serving.join()
