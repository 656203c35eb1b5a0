"""The ``wdsfs`` command, run in-process (``main([...])``) and as a real program.

``ls``, ``index`` and ``prefetch`` run over every backend of the ``remote`` fixture, with its
storage options passed as ``--storage-option KEY=JSON``; the flags that only apply to one
backend (``--endpoint-url``) run against the moto and fake-gcs servers; Ctrl-C is a real
SIGINT to a ``python -m wdsfs prefetch`` process downloading through a throttled proxy.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.datasets import write_dataset
from tests.proxy import FaultProxy
from tests.remotes import Remote, bucket_remote, memory_remote
from tests.servers import FakeGCSServer, MotoS3Server
from wdsfs._cli_args import parse_storage_option, storage_options_from
from wdsfs._direct import read_direct
from wdsfs.cache import ShardCache
from wdsfs.cli import main
from wdsfs.index import INDEX_NAME
from wdsfs.source import list_shards

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
COUNTS = [3, 4, 5]
EPOCH = re.compile(
    r"epoch (\d+): (\d+) samples, .* in [\d.]+ s: ([\d.]+) samples/s, ([\d.]+) MB/s, "
    r"first sample after ([\d.]+) s(?: \((\w+): (\d+) shards downloaded, (\d+) from cache\))?"
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def option_args(options: dict[str, object]) -> list[str]:
    """``--storage-option KEY=<JSON>`` for each storage option."""
    args = []
    for key, value in options.items():
        args += ["--storage-option", f"{key}={json.dumps(value)}"]
    return args


def program(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wdsfs", *argv], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


# ------------------------------------------------------------------------- every backend


def test_ls_then_index_then_ls_from_the_index(
    remote: Remote, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_dataset(remote.put, COUNTS, prefix="train/")
    opts = option_args(remote.storage_options)

    code, out, err = run(capsys, "ls", remote.url, *opts)
    assert code == 0, err
    assert "train/shard-000002.tar" in out
    assert out.splitlines()[-1].startswith("3 shards, ")  # no sample counts without an index

    code, out, err = run(capsys, "index", remote.url, "--workers", "2", *opts)
    if remote.protocol == "http":
        assert code == 1
        assert err == (
            f"wdsfs: error: {remote.url}/{INDEX_NAME}: cannot write {INDEX_NAME} over HTTP, "
            "which is read-only; build it where the files are stored (a local path or a "
            "bucket), or save it to a local file and upload it beside the shards\n"
        )
        code, out, err = run(capsys, "index", remote.url, "--dry-run", *opts)
        assert code == 0, err
        assert "dry run" in out
        local = tmp_path / INDEX_NAME
        assert run(capsys, "index", remote.url, "-o", str(local), *opts)[0] == 0
        remote.put(INDEX_NAME, local.read_bytes())
    else:
        assert code == 0, err
        assert f"{remote.url}: 3 shards, 12 samples" in out
        assert f"wrote {remote.url}/{INDEX_NAME}" in out

    remote.put("train/shard-000099.tar", b"not indexed")  # a listing would see it
    code, out, err = run(capsys, "ls", remote.url, "--json", *opts)
    assert code == 0, err
    listing = json.loads(out)
    assert [s["path"] for s in listing["shards"]] == [f"train/shard-{i:06d}.tar" for i in range(3)]
    assert [s["num_samples"] for s in listing["shards"]] == COUNTS
    assert listing["total"]["num_samples"] == 12
    shards = list_shards(remote.url, storage_options=remote.storage_options)
    assert [s.num_samples for s in shards] == COUNTS


def test_prefetch_downloads_once_then_hits(
    remote: Remote, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_dataset(remote.put, COUNTS)
    args = ["prefetch", remote.url, "--cache-dir", str(tmp_path / "c")]
    args += option_args(remote.storage_options)

    code, out, err = run(capsys, *args)
    assert code == 0, err
    if remote.protocol == "file":
        assert "local shards are read in place" in out
        return
    assert "3 shards in " in out and "0 already cached, 3 downloaded" in out
    assert len(ShardCache(tmp_path / "c")) == 3
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "3 already cached, 0 downloaded" in out


# ------------------------------------------------------------------------- as a program


def test_runs_as_a_program(tmp_path: Path) -> None:
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), COUNTS)

    done = program("index", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "3 shards, 12 samples" in done.stdout
    assert (tmp_path / INDEX_NAME).exists()

    done = program("ls", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("3 shards, 12 samples, ")

    done = subprocess.run(
        [sys.executable, "-m", "wdsfs.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert done.stdout.startswith("wdsfs ")

    missing = tmp_path / "missing"
    done = program("ls", str(missing))
    assert done.returncode == 1
    assert done.stderr.startswith("wdsfs: error: ") and str(missing) in done.stderr
    assert len(done.stderr.splitlines()) == 1  # no traceback without -v


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    for i in range(5000):  # ~160 KB of listing: more than a pipe holds (64 KB) unread
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    with subprocess.Popen(
        [sys.executable, "-m", "wdsfs", "ls", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().split() == [b"size", b"path"]  # as `wdsfs ls | head -1`
        proc.stdout.close()
        assert proc.wait(timeout=60) == 1
        assert proc.stderr.read() == b""


@pytest.mark.parametrize("command", ["ls", "index", "prefetch", "cache", "bench"])
def test_every_command_has_help_with_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wdsfs {command}")
    assert "examples:" in out


# ------------------------------------------------------------------------- storage options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("anon=true", (["anon"], True)),
        ("key=testing", (["key"], "testing")),
        ("retries=3", (["retries"], 3)),
        ('token="3"', (["token"], "3")),
        ("empty=", (["empty"], "")),
        ("a=b=c", (["a"], "b=c")),
        ('client_kwargs={"region_name": "x"}', (["client_kwargs"], {"region_name": "x"})),
        (
            "client_kwargs.endpoint_url=http://127.0.0.1:9000",
            (["client_kwargs", "endpoint_url"], "http://127.0.0.1:9000"),
        ),
    ],
)
def test_parse_storage_option(text: str, expected: tuple[list[str], object]) -> None:
    assert parse_storage_option(text) == expected


def test_storage_options_nest_merge_and_take_the_endpoint_flags() -> None:
    items = [
        parse_storage_option('client_kwargs={"region_name": "x"}'),
        parse_storage_option("client_kwargs.endpoint_url=http://h:1"),
        parse_storage_option("config_kwargs.s3.addressing_style=path"),
        parse_storage_option("anon=false"),
    ]
    assert storage_options_from("s3://b/ds", items, profile="research") == {
        "client_kwargs": {"region_name": "x", "endpoint_url": "http://h:1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "anon": False,
        "profile": "research",
    }
    assert storage_options_from("s3://b", [], endpoint_url="http://e") == {
        "client_kwargs": {"endpoint_url": "http://e"}
    }
    assert storage_options_from("gs://b", [], endpoint_url="http://e") == {
        "endpoint_url": "http://e"
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--storage-option", "anon"], "expected KEY=VALUE"),
        (["--storage-option", "=1"], "expected KEY=VALUE"),
        (["--storage-option", "a..b=1"], "expected KEY=VALUE"),
        (
            ["--storage-option", "a=1", "--storage-option", "a.b=2"],
            "storage option a is set to 1 and used as a dict",
        ),
        (["--endpoint-url", "http://e"], "--endpoint-url applies to s3:// and gs:// URLs"),
        (["--profile", "p"], "--profile applies to s3:// URLs"),
        (["--workers", "0"], "expected a positive integer"),
        (["--workers", "-2"], "expected a positive integer, got '-2'"),
        (["--workers", "two"], "expected a positive integer, got 'two'"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prefetch", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: wdsfs prefetch")
    assert message in err


def test_other_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["bench", "x", "--decode", "jpg=nope"],
        ["cache", "info", "--cache-limit", "10XB"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    assert "NAME one of bytes, int" in capsys.readouterr().err


@pytest.mark.s3
def test_endpoint_url_and_credentials_from_flags(
    s3_bucket: Remote, moto_server: MotoS3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(s3_bucket.put, COUNTS)
    flags = ["--endpoint-url", moto_server.endpoint_url]
    flags += ["--storage-option", "key=testing", "--storage-option", "secret=testing"]

    code, out, err = run(capsys, "index", s3_bucket.url, *flags)
    assert code == 0, err
    assert f"wrote {s3_bucket.url}/{INDEX_NAME}" in out
    code, out, err = run(capsys, "ls", s3_bucket.url, *flags)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("3 shards, 12 samples")


@pytest.mark.gcs
def test_endpoint_url_for_gcs(
    gcs_server: FakeGCSServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with bucket_remote(gcs_server, protocol="gcs", scheme="gs") as bucket:
        write_dataset(bucket.put, COUNTS)
        flags = ["--endpoint-url", gcs_server.endpoint_url, "--storage-option", "token=anon"]
        code, out, err = run(capsys, "ls", bucket.url, *flags)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("3 shards")


# ------------------------------------------------------------------------- errors


@pytest.mark.s3
def test_missing_bucket_is_one_line_naming_the_url(
    moto_server: MotoS3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "s3://no-such-bucket-for-wdsfs/ds"
    opts = option_args(moto_server.storage_options)
    for command in ("ls", "index", "prefetch"):
        code, out, err = run(capsys, command, url, *opts)
        assert code == 1, command
        assert err.startswith(f"wdsfs: error: {url}: "), err
        assert "bucket" in err
        assert len(err.splitlines()) == 1
        assert out == ""


def test_unknown_protocol_and_verbose_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    url = "nosuchprotocol://bucket/ds"
    code, _, err = run(capsys, "ls", url)
    assert code == 1
    assert err.startswith(f"wdsfs: error: {url}: ")
    assert "Traceback" not in err

    code, _, err = run(capsys, "ls", "-v", url)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith(f"wdsfs: error: {url}: ")


def test_verbose_shows_library_logs_only_while_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), COUNTS)
    logger = logging.getLogger("wdsfs")
    before = (logger.level, list(logger.handlers))

    code, _, err = run(capsys, "-v", "ls", str(tmp_path))

    assert code == 0
    assert f"wdsfs: INFO: wdsfs.source: {tmp_path}: 3 shards" in err
    assert (logger.level, list(logger.handlers)) == before


# ------------------------------------------------------------------------- Ctrl-C


@pytest.mark.s3
def test_ctrl_c_during_prefetch_exits_130_and_leaves_nothing_half_written(
    s3_bucket: Remote,
    moto_server: MotoS3Server,
    fault_proxy: Callable[[str], FaultProxy],
    tmp_path: Path,
) -> None:
    s3_bucket.put("shard-000000.tar", os.urandom(40 * MiB))  # prefetch never parses it
    proxy = fault_proxy(moto_server.endpoint_url)
    proxy.throttle(1 * MiB)  # per connection: ~5 s for 8 connections
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wdsfs",
            "prefetch",
            s3_bucket.url,
            "--endpoint-url",
            proxy.endpoint_url,
            "--storage-option",
            "key=testing",
            "--storage-option",
            "secret=testing",
            "--cache-dir",
            str(cache_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while proxy.bytes_to_client < 4 * MiB and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list((cache_dir / "tmp").glob("*.part")), "the download should be in progress"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "wdsfs: interrupted"
    assert "Traceback" not in err
    assert elapsed < 3.0, elapsed
    assert proxy.bytes_to_client < 30 * MiB  # stopped mid-shard, not after it
    assert not list((cache_dir / "tmp").glob("*.part"))
    assert len(ShardCache(cache_dir)) == 0


# ------------------------------------------------------------------------- cache


def test_cache_info_and_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = str(tmp_path / "c")
    with memory_remote() as remote:
        write_dataset(remote.put, COUNTS)
        assert run(capsys, "prefetch", remote.url, "--cache-dir", cache_dir)[0] == 0
        sizes = sum(s.size or 0 for s in list_shards(remote.url))

    code, out, _ = run(capsys, "cache", "info", "--cache-dir", cache_dir, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["directory"] == cache_dir
    assert info["entries"] == 3
    assert info["bytes_used"] >= sizes
    code, out, _ = run(capsys, "cache", "info", "--cache-dir", cache_dir, "--cache-limit", "1GB")
    assert "entries:    3" in out and "limit:      1.0 GB (1000000000 bytes)" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: --yes is required
    code, _, err = run(capsys, "cache", "clear", "--cache-dir", cache_dir)
    assert code == 1
    assert "Pass --yes" in err and cache_dir in err
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    assert run(capsys, "cache", "clear", "--cache-dir", cache_dir)[0] == 1
    assert len(ShardCache(cache_dir)) == 3
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out, _ = run(capsys, "cache", "clear", "--cache-dir", cache_dir)
    assert code == 0
    assert "removed 3 shards" in out
    code, out, _ = run(capsys, "cache", "clear", "--cache-dir", cache_dir, "--yes")
    assert "removed 0 shards" in out
    code, out, _ = run(capsys, "cache", "info", "--cache-dir", cache_dir, "--json")
    assert json.loads(out)["entries"] == 0


def test_cache_commands_do_not_create_a_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, other = tmp_path / "none", tmp_path / "not-a-cache"
    other.mkdir()
    for directory in (missing, other):
        code, out, _ = run(capsys, "cache", "info", "--cache-dir", str(directory), "--json")
        assert code == 0
        assert json.loads(out)["entries"] == 0
        code, out, _ = run(capsys, "cache", "clear", "--cache-dir", str(directory), "--yes")
        assert code == 0
        assert "no cache here" in out
    assert not missing.exists()
    assert list(other.iterdir()) == []


def test_progress_bar_counts_every_byte_from_many_threads() -> None:
    from wdsfs.cli import _ByteBar

    with _ByteBar("test", total=8 * 1000) as bar:
        threads = [
            threading.Thread(target=lambda: [bar.relative_update(1) for _ in range(1000)])
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bar.set_size(9000)
    assert (bar.value, bar.size) == (8000, 9000)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ------------------------------------------------------------------------- bench


def test_bench_reports_cold_then_warm(capsys: pytest.CaptureFixture[str]) -> None:
    with memory_remote() as remote:
        write_dataset(remote.put, COUNTS)
        code, out, err = run(capsys, "bench", remote.url, "--epochs", "2", "--decode", "json=JSON")
    assert code == 0, err
    epochs = [m.groups() for m in map(EPOCH.search, out.splitlines()) if m]
    assert [e[:2] for e in epochs] == [("1", "12"), ("2", "12")]
    assert all(float(e[2]) > 0 and float(e[3]) >= 0 for e in epochs)
    assert [e[5:] for e in epochs] == [("cold", "3", "0"), ("warm", "0", "3")]


def test_bench_direct_io_reads_fresh_downloads_with_o_direct(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import wdsfs.download

    direct_reads = []

    def counting(handle, pool):
        reader = read_direct(handle, pool)
        direct_reads.append(reader is not handle)
        return reader

    monkeypatch.setattr(wdsfs.download, "read_direct", counting)
    cache = str(tmp_path / "cache")
    with memory_remote() as remote:
        write_dataset(remote.put, COUNTS)
        code, out, err = run(
            capsys, "bench", remote.url, "--epochs", "2", "--direct-io", "--cache-dir", cache
        )
    assert code == 0, err
    epochs = [m.groups() for m in map(EPOCH.search, out.splitlines()) if m]
    assert [e[:2] for e in epochs] == [("1", "12"), ("2", "12")]
    assert [e[5:] for e in epochs] == [("cold", "3", "0"), ("warm", "0", "3")]
    assert direct_reads == [hasattr(os, "O_DIRECT")] * 6  # 3 downloads, then 3 cache hits


def test_bench_max_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), COUNTS)
    code, out, err = run(capsys, "bench", str(tmp_path), "--max-samples", "5")
    assert code == 0, err
    [match] = [m for m in map(EPOCH.search, out.splitlines()) if m]
    assert match.group(2) == "5"


def test_bench_with_workers_without_torch_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), COUNTS)
    for name in ("torch", "torch.utils.data"):  # as if torch were not installed
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run(capsys, "bench", str(tmp_path), "--num-workers", "2")
    assert code == 1
    assert "needs torch: pip install wdsfs[torch]" in err


@pytest.mark.torch
def test_bench_through_a_dataloader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), COUNTS)
    code, out, err = run(capsys, "bench", str(tmp_path), "--num-workers", "2", "--epochs", "2")
    assert code == 0, err
    epochs = [m.groups() for m in map(EPOCH.search, out.splitlines()) if m]
    assert [e[:2] for e in epochs] == [("1", "12"), ("2", "12")]


def test_a_dataloader_worker_error_prints_its_own_message_on_one_line():
    from wdsfs.cli import _one_line
    from wdsfs.errors import CorruptShardError

    # what torch re-raises in the main process for an error in a DataLoader worker
    reraised = CorruptShardError(
        "Caught CorruptShardError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "/x/torch/utils/data/_utils/worker.py", line 349, in _worker_loop\n'
        "    data = fetcher.fetch(index)\n"
        "wdsfs.errors.CorruptShardError: s3://b/ds/x.tar: not a tar header (byte offset 0)\n"
    )
    assert _one_line(reraised, "s3://b/ds") == "s3://b/ds/x.tar: not a tar header (byte offset 0)"
