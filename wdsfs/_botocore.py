"""botocore's service models parsed once per process, for every s3fs filesystem in it.

An S3 client is built from botocore's JSON service models, and each botocore session parses
them again (~100 ms): s3fs makes a session per filesystem instance, and fsspec makes a new
instance in every forked DataLoader worker, so each worker paid that before its first request.
The data loader holds only what it read from botocore's files, so sessions share one per data
path, and a forked child inherits it parsed.
"""

from __future__ import annotations

import threading
from typing import Any

from fsspec.spec import AbstractFileSystem

_loaders: dict[Any, Any] = {}  # botocore data_path -> Loader
_lock = threading.Lock()


def share_service_models(fs: AbstractFileSystem) -> None:
    """Give an s3fs filesystem that has no session yet one with the process's data loader.

    The session is made as s3fs would make it (from the filesystem's session arguments, such
    as ``profile``); a session the caller passed, or one already in use, stays. Errors (an
    unknown option or profile) surface at the first request, as they would without this.
    """
    if getattr(fs, "session", False) is not None or getattr(fs, "_s3", None) is not None:
        return
    from aiobotocore.session import AioSession

    with _lock:
        if fs.session is not None:  # another thread was first
            return
        try:
            session = AioSession(**fs.kwargs)
        except TypeError:
            return  # an unknown storage option: s3fs raises it at the first request
        session.lazy_register_component(
            "data_loader", lambda: _loader(session.get_config_variable("data_path"))
        )
        fs.session = session


def _loader(data_path: Any) -> Any:
    from botocore.loaders import create_loader

    with _lock:
        loader = _loaders.get(data_path)
        if loader is None:
            loader = _loaders[data_path] = create_loader(data_path)
        return loader
