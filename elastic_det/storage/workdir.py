"""A work dir on local disk or behind any fsspec URL (``s3://bucket/prefix`` first), with atomic writes.

Everything goes through fsspec. The commit primitives differ per backend because their atomicity does:

* **local**: write a hidden temp file in the target directory, fsync it, ``os.replace`` it onto the final
  name, fsync the directory. Exclusive creation writes a temp file and ``os.link``\\ s it (fails when the
  name exists), so the final name never shows partial content.
* **S3** (s3fs): a single object is never partial, but s3fs *publishes the truncated object* when an
  exception leaves ``with fs.open(path, "wb")``. So writes are not done in a ``with`` block: on error the
  file is discarded (the multipart upload is aborted) and marked closed, so nothing is published. Exclusive
  creation uses ``If-None-Match: *`` (s3fs mode ``"xb"``). s3fs caches listings; every query here refreshes.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, a workload identity, ...) or from ``storage_options``
(``endpoint_url``, ``client_kwargs``, ...), which win.

Every S3 request is bounded in time (``timeout``: connect and read timeouts, few retries; see
:func:`s3_options`), so a store that stops answering turns into a failed operation, not a hang.

Failures are classified by :mod:`.classify` (final: exit 2, or retryable: exit 75).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import fsspec

from ..errors import StorageError, StorageUnavailableError
from .classify import STORAGE_FAILURES, cut_mid_body, describe_error, storage_error, storage_errors
from .hashing import CRC32_CHUNKED, SHA256, HashingWriter, new_digest
from .local import create_without_link, fsync_dir, makedirs_durable, unlink_quietly

log = logging.getLogger(__name__)


DEFAULT_TIMEOUT = 10.0
"""Seconds one S3 request may wait for the store (connect, or each read of its answer)."""

S3_ATTEMPTS = 2
"""Attempts per S3 request by botocore (standard mode: retries 5xx, SlowDown, timeouts, resets)..."""
S3FS_ATTEMPTS = 2
"""...and by s3fs around it (also retries a body cut mid-response): at most 4 tries in all."""

_ENDPOINT_VARS = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class WorkDir:
    """A work dir on local disk or any fsspec URL (``s3://...``).

    Paths given to the methods are relative to the work dir and use ``/``. Storage failures raise
    :class:`StorageError` naming the full path and the cause; a missing file on read raises
    ``FileNotFoundError``.
    """

    def __init__(self, url: str, storage_options: dict | None = None, timeout: float = DEFAULT_TIMEOUT):
        options = dict(storage_options or {})
        self.timeout = timeout
        protocol, _ = fsspec.core.split_protocol(url)
        self.is_local = protocol in (None, "file", "local")
        if self.is_local:
            self.url = os.path.abspath(os.path.expanduser(fsspec.core.strip_protocol(url)))
            self.fs = fsspec.filesystem("file")
            self._root = self.url
        else:
            if protocol in ("s3", "s3a"):
                options = s3_options(options, timeout)
            self.url = url.rstrip("/")
            try:
                self.fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            except (ValueError, TypeError, ImportError) as e:
                raise StorageError(f"Work dir {url} is not a valid location: {describe_error(e)}") from e
            if protocol in ("s3", "s3a"):
                self.fs.retries = S3FS_ATTEMPTS
            self._root = self._root.rstrip("/")
        self.protocol = protocol or "file"
        self.storage_options = options

    def __repr__(self) -> str:
        return f"WorkDir({self.url!r})"

    # ------------------------------------------------------------------------------------------------
    # Paths

    def path(self, relpath: str) -> str:
        """The full local path or URL of ``relpath``."""
        relpath = relpath.strip("/")
        if not relpath:
            return self.url
        if self.is_local:
            return os.path.join(self.url, *relpath.split("/"))
        return f"{self.url}/{relpath}"

    def _fs_path(self, relpath: str) -> str:
        relpath = relpath.strip("/")
        if self.is_local:
            return self.path(relpath)
        return f"{self._root}/{relpath}" if relpath else self._root

    # ------------------------------------------------------------------------------------------------
    # Writes

    def write_atomic(self, relpath: str, write_fn: Callable[[BinaryIO], None]) -> tuple[int, str]:
        """Write ``relpath`` through ``write_fn(file)``: complete, or invisible if anything fails.

        Returns ``(size, sha256 hex)`` computed while writing. Exceptions raised by ``write_fn`` itself
        propagate unchanged (after cleanup); storage failures become :class:`StorageError`.
        """
        size, _, sha256 = self.write_atomic_digest(relpath, write_fn, SHA256)
        return size, sha256

    def write_atomic_digest(self, relpath: str, write_fn: Callable[[BinaryIO], None],
                            hash_alg: str) -> tuple[int, str, str]:
        """:meth:`write_atomic` with the digest by ``hash_alg`` (see :mod:`.hashing`): ``(size, hash_alg,
        hex digest)``. For ``crc32/zip``, bytes that turn out not to be such a zip are read back and
        digested as ``crc32/64MiB`` instead (the hash_alg returned)."""
        try:
            if self.is_local:
                return self._write_local(relpath, write_fn, hash_alg)
            return self._write_remote(relpath, write_fn, hash_alg)
        except STORAGE_FAILURES:
            raise
        except storage_errors() as e:
            raise storage_error(f"Cannot write {self.path(relpath)}", e) from e

    def write_bytes_atomic(self, relpath: str, data: bytes) -> None:
        self.write_atomic(relpath, lambda f: f.write(data))

    def upload_file(self, local_path: str, relpath: str) -> None:
        """Copy a local file to ``relpath`` as one whole object (atomically), e.g. logs on object stores."""
        with open(local_path, "rb") as src:
            self.write_atomic(relpath, lambda f: shutil.copyfileobj(src, f, 8 << 20))

    def create_exclusive(self, relpath: str, data: bytes) -> bool:
        """Create ``relpath`` with ``data`` unless it exists; False when it already existed."""
        try:
            if self.is_local:
                return self._create_local(relpath, data)
            return self._create_remote(relpath, data)
        except storage_errors() as e:
            raise storage_error(f"Cannot create {self.path(relpath)}", e) from e

    def _local_temp(self, relpath: str) -> tuple[str, str, str]:
        """``(final path, its directory, a hidden temp path beside it)``, the directory made durably."""
        final = self.path(relpath)
        parent = os.path.dirname(final)
        makedirs_durable(parent)
        return final, parent, os.path.join(parent, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp")

    def _write_local(self, relpath: str, write_fn: Callable[[BinaryIO], None],
                     hash_alg: str) -> tuple[int, str, str]:
        final, parent, tmp = self._local_temp(relpath)
        try:
            with open(tmp, "xb") as raw:
                writer = HashingWriter(raw, writeback_fd=raw.fileno(), hash_alg=hash_alg)
                try:
                    write_fn(writer)
                except BaseException:
                    if writer.error is not None:
                        raise writer.error from None  # the storage failure, not what the serializer made of it
                    raise
                finally:
                    writer.close()
                raw.flush()
                os.fsync(raw.fileno())
            on_disk = os.stat(tmp).st_size
            if on_disk != writer.size:
                raise StorageUnavailableError(f"Wrote {writer.size} bytes to {final} but {on_disk} are on disk")
            hash_alg, digest = _digest_or_read_back(writer, lambda: open(tmp, "rb"))
            os.replace(tmp, final)
        except BaseException:
            unlink_quietly(tmp)
            raise
        fsync_dir(parent)
        return writer.size, hash_alg, digest

    def _write_remote(self, relpath: str, write_fn: Callable[[BinaryIO], None],
                      hash_alg: str) -> tuple[int, str, str]:
        path = self._fs_path(relpath)
        f = self.fs.open(path, "wb")
        writer = HashingWriter(f, hash_alg=hash_alg)
        try:
            write_fn(writer)
            writer.close()
            f.close()
        except BaseException:
            writer.close()
            _discard(f)
            if writer.error is not None:
                raise writer.error from None  # the storage failure, not what the serializer made of it
            raise
        self.fs.invalidate_cache(path)
        stored = self.fs.info(path)["size"]
        if stored != writer.size:
            self.delete(relpath)
            raise StorageUnavailableError(f"Wrote {writer.size} bytes to {self.path(relpath)} but the store "
                                          f"holds {stored}; the object was deleted")
        try:
            hash_alg, digest = _digest_or_read_back(writer, lambda: self.fs.open(path, "rb"))
        except BaseException:
            self.delete(relpath)
            raise
        return writer.size, hash_alg, digest

    def _create_local(self, relpath: str, data: bytes) -> bool:
        final, parent, tmp = self._local_temp(relpath)
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

    def _create_remote(self, relpath: str, data: bytes) -> bool:
        path = self._fs_path(relpath)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True

    # ------------------------------------------------------------------------------------------------
    # Reads and listings (never served from a stale cache)

    def read_bytes(self, relpath: str) -> bytes:
        """The whole file. On object stores a read cut off mid-body is tried once more (s3fs does not
        retry every such cut): a large checkpoint should not need a relaunch for one reset connection."""
        path = self._fs_path(relpath)
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    return f.read()
            self.fs.invalidate_cache(path)
            try:
                return self.fs.cat_file(path)
            except storage_errors() as e:
                if not cut_mid_body(e):
                    raise
                return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except IsADirectoryError as e:
            raise FileNotFoundError(f"{self.path(relpath)} is a directory") from e
        except storage_errors() as e:
            raise storage_error(f"Cannot read {self.path(relpath)}", e) from e

    def size(self, relpath: str) -> int:
        """Size in bytes of the file at ``relpath`` (FileNotFoundError when missing)."""
        path = self._fs_path(relpath)
        try:
            if self.is_local:
                return os.stat(path).st_size
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
        except FileNotFoundError:
            raise
        except storage_errors() as e:
            raise storage_error(f"Cannot stat {self.path(relpath)}", e) from e
        if info["type"] != "file":
            raise FileNotFoundError(f"{self.path(relpath)} is not a file")
        return info["size"]

    def exists(self, relpath: str) -> bool:
        path = self._fs_path(relpath)
        if self.is_local:
            return os.path.exists(path)
        self.fs.invalidate_cache(path)
        try:
            return self.fs.exists(path)
        except storage_errors() as e:
            raise storage_error(f"Cannot look up {self.path(relpath)}", e) from e

    def listdir(self, relpath: str) -> list[str]:
        """Sorted names in the directory ``relpath``; [] when it does not exist."""
        path = self._fs_path(relpath)
        try:
            if self.is_local:
                return sorted(os.listdir(path))
            self.fs.invalidate_cache(path)
            entries = self.fs.ls(path, detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except storage_errors() as e:
            raise storage_error(f"Cannot list {self.path(relpath)}", e) from e
        if [e.rstrip("/") for e in entries] == [path]:
            return []  # a file, not a directory
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def find(self, relpath: str) -> list[str]:
        """Every file below ``relpath``, as sorted paths relative to it; [] when it does not exist.

        One listing on object stores (no per-directory round trips).
        """
        path = self._fs_path(relpath)
        if self.is_local:
            out = []
            for dirpath, _, files in os.walk(path):
                rel = os.path.relpath(dirpath, path)
                out += [f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in files]
            return sorted(out)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        except storage_errors() as e:
            raise storage_error(f"Cannot list {self.path(relpath)}", e) from e
        prefix = path + "/"
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix))

    def delete(self, relpath: str, recursive: bool = False) -> None:
        """Delete a file (or a directory tree with ``recursive``); nothing to delete is not an error."""
        path = self._fs_path(relpath)
        try:
            if self.is_local:
                if os.path.isdir(path) and not os.path.islink(path):
                    if recursive:
                        shutil.rmtree(path)
                    else:
                        os.rmdir(path)
                else:
                    os.remove(path)
                fsync_dir(os.path.dirname(path))
                return
            self.fs.invalidate_cache(path)
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        except storage_errors() as e:
            raise storage_error(f"Cannot delete {self.path(relpath)}", e) from e
        finally:
            if not self.is_local:
                self.fs.invalidate_cache(path)

    # ------------------------------------------------------------------------------------------------
    # Probing

    def check_writable(self) -> None:
        """Create and delete a probe file; raise naming the URL and the cause.

        :class:`StorageError` (final) when the location can never work, :class:`StorageUnavailableError`
        (retryable) when the store cannot be reached now. On object stores the probe uses short timeouts
        and a single attempt, so a dead endpoint or a missing bucket is reported in seconds.
        """
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.is_local:
                if not self.create_exclusive(probe, b""):
                    raise StorageError(f"Work dir {self.url}: probe file {probe} already exists")
                self.delete(probe)
                return
            fs = self._probe_fs()
            path = self._fs_path(probe)
            fs.pipe_file(path, b"")
            fs.rm_file(path)
        except STORAGE_FAILURES as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            raise type(e)(f"Work dir {self.url} is not writable: {describe_error(cause)}") from cause
        except storage_errors() as e:
            raise storage_error(f"Work dir {self.url} is not writable", e, self._explain(e)) from e

    def _probe_fs(self) -> fsspec.AbstractFileSystem:
        if self.protocol not in ("s3", "s3a"):
            return self.fs
        options = dict(self.storage_options)
        config = dict(options.get("config_kwargs") or {})
        config["connect_timeout"] = min(3.0, config.get("connect_timeout", 3.0))
        config["read_timeout"] = min(10.0, config.get("read_timeout", 10.0))
        config["retries"] = {"total_max_attempts": 1}
        options["config_kwargs"] = config
        fs = type(self.fs)(skip_instance_cache=True, **options)
        fs.retries = 1
        return fs

    def _explain(self, error: BaseException) -> str:
        text = describe_error(error)
        if self.protocol not in ("s3", "s3a"):
            return text
        endpoint = (self.storage_options.get("endpoint_url")
                    or (self.storage_options.get("client_kwargs") or {}).get("endpoint_url")
                    or "the default AWS endpoint")
        bucket = self._root.split("/", 1)[0]
        name = type(error).__name__
        if isinstance(error, FileNotFoundError):
            return f"no such bucket '{bucket}' at {endpoint} ({text})"
        if isinstance(error, PermissionError):
            return f"access denied to bucket '{bucket}' at {endpoint} ({text})"
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return ("no AWS credentials found: give the job AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    f"AWS_PROFILE, or a workload identity (an IAM role, IRSA) in its environment ({text})")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            return f"endpoint {endpoint} unreachable: {text}"
        return text


def s3_options(options: dict, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """``storage_options`` for s3fs: the endpoint from the environment when not given, and time bounds.

    botocore reads ``AWS_ENDPOINT_URL`` by itself, but fsspec caches filesystem instances by their
    arguments, so an endpoint that only lives in the environment would let two endpoints share one
    cached instance. ``FSSPEC_S3_ENDPOINT_URL`` is only read by fsspec at import time; it is honoured here
    at call time too.

    Time bounds (``config_kwargs`` given by the user win): connect within ``min(timeout, 10)`` s, wait at
    most ``timeout`` s for each read of an answer, :data:`S3_ATTEMPTS` attempts in botocore's standard
    retry mode (5xx, SlowDown, timeouts, resets), times :data:`S3FS_ATTEMPTS` in s3fs. A store that
    accepts connections but never answers fails a request after about ``4 * timeout`` s.
    """
    options = dict(options)
    client_kwargs = options.get("client_kwargs") or {}
    if not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        for var in _ENDPOINT_VARS:
            if os.environ.get(var):
                options["endpoint_url"] = os.environ[var]
                break
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", min(float(timeout), 10.0))
    config.setdefault("read_timeout", float(timeout))
    config.setdefault("retries", {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"})
    options["config_kwargs"] = config
    return options


def _digest_or_read_back(writer: HashingWriter, open_written: Callable[[], BinaryIO]) -> tuple[str, str]:
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


def _discard(f: Any) -> None:
    """Throw away an fsspec file opened for writing without publishing anything.

    ``discard`` aborts an S3 multipart upload; marking the file closed keeps ``close()`` (also called
    from ``__del__``) from uploading the buffered rest as a truncated object.
    """
    try:
        f.discard()
    except storage_errors():  # the abort is best effort; an unfinished upload is invisible anyway
        pass
    f.closed = True
