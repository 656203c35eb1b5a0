"""streaming-wds names: ShardDownloader, DownloadCancelled, count_shards."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import wdsfs
from tests.datasets import make_shard, write_dataset
from wdsfs.compat import DownloadCancelled, ShardDownloader, count_shards
from wdsfs.errors import ShardNotFoundError


def test_defaults_find_get_and_prefetch(remote, tmp_path):
    names = write_dataset(remote.put, [2, 3, 4])
    downloader = ShardDownloader(
        remote.url, storage_options=remote.storage_options, cache_dir=str(tmp_path / "c")
    )
    with downloader:
        urls = downloader.find_shards()
        assert urls == [remote.join(n) for n in names]
        assert downloader.num_shards() == 3
        path = downloader.get_shard(urls[1])
        assert Path(path).read_bytes() == make_shard(1, 3)
        paths = downloader.prefetch_shards(urls)
        assert [Path(p).read_bytes() for p in paths] == [
            make_shard(i, n) for i, n in enumerate([2, 3, 4])
        ]
    assert count_shards(remote.url, remote.storage_options) == 3
    assert wdsfs.count_shards is count_shards
    assert wdsfs.DownloadCancelled is DownloadCancelled


def test_cancellable_download(remote, tmp_path):
    write_dataset(remote.put, [3])
    stop = threading.Event()
    downloader = ShardDownloader(
        remote.url,
        storage_options=remote.storage_options,
        stop_event=stop,
        cache_dir=str(tmp_path / "c"),
    )
    (url,) = downloader.find_shards()
    out = tmp_path / "out" / "shard.tar"
    assert downloader.cancellable_download(url, str(out))
    assert out.read_bytes() == make_shard(0, 3)
    downloader.download_cancel_helper(0)  # not set: no error
    stop.set()
    with pytest.raises(DownloadCancelled):
        downloader.download_cancel_helper(0)
    other = tmp_path / "out" / "other.tar"
    assert downloader.cancellable_download(url, str(other)) is False
    assert not other.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["shard.tar"]  # no temp file left


@dataclass
class WorkerInfo:  # what streaming-wds passes to run()
    start: int = 0
    end: int = 0
    rank: int = 0
    idx: int = 0
    resume: bool = False


def test_run_feeds_the_output_queue_and_sets_finish(remote, tmp_path):
    write_dataset(remote.put, [1] * 7)
    out: queue.Queue = queue.Queue()
    finish = threading.Event()
    seen = []
    for rank in range(3):
        finish.clear()
        downloader = ShardDownloader(
            remote.url,
            storage_options=remote.storage_options,
            output_queue=out,
            finish_event=finish,
            cache_dir=str(tmp_path / "c"),
        )
        infos = [WorkerInfo(rank=r) for r in range(3)]
        downloader.run(rank, infos, epoch=0, shuffle=False)
        assert finish.is_set()
        while not out.empty():
            index, path = out.get_nowait()
            assert Path(path).read_bytes() == make_shard(index, 1)
            seen.append(index)
        downloader.close()
    assert sorted(seen) == list(range(7))


def test_run_resumes_at_shard_level_and_stops_on_the_event(remote, tmp_path):
    write_dataset(remote.put, [1] * 6)
    out: queue.Queue = queue.Queue()
    downloader = ShardDownloader(
        remote.url,
        storage_options=remote.storage_options,
        output_queue=out,
        cache_dir=str(tmp_path / "c"),
    )
    downloader.run(0, [WorkerInfo(idx=4, resume=True)], epoch=0)
    assert [out.get_nowait()[0] for _ in range(out.qsize())] == [4, 5]
    downloader.stop_event.set()
    started = time.monotonic()
    downloader.run(0, [WorkerInfo()], epoch=0)
    assert time.monotonic() - started < 5
    assert downloader.finish_event.is_set()
    assert out.qsize() <= 1


def test_boto3_session_gives_credentials(moto_server, tmp_path):
    import boto3

    moto_server.make_bucket("sessioned")
    moto_server.filesystem().pipe("sessioned/ds/shard-000000.tar", make_shard(0, 1))
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    downloader = ShardDownloader(
        "s3://sessioned/ds",
        session,
        storage_options={"client_kwargs": {"endpoint_url": moto_server.endpoint_url}},
        cache_dir=str(tmp_path / "c"),
    )
    options = downloader.source.storage_options
    assert options["key"] == "testing"
    with downloader:
        (url,) = downloader.find_shards()
        assert Path(downloader.get_shard(url)).read_bytes() == make_shard(0, 1)


def test_count_shards_takes_a_boto3_session_as_streaming_wds_did(moto_server, monkeypatch):
    import boto3

    moto_server.make_bucket("counted")
    for i in range(3):
        moto_server.filesystem().pipe(f"counted/ds/shard-{i:06d}.tar", make_shard(i, 1))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)  # the session has none
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    assert count_shards("s3://counted/ds", session) == 3
    with pytest.raises(TypeError, match="mapping of fsspec options or a boto3 Session"):
        count_shards("s3://counted/ds", 42)


def test_keys_are_object_keys_in_the_bucket_and_ambiguous_names_are_errors(
    moto_server, tmp_path, monkeypatch
):
    moto_server.make_bucket("keyed")
    fs = moto_server.filesystem()
    for split in ("train", "val"):
        fs.pipe(f"keyed/ds/{split}/shard-000000.tar", make_shard(0 if split == "train" else 1, 1))
    fs.pipe("keyed/other/shard-000009.tar", make_shard(9, 1))  # not under the dataset
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "other"
    local.mkdir(parents=True)
    (local / "shard-000009.tar").write_bytes(b"a local file of the same name: never used")
    downloader = ShardDownloader(
        "s3://keyed/ds",
        storage_options=moto_server.storage_options,
        cache_dir=str(tmp_path / "c"),
    )
    with downloader:
        path = downloader.get_shard("other/shard-000009.tar")  # an S3 key, not a local path
        assert Path(path).read_bytes() == make_shard(9, 1)
        assert Path(downloader.get_shard("val/shard-000000.tar")).read_bytes() == make_shard(1, 1)
        with pytest.raises(ValueError, match="names several shards"):
            downloader.get_shard("shard-000000.tar")
        with pytest.raises(ShardNotFoundError, match="s3://keyed/ds/missing.tar"):
            downloader.get_shard("ds/missing.tar")
        with pytest.raises(ValueError, match="rank 3 is out of range"):
            downloader.run(3, [object()])
        assert downloader.finish_event.is_set()
