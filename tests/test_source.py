"""Source: which shards a URL, pattern or list names, on every backend."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from tests.datasets import make_shard, write_dataset
from wdsfs.errors import NoShardsError, ShardNotFoundError
from wdsfs.source import Source, count_shards, list_shards


def test_prefix_lists_tar_shards_recursively_in_order(remote):
    remote.put("b/shard-000001.tar", make_shard(1, 2))
    remote.put("a/shard-000000.tar", make_shard(0, 2))
    remote.put("a/nested/deeper/shard-000002.tar.gz", make_shard(2, 2, compress=True))
    remote.put("c/shard-000003.tgz", make_shard(3, 2, compress=True))
    remote.put("a/readme.md", b"not a shard")
    remote.put("a/shard-000000.tar.idx", b"not a shard either")

    shards = list_shards(remote.url, storage_options=remote.storage_options)

    assert [s.url for s in shards] == [
        remote.join("a/nested/deeper/shard-000002.tar.gz"),
        remote.join("a/shard-000000.tar"),
        remote.join("b/shard-000001.tar"),
        remote.join("c/shard-000003.tgz"),
    ]
    if remote.protocol != "http":  # an HTTP directory page gives no sizes (a HEAD does, later)
        assert all(s.size and s.size > 0 for s in shards)
    assert count_shards(remote.url, remote.storage_options) == 4


def test_split_selects_a_sub_prefix(remote):
    write_dataset(remote.put, [1, 1], prefix="train/")
    write_dataset(remote.put, [1], prefix="val/")
    train = list_shards(remote.url, split="train", storage_options=remote.storage_options)
    val = list_shards(remote.url, split="val", storage_options=remote.storage_options)
    assert [s.name for s in train] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s.url for s in val] == [remote.join("val/shard-000000.tar")]


def test_brace_pattern_and_list(remote):
    write_dataset(remote.put, [1, 1, 1])
    pattern = remote.join("shard-{000000..000002}.tar")
    shards = list_shards(pattern, storage_options=remote.storage_options)
    assert [s.name for s in shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    listed = list_shards(
        [remote.join("shard-000002.tar"), remote.join("shard-00000{0,1}.tar")],
        storage_options=remote.storage_options,
    )
    assert [s.name for s in listed] == ["shard-000002.tar", "shard-000000.tar", "shard-000001.tar"]


def test_index_is_used_instead_of_listing(remote):
    data = make_shard(0, 3)
    remote.put("listed/shard-000000.tar", data)
    remote.put("listed/shard-000009.tar", make_shard(9, 1))  # not in the index: ignored
    index = {
        "format": "wdsfs-index",
        "version": 1,
        "shards": [{"path": "shard-000000.tar", "size": len(data), "num_samples": 3, "md5": None}],
    }
    index["shards"][0]["md5"] = hashlib.md5(data).hexdigest()
    remote.put("listed/index.wds", json.dumps(index).encode())
    shards = list_shards(remote.join("listed"), storage_options=remote.storage_options)
    assert len(shards) == 1
    assert shards[0].url == remote.join("listed/shard-000000.tar")
    assert shards[0].num_samples == 3
    assert shards[0].size == len(data)
    assert shards[0].checksum == "md5:" + hashlib.md5(data).hexdigest()


def test_empty_prefix_is_a_clear_error(remote):
    remote.put("other/readme.txt", b"x")
    with pytest.raises(NoShardsError, match="no tar shards"):
        list_shards(remote.join("other"), storage_options=remote.storage_options)


@pytest.mark.s3
def test_missing_bucket_is_a_clear_error(moto_server):
    with pytest.raises(ShardNotFoundError, match="no-such-bucket"):
        list_shards("s3://no-such-bucket/ds", storage_options=moto_server.storage_options)


def test_missing_local_directory(tmp_path):
    with pytest.raises(ShardNotFoundError, match="directory '.*does-not-exist' does not exist"):
        list_shards(str(tmp_path / "does-not-exist"))


def test_empty_local_directory_says_no_shards_not_missing_bucket(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoShardsError, match="no tar shards") as info:
        list_shards(str(tmp_path / "empty"))
    assert "bucket" not in str(info.value)


def test_plain_local_path_and_single_shard(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(make_shard(0, 1))
    assert [s.name for s in list_shards(str(tmp_path))] == ["shard-000000.tar"]
    single = list_shards(str(tmp_path / "shard-000000.tar"))
    assert single[0].url.endswith("shard-000000.tar")


def test_bad_arguments():
    with pytest.raises(ValueError, match="remote"):
        Source("")
    with pytest.raises(ValueError, match="remote"):
        Source([])
    with pytest.raises(ValueError, match="not a tar shard"):
        list_shards(["memory://x/readme.txt"])
    with pytest.raises(ValueError, match="split"):
        list_shards(["memory://x/a.tar", "memory://x/b.tar"], split="train")


@pytest.mark.parametrize("url", ["s3://", "gs:///", "https://", "az://"])
def test_a_url_without_bucket_or_path_is_a_clear_error(url):
    with pytest.raises(ValueError, match=r"no bucket or path after [a-z0-9]+://"):
        Source(url)


def test_a_known_protocol_with_one_slash_is_a_typo_not_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"did you mean s3://bucket/ds\?"):
        Source("s3:/bucket/ds")
    (tmp_path / "s3:" / "bucket" / "ds").mkdir(parents=True)  # a real local directory: read it
    (tmp_path / "s3:" / "bucket" / "ds" / "shard-000000.tar").write_bytes(make_shard(0, 1))
    assert len(list_shards("s3:/bucket/ds")) == 1
    assert Source("c:/data").remotes == ["c:/data"]  # not a protocol: left alone


def test_url_schemes_are_case_insensitive(tmp_path):
    write_dataset(lambda name, data: (tmp_path / name).write_bytes(data), [2, 3])
    shards = list_shards(f"FILE://{tmp_path}")
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert Source("S3://Bucket/DS").remotes == ["s3://Bucket/DS"]  # the scheme only
    assert Source("memory://").remotes == ["memory://"]  # a whole in-memory tree


def test_source_pickles_as_a_recipe(remote):
    write_dataset(remote.put, [1])
    source = Source(remote.url, storage_options=remote.storage_options)
    assert source.fs is not None
    clone = pickle.loads(pickle.dumps(source))
    assert clone._fs is None
    assert clone.shards() == source.shards()


def test_profile_goes_to_storage_options():
    source = Source("s3://bucket/ds", profile="research")
    assert source.storage_options["profile"] == "research"


@pytest.mark.http
def test_http_without_directory_index(tmp_path):
    from tests.servers import LocalHTTPServer

    with LocalHTTPServer(directory_listing=False) as server:
        root = Path(server.root) / "ds"
        root.mkdir()
        (root / "shard-000000.tar").write_bytes(make_shard(0, 2))
        (root / "shard-000001.tar").write_bytes(make_shard(1, 2))
        with pytest.raises(NoShardsError, match=r"index\.wds.*brace pattern"):
            list_shards(f"{server.url}/ds")
        pattern = list_shards(f"{server.url}/ds/shard-{{000000..000001}}.tar")
        assert [s.name for s in pattern] == ["shard-000000.tar", "shard-000001.tar"]
        data = make_shard(0, 2)
        index = {
            "format": "wdsfs-index",
            "version": 1,
            "shards": [
                {
                    "path": "shard-000000.tar",
                    "size": len(data),
                    "num_samples": 2,
                    "md5": hashlib.md5(data).hexdigest(),
                }
            ],
        }
        (root / "index.wds").write_text(json.dumps(index))
        (indexed,) = list_shards(f"{server.url}/ds")
        assert indexed.num_samples == 2


def test_dataset_index_serves_its_splits(remote):
    entries = []
    for split in ("train", "val"):
        data = make_shard(0 if split == "train" else 1, 2)
        remote.put(f"{split}/shard-000000.tar", data)
        entries.append(
            {
                "path": f"{split}/shard-000000.tar",
                "size": len(data),
                "num_samples": 2,
                "md5": hashlib.md5(data).hexdigest(),
            }
        )
    remote.put("train/extra-not-indexed.tar", make_shard(9, 1))
    remote.put(
        "index.wds", json.dumps({"format": "wdsfs-index", "version": 1, "shards": entries}).encode()
    )
    train = list_shards(remote.url, split="train", storage_options=remote.storage_options)
    assert [s.url for s in train] == [remote.join("train/shard-000000.tar")]
    assert train[0].num_samples == 2
    listed = Source(
        remote.url, split="train", storage_options=remote.storage_options, use_index=False
    )
    assert [s.name for s in listed.shards()] == ["extra-not-indexed.tar", "shard-000000.tar"]
    with pytest.raises(NoShardsError, match="lists no shard under test/"):
        list_shards(remote.url, split="test", storage_options=remote.storage_options)


@pytest.mark.s3
def test_bad_storage_options_and_profiles_are_configuration_errors(moto_server):
    from wdsfs.errors import StorageConfigError

    bad = {**moto_server.storage_options, "bogus_option": 1}
    with pytest.raises(StorageConfigError, match="bogus_option") as info:
        list_shards("s3://any-bucket/ds", storage_options=bad)
    assert "s3://any-bucket/ds" in str(info.value) and "storage_options/profile" in str(info.value)
    with pytest.raises(StorageConfigError, match="no-such-profile"):
        list_shards(
            "s3://any-bucket/ds",
            storage_options={"client_kwargs": moto_server.storage_options["client_kwargs"]},
            profile="no-such-profile",
        )


def test_listing_without_an_index_leaves_no_frame_alive(remote):
    """A missing index.wds is an exception fsspec's sync() keeps in a reference cycle with its
    frames; the frames of the listing (and every caller's: a dataset iterator's locals) must not
    outlive it until the garbage collector runs."""
    import gc
    import types

    import wdsfs.source

    write_dataset(remote.put, [2, 3])
    source = Source(remote.url, storage_options=remote.storage_options)
    gc.collect()
    gc.disable()
    try:
        assert len(source.shards()) == 2
        alive = [
            frame
            for frame in gc.get_objects()
            if type(frame) is types.FrameType  # isinstance would ask torch's lazy modules
            and frame.f_code.co_filename == wdsfs.source.__file__
        ]
    finally:
        gc.enable()
    assert alive == []
