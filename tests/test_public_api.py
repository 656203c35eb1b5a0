"""The public names are pinned, sorted, importable, and ``import wdsfs`` never imports torch."""

from __future__ import annotations

import subprocess
import sys

import wdsfs

EXPECTED = [
    "CacheError",
    "CorruptShardError",
    "Decoder",
    "DownloadCancelled",
    "DownloadError",
    "FetchedShard",
    "Fetcher",
    "IndexFormatError",
    "IntegrityError",
    "NoShardsError",
    "Shard",
    "ShardCache",
    "ShardDownloader",
    "ShardNotFoundError",
    "Source",
    "StateMismatchError",
    "StorageAccessError",
    "StorageConfigError",
    "StreamingDataLoader",
    "StreamingWebDataset",
    "TransferCallback",
    "WdsfsError",
    "build_index",
    "count_shards",
    "gather_state_dict",
    "list_shards",
    "read_samples",
    "write_index",
]


def test_all_is_pinned_and_sorted():
    assert wdsfs.__all__ == EXPECTED
    assert sorted(wdsfs.__all__) == wdsfs.__all__


def test_import_does_not_import_torch():
    code = "import sys, wdsfs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_error_hierarchy_and_pickling():
    import pickle

    for name in EXPECTED:
        if name in wdsfs._TORCH_NAMES:  # not exceptions; and importing them needs torch
            continue
        obj = getattr(wdsfs, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, wdsfs.WdsfsError)
            exc = obj("s3://b/x.tar: what went wrong", url="s3://b/x.tar")
            back = pickle.loads(pickle.dumps(exc))
            assert type(back) is obj and str(back) == str(exc) and back.url == "s3://b/x.tar"
            assert type(obj(str(exc))) is obj  # DataLoader re-raises as type(exc)(message)
    assert issubclass(wdsfs.ShardNotFoundError, FileNotFoundError)
    assert issubclass(wdsfs.IntegrityError, wdsfs.DownloadError)
    assert issubclass(wdsfs.DownloadError, OSError)
    assert issubclass(wdsfs.CorruptShardError, ValueError)


def test_torch_names_load_lazily_with_a_clear_error_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import wdsfs\n"
        "try:\n"
        "    wdsfs.StreamingWebDataset\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install wdsfs[torch]" in out.stdout
