"""Backend-specific options and guarantees, each against a real server on loopback.

The behaviour every backend shares (listing, download, verification, cache, dataset iteration)
is the ``remote``-parametrised suite in the other test modules; this module covers what only
one backend has: S3 endpoints, profiles, anonymous and requester-pays access, GCS generations
and checksums, Azure MD5s.
"""

from __future__ import annotations

import time

import pytest

from tests.datasets import make_shard, write_dataset
from wdsfs.cache import ShardCache
from wdsfs.download import Fetcher
from wdsfs.errors import StorageAccessError
from wdsfs.source import list_shards


def _read_all(shards, options, cache_dir):
    with Fetcher(ShardCache(cache_dir), storage_options=options) as fetcher:
        out = []
        for fetched in fetcher.fetch_ahead(shards):
            with fetched:
                out.append(fetched.file.read())
        return out


@pytest.mark.seaweedfs
def test_s3_profile_from_a_credentials_file(seaweedfs_server, tmp_path, monkeypatch):
    """``profile=`` picks keys from the AWS files; SeaweedFS checks the signatures."""
    seaweedfs_server.make_bucket("profiled")
    seaweedfs_server.filesystem().pipe("profiled/ds/shard-000000.tar", make_shard(0, 2))
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[research]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
        "[wrong]\naws_access_key_id = testing\naws_secret_access_key = not-the-secret\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    endpoint = {
        "client_kwargs": {"endpoint_url": seaweedfs_server.endpoint_url, "region_name": "us-east-1"}
    }
    shards = list_shards("s3://profiled/ds", storage_options=endpoint, profile="research")
    assert _read_all(shards, {**endpoint, "profile": "research"}, tmp_path / "c") == [
        make_shard(0, 2)
    ]
    with pytest.raises(StorageAccessError, match="s3://profiled/ds"):
        list_shards("s3://profiled/ds", storage_options=endpoint, profile="wrong")


@pytest.mark.s3
def test_s3_anonymous_and_requester_pays_are_passed_through(s3_bucket, tmp_path):
    for name in write_dataset(s3_bucket.put, [2, 1]):
        s3_bucket.fs.chmod(s3_bucket.join(name), acl="public-read")  # a public dataset
    endpoint = {"client_kwargs": s3_bucket.storage_options["client_kwargs"]}
    for extra in ({"anon": True}, {**s3_bucket.storage_options, "requester_pays": True}):
        options = {**endpoint, **extra}
        shards = list_shards(s3_bucket.url, storage_options=options)
        assert _read_all(shards, options, tmp_path / str(len(extra))) == [
            make_shard(0, 2),
            make_shard(1, 1),
        ]


@pytest.mark.s3
def test_s3_single_part_etag_is_the_md5(s3_bucket):
    import hashlib

    s3_bucket.put("shard-000000.tar", make_shard(0, 3))
    (shard,) = list_shards(s3_bucket.url, storage_options=s3_bucket.storage_options)
    assert shard.checksum == "md5:" + hashlib.md5(make_shard(0, 3)).hexdigest()


@pytest.mark.gcs
def test_gcs_generation_and_crc32c(gcs_server, tmp_path):
    import google_crc32c

    gcs_server.make_bucket("gens")
    fs = gcs_server.filesystem()
    fs.pipe("gens/ds/shard-000000.tar", make_shard(0, 2))
    options = gcs_server.storage_options
    (first,) = list_shards("gs://gens/ds", storage_options=options)
    # GCS keeps MD5 and CRC32C: the cheaper CRC32C is the one verified
    assert first.checksum == f"crc32c:{google_crc32c.value(make_shard(0, 2)):08x}"
    assert _read_all([first], options, tmp_path / "c") == [make_shard(0, 2)]
    time.sleep(0.01)
    fs.pipe("gens/ds/shard-000000.tar", make_shard(0, 5))  # a new generation
    (second,) = list_shards("gs://gens/ds", storage_options=options)
    assert second.version != first.version
    assert _read_all([second], options, tmp_path / "c") == [make_shard(0, 5)]


@pytest.mark.azure
def test_azure_lists_and_verifies(azurite_server, tmp_path):
    azurite_server.make_bucket("blobs")
    fs = azurite_server.filesystem()
    fs.pipe("blobs/ds/shard-000000.tar", make_shard(0, 4))
    options = azurite_server.storage_options
    (shard,) = list_shards("az://blobs/ds", storage_options=options)
    assert shard.size == len(make_shard(0, 4))
    assert _read_all([shard], options, tmp_path / "c") == [make_shard(0, 4)]


@pytest.mark.s3
@pytest.mark.parametrize("server", ["moto_server", "seaweedfs_server"])
def test_s3_keeps_the_sdk_crc32_and_the_fetcher_verifies_it(request, server, tmp_path):
    """SDK uploads store a CRC32 (HEAD with ChecksumMode shows it): cheaper than the ETag MD5."""
    import zlib

    from tests.remotes import bucket_remote
    from wdsfs._fs import url_to_fs
    from wdsfs.checksum import Checksum
    from wdsfs.download import TransferCallback
    from wdsfs.source import s3_store_checksum

    with bucket_remote(request.getfixturevalue(server), protocol="s3", scheme="s3") as remote:
        data = make_shard(0, 3)
        remote.put("shard-000000.tar", data)
        (shard,) = list_shards(remote.url, storage_options=remote.storage_options)
        assert shard.checksum is not None and shard.checksum.startswith("md5:")  # the ETag
        fs, path = url_to_fs(shard.url, remote.storage_options)
        crc = Checksum("crc32", f"{zlib.crc32(data):08x}")
        assert s3_store_checksum(fs, path, shard) == crc
        with Fetcher(ShardCache(tmp_path / "c"), storage_options=remote.storage_options) as f:
            transfer = TransferCallback(shard.url)
            assert f.downloader.with_store_checksum(fs, path, shard, transfer).checksum == str(crc)
            with f.fetch(shard) as fetched:
                assert fetched.file.read() == data
        remote.put("shard-000000.tar", make_shard(0, 4))  # replaced after the listing
        assert s3_store_checksum(fs, path, shard) is None  # not the listed version's checksum
