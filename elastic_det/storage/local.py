r"""A work dir on local disk (or a mounted file system), and durable local file operations.

Atomic write: a hidden temp file in the target directory, fsynced, ``os.replace``\ d onto the final name, the
directory fsynced. Exclusive creation writes a temp file and ``os.link``\ s it (fails when the name exists), so
the final name never shows partial content.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from typing import BinaryIO

import fsspec

from ..errors import StorageError, StorageUnavailableError
from .classify import classified
from .hashing import HashingWriter
from .workdir import DEFAULT_TIMEOUT, WorkDir, digest_or_read_back, write_through


class LocalWorkDir(WorkDir):
    """A work dir that is a local path (or ``file://`` URL)."""

    is_local = True

    def __init__(self, url: str, storage_options: dict | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.url = os.path.abspath(os.path.expanduser(fsspec.core.strip_protocol(url)))
        self.protocol = "file"
        self.storage_options = dict(storage_options or {})
        self.timeout = timeout

    def path(self, relpath: str) -> str:
        relpath = relpath.strip("/")
        return os.path.join(self.url, *relpath.split("/")) if relpath else self.url

    def write_atomic_digest(self, relpath: str, write_fn: Callable[[BinaryIO], None],
                            hash_alg: str) -> tuple[int, str, str]:
        final, parent, tmp = self._temp_beside(relpath)
        with classified(f"Cannot write {final}"):
            try:
                with open(tmp, "xb") as raw:
                    writer = HashingWriter(raw, writeback_fd=raw.fileno(), hash_alg=hash_alg)
                    write_through(writer, write_fn)
                    raw.flush()
                    os.fsync(raw.fileno())
                on_disk = os.stat(tmp).st_size
                if on_disk != writer.size:
                    raise StorageUnavailableError(f"Wrote {writer.size} bytes to {final} but {on_disk} are on disk")
                hash_alg, digest = digest_or_read_back(writer, lambda: open(tmp, "rb"))
                os.replace(tmp, final)
            except BaseException:
                unlink_quietly(tmp)
                raise
            fsync_dir(parent)
        return writer.size, hash_alg, digest

    def create_exclusive(self, relpath: str, data: bytes) -> bool:
        final, parent, tmp = self._temp_beside(relpath)
        with classified(f"Cannot create {final}"):
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    return create_without_link(final, data)  # file systems without hard links
            finally:
                unlink_quietly(tmp)
            fsync_dir(parent)
        return True

    def _temp_beside(self, relpath: str) -> tuple[str, str, str]:
        """``(final path, its directory, a hidden temp path beside it)``, the directory made durably."""
        final = self.path(relpath)
        parent = os.path.dirname(final)
        with classified(f"Cannot write {final}"):
            makedirs_durable(parent)
        return final, parent, os.path.join(parent, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp")

    def read_bytes(self, relpath: str) -> bytes:
        path = self.path(relpath)
        with classified(f"Cannot read {path}"):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except IsADirectoryError as e:
                raise FileNotFoundError(f"{path} is a directory") from e

    def size(self, relpath: str) -> int:
        path = self.path(relpath)
        with classified(f"Cannot stat {path}"):
            if os.path.isdir(path):
                raise FileNotFoundError(f"{path} is not a file")
            return os.stat(path).st_size

    def exists(self, relpath: str) -> bool:
        return os.path.exists(self.path(relpath))

    def listdir(self, relpath: str) -> list[str]:
        path = self.path(relpath)
        with classified(f"Cannot list {path}"):
            try:
                return sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []

    def find(self, relpath: str) -> list[str]:
        path = self.path(relpath)
        out = []
        for dirpath, _, files in os.walk(path):
            rel = os.path.relpath(dirpath, path)
            out += [f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in files]
        return sorted(out)

    def delete(self, relpath: str, recursive: bool = False) -> None:
        path = self.path(relpath)
        with classified(f"Cannot delete {path}"):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    if recursive:
                        shutil.rmtree(path)
                    else:
                        os.rmdir(path)
                else:
                    os.remove(path)
            except FileNotFoundError:
                return
            fsync_dir(os.path.dirname(path))

    def _probe(self) -> None:
        if os.path.exists(self.url) and not os.path.isdir(self.url):
            raise StorageError(f"Work dir {self.url} is a file, not a directory")
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        if not self.create_exclusive(probe, b""):
            raise StorageError(f"Work dir {self.url}: probe file {probe} already exists")
        self.delete(probe)


def fsync_dir(path: str) -> None:
    """Make a directory entry change (create, rename, delete) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (e.g. certain network mounts) refuse directory fsync
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """``os.makedirs`` that also fsyncs the parent of every directory it creates."""
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
        fsync_dir(os.path.dirname(directory))


def create_without_link(final: str, data: bytes) -> bool:
    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(final))
    return True


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
