"""botocore's service models shared by the s3fs filesystems of a process and its forked children."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from wdsfs._fs import url_to_fs


def _loader(fs):
    return fs.session.get_component("data_loader")


def _options(moto_server, **extra):
    return {**moto_server.storage_options, "skip_instance_cache": True, **extra}


def test_filesystems_share_one_data_loader_and_still_work(moto_server):
    moto_server.make_bucket("share-models")
    first, _ = url_to_fs("s3://share-models/a", _options(moto_server))
    second, _ = url_to_fs("s3://share-models/b", _options(moto_server, default_block_size=2**20))

    assert first is not second and first.session is not second.session
    assert _loader(first) is _loader(second)
    first.pipe("share-models/a", b"payload")
    assert second.cat_file("share-models/a") == b"payload"


def test_a_session_given_by_the_caller_is_kept(moto_server):
    from aiobotocore.session import AioSession

    mine = AioSession()
    fs, _ = url_to_fs("s3://any/x", _options(moto_server, session=mine))

    assert fs.session is mine


def _child_reads(storage_options, parent_loader_id, queue):
    fs, _ = url_to_fs("s3://share-fork/a", storage_options)
    queue.put((id(_loader(fs)) == parent_loader_id, fs.cat_file("share-fork/a")))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method")
def test_a_forked_child_builds_its_client_from_the_parents_parsed_models(moto_server):
    moto_server.make_bucket("share-fork")
    options = _options(moto_server)
    parent, _ = url_to_fs("s3://share-fork/a", options)
    parent.pipe("share-fork/a", b"from the parent")  # the models are parsed here
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(options, id(_loader(parent)), queue))
    child.start()
    same_loader, data = queue.get(timeout=60)
    child.join(timeout=60)

    assert child.exitcode == 0
    assert same_loader and data == b"from the parent"


def test_bad_session_options_still_fail_at_the_first_request(moto_server):
    fs, _ = url_to_fs("s3://any/x", _options(moto_server, bogus_option=1))

    assert fs.session is None  # s3fs makes the session, and raises, when first used
    with pytest.raises(TypeError, match="bogus_option"):
        fs.ls("any")
