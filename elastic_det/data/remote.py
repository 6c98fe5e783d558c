"""Dataset files behind URLs (``s3://bucket/coco/...`` or any fsspec protocol), with errors that name the URL.

Storage options and credentials follow the work dir's rules (:mod:`elastic_det.storage.fsspec_dir`): the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...) or
``data.storage_options``, which win. They live in memory only.

Failures are sorted by what relaunching can do about them: a missing object or a denied bucket is bad
input (:class:`DataError`, exit 2); an endpoint that cannot be reached, times out or answers 5xx is an
outage (:class:`StorageUnavailableError`, exit 75, retryable).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import fsspec

from ..errors import DataError, StorageUnavailableError
from ..storage import describe_error, is_final, s3_options, storage_errors
from ..storage.classify import lacks_credentials

T = TypeVar("T")

_LOCAL_PROTOCOLS = (None, "file", "local")


def is_url(path: str) -> bool:
    """True for a path with a remote protocol (``s3://...``); local paths and ``file://`` are not."""
    return fsspec.core.split_protocol(path)[0] not in _LOCAL_PROTOCOLS


def join(root: str, name: str) -> str:
    """``root/name`` for a local folder or a URL prefix."""
    if is_url(root):
        return f"{root.rstrip('/')}/{name.lstrip('/')}"
    return os.path.join(root, name)


class RemoteFiles:
    """Reads of remote dataset files. Picklable (DataLoader workers): the filesystem is made per process."""

    def __init__(self, storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self._fs: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}

    def __getstate__(self) -> dict:
        return {"storage_options": self.storage_options, "_fs": {}}

    def endpoint(self, url: str) -> str:
        """The endpoint that ``url`` is read from, for messages ("" for the protocol's default)."""
        protocol = fsspec.core.split_protocol(url)[0]
        options = self._options(protocol)
        return options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url") or ""

    def _options(self, protocol: str | None) -> dict[str, Any]:
        options = dict(self.storage_options)
        if protocol in ("s3", "s3a"):
            options = s3_options(options)  # the work dir's endpoint rules and time bounds
        return options

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem of ``url`` (made once per process and protocol) and the path in it."""
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        key = (os.getpid(), protocol)
        fs = self._fs.get(key)
        if fs is None:
            fs = fsspec.filesystem(protocol, **self._options(protocol))
            self._fs[key] = fs
        return fs, fs._strip_protocol(url)

    # --------------------------------------------------------------------------------------------------

    def info(self, url: str, what: str = "File") -> dict[str, Any]:
        """fsspec's ``info`` of a file (``size``, and ``ETag`` on S3); DataError when it is missing."""
        fs, path = self.filesystem(url)
        info = self._call(url, what, lambda: fs.info(path))
        if info.get("type") != "file":
            raise DataError(f"{what} not found: {url} (it is a folder)")
        return info

    def read_bytes(self, url: str, what: str = "File") -> bytes:
        fs, path = self.filesystem(url)
        return self._call(url, what, lambda: fs.cat_file(path))

    def open(self, url: str, what: str = "File") -> BinaryIO:
        """A file object for streaming reads; every read of it checks the object's ETag (s3fs)."""
        fs, path = self.filesystem(url)
        return self._call(url, what, lambda: fs.open(path, "rb", block_size=8 << 20, cache_type="none"))

    def read_many(self, urls: list[str], what: str = "File") -> list[bytes]:
        """Many small files at once (concurrent requests), in the order given."""
        if not urls:
            return []
        fs, _ = self.filesystem(urls[0])
        paths = [self.filesystem(u)[1] for u in urls]
        found = self._call(urls[0], what, lambda: fs.cat(paths, on_error="return"))
        out = []
        for url, path in zip(urls, paths, strict=True):
            value = found.get(path, FileNotFoundError(path))
            if isinstance(value, BaseException):
                raise self.error(url, what, value)
            out.append(value)
        return out

    def check_folder(self, url: str, what: str) -> None:
        """DataError unless ``url`` is a prefix with objects below it (one short listing on S3)."""
        fs, path = self.filesystem(url)
        info = self._call(url, what, lambda: fs.info(path))
        if info.get("type") != "directory":
            raise DataError(f"{what} {url} is a file, not a folder")

    def listing(self, url: str, what: str) -> dict[str, dict[str, Any]]:
        """Every file below ``url``: relative path -> info (one paginated listing on object stores)."""
        fs, path = self.filesystem(url)
        found = self._call(url, what, lambda: fs.find(path, detail=True))
        prefix = path.rstrip("/") + "/"
        return {p[len(prefix):]: i for p, i in found.items() if p.startswith(prefix)}

    def _call(self, url: str, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (*storage_errors(), ValueError) as e:
            raise self.error(url, what, e) from e

    def error(self, url: str, what: str, error: BaseException) -> Exception:
        """The taxonomy's error for a failed read of ``url``: DataError (final) or StorageUnavailableError."""
        if isinstance(error, (DataError, StorageUnavailableError)):
            return error
        cause = describe_error(error)
        if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return DataError(f"{what} not found: {url} ({cause})")
        if isinstance(error, PermissionError):
            return DataError(f"Access denied to {url} ({cause}): check the credentials (AWS environment or "
                             f"data.storage_options) and the bucket's policy.")
        if lacks_credentials(error):
            return DataError(f"No credentials to read {url} ({cause}): set AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a workload identity).")
        if isinstance(error, ValueError) or is_final(error):
            return DataError(f"Cannot read {url}: {cause}")
        endpoint = self.endpoint(url) or "the default endpoint"
        return StorageUnavailableError(f"Cannot reach {url} at {endpoint} ({cause}); the store is unreachable "
                                       f"or failing right now: relaunching may help.")
