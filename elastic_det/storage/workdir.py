"""A work dir: local disk or any fsspec URL (``s3://bucket/prefix`` first), with atomic writes.

``WorkDir(url)`` returns the implementation for the URL, as ``pathlib.Path`` does for the platform:
:class:`~.local.LocalWorkDir` for a path or ``file://`` URL, :class:`~.fsspec_dir.FsspecWorkDir` for
everything else. Both provide the same small protocol below; the commit primitives differ because their
atomicity does (each module's docstring says how). Everything above this package (checkpoints, the
supervisor, the report) only speaks the protocol.

Paths given to the methods are relative to the work dir and use ``/``. Storage failures raise
:class:`StorageError` (final, exit 2) or :class:`StorageUnavailableError` (retryable, exit 75) naming the full
path and the cause (see :mod:`.classify`); a missing file on read raises ``FileNotFoundError``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from typing import BinaryIO

import fsspec

from ..errors import StorageError
from .classify import STORAGE_FAILURES, describe_error, storage_error, storage_errors
from .hashing import CRC32_CHUNKED, SHA256, HashingWriter, new_digest

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
"""Seconds one request to an object store may wait (connect, or each read of its answer)."""

LOCAL_PROTOCOLS = (None, "file", "local")


class WorkDir:
    """The storage protocol of a work dir. ``WorkDir(url, storage_options, timeout)`` picks the implementation.

    Implementations provide :meth:`path`, :meth:`write_atomic_digest`, :meth:`create_exclusive`,
    :meth:`read_bytes`, :meth:`size`, :meth:`exists`, :meth:`listdir`, :meth:`find`, :meth:`delete` and
    ``_probe`` (what :meth:`check_writable` tries); the rest is built on those.
    """

    is_local: bool
    url: str
    protocol: str
    storage_options: dict
    timeout: float

    def __new__(cls, url: str, storage_options: dict | None = None, timeout: float = DEFAULT_TIMEOUT):
        if cls is WorkDir:
            protocol, _ = fsspec.core.split_protocol(url)
            if protocol in LOCAL_PROTOCOLS:
                from .local import LocalWorkDir as cls
            else:
                from .fsspec_dir import FsspecWorkDir as cls
        return super().__new__(cls)

    def __repr__(self) -> str:
        return f"WorkDir({self.url!r})"

    # The protocol ---------------------------------------------------------------------------------------

    def path(self, relpath: str) -> str:
        """The full local path or URL of ``relpath``."""
        raise NotImplementedError

    def write_atomic_digest(self, relpath: str, write_fn: Callable[[BinaryIO], None],
                            hash_alg: str) -> tuple[int, str, str]:
        """Write ``relpath`` through ``write_fn(file)``: complete, or invisible if anything fails.

        Returns ``(size, hash_alg, hex digest)`` computed while writing (see :mod:`.hashing`). For
        ``crc32/zip``, bytes that turn out not to be such a zip are read back and digested as ``crc32/64MiB``
        instead (the hash_alg returned). Exceptions raised by ``write_fn`` itself propagate unchanged (after
        cleanup); storage failures become :class:`StorageError`.
        """
        raise NotImplementedError

    def create_exclusive(self, relpath: str, data: bytes) -> bool:
        """Create ``relpath`` with ``data`` unless it exists; False when it already existed."""
        raise NotImplementedError

    def read_bytes(self, relpath: str) -> bytes:
        """The whole file."""
        raise NotImplementedError

    def size(self, relpath: str) -> int:
        """Size in bytes of the file at ``relpath`` (FileNotFoundError when missing or not a file)."""
        raise NotImplementedError

    def exists(self, relpath: str) -> bool:
        raise NotImplementedError

    def listdir(self, relpath: str) -> list[str]:
        """Sorted names in the directory ``relpath``; [] when it does not exist."""
        raise NotImplementedError

    def find(self, relpath: str) -> list[str]:
        """Every file below ``relpath``, as sorted paths relative to it; [] when it does not exist."""
        raise NotImplementedError

    def delete(self, relpath: str, recursive: bool = False) -> None:
        """Delete a file (or a directory tree with ``recursive``); nothing to delete is not an error."""
        raise NotImplementedError

    def _probe(self) -> None:
        """Create and delete a probe file, failing fast (the body of :meth:`check_writable`)."""
        raise NotImplementedError

    def _explain(self, error: BaseException) -> str:
        """What ``error`` means for this kind of store, for the not-writable message."""
        return describe_error(error)

    # Built on the protocol ------------------------------------------------------------------------------

    def write_atomic(self, relpath: str, write_fn: Callable[[BinaryIO], None]) -> tuple[int, str]:
        """:meth:`write_atomic_digest` with SHA-256: ``(size, sha256 hex)``."""
        size, _, sha256 = self.write_atomic_digest(relpath, write_fn, SHA256)
        return size, sha256

    def write_bytes_atomic(self, relpath: str, data: bytes) -> None:
        self.write_atomic(relpath, lambda f: f.write(data))

    def upload_file(self, local_path: str, relpath: str) -> None:
        """Copy a local file to ``relpath`` as one whole object (atomically), e.g. logs on object stores."""
        with open(local_path, "rb") as src:
            self.write_atomic(relpath, lambda f: shutil.copyfileobj(src, f, 8 << 20))

    def check_writable(self) -> None:
        """Create and delete a probe file; raise :class:`StorageError` (final: the location can never work)
        or :class:`StorageUnavailableError` (retryable: the store cannot be reached now) naming the URL and
        the cause, within seconds."""
        try:
            self._probe()
        except STORAGE_FAILURES as e:
            if str(e).startswith(f"Work dir {self.url} "):
                raise  # the probe said what is wrong with the location itself
            cause = e.__cause__ if e.__cause__ is not None else e
            raise type(e)(f"Work dir {self.url} is not writable: {describe_error(cause)}") from cause
        except storage_errors() as e:
            raise storage_error(f"Work dir {self.url} is not writable", e, self._explain(e)) from e


def write_through(writer: HashingWriter, write_fn: Callable[[BinaryIO], None]) -> None:
    """``write_fn(writer)``, then close the writer; a storage failure the writer saw is raised instead of
    what the serializer made of it."""
    try:
        write_fn(writer)
    except BaseException:
        writer.close()
        if writer.error is not None:
            raise writer.error from None
        raise
    writer.close()


def digest_or_read_back(writer: HashingWriter, open_written: Callable[[], BinaryIO]) -> tuple[str, str]:
    """``(hash_alg, digest)`` of what ``writer`` wrote; read back and digested as ``crc32/64MiB`` when its
    own hash_alg cannot describe the bytes (a ``crc32/zip`` that was not such a zip)."""
    digest = writer.hexdigest()
    if digest is not None:
        return writer.hash_alg, digest
    log.warning("Checkpoint data is not a zip with CRC-32s as torch.save writes it; digesting it by reading it "
                "back (slower)")
    chunked = new_digest(CRC32_CHUNKED)
    with open_written() as f:
        while chunk := f.read(8 << 20):
            chunked.update(chunk)
    return CRC32_CHUNKED, chunked.hexdigest()


__all__ = ["DEFAULT_TIMEOUT", "StorageError", "WorkDir", "digest_or_read_back", "write_through"]
