"""ShardCache: a size-limited LRU store of shard files on local disk, shared by processes.

Built on :class:`diskcache.Cache` (SQLite index + one file per shard). Every process on the
machine that uses the same ``cache_dir`` shares it safely:

- a shard is keyed by its URL **and** its version (ETag, generation, size+mtime), so a replaced
  object gets a new key and the stale copy is never served;
- downloads go to ``<cache_dir>/tmp/<host>-<pid>-<random>.part`` and are moved into the cache by an
  atomic rename only after verification; a process killed mid-download leaves only a temp file,
  which the next process to open the cache removes (its owner is dead);
- :meth:`ShardCache.lock` is an OS file lock per key (released by the kernel if its holder
  dies), so two processes asking for the same shard download it once;
- readers hold an open file handle: eviction unlinks the file but never breaks a reader that has
  it open (POSIX semantics);
- eviction is least-recently-used, run after each commit until the volume is under
  ``cache_limit``, and before a download until the disk has room for it (a disk smaller
  than the limit); a shard larger than the whole limit is refused with :class:`CacheError`;
- the sample count of every shard read to its end is remembered (beside the shards, under the
  same key, never evicted with them), so ``num_samples`` is known after one epoch even
  without an ``index.wds``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import diskcache
import filelock
import platformdirs

try:
    import fcntl
except ImportError:  # Windows: no claims (see ShardCache.claim)
    fcntl = None  # type: ignore[assignment]

from wdsfs._fs import parse_size
from wdsfs.errors import CacheError, DownloadCancelled
from wdsfs.shard import Shard

__all__ = ["DEFAULT_CACHE_LIMIT", "ShardCache", "default_cache_dir"]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT = "20GB"
_DISK_MARGIN = 64 * 1024 * 1024
_LOCK_POLL = 0.01
# Temp files are named host-pid-random: only this host can tell whether their owner is alive.
_HOST = socket.gethostname().replace("-", "_") or "localhost"


def default_cache_dir() -> str:
    """The platform's user cache directory for wdsfs shards (``~/.cache/wdsfs/shards`` on Linux)."""
    return str(Path(platformdirs.user_cache_dir("wdsfs")) / "shards")


class StopSignal(Protocol):
    """Anything with ``is_set()``: a ``threading.Event``, or several seen as one."""

    def is_set(self) -> bool: ...


class _MoveIn:
    """A diskcache value meaning: adopt this already-written file (rename, no copy)."""

    def __init__(self, path: str) -> None:
        self.path = path


class _ShardDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache storage that renames verified temp files into the cache instead of copying."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, _MoveIn):
            filename, full_path = self.filename(key, value)
            Path(full_path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(value.path, full_path)
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key=key)


class ShardCache:
    """LRU disk cache of shard files, shared by every process using the same directory.

    Args:
        cache_dir: Directory of the cache; default :func:`default_cache_dir`.
        cache_limit: Maximum bytes of shard files, an int or a string (``"500MB"``, ``"10GB"``).

    The cache pickles as its recipe (directory and limit) and opens its SQLite connection lazily
    in each process, so it can be handed to DataLoader workers.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        cache_limit: int | str = DEFAULT_CACHE_LIMIT,
    ) -> None:
        self.directory = str(Path(cache_dir).expanduser()) if cache_dir else default_cache_dir()
        self.cache_limit = parse_size(cache_limit)
        self._cache: diskcache.Cache | None = None
        self._counts: diskcache.Cache | None = None
        self._pid: int | None = None
        self._open_lock = threading.Lock()
        self._held = threading.local()  # depth of this thread's open session()s
        self._claims: dict[str, tuple[int, int]] = {}  # key -> (pid, fd holding its flock)
        self._warned_full_disk = False

    def __repr__(self) -> str:
        return f"ShardCache({self.directory!r}, cache_limit={self.cache_limit})"

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "cache_limit": self.cache_limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], cache_limit=state["cache_limit"])  # type: ignore[misc]

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _db(self) -> diskcache.Cache:
        if self._cache is None or self._pid != os.getpid():
            with self._open_lock:
                if self._cache is None:
                    self._cache = self._open()
                    self._cache.close()
                # a forked child keeps the parent's opened index (diskcache connects again in
                # each process and thread): opening it again writes its settings, and workers
                # doing that all at once wait on each other's SQLite locks
                self._pid = os.getpid()
        return self._cache

    @contextlib.contextmanager
    def _session(self) -> Iterator[diskcache.Cache]:
        """The index, with this thread's SQLite connection closed again afterwards.

        diskcache keeps one connection per thread; fetch threads come and go, and a connection
        left to the garbage collector is a leak (a ResourceWarning on Python 3.13). Inside
        :meth:`session` the connection stays open instead.
        """
        with self._used(self._db) as db:
            yield db

    @contextlib.contextmanager
    def _used(self, db: diskcache.Cache) -> Iterator[diskcache.Cache]:
        """``db``, its thread's connection closed afterwards unless a session holds it."""
        try:
            yield db
        finally:
            if not self._depth():
                db.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Keep this thread's connection to the index open until the block ends.

        Opening a connection costs ~1.4 ms (diskcache re-applies its pragmas each time), a
        lookup on an open one ~0.05 ms: a reader that looks up one shard after another holds a
        session for its whole iteration. Nestable; the connection is closed by the thread that
        opened it, when its outermost session ends.
        """
        held = self._held
        held.depth, held.pid = self._depth() + 1, os.getpid()
        try:
            yield
        finally:
            # (a generator holding a session may be finalised by another thread: that
            # thread's depth is not this one's; the opener's connection then stays open)
            depth = self._depth()
            if depth:
                held.depth = depth - 1
            if depth == 1:
                self._close_connections()

    def _depth(self) -> int:
        """This thread's session depth (a forked child starts with none of its parent's)."""
        held = self._held
        return int(held.depth) if getattr(held, "pid", None) == os.getpid() else 0

    def _open(self) -> diskcache.Cache:
        try:
            for sub in ("tmp", "locks"):
                Path(self.directory, sub).mkdir(parents=True, exist_ok=True)
            cache = diskcache.Cache(
                self.directory,
                size_limit=self.cache_limit,
                eviction_policy="least-recently-used",
                cull_limit=0,  # we cull after each commit, never the entry just written
                disk=_ShardDisk,
                statistics=False,
            )
        except OSError as exc:
            raise CacheError(f"cannot open the shard cache in {self.directory}: {exc}") from exc
        self._remove_orphans()
        return cache

    def _remove_orphans(self) -> None:
        """Delete temp files whose owning process is gone (killed mid-download)."""
        for part in Path(self.directory, "tmp").glob(f"{_HOST}-*.part"):
            pid_text = part.name[len(_HOST) + 1 :].split("-", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                logger.debug("removing leftover temp file %s", part)
                part.unlink(missing_ok=True)

    def close(self) -> None:
        """Close this process's connection to the cache index."""
        self._close_connections()
        self._cache = self._counts = None

    def _close_connections(self) -> None:
        """Close this thread's connections to the index and the counts (this process's only)."""
        if self._pid == os.getpid():
            for db in (self._cache, self._counts):
                if db is not None:
                    db.close()

    @contextlib.contextmanager
    def _count_session(self) -> Iterator[diskcache.Cache]:
        """The store of sample counts (a small SQLite file of its own), as :meth:`_session`."""
        self._db  # noqa: B018 - directory made, this process's state current
        with self._open_lock:
            if self._counts is None:
                try:
                    self._counts = diskcache.Cache(
                        str(Path(self.directory, "counts")), statistics=False
                    )
                except OSError as exc:
                    raise CacheError(
                        f"cannot open the sample counts in {self.directory}: {exc}"
                    ) from exc
        with self._used(self._counts) as counts:
            yield counts

    def remember_count(self, key: str, num_samples: int) -> None:
        """Record that the shard stored (or to be stored) under ``key`` holds ``num_samples``."""
        with self._count_session() as counts:
            counts.set(key, int(num_samples))

    def known_counts(self, keys: list[str]) -> list[int | None]:
        """The remembered sample count of each key, None where no full read recorded one."""
        if not self.exists():
            return [None] * len(keys)
        with self._count_session() as counts:
            return [counts.get(key) for key in keys]

    def exists(self) -> bool:
        """Whether ``cache_dir`` already holds a cache (without creating one)."""
        return Path(self.directory, diskcache.core.DBNAME).is_file()

    @staticmethod
    def key(shard: Shard) -> str:
        """The cache key of a shard: its URL and version."""
        return f"{shard.url}#{shard.version}" if shard.version else shard.url

    def __contains__(self, key: object) -> bool:
        with self._session() as db:
            return key in db

    def __len__(self) -> int:
        with self._session() as db:
            return len(db)

    def open(self, key: str) -> IO[bytes] | None:
        """An open handle on the cached shard, or None. Marks it recently used.

        The handle stays readable even if the entry is evicted while it is open.
        """
        with self._session() as db:
            handle: IO[bytes] | None = db.get(key, default=None, read=True)
        return handle

    def path(self, key: str) -> str | None:
        """The local path of a cached shard, or None (valid until the entry is evicted)."""
        handle = self.open(key)
        if handle is None:
            return None
        with handle:
            return str(handle.name)

    def volume(self) -> int:
        """Bytes used by the cache on disk (shard files and index)."""
        with self._session() as db:
            return int(db.volume())

    def keys(self) -> list[str]:
        """Keys of the cached shards."""
        with self._session() as db:
            return [str(k) for k in db.iterkeys()]

    def clear(self) -> int:
        """Remove every cached shard and remembered count; returns how many shards."""
        with self._count_session() as counts:
            counts.clear()
        with self._session() as db:
            return int(db.clear())

    def check_fits(self, shard: Shard) -> None:
        """Refuse a shard that can never fit; make room on the disk for one that can.

        The disk must have room for the shard and a margin of 64 MiB. Where it has not (a disk
        smaller than ``cache_limit``, or filled by others), least-recently-used shards are
        evicted until it has, below ``cache_limit`` (a warning says so the first time).

        Raises:
            CacheError: The shard is larger than ``cache_limit``, or the disk has no room for it
                even with every shard evicted.
        """
        if shard.size is None:
            return
        if shard.size > self.cache_limit:
            raise CacheError(
                f"{shard.url}: shard is {shard.size} bytes but cache_limit is {self.cache_limit} "
                f"bytes; raise cache_limit above the largest shard",
                url=shard.url,
            )
        needed = shard.size + _DISK_MARGIN
        if self._free_disk() >= needed:
            return
        evicted = self._evict(keep="", enough=lambda _: self._free_disk() >= needed)
        free = self._free_disk()
        if evicted:
            log = logger.debug if self._warned_full_disk else logger.warning
            self._warned_full_disk = True
            log(
                "the disk of the shard cache %s is full before cache_limit (%d bytes): evicted "
                "%d least-recently-used shards to make room for %s",
                self.directory,
                self.cache_limit,
                evicted,
                shard.url,
            )
        if free < needed:
            raise CacheError(
                f"{shard.url}: not enough free disk in {self.directory} for this shard of "
                f"{shard.size} bytes: {free} bytes free, {needed} needed (the shard and a "
                f"{_DISK_MARGIN // 2**20} MiB margin), with every cached shard evicted (a shard "
                f"a reader has open frees its space when closed); free disk space, or use a "
                f"cache_dir on a larger disk",
                url=shard.url,
            )

    def _free_disk(self) -> int:
        return shutil.disk_usage(Path(self.directory, "tmp")).free

    def temp_path(self) -> str:
        """A fresh temp file path inside the cache directory (same filesystem: atomic rename)."""
        self._db  # noqa: B018 - make sure the directory exists and orphans are gone
        name = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex}.part"
        return str(Path(self.directory, "tmp", name))

    def commit(self, key: str, temp_path: str) -> IO[bytes]:
        """Move a verified temp file into the cache under ``key``; return an open handle on it.

        The handle is opened before the rename, so it reads the shard even if another process
        evicts it at once. Least-recently-used entries are then evicted to respect the limit.
        """
        handle: IO[bytes] = open(temp_path, "rb")  # noqa: SIM115 - returned to the caller
        try:
            with self._session() as db:
                db.set(key, _MoveIn(temp_path))
        except BaseException:
            handle.close()
            raise
        final = self.open(key)  # same bytes, named by their place in the cache
        if final is not None:
            handle.close()
            handle = final
        self._evict(keep=key, enough=self._under_limit)
        return handle

    def trim(self) -> None:
        """Evict least-recently-used shards until the cache is under ``cache_limit``.

        Commits evict by themselves; this applies a ``cache_limit`` lowered since the cache
        was filled (the fetcher calls it before its first fetch). Handles already open on
        evicted shards stay readable.
        """
        self._evict(keep="", enough=self._under_limit)

    def _under_limit(self, db: diskcache.Cache) -> bool:
        return bool(db.volume() <= self.cache_limit)

    def _evict(self, keep: str, enough: Callable[[diskcache.Cache], bool]) -> int:
        """Evict least-recently-used shards but ``keep``, one at a time, until ``enough(db)``.

        Returns how many were evicted. (diskcache's own ``cull`` evicts in batches of ten and
        may drop the entry just written.)
        """
        evicted = 0
        with self._session() as db:
            while not enough(db):
                rows = db._sql(
                    "SELECT key FROM Cache WHERE key != ? ORDER BY access_time LIMIT 1", (keep,)
                ).fetchall()
                if not rows:
                    break
                logger.debug("evicting %s", rows[0][0])
                db.delete(rows[0][0])
                evicted += 1
        return evicted

    def _lock_path(self, key: str) -> str:
        self._db  # noqa: B018 - the locks directory exists
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return str(Path(self.directory, "locks", f"{name}.lock"))

    def claim(self, key: str) -> bool:
        """Take the lock of ``key`` now, if it is free, for this process's next :meth:`lock`.

        The main process claims the shards its head start fetches before it forks DataLoader
        workers: a worker asking for one then waits for that fetch, instead of racing it with a
        storage client of its own that is still cold. A forked child inherits the lock's file
        descriptor but never releases the lock (only the claimer's ``flock(LOCK_UN)`` does).
        Returns whether the claim was taken; never on Windows, which has no fork.
        """
        if fcntl is None:
            return False
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        with self._open_lock:
            old = self._claims.pop(key, None)
            self._claims[key] = (os.getpid(), fd)
        if old is not None:
            self._end_claim(old)
        return True

    def release_claim(self, key: str) -> None:
        """Release the claim of ``key`` if no :meth:`lock` took it over."""
        with self._open_lock:
            claimed = self._claims.pop(key, None)
        if claimed is not None:
            self._end_claim(claimed)

    @staticmethod
    def _end_claim(claimed: tuple[int, int]) -> None:
        pid, fd = claimed
        if pid == os.getpid() and fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)  # in a forked child only its copy: the claimer's lock stays

    @contextlib.contextmanager
    def lock(self, key: str, stop_event: StopSignal | None = None) -> Iterator[None]:
        """Hold the cross-process lock of ``key`` (one download per key on this machine).

        Raises:
            DownloadCancelled: ``stop_event`` was set while waiting for the lock.
        """
        with self._open_lock:
            claimed = self._claims.pop(key, None)
        if claimed is not None:
            if claimed[0] == os.getpid():  # this process claimed it: taken over, held already
                try:
                    yield
                finally:
                    self._end_claim(claimed)
                return
            self._end_claim(claimed)  # a parent's claim: wait for it like any other holder
        lock = filelock.FileLock(self._lock_path(key), thread_local=False)
        while True:
            try:
                lock.acquire(timeout=0.5, poll_interval=_LOCK_POLL)
                break
            except filelock.Timeout:
                if stop_event is not None and stop_event.is_set():
                    raise DownloadCancelled(
                        f"{key}: cancelled while waiting for another download"
                    ) from None
        try:
            yield
        finally:
            lock.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
