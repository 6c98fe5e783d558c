"""The node-local image cache: remote images copied once to local disk, shared by every process of a node.

Layout under ``dir``: ``objects/<2 hex>/<40 hex>`` (the entry of one URL: sha256 of endpoint and URL),
``locks/<2 hex>`` (lock stripes) and ``evict.lock``.

* **Atomic fills.** An entry is downloaded to a hidden temp name in its own folder, its size checked
  against the object's (s3fs checks every read against the object's ETag), fsynced and renamed onto the
  final name. A process killed mid-download leaves only a temp file, never a truncated entry; the next
  read downloads again, and eviction removes stale temps.
* **One download per entry and node.** Fills of the same entry take an ``flock`` on its lock stripe, so a
  rank or loader worker that wants an image being downloaded waits for it instead of fetching it again.
  ``flock`` is released by the kernel when its holder dies.
* **A size bound.** After every ``slack`` bytes a process added, it scans the cache (one process at a
  time) and deletes the least recently used entries (by mtime, refreshed on use at most every 10 min)
  down to 90 % of ``max_bytes``. An entry deleted while another process reads it stays readable to that
  reader (POSIX unlink); a reader that finds it gone downloads it again.
* **A full disk** (ENOSPC, EDQUOT, EFBIG) or a cache folder that cannot be written turns this process's
  cache into a read-through (images read into memory from the store) with one warning; the run goes on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from .remote import RemoteFiles

logger = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_TOUCH_SECONDS = 600
_STALE_TEMP_SECONDS = 3600
_CHUNK = 1 << 20


class ImageCache:
    """``open(url)``: a readable file of the remote object at ``url``, through the cache when it works.

    ``max_bytes == 0`` (or ``root`` empty) turns the cache off: every read goes to the store.
    Picklable: DataLoader workers get their own copy that shares the folder, not the in-memory state.
    """

    def __init__(self, root: str, max_bytes: int, remote: RemoteFiles):
        self.root = os.path.abspath(os.path.expanduser(root)) if root else ""
        self.max_bytes = max_bytes
        self.remote = remote
        self.slack = max(64 << 20, max_bytes // 50)
        self._added = 0
        self._read_through = not (self.root and max_bytes > 0)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_added"] = 0
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return not self._read_through

    def entry_path(self, url: str) -> str:
        digest = hashlib.sha256(f"{self.remote.endpoint(url)}\n{url}".encode()).hexdigest()[:40]
        return os.path.join(self.root, "objects", digest[:2], digest)

    def open(self, url: str, what: str = "Image file") -> BinaryIO:
        """The object at ``url`` as a binary file: the cache entry (filled first if needed) or its bytes."""
        if not self._read_through:
            path = self.entry_path(url)
            for _ in range(2):
                try:
                    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
                except FileNotFoundError:
                    if not self.fill(url, what):
                        break
                    continue  # filled (or evicted right after: once more)
                self._touch(f)
                return f
        return io.BytesIO(self.remote.read_bytes(url, what))

    def fill(self, url: str, what: str = "Image file") -> bool:
        """Make sure ``url`` has an entry; False when the cache is (or just turned) read-through.

        Errors of the store (missing object, denied, unreachable) propagate as the taxonomy's errors.
        """
        if self._read_through:
            return False
        final = self.entry_path(url)
        try:
            if os.path.exists(final):
                return True
            with self._stripe(os.path.basename(final)):
                if os.path.exists(final):  # another process filled it while this one waited
                    return True
                size = self._download(url, final, what)
        except OSError as e:
            if e.errno in FULL_ERRNOS or e.errno in _UNWRITABLE_ERRNOS:
                self._degrade(e)
                return False
            raise
        self._account(size)
        return True

    def _download(self, url: str, final: str, what: str) -> int:
        folder = os.path.dirname(final)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(final)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self.remote.open(url, what) as src, open(tmp, "xb") as dst:
                expected = src.size
                try:
                    shutil.copyfileobj(src, dst, _CHUNK)
                except (OSError, ValueError) as e:
                    if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
                        raise
                    raise self.remote.error(url, what, e) from e
                dst.flush()
                os.fsync(dst.fileno())
                written = os.fstat(dst.fileno()).st_size
            if written != expected:
                raise self.remote.error(url, what, OSError(errno.EIO, f"read {written} of {expected} bytes"))
            os.replace(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        return written

    class _StripeLock:
        def __init__(self, path: str):
            self.path = path
            self.fd = -1

        def __enter__(self) -> None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def __exit__(self, *exc: object) -> None:
            os.close(self.fd)  # releases the flock

    def _stripe(self, name: str) -> ImageCache._StripeLock:
        folder = os.path.join(self.root, "locks")
        os.makedirs(folder, exist_ok=True)
        return self._StripeLock(os.path.join(folder, name[:2]))

    def _touch(self, f: BinaryIO) -> None:
        """Refresh the entry's mtime (its LRU time) when it is older than 10 minutes."""
        try:
            if time.time() - os.fstat(f.fileno()).st_mtime > _TOUCH_SECONDS:
                os.utime(f.fileno())
        except OSError:
            pass

    def _degrade(self, error: OSError) -> None:
        with self._lock:
            if self._read_through:
                return
            self._read_through = True
        reason = "is full" if error.errno in FULL_ERRNOS else "cannot be written"
        logger.warning("Image cache %s %s (%s): this process reads images directly from the store from now on "
                       "(slower, but the run goes on). Free space or raise data.cache.max_gb's disk.",
                       self.root, reason, os.strerror(error.errno or 0))

    def _account(self, size: int) -> None:
        with self._lock:
            self._added += size
            due = self._added >= self.slack
            if due:
                self._added = 0
        if due:
            self.evict()

    def evict(self) -> int:
        """Scan the cache and delete least recently used entries down to 90 % of ``max_bytes`` (one process
        at a time; others skip). Stale temp files are removed. Returns the bytes in the cache afterwards."""
        if not self.root:
            return 0
        try:
            fd = os.open(os.path.join(self.root, "evict.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return -1
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return -1  # another process is evicting
            entries, total = _scan(os.path.join(self.root, "objects"))
            if total > self.max_bytes:
                target = self.max_bytes * 9 // 10
                for _, size, path in sorted(entries):
                    if total <= target:
                        break
                    try:
                        os.unlink(path)
                        total -= size
                    except FileNotFoundError:
                        pass
            return total
        finally:
            os.close(fd)


def _scan(objects: str) -> tuple[list[tuple[float, int, str]], int]:
    entries, total, now = [], 0, time.time()
    try:
        folders = [d.path for d in os.scandir(objects) if d.is_dir()]
    except FileNotFoundError:
        return [], 0
    for folder in folders:
        for entry in os.scandir(folder):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith("."):
                if now - st.st_mtime > _STALE_TEMP_SECONDS:
                    _unlink(entry.path)  # left by a process killed mid-download
                    continue
            else:
                entries.append((st.st_mtime, st.st_size, entry.path))
            total += st.st_size
    return entries, total


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Prefetcher:
    """Fills the cache ahead of the loader from a small thread pool (the batch plan knows the order).

    Errors are left for the loader's own read of the image, which reports them; a prefetch never fails.
    Lives in the main process; DataLoader workers read what it fetched.
    """

    def __init__(self, cache: ImageCache, threads: int):
        self.cache = cache
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        return {"cache": self.cache, "threads": self.threads, "_pool": None}

    def submit(self, urls: Iterable[str]) -> None:
        if not self.cache.enabled or self.threads <= 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="image-prefetch")
        for url in urls:
            self._pool.submit(self._fill, url)

    def _fill(self, url: str) -> None:
        try:
            self.cache.fill(url)
        except Exception:  # whatever it is, the loader's own read of this image raises it again and reports it
            pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
