"""Node copies: a checkpoint on an object store is read once per node, and every rank of the node loads it.

Layout under ``root`` (``<data.cache.dir>/checkpoints``, the local disk the data cache already uses):
``<40 hex>`` (the copy of one data object: sha256 of its URL and its manifest digest), ``<40 hex>.lock``
(its ``flock``) and ``<40 hex>.bad`` (the reason the object failed its digest).

* **One read per node.** The first process of the node to want the object takes the entry's ``flock``,
  reads the object from the store, checks its size and digest against the manifest, writes the copy (temp
  name, rename; no fsync: every reader verifies the digest) and loads the bytes it holds. The others wait
  on the lock and then load the copy, each verifying its digest first: a copy damaged on local disk is
  read again from the store, never taken for a broken checkpoint. ``flock`` is released by the kernel when
  its holder dies.
* **A broken object is read once too**: its reason goes into the ``.bad`` marker, and the node's other
  processes fall back past it without reading it (the key includes the digest, so a new commit of the step
  never meets an old marker).
* **A failing store is not a broken checkpoint**: a read cut short or an unreachable store raises
  :class:`StorageUnavailableError` (exit 75), nothing is written, and the next process tries the store itself.
* **Bounded**: after each fill only the ``keep`` most recently used copies stay (a process that holds one
  open keeps reading it: POSIX unlink).
* **A full or unwritable cache disk** turns this process's copies off with one warning: it reads from the
  store as if there were no cache.

Measured against the alternative (one rank reads, ``broadcast`` over the process group) in
``bench/restore.py``; see docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from ..errors import StorageError, StorageUnavailableError
from ..storage import WorkDir
from ..storage.hashing import new_digest
from .manifest import Manifest
from .verify import HEAD, InvalidCheckpoint, check_digest, digest_bytes, load_weights_only

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
_BAD = ".bad"
_LOCK = ".lock"
_STALE_TEMP_SECONDS = 3600


class NodeCopies:
    """Local copies of checkpoint data objects of remote work dirs, shared by the processes of a node.

    ``root`` empty turns it off (every process reads from the store).
    """

    def __init__(self, root: str, keep: int = 2):
        self.root = os.path.abspath(os.path.expanduser(root)) if root else ""
        self.keep = keep
        self._off = not self.root

    @property
    def enabled(self) -> bool:
        return not self._off

    def entry_path(self, url: str, manifest: Manifest) -> str:
        return os.path.join(self.root, hashlib.sha256(f"{url}\n{manifest.digest}".encode()).hexdigest()[:40])

    def read_verified(self, wd: WorkDir, relpath: str, manifest: Manifest, map_location: Any) -> Any:
        """The state in ``relpath`` of remote ``wd``, verified against ``manifest``, read from the store at
        most once per node (see the module docstring). Raises like :func:`verify.read_verified`."""
        path = self.entry_path(wd.path(relpath), manifest)
        for _ in range(2):
            if self._off:
                break
            blob = None
            try:
                with self._locked(path):
                    copy = self._open_copy(path)
                    if copy is None:
                        blob = self._fill(wd, relpath, manifest, path)
            except OSError as e:  # the cache disk, never the store (its errors are the taxonomy's)
                self._turn_off(e)
                break
            if blob is not None:
                return load_weights_only(io.BytesIO(blob), blob[:HEAD], map_location)
            with copy:
                state = self._load_copy(copy, path, manifest, map_location)
            if state is not None:
                return state
        return _read_from_store(wd, relpath, manifest, map_location)

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(path + _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _open_copy(self, path: str) -> BinaryIO | None:
        """The copy opened (under the lock, so eviction cannot take it between), None when there is none;
        :class:`InvalidCheckpoint` when this node already found the object broken."""
        try:
            with open(path + _BAD, encoding="utf-8") as f:
                raise InvalidCheckpoint(f.read())
        except FileNotFoundError:
            pass
        try:
            copy = open(path, "rb")  # noqa: SIM115 - closed by read_verified
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(copy.fileno())  # its LRU time
        return copy

    def _fill(self, wd: WorkDir, relpath: str, manifest: Manifest, path: str) -> bytes:
        """The object's verified bytes, read from the store and left as the node's copy."""
        blob = _read_checked(wd, relpath, manifest)
        try:
            check_digest(digest_bytes(blob, manifest), manifest)
        except InvalidCheckpoint as e:
            with contextlib.suppress(OSError):
                _write_atomic(path + _BAD, str(e).encode())
            raise
        try:
            _write_atomic(path, blob)
        except OSError as e:
            self._turn_off(e)
        else:
            self._evict(keep=path)
        return blob

    def _load_copy(self, copy: BinaryIO, path: str, manifest: Manifest, map_location: Any) -> Any:
        """The state in the copy when its size and digest match; None (and the copy removed) when not."""
        size = os.fstat(copy.fileno()).st_size
        digest = new_digest(manifest.hash_alg, manifest.digest, size)
        head = b""
        while chunk := copy.read(_CHUNK):
            head = head or chunk[:HEAD]
            digest.update(chunk)
        if size != manifest.size or digest.hexdigest() != manifest.digest:
            log.warning("The node copy %s of %s is damaged; reading the checkpoint from the store again", path,
                        manifest.data)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        copy.seek(0)
        return load_weights_only(copy, head, map_location)

    def _evict(self, keep: str) -> None:
        """Remove all but the ``keep`` most recently used copies (with their markers and lock files: a fill
        racing on an evicted lock file writes the same bytes atomically)."""
        try:
            entries = [e for e in os.scandir(self.root) if e.is_file() and len(e.name) == 40]
            entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
            for entry in entries[self.keep:]:
                if entry.path != keep:
                    for suffix in ("", _BAD, _LOCK):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path + suffix)
            for entry in os.scandir(self.root):  # temp files of processes killed mid-write
                if entry.name.endswith(".tmp") and entry.stat().st_mtime < time.time() - _STALE_TEMP_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        except OSError as e:
            log.warning("Could not evict node copies in %s: %s", self.root, e)

    def _turn_off(self, error: OSError) -> None:
        if self._off:
            return
        self._off = True
        log.warning("The node copy folder %s cannot be used (%s): this process reads checkpoints from the store "
                    "itself (each rank of the node reads the whole checkpoint).", self.root,
                    os.strerror(error.errno) if error.errno else error)


def _read_checked(wd: WorkDir, relpath: str, manifest: Manifest) -> bytes:
    """The object's bytes, with the size checks of :func:`verify.read_verified`."""
    try:
        size = wd.size(relpath)
    except FileNotFoundError:
        raise InvalidCheckpoint(f"data object {manifest.data} is missing") from None
    except StorageError as e:
        raise InvalidCheckpoint(str(e)) from None
    if size != manifest.size:
        raise InvalidCheckpoint(f"data object {manifest.data} has {size} bytes but the manifest records "
                                f"{manifest.size} (truncated or replaced)")
    try:
        blob = wd.read_bytes(relpath)
    except FileNotFoundError:
        raise InvalidCheckpoint(f"data object {manifest.data} is missing") from None
    except StorageError as e:
        raise InvalidCheckpoint(str(e)) from None
    if len(blob) != size:
        raise StorageUnavailableError(f"Cannot read {wd.path(relpath)}: the store returned {len(blob)} of its "
                                      f"{size} bytes (retryable)")
    return blob


def _read_from_store(wd: WorkDir, relpath: str, manifest: Manifest, map_location: Any) -> Any:
    blob = _read_checked(wd, relpath, manifest)
    check_digest(digest_bytes(blob, manifest), manifest)
    return load_weights_only(io.BytesIO(blob), blob[:HEAD], map_location)


def _write_atomic(path: str, data: bytes) -> None:
    """Temp file + rename, without fsync: every reader verifies the digest, so a copy damaged by a crash
    is read again from the store (an fsync of 141 MB kept the node's other ranks waiting)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
