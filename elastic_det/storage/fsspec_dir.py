"""A work dir behind an fsspec URL (``s3://bucket/prefix`` first, any fsspec file system).

S3 (s3fs): a single object is never partial, but s3fs *publishes the truncated object* when an exception leaves
``with fs.open(path, "wb")``. So writes are not done in a ``with`` block: on error the file is discarded (the
multipart upload is aborted) and marked closed, so nothing is published. Exclusive creation uses
``If-None-Match: *`` (s3fs mode ``"xb"``). s3fs caches listings; every query here refreshes.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, a workload identity, ...) or from ``storage_options`` (``endpoint_url``, ``client_kwargs``,
...), which win. Every S3 request is bounded in time (``timeout``: connect and read timeouts, few retries; see
:func:`s3_options`), so a store that stops answering turns into a failed operation, not a hang.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import fsspec

from ..errors import StorageError, StorageUnavailableError
from .classify import classified, cut_mid_body, describe_error, storage_errors
from .hashing import HashingWriter
from .workdir import DEFAULT_TIMEOUT, WorkDir, digest_or_read_back, write_through

S3_ATTEMPTS = 2
"""Attempts per S3 request by botocore (standard mode: retries 5xx, SlowDown, timeouts, resets)..."""
S3FS_ATTEMPTS = 2
"""...and by s3fs around it (also retries a body cut mid-response): at most 4 tries in all."""

S3_PROTOCOLS = ("s3", "s3a")
_ENDPOINT_VARS = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class FsspecWorkDir(WorkDir):
    """A work dir at an fsspec URL. Every query invalidates fsspec's listing cache first."""

    is_local = False

    def __init__(self, url: str, storage_options: dict | None = None, timeout: float = DEFAULT_TIMEOUT):
        options = dict(storage_options or {})
        protocol, _ = fsspec.core.split_protocol(url)
        if protocol in S3_PROTOCOLS:
            options = s3_options(options, timeout)
        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ValueError, TypeError, ImportError) as e:
            raise StorageError(f"Work dir {url} is not a valid location: {describe_error(e)}") from e
        if protocol in S3_PROTOCOLS:
            self.fs.retries = S3FS_ATTEMPTS
        self._root = root.rstrip("/")
        self.protocol = protocol
        self.storage_options = options
        self.timeout = timeout

    def path(self, relpath: str) -> str:
        relpath = relpath.strip("/")
        return f"{self.url}/{relpath}" if relpath else self.url

    def fs_path(self, relpath: str) -> str:
        """``relpath`` as the file system names it (without the protocol)."""
        relpath = relpath.strip("/")
        return f"{self._root}/{relpath}" if relpath else self._root

    def write_atomic_digest(self, relpath: str, write_fn: Callable[[BinaryIO], None],
                            hash_alg: str) -> tuple[int, str, str]:
        path = self.fs_path(relpath)
        with classified(f"Cannot write {self.path(relpath)}"):
            f = self.fs.open(path, "wb")
            writer = HashingWriter(f, hash_alg=hash_alg)
            try:
                write_through(writer, write_fn)
                f.close()
            except BaseException:
                _discard(f)
                raise
            self.fs.invalidate_cache(path)
            stored = self.fs.info(path)["size"]
            if stored != writer.size:
                self.delete(relpath)
                raise StorageUnavailableError(f"Wrote {writer.size} bytes to {self.path(relpath)} but the store "
                                              f"holds {stored}; the object was deleted")
            try:
                hash_alg, digest = digest_or_read_back(writer, lambda: self.fs.open(path, "rb"))
            except BaseException:
                self.delete(relpath)
                raise
        return writer.size, hash_alg, digest

    def create_exclusive(self, relpath: str, data: bytes) -> bool:
        path = self.fs_path(relpath)
        with classified(f"Cannot create {self.path(relpath)}"):
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            finally:
                self.fs.invalidate_cache(path)
        return True

    def read_bytes(self, relpath: str) -> bytes:
        """The whole file. A read cut off mid-body is tried once more (s3fs does not retry every such cut): a
        large checkpoint should not need a relaunch for one reset connection."""
        path = self.fs_path(relpath)
        with classified(f"Cannot read {self.path(relpath)}"):
            self.fs.invalidate_cache(path)
            try:
                return self.fs.cat_file(path)
            except IsADirectoryError as e:
                raise FileNotFoundError(f"{self.path(relpath)} is a directory") from e
            except storage_errors() as e:
                if isinstance(e, FileNotFoundError) or not cut_mid_body(e):
                    raise
                return self.fs.cat_file(path)

    def size(self, relpath: str) -> int:
        path = self.fs_path(relpath)
        with classified(f"Cannot stat {self.path(relpath)}"):
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
        if info["type"] != "file":
            raise FileNotFoundError(f"{self.path(relpath)} is not a file")
        return info["size"]

    def exists(self, relpath: str) -> bool:
        path = self.fs_path(relpath)
        with classified(f"Cannot look up {self.path(relpath)}"):
            self.fs.invalidate_cache(path)
            return self.fs.exists(path)

    def listdir(self, relpath: str) -> list[str]:
        path = self.fs_path(relpath)
        with classified(f"Cannot list {self.path(relpath)}"):
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except (FileNotFoundError, NotADirectoryError):
                return []
        if [e.rstrip("/") for e in entries] == [path]:
            return []  # a file, not a directory
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def find(self, relpath: str) -> list[str]:
        """One listing on object stores (no per-directory round trips)."""
        path = self.fs_path(relpath)
        with classified(f"Cannot list {self.path(relpath)}"):
            self.fs.invalidate_cache(path)
            try:
                found = self.fs.find(path)
            except FileNotFoundError:
                return []
        prefix = path + "/"
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix))

    def delete(self, relpath: str, recursive: bool = False) -> None:
        path = self.fs_path(relpath)
        with classified(f"Cannot delete {self.path(relpath)}"):
            self.fs.invalidate_cache(path)
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(path)

    def _probe(self) -> None:
        """On S3 with short timeouts and a single attempt, so a dead endpoint or a missing bucket is reported in
        seconds."""
        fs = self._probe_fs()
        path = self.fs_path(f".write-probe-{uuid.uuid4().hex[:8]}")
        fs.pipe_file(path, b"")
        fs.rm_file(path)

    def _probe_fs(self) -> fsspec.AbstractFileSystem:
        if self.protocol not in S3_PROTOCOLS:
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
        if self.protocol not in S3_PROTOCOLS:
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

    botocore reads ``AWS_ENDPOINT_URL`` by itself, but fsspec caches filesystem instances by their arguments, so
    an endpoint that only lives in the environment would let two endpoints share one cached instance.
    ``FSSPEC_S3_ENDPOINT_URL`` is only read by fsspec at import time; it is honoured here at call time too.

    Time bounds (``config_kwargs`` given by the user win): connect within ``min(timeout, 10)`` s, wait at most
    ``timeout`` s for each read of an answer, :data:`S3_ATTEMPTS` attempts in botocore's standard retry mode
    (5xx, SlowDown, timeouts, resets), times :data:`S3FS_ATTEMPTS` in s3fs. A store that accepts connections but
    never answers fails a request after about ``4 * timeout`` s.
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


def _discard(f: Any) -> None:
    """Throw away an fsspec file opened for writing without publishing anything.

    ``discard`` aborts an S3 multipart upload; marking the file closed keeps ``close()`` (also called from
    ``__del__``) from uploading the buffered rest as a truncated object.
    """
    try:
        f.discard()
    except storage_errors():  # the abort is best effort; an unfinished upload is invisible anyway
        pass
    f.closed = True
